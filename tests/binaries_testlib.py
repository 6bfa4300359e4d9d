"""Shared pieces of the binaries' tests: tiny settings, cached runs, subprocess helpers.

A training run costs tens of seconds even at 16 pixels, so the runs several test modules read
(the tiny PGD-AT source model, a TWINS-AT fine-tuning of it) are made once per session and
cached here rather than in per-module fixtures.
"""

import os
import pathlib
import socket
import subprocess
import sys

import h5py
import numpy as np
from absl import flags

from twins_tf.training import flags as run_flags
from twins_tf.training import model_dir as run_files

REPO_ROOT = pathlib.Path(__file__).absolute().parent.parent

# ResNet-18 on 16-pixel digits, one PGD step: seconds per epoch on a laptop CPU.
TINY = [
    "--arch=resnet18",
    "--image_size=16",
    "--batch_size=16",
    "--attack_steps=1",
    "--attack_eps=8/255",
    "--attack_step=4/255",
    "--max_train_examples=64",
    "--max_validation_examples=32",
    "--lr_decay_epochs=",
    "--seed=7",
]
SOURCE_ARGS = [
    "--dataset=digits_0_4",
    *TINY,
    "--method=at",
    "--epochs=2",
    "--lr=0.02",
    "--weight_decay=5e-4",
]
FINETUNE_ARGS = [
    "--dataset=digits_5_9",
    *TINY,
    "--method=twins_at",
    "--epochs=2",
    "--lr=0.01",
    "--weight_decay=1e-4",
    "--lambda_twins=0.5",
]

_CACHE = {}


def settings(binary, args):
    """Settings of `python -m twins_tf.<binary> <args>`, parsed as the binary parses them."""
    return run_flags.settings_from_args(binary, args)


def evaluate_settings(args):
    """Settings of `python -m twins_tf.evaluate <args>`, parsed as the binary parses them."""
    from twins_tf.evaluation import flags as evaluation_flags

    flag_values = flags.FlagValues()
    evaluation_flags.define_flags(flag_values)
    flag_values(["evaluate", *args])
    return evaluation_flags.settings_from_flags(flag_values)


def source_run(tmp_path_factory):
    """model_dir of a finished tiny `pretrain` run (PGD-AT on digits 0-4), made once."""
    if "source" not in _CACHE:
        from twins_tf.training import loop

        model_dir = tmp_path_factory.mktemp("source") / "run"
        loop.run(settings("pretrain", [*SOURCE_ARGS, f"--model_dir={model_dir}"]), verbose=0)
        _CACHE["source"] = model_dir
    return _CACHE["source"]


def finetune_run(tmp_path_factory):
    """model_dir of a finished tiny TWINS-AT `train` run from the source run, made once."""
    if "finetune" not in _CACHE:
        from twins_tf.training import loop

        pretrained = source_run(tmp_path_factory) / run_files.BEST_WEIGHTS
        model_dir = tmp_path_factory.mktemp("finetune") / "run"
        loop.run(
            settings(
                "train", [*FINETUNE_ARGS, f"--pretrained={pretrained}", f"--model_dir={model_dir}"]
            ),
            verbose=0,
        )
        _CACHE["finetune"] = model_dir
    return _CACHE["finetune"]


def evaluated_examples(model_dir, count):
    """The --max_examples subset `evaluate` takes of a run's test split (class-stratified,
    in split order), as (images, labels) arrays."""
    from twins_tf import data as data_lib

    config = run_files.read_config(model_dir)
    spec = data_lib.get_dataset_spec(config["dataset"], image_size=config["image_size"])
    images, labels = zip(*[(x.numpy(), y.numpy()) for x, y in data_lib.load_splits(spec).test])
    rows = data_lib.stratified_indices(np.array(labels), count)
    return np.stack(images)[rows], np.array(labels)[rows]


def model_of_run(model_dir, *, twin=False):
    """(the run's config.json settings, its `build_model` network with the best weights),
    built in the global dtype policy."""
    from twins_tf.models import build_model

    config = run_files.read_config(model_dir)
    model = build_model(
        config["arch"],
        config["num_classes"],
        twin=twin,
        input_shape=(config["image_size"], config["image_size"], 3),
    )
    model.load_weights(pathlib.Path(model_dir) / run_files.BEST_WEIGHTS)
    return config, model


def read_weights(path):
    """{h5 dataset path: array} of a `.weights.h5` file, read with h5py (not Keras)."""
    arrays = {}
    with h5py.File(path, "r") as f:
        f.visititems(
            lambda name, obj: (
                arrays.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None
            )
        )
    return arrays


def assert_same_weights(path_a, path_b):
    a, b = read_weights(path_a), read_weights(path_b)
    assert sorted(a) == sorted(b)
    differing = [k for k in a if not np.array_equal(a[k], b[k])]
    assert not differing, f"{len(differing)} of {len(a)} arrays differ, e.g. {differing[:3]}"
    assert all(np.all(np.isfinite(v)) for v in a.values() if v.dtype.kind == "f")


def binary_command(module, args):
    return [sys.executable, "-m", f"twins_tf.{module}", *args]


def subprocess_env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    env.update(TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1", **extra)
    return env


def multi_worker_job(command, *, workers=2, timeout=600, **env):
    """Runs `command` (a list of words) as the `workers` processes of one
    MultiWorkerMirroredStrategy job on loopback (TF_CONFIG on 127.0.0.1, free ports) and
    waits for them; returns [(returncode, stdout, stderr)] by worker index."""
    import json

    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(workers)]}
    processes = [
        subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            text=True,
            env=subprocess_env(
                TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}}),
                **env,
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for i in range(workers)
    ]
    try:
        outputs = [process.communicate(timeout=timeout) for process in processes]
    finally:
        for process in processes:
            process.kill()
    return [(process.returncode, out, err) for process, (out, err) in zip(processes, outputs)]


def run_binary(module, args, *, timeout=300, **env):
    """Runs `python -m twins_tf.<module> <args>` to completion; returns the CompletedProcess."""
    return subprocess.run(
        binary_command(module, args),
        cwd=REPO_ROOT,
        env=subprocess_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def free_ports(count):
    """`count` TCP ports on 127.0.0.1 that were free a moment ago."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def file_snapshot(directory):
    """{relative path: bytes} of every file under `directory` (to show nothing changed)."""
    directory = pathlib.Path(directory)
    if not directory.exists():
        return {}
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }
