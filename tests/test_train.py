"""`python -m twins_tf.train`: bad inputs, flagfiles, kill-and-resume, multi-worker, schedule.

Subprocess runs (a fresh TensorFlow each: ~5 s of start-up) are kept to the cases that need a
process of their own: the command-line error format, a run killed with SIGKILL and restarted,
and two workers of a multi-worker job.  Everything else calls `train.run` in this process.
"""
import json
import os
import pathlib
import re
import signal
import subprocess
import time

import numpy as np
import pytest

from binaries_testlib import (
    FINETUNE_ARGS, REPO_ROOT, TINY, assert_same_weights, binary_command, file_snapshot,
    finetune_run, free_ports, read_weights, run_binary, settings, source_run, subprocess_env)
from twins_tf import run_config, train
from twins_tf.run_config import SetupError


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    return source_run(tmp_path_factory) / run_config.BEST_WEIGHTS


def _args(pretrained, model_dir, *extra):
    return [*FINETUNE_ARGS, f"--pretrained={pretrained}", f"--model_dir={model_dir}", *extra]


def _refused(args, model_dir, match):
    """Runs train with `args`, expects a one-line SetupError matching `match`, nothing written."""
    before = file_snapshot(model_dir)
    with pytest.raises(SetupError) as error:
        train.run(settings("train", args), verbose=0)
    message = str(error.value)
    assert "\n" not in message
    assert re.search(match, message), message
    assert file_snapshot(model_dir) == before
    return message


# --- bad input: one-line errors before anything runs -------------------------------------------
def test_unknown_dataset(tmp_path, pretrained):
    model_dir = tmp_path / "run"
    message = _refused(_args(pretrained, model_dir, "--dataset=imagenet21k"), model_dir,
                       "Unknown dataset 'imagenet21k'")
    assert "cifar10" in message and "stanford_dogs" in message  # the choices are listed
    assert not model_dir.exists()


def test_unknown_arch(tmp_path, pretrained):
    _refused(_args(pretrained, tmp_path / "run", "--arch=resnet19"), tmp_path / "run",
             "Unknown arch 'resnet19'; choose one of .*resnet18")


def test_missing_image_folder(tmp_path, pretrained):
    _refused(_args(pretrained, tmp_path / "run", "--dataset=folder",
                   f"--data_dir={tmp_path / 'no_such_dir'}"),
             tmp_path / "run", "--data_dir=.*no_such_dir does not exist")


def test_missing_tfds_data_fails_at_once(tmp_path, pretrained):
    started = time.time()
    message = _refused(_args(pretrained, tmp_path / "run", "--dataset=cifar10",
                             "--image_size=32", f"--tfds_data_dir={tmp_path / 'tfds'}"),
                       tmp_path / "run", "cifar10.*not prepared")
    assert time.time() - started < 30  # no download retries
    assert "tfds build cifar10" in message


def test_pretrained_of_another_arch(tmp_path, pretrained):
    _refused(_args(pretrained, tmp_path / "run", "--arch=resnet34"), tmp_path / "run",
             r"--pretrained: .*does not hold resnet34 weights.*resnet18")


def test_corrupt_pretrained_file(tmp_path):
    corrupt = tmp_path / "corrupt.weights.h5"
    corrupt.write_bytes(b"\x89HDF\r\n\x1a\n" + os.urandom(300))
    _refused(_args(corrupt, tmp_path / "run"), tmp_path / "run",
             "--pretrained: .*corrupt, truncated or not a Keras weights file")


def test_missing_pretrained_file(tmp_path):
    _refused(_args(tmp_path / "nothing.weights.h5", tmp_path / "run"), tmp_path / "run",
             "--pretrained: .*not found")


def test_odd_batch_for_a_twin_method(tmp_path, pretrained):
    _refused(_args(pretrained, tmp_path / "run", "--batch_size=15"), tmp_path / "run",
             r"--batch_size=15 must be a multiple of 2 x 1 replica")


def test_batch_not_divisible_by_two_times_the_replicas(tmp_path, pretrained):
    # conftest gives this process two logical CPUs: MirroredStrategy has 2 replicas.
    _refused(_args(pretrained, tmp_path / "run", "--strategy=mirrored", "--batch_size=18"),
             tmp_path / "run", r"--batch_size=18 must be a multiple of 2 x 2 replica")


@pytest.mark.parametrize("flag", ["--attack_eps=8", "--attack_eps=-0.01", "--attack_step=2"])
def test_attack_radius_outside_the_unit_interval(tmp_path, pretrained, flag):
    _refused(_args(pretrained, tmp_path / "run", flag), tmp_path / "run",
             r"outside \[0, 1\].*8/255")


def test_unknown_method(tmp_path, pretrained):
    _refused(_args(pretrained, tmp_path / "run", "--method=mart"), tmp_path / "run",
             "Unknown --method='mart'.*twins_trades")


def test_refuses_a_model_dir_holding_a_run_with_other_settings(tmp_path_factory, tmp_path):
    finished = finetune_run(tmp_path_factory)
    pretrained = json.loads((finished / "config.json").read_text())["pretrained"]
    message = _refused(_args(pretrained, finished, "--lr=0.5", "--lambda_twins=1.0"), finished,
                       "holds a run with different settings")
    assert "lambda_twins: 0.5 in the run, 1.0 now" in message
    assert "lr: 0.01 in the run, 0.5 now" in message


def test_refuses_a_model_dir_with_run_files_but_no_config(tmp_path, pretrained):
    model_dir = tmp_path / "run"
    model_dir.mkdir()
    (model_dir / "best.weights.h5").write_bytes(b"weights of some other run")
    _refused(_args(pretrained, model_dir), model_dir, "holds best.weights.h5 but no config.json")


def test_location_and_execution_flags_may_change_between_restarts():
    stored = {"lr": 0.1, "data_dir": "/a", "strategy": "default", "jit_compile": "auto"}
    now = {"lr": 0.1, "data_dir": "/b", "strategy": "mirrored", "jit_compile": "false"}
    assert run_config.differing_keys(stored, now) == []
    assert run_config.differing_keys(stored, {**now, "lr": 0.2}) == ["lr"]


def test_command_line_error_is_one_line_and_nonzero(tmp_path):
    result = run_binary("train", ["--dataset=digits_5_9", "--arch=resnet19",
                                  f"--model_dir={tmp_path / 'run'}"], timeout=120)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("train: error: Unknown arch 'resnet19'; choose one of")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


# --- flagfiles ---------------------------------------------------------------------------------
def _flagfile_values(path):
    """{flag: value} of a flagfile, read as plain text (independent of absl)."""
    values = {}
    for line in pathlib.Path(path).read_text().splitlines():
        line = line.strip()
        if line.startswith("--") and "=" in line:
            name, value = line[2:].split("=", 1)
            values[name] = value
    return values


@pytest.mark.parametrize("flagfile", sorted((REPO_ROOT / "flags").glob("*.flags")),
                         ids=lambda p: p.stem)
def test_every_shipped_flagfile_is_a_valid_train_configuration(flagfile):
    checked = run_config.check_settings(settings("train", [f"--flagfile={flagfile}",
                                                           "--model_dir=unused"]))
    for name, text in _flagfile_values(flagfile).items():
        value = checked[name]
        if "/" in text and name.startswith("attack_"):
            numerator, denominator = text.split("/")
            assert value == pytest.approx(float(numerator) / float(denominator)), name
        elif name == "lr_decay_epochs":
            assert value == [int(e) for e in text.split(",")]
        elif name == "dataset":
            assert value in (text, "caltech_birds2011")  # cub200 is an alias
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            assert value == pytest.approx(float(text)), name
        else:
            assert str(value) == text, name


# --- kill and resume ---------------------------------------------------------------------------
def _wait_for(predicate, process, timeout=240):
    deadline = time.time() + timeout
    while not predicate():
        if process.poll() is not None:
            raise AssertionError(f"the run ended (code {process.returncode}) before the kill:\n"
                                 + process.stderr.read()[-2000:])
        if time.time() > deadline:
            process.kill()
            raise AssertionError("timed out waiting for the first epoch's backup")
        time.sleep(0.05)


def test_flagfile_run_and_sigkill_resume_give_the_uninterrupted_weights(tmp_path, pretrained):
    """A run killed after its first epoch, started again with the same command, ends with
    bit-identical weights and metrics to an uninterrupted run; both read a flagfile."""
    flagfile = tmp_path / "tiny.flags"
    lines = [*FINETUNE_ARGS, "--epochs=3", "--deterministic", f"--pretrained={pretrained}"]
    flagfile.write_text("# the kill-and-resume test's run\n" + "\n".join(lines) + "\n")
    reference_dir, killed_dir = tmp_path / "uninterrupted", tmp_path / "killed"

    def command(model_dir):
        return binary_command("train", [f"--flagfile={flagfile}", f"--model_dir={model_dir}"])

    options = dict(cwd=REPO_ROOT, env=subprocess_env(), text=True)
    reference = subprocess.Popen(command(reference_dir), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, **options)
    victim = subprocess.Popen(command(killed_dir), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, **options)
    metadata = killed_dir / "backup" / "training_metadata.json"
    _wait_for(lambda: metadata.exists() and '"epoch": 1' in metadata.read_text(), victim)
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=60)
    assert victim.returncode == -signal.SIGKILL
    assert not (killed_dir / "summary.json").exists()
    assert [r.split(",")[0] for r in (killed_dir / "metrics.csv").read_text().splitlines()[1:]
            ] in (["1"], ["1", "2"])  # epoch 2 may have been logged before its backup

    resumed = subprocess.run(command(killed_dir), capture_output=True, timeout=300, **options)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming after epoch" in resumed.stdout
    _, reference_err = reference.communicate(timeout=300)
    assert reference.returncode == 0, reference_err[-3000:]

    assert_same_weights(reference_dir / "last.weights.h5", killed_dir / "last.weights.h5")
    assert_same_weights(reference_dir / "best.weights.h5", killed_dir / "best.weights.h5")
    assert ((reference_dir / "metrics.csv").read_text()
            == (killed_dir / "metrics.csv").read_text())
    assert len((killed_dir / "metrics.csv").read_text().splitlines()) == 1 + 3

    # The flagfile's values are the run's settings.
    config = json.loads((reference_dir / "config.json").read_text())
    for name, text in _flagfile_values(flagfile).items():
        if name in ("attack_eps", "attack_step"):
            numerator, denominator = text.split("/")
            assert config[name] == pytest.approx(int(numerator) / int(denominator))
        elif name == "lr_decay_epochs":
            assert config[name] == []
        elif name in ("deterministic",):
            assert config[name] is True
        elif isinstance(config[name], (int, float)):
            assert config[name] == pytest.approx(float(text)), name
        else:
            assert str(config[name]) == text, name
    assert config["model_dir"] == str(reference_dir)
    # The training moved away from the pre-trained weights.
    start, end = read_weights(pretrained), read_weights(reference_dir / "last.weights.h5")
    assert not np.array_equal(start["layers/conv2d/vars/0"], end["layers/conv2d/vars/0"])


# --- multi-worker ------------------------------------------------------------------------------
def test_two_workers_on_loopback_end_with_identical_weights(tmp_path, pretrained):
    """Two local processes of one MultiWorkerMirroredStrategy job (TF_CONFIG on 127.0.0.1)
    train together; the chief writes into model_dir, the other worker into model_dir/worker_1,
    and both end with the same weights, equal to a 2-replica MirroredStrategy run's."""
    model_dir = tmp_path / "multi_worker"
    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    args = _args(pretrained, model_dir, "--strategy=multi_worker", "--epochs=1")
    workers = []
    for index in range(2):
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        workers.append(subprocess.Popen(
            binary_command("train", args), cwd=REPO_ROOT, text=True,
            env=subprocess_env(TF_CONFIG=tf_config), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE))
    outputs = []
    try:
        for worker in workers:
            outputs.append(worker.communicate(timeout=400))
    finally:
        for worker in workers:
            worker.kill()
    for worker, (out, err) in zip(workers, outputs):
        assert worker.returncode == 0, err[-3000:]
        assert "2 replica(s)" in out
    chief_weights = model_dir / "last.weights.h5"
    worker_weights = model_dir / "worker_1" / "last.weights.h5"
    assert_same_weights(chief_weights, worker_weights)
    assert (model_dir / "tensorboard").is_dir()
    assert not (model_dir / "worker_1" / "tensorboard").exists()  # only the chief logs

    # The same job as one process with two replicas (conftest's two logical CPUs).
    mirrored_dir = tmp_path / "mirrored"
    train.run(settings("train", _args(pretrained, mirrored_dir, "--strategy=mirrored",
                                      "--epochs=1")), verbose=0)
    a, b = read_weights(chief_weights), read_weights(mirrored_dir / "last.weights.h5")
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-5, err_msg=key)


def test_mixed_bfloat16_run_keeps_float32_weights_and_restores_the_policy(tmp_path, pretrained):
    import keras

    model_dir = tmp_path / "bf16"
    summary = train.run(settings("train", _args(pretrained, model_dir, "--epochs=1",
                                                "--mixed_precision=mixed_bfloat16")), verbose=0)
    assert keras.config.dtype_policy().name == "float32"
    assert json.loads((model_dir / "config.json").read_text())["mixed_precision"] == (
        "mixed_bfloat16")
    assert np.isfinite(summary["final"]["loss"]) and summary["best_epoch"] == 1
    saved = read_weights(model_dir / "best.weights.h5")
    assert {v.dtype for v in saved.values()} == {np.dtype("float32")}


# --- the learning-rate schedule ----------------------------------------------------------------
def test_learning_rate_is_divided_by_ten_from_each_decay_epoch_on():
    schedule = train.learning_rate_schedule(0.3, [2, 4], steps_per_epoch=5)
    steps = np.arange(0, 30)
    expected = 0.3 * 0.1 ** ((steps >= 10).astype(int) + (steps >= 20).astype(int))
    actual = np.array([float(schedule(int(k))) for k in steps])
    np.testing.assert_allclose(actual, expected, rtol=1e-6)
    assert train.learning_rate_schedule(0.3, [], steps_per_epoch=5) == 0.3
