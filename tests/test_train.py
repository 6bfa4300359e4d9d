"""`python -m twins_tf.train`: bad inputs, flagfiles, kill-and-resume, multi-worker, schedule.

Subprocess runs (a fresh TensorFlow each: ~5 s of start-up) are kept to the cases that need a
process of their own: the command-line error format, a run killed with SIGKILL and restarted,
and two workers of a multi-worker job.  Everything else calls `training.loop.run` in this process.
"""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from binaries_testlib import (
    FINETUNE_ARGS,
    REPO_ROOT,
    assert_same_weights,
    binary_command,
    file_snapshot,
    finetune_run,
    multi_worker_job,
    read_weights,
    run_binary,
    settings,
    source_run,
    subprocess_env,
)

from twins_tf.training import backup, loop, run_callbacks, trainer_setup
from twins_tf.training import model_dir as run_files
from twins_tf.training.schedule import learning_rate_schedule
from twins_tf.training.settings import Settings, SetupError


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    return source_run(tmp_path_factory) / run_files.BEST_WEIGHTS


@pytest.fixture(scope="module")
def one_epoch_run(tmp_path_factory, pretrained):
    """model_dir of the cached fine-tuning run's settings stopped after its first epoch
    (`--epochs=1`; the schedule has no decay, so epoch 1 is the same as in 2-epoch runs)."""
    model_dir = tmp_path_factory.mktemp("one_epoch") / "run"
    loop.run(settings("train", _args(pretrained, model_dir, "--epochs=1")), verbose=0)
    return model_dir


def _args(pretrained, model_dir, *extra):
    return [*FINETUNE_ARGS, f"--pretrained={pretrained}", f"--model_dir={model_dir}", *extra]


def _refused(args, model_dir, match):
    """Runs train with `args`, expects a one-line SetupError matching `match`, nothing written."""
    before = file_snapshot(model_dir)
    with pytest.raises(SetupError) as error:
        loop.run(settings("train", args), verbose=0)
    message = str(error.value)
    assert "\n" not in message
    assert re.search(match, message), message
    assert file_snapshot(model_dir) == before
    return message


# --- bad input: one-line errors before anything runs -------------------------------------------
def test_unknown_dataset(tmp_path, pretrained):
    model_dir = tmp_path / "run"
    message = _refused(
        _args(pretrained, model_dir, "--dataset=imagenet21k"),
        model_dir,
        "Unknown dataset 'imagenet21k'",
    )
    assert "cifar10" in message and "stanford_dogs" in message  # the choices are listed
    assert not model_dir.exists()


def test_unknown_arch(tmp_path, pretrained):
    _refused(
        _args(pretrained, tmp_path / "run", "--arch=resnet19"),
        tmp_path / "run",
        "Unknown arch 'resnet19'; choose one of .*resnet18",
    )


def test_missing_image_folder(tmp_path, pretrained):
    _refused(
        _args(
            pretrained,
            tmp_path / "run",
            "--dataset=folder",
            f"--data_dir={tmp_path / 'no_such_dir'}",
        ),
        tmp_path / "run",
        "--data_dir=.*no_such_dir does not exist",
    )


def test_missing_tfds_data_fails_at_once(tmp_path, pretrained):
    started = time.time()
    message = _refused(
        _args(
            pretrained,
            tmp_path / "run",
            "--dataset=cifar10",
            "--image_size=32",
            f"--tfds_data_dir={tmp_path / 'tfds'}",
        ),
        tmp_path / "run",
        "cifar10.*not prepared",
    )
    assert time.time() - started < 30  # no download retries
    assert "tfds build cifar10" in message


def test_pretrained_of_another_arch(tmp_path, pretrained):
    _refused(
        _args(pretrained, tmp_path / "run", "--arch=resnet34"),
        tmp_path / "run",
        r"--pretrained: .*does not hold resnet34 weights.*resnet18",
    )


def test_corrupt_pretrained_file(tmp_path):
    corrupt = tmp_path / "corrupt.weights.h5"
    corrupt.write_bytes(b"\x89HDF\r\n\x1a\n" + os.urandom(300))
    _refused(
        _args(corrupt, tmp_path / "run"),
        tmp_path / "run",
        "--pretrained: .*corrupt, truncated or not a Keras weights file",
    )


def test_missing_pretrained_file(tmp_path):
    _refused(
        _args(tmp_path / "nothing.weights.h5", tmp_path / "run"),
        tmp_path / "run",
        "--pretrained: .*not found",
    )


def test_odd_batch_for_a_twin_method(tmp_path, pretrained):
    _refused(
        _args(pretrained, tmp_path / "run", "--batch_size=15"),
        tmp_path / "run",
        r"--batch_size=15 must be a multiple of 2 x 1 replica",
    )


def test_batch_not_divisible_by_two_times_the_replicas(tmp_path, pretrained):
    # conftest gives this process two logical CPUs: MirroredStrategy has 2 replicas.
    _refused(
        _args(pretrained, tmp_path / "run", "--strategy=mirrored", "--batch_size=18"),
        tmp_path / "run",
        r"--batch_size=18 must be a multiple of 2 x 2 replica",
    )


@pytest.mark.parametrize("flag", ["--attack_eps=8", "--attack_eps=-0.01", "--attack_step=2"])
def test_attack_radius_outside_the_unit_interval(tmp_path, pretrained, flag):
    _refused(
        _args(pretrained, tmp_path / "run", flag), tmp_path / "run", r"outside \[0, 1\].*8/255"
    )


def test_unknown_method(tmp_path, pretrained):
    _refused(
        _args(pretrained, tmp_path / "run", "--method=mart"),
        tmp_path / "run",
        "Unknown --method='mart'.*twins_trades",
    )


def test_refuses_a_model_dir_holding_a_run_with_other_settings(tmp_path_factory, tmp_path):
    finished = finetune_run(tmp_path_factory)
    pretrained = json.loads((finished / "config.json").read_text())["pretrained"]
    message = _refused(
        _args(pretrained, finished, "--lr=0.5", "--lambda_twins=1.0"),
        finished,
        "holds a run with different settings",
    )
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
    assert run_files.differing_keys(stored, now) == []
    assert run_files.differing_keys(stored, {**now, "lr": 0.2}) == ["lr"]
    # --precision changes what is trained (the attack's numerics too): part of the run
    stored, now = {**stored, "precision": "float32"}, {**now, "precision": "float32"}
    assert run_files.differing_keys(stored, {**now, "precision": "bfloat16"}) == ["precision"]


def test_command_line_error_is_one_line_and_nonzero(tmp_path):
    result = run_binary(
        "train",
        ["--dataset=digits_5_9", "--arch=resnet19", f"--model_dir={tmp_path / 'run'}"],
        timeout=120,
    )
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


@pytest.mark.parametrize(
    "flagfile", sorted((REPO_ROOT / "flags").glob("*.flags")), ids=lambda p: p.stem
)
def test_every_shipped_flagfile_is_a_valid_train_configuration(flagfile):
    checked = _checked_settings(
        settings(
            "train",
            [f"--flagfile={flagfile}", "--model_dir=unused", "--pretrained=source.weights.h5"],
        )
    )
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
            raise AssertionError(
                f"the run ended (code {process.returncode}) before the kill:\n"
                + process.stderr.read()[-2000:]
            )
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
    reference = subprocess.Popen(
        command(reference_dir), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **options
    )
    victim = subprocess.Popen(
        command(killed_dir), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **options
    )
    metadata = killed_dir / "backup" / "training_metadata.json"
    _wait_for(lambda: metadata.exists() and '"epoch": 1' in metadata.read_text(), victim)
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=60)
    assert victim.returncode == -signal.SIGKILL
    assert not (killed_dir / "summary.json").exists()
    assert [r.split(",")[0] for r in (killed_dir / "metrics.csv").read_text().splitlines()[1:]] in (
        ["1"],
        ["1", "2"],
    )  # epoch 2 may have been logged before its backup

    resumed = subprocess.run(command(killed_dir), capture_output=True, timeout=300, **options)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming after epoch" in resumed.stdout
    _, reference_err = reference.communicate(timeout=300)
    assert reference.returncode == 0, reference_err[-3000:]

    assert_same_weights(reference_dir / "last.weights.h5", killed_dir / "last.weights.h5")
    assert_same_weights(reference_dir / "best.weights.h5", killed_dir / "best.weights.h5")
    assert (reference_dir / "metrics.csv").read_text() == (killed_dir / "metrics.csv").read_text()
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
@pytest.mark.slow  # ~50 s; test_distributed_runs runs the same job with --init
def test_two_workers_on_loopback_end_with_identical_weights(tmp_path, pretrained):
    """Two local processes of one MultiWorkerMirroredStrategy job (TF_CONFIG on 127.0.0.1)
    train together; the chief writes into model_dir, the other worker into model_dir/worker_1,
    and both end with the same weights, equal to a 2-replica MirroredStrategy run's."""
    model_dir = tmp_path / "multi_worker"
    args = _args(pretrained, model_dir, "--strategy=multi_worker", "--epochs=1")
    for returncode, out, err in multi_worker_job(binary_command("train", args), timeout=400):
        assert returncode == 0, err[-3000:]
        assert "2 replica(s)" in out
    chief_weights = model_dir / "last.weights.h5"
    worker_weights = model_dir / "worker_1" / "last.weights.h5"
    assert_same_weights(chief_weights, worker_weights)
    assert (model_dir / "tensorboard").is_dir()
    assert not (model_dir / "worker_1" / "tensorboard").exists()  # only the chief logs

    # The same job as one process with two replicas (conftest's two logical CPUs).
    mirrored_dir = tmp_path / "mirrored"
    loop.run(
        settings("train", _args(pretrained, mirrored_dir, "--strategy=mirrored", "--epochs=1")),
        verbose=0,
    )
    a, b = read_weights(chief_weights), read_weights(mirrored_dir / "last.weights.h5")
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-5, err_msg=key)


def test_bfloat16_run_keeps_float32_weights_and_restores_the_policy(tmp_path, pretrained):
    import keras

    model_dir = tmp_path / "bf16"
    summary = loop.run(
        settings("train", _args(pretrained, model_dir, "--epochs=1", "--precision=bfloat16")),
        verbose=0,
    )
    assert keras.config.dtype_policy().name == "float32"
    assert json.loads((model_dir / "config.json").read_text())["precision"] == "bfloat16"
    assert json.loads((model_dir / "summary.json").read_text())["precision"] == "bfloat16"
    assert np.isfinite(summary["final"]["loss"]) and summary["best_epoch"] == 1
    saved = read_weights(model_dir / "best.weights.h5")
    assert {v.dtype for v in saved.values()} == {np.dtype("float32")}


# --- the learning-rate schedule ----------------------------------------------------------------
def test_learning_rate_is_divided_by_ten_from_each_decay_epoch_on():
    schedule = learning_rate_schedule(0.3, [2, 4], steps_per_epoch=5)
    steps = np.arange(0, 30)
    expected = 0.3 * 0.1 ** ((steps >= 10).astype(int) + (steps >= 20).astype(int))
    actual = np.array([float(schedule(int(k))) for k in steps])
    np.testing.assert_allclose(actual, expected, rtol=1e-6)
    assert learning_rate_schedule(0.3, [], steps_per_epoch=5) == 0.3


# --- no silent failure: divergence, valid JSON, random init --------------------------------------
def _strict_json(path):
    """Parses `path` as standard JSON: Python's NaN/Infinity extensions are refused."""

    def refuse(constant):
        raise ValueError(f"{path} holds a bare {constant}, which is not JSON")

    return json.loads(pathlib.Path(path).read_text(), parse_constant=refuse)


def test_json_writer_writes_non_finite_numbers_as_null(tmp_path):
    path = tmp_path / "report.json"
    run_files.write_json(
        path,
        {
            "loss": float("nan"),
            "rows": [np.float32("inf"), 1.5],
            "nested": {"acc": -float("inf"), "n": np.int64(3)},
        },
    )
    assert _strict_json(path) == {
        "loss": None,
        "rows": [None, 1.5],
        "nested": {"acc": None, "n": 3},
    }


def test_a_twin_method_without_pretrained_weights_is_refused(tmp_path):
    model_dir = tmp_path / "run"
    for method in ("twins_at", "twins_trades"):
        message = _refused(
            [*FINETUNE_ARGS, f"--method={method}", f"--model_dir={model_dir}"],
            model_dir,
            f"--method={method} fine-tunes a pre-trained model but no --pretrained was given",
        )
        assert "--allow_random_init" in message
    checked = _checked_settings(
        settings("train", [*FINETUNE_ARGS, "--allow_random_init", f"--model_dir={model_dir}"])
    )
    assert checked["twin"] and checked["pretrained"] is None
    _checked_settings(
        settings("train", [*FINETUNE_ARGS, "--method=at", f"--model_dir={model_dir}"])
    )  # plain: fine


def test_paths_in_the_settings_are_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    checked = _checked_settings(
        settings(
            "train",
            [
                *FINETUNE_ARGS,
                "--model_dir=runs/a",
                "--data_dir=data/../images",
                "--tfds_data_dir=tfds",
                "--pretrained=source.weights.h5",
            ],
        )
    )
    assert checked["model_dir"] == str(tmp_path / "runs" / "a")
    assert checked["data_dir"] == str(tmp_path / "images")
    assert checked["tfds_data_dir"] == str(tmp_path / "tfds")
    assert checked["pretrained"] == str(tmp_path / "source.weights.h5")


def _unconverged_source(pretrained, path, scale=1e-2):
    """`pretrained` with every BN moving variance times `scale`: statistics far from those
    the network computes, as of a source stopped long before convergence."""
    import keras

    from twins_tf.models.resnet import build_resnet

    model = build_resnet("resnet18", 5, twin=False, input_shape=(16, 16, 3), upsample=1)
    model.load_weights(pretrained)
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_variance.assign(layer.moving_variance.numpy() * scale)
    model.save_weights(path)
    return path


def test_a_twin_run_from_unconverged_bn_statistics_stops_with_the_cause(tmp_path, pretrained):
    """The issue's divergence: the Frozen wing's logits explode, the loss becomes NaN; the
    run stops at that step naming the source's BN statistics, and writes no weights."""
    source = _unconverged_source(pretrained, tmp_path / "unconverged.weights.h5")
    model_dir = tmp_path / "run"
    with pytest.raises(run_callbacks.DivergenceError) as error:
        loop.run(settings("train", _args(source, model_dir)), verbose=0)
    message = str(error.value)
    assert "\n" not in message
    match = re.match(
        r"training diverged: the training loss became (nan|inf) at step (\d) "
        r"\(epoch 1, batch (\d) of 4\); the Frozen wing's max \|logit\| on a "
        r"batch of the task.s images was (\S+) at the start: the source's BatchNorm "
        r"statistics \(--pretrained\) are far from converged",
        message,
    )
    assert match, message
    assert match.group(2) == match.group(3)
    assert not float(match.group(4)) <= 1e3
    assert message.endswith("no epoch had finished, so no weights were saved.")
    assert not any(
        (model_dir / n).exists()
        for n in ("best.weights.h5", "last.weights.h5", "summary.json", "metrics.csv")
    )
    _strict_json(model_dir / "config.json")


def test_divergence_in_a_later_epoch_keeps_the_last_finite_epoch(
    tmp_path, pretrained, monkeypatch, one_epoch_run
):
    """An infinite learning rate from the first step of epoch 2 on: the weights are NaN
    after that step, so the loss of step 6 is; every file the run keeps is that of epoch 1
    (equal to a 1-epoch run's), all valid JSON."""
    import keras

    class Exploding(keras.optimizers.schedules.LearningRateSchedule):
        def __init__(self, lr, steps_per_epoch):
            self.lr, self.steps_per_epoch = lr, steps_per_epoch

        def __call__(self, step):
            return keras.ops.where(step >= self.steps_per_epoch, float("inf"), self.lr)

    def exploding(lr, decay_epochs, steps_per_epoch):
        return Exploding(lr, steps_per_epoch)

    # make_trainer (twins_tf.training.trainer_setup) looks the schedule up in its module
    monkeypatch.setattr(trainer_setup, "learning_rate_schedule", exploding)
    model_dir = tmp_path / "run"
    with pytest.raises(
        run_callbacks.DivergenceError,
        match=re.escape("the training loss became nan at step 6 (epoch 2, batch 2 of 4)"),
    ) as error:
        loop.run(settings("train", _args(pretrained, model_dir)), verbose=0)
    assert str(error.value).endswith("last.weights.h5 keeps epoch 1, the last finite one.")
    assert_same_weights(one_epoch_run / "last.weights.h5", model_dir / "last.weights.h5")
    assert_same_weights(one_epoch_run / "best.weights.h5", model_dir / "best.weights.h5")
    assert _strict_json(model_dir / "best.json")["epoch"] == 1
    assert [r["epoch"] for r in run_callbacks.read_metrics(model_dir / "metrics.csv")] == [1]
    assert not (model_dir / "summary.json").exists()


def test_the_diverging_binary_exits_nonzero_with_one_line(tmp_path, pretrained):
    source = _unconverged_source(pretrained, tmp_path / "unconverged.weights.h5")
    result = run_binary("train", _args(source, tmp_path / "run"), timeout=400)
    assert result.returncode == 1, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "train: error: training diverged: the training loss became nan at step "
    ), result.stderr[-3000:]
    assert "source's BatchNorm statistics" in last
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "best.weights.h5").exists()


# --- extending a finished run, the validation protocol ----------------------------------------
def test_a_finished_run_is_extended_by_raising_epochs(
    tmp_path, tmp_path_factory, pretrained, one_epoch_run, capsys
):
    """The finished 1-epoch run, started again with --epochs=2, resumes from its backup and
    ends with the weights of the uninterrupted 2-epoch run."""
    import shutil

    two_epochs = finetune_run(tmp_path_factory)  # the same settings with --epochs=2
    model_dir = tmp_path / "extended"
    shutil.copytree(one_epoch_run, model_dir)
    capsys.readouterr()
    summary = loop.run(settings("train", _args(pretrained, model_dir, "--epochs=2")), verbose=0)
    assert "resuming after epoch 1" in capsys.readouterr().out
    assert summary["epochs"] == 2
    assert_same_weights(two_epochs / "last.weights.h5", model_dir / "last.weights.h5")
    assert_same_weights(two_epochs / "best.weights.h5", model_dir / "best.weights.h5")
    assert (two_epochs / "metrics.csv").read_text() == (model_dir / "metrics.csv").read_text()
    assert _strict_json(model_dir / "config.json")["epochs"] == 2

    _refused(
        _args(pretrained, model_dir, "--epochs=1"),
        model_dir,
        r"has trained 2 epochs; --epochs=1 cannot undo them",
    )
    message = _refused(
        _args(pretrained, model_dir, "--epochs=3", "--lr_decay_epochs=2"),
        model_dir,
        r"lr_decay_epochs: \[\] in the run, \[2\] now",
    )
    assert "learning-rate schedule the trained epochs followed" in message


def test_validation_none_trains_on_the_whole_train_split_and_keeps_the_final_epoch(
    tmp_path, pretrained
):
    from twins_tf import data as data_lib

    model_dir = tmp_path / "run"
    args = [
        a
        for a in _args(pretrained, model_dir, "--validation=none")
        if not a.startswith("--max_train_examples")
    ] + ["--max_train_examples=32"]
    prepared = loop.prepare(settings("train", args))
    carved = data_lib.load_splits("digits_5_9").num_examples
    assert carved["validation"] > 0
    # nothing carved out: the train split is carve's train and validation together
    assert prepared.splits.num_examples["train"] == carved["train"] + carved["validation"]
    assert prepared.splits.validation is None
    summary = loop.fit(prepared, verbose=0)
    assert summary["best_epoch"] == 2 and summary["best_val_adv_acc"] is None
    best = _strict_json(model_dir / "best.json")
    assert best["epoch"] == 2 and best["selection"] == "final epoch (--validation=none)"
    assert_same_weights(model_dir / "best.weights.h5", model_dir / "last.weights.h5")
    rows = run_callbacks.read_metrics(model_dir / "metrics.csv")
    assert [r["epoch"] for r in rows] == [1, 2]
    assert not [k for k in rows[0] if k.startswith("val_")]
    _strict_json(model_dir / "summary.json")

    from binaries_testlib import evaluate_settings

    from twins_tf import evaluation

    with pytest.raises(
        SetupError,
        match=r"--validation=none\), so it has no held-out "
        "validation split: use --split=test",
    ):
        evaluation.evaluate(
            evaluate_settings([f"--model_dir={model_dir}", "--split=validation", "--attacks=clean"])
        )


# --- a kill while the backup is written -----------------------------------------------------
# Runs the train binary with h5py patched to SIGKILL the process in the middle of writing
# backup/latest.weights.h5 of epoch 2: after 20 of its arrays, flushed to disk, so the file
# left behind opens but is cut short (harder than an empty file: Keras's own fallback only
# catches files that do not open).
_KILL_DURING_BACKUP = """
import os, runpy, signal, sys
import h5py

create_dataset = h5py.Group.create_dataset
written = []

def create_and_maybe_die(self, name, *args, **kwargs):
    dataset = create_dataset(self, name, *args, **kwargs)
    backup = os.path.dirname(self.file.filename)
    metadata = os.path.join(backup, "training_metadata.json")
    if (self.file.filename.endswith(os.path.join("backup", "latest.weights.h5"))
            and os.path.exists(metadata) and '"epoch": 1' in open(metadata).read()):
        written.append(name)
        if len(written) == 20:
            self.file.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    return dataset

h5py.Group.create_dataset = create_and_maybe_die
sys.path.insert(0, os.getcwd())  # the checkout's twins_tf (the test runs in REPO_ROOT)
sys.argv = ["twins_tf.train", *sys.argv[1:]]
runpy.run_module("twins_tf.train", run_name="__main__", alter_sys=True)
"""


def test_a_kill_while_the_backup_is_written_resumes_from_the_previous_epoch(tmp_path, pretrained):
    """Killed in the middle of writing epoch 2's backup, the run restarts from epoch 1's
    (BackupAndRestore's double_checkpoint) and ends with an uninterrupted run's weights."""
    driver = tmp_path / "kill_during_backup.py"
    driver.write_text(_KILL_DURING_BACKUP)
    reference_dir, killed_dir = tmp_path / "uninterrupted", tmp_path / "killed"
    args = [*FINETUNE_ARGS, "--epochs=3", "--deterministic", f"--pretrained={pretrained}"]
    options = dict(cwd=REPO_ROOT, env=subprocess_env(), text=True)
    reference = subprocess.Popen(
        binary_command("train", [*args, f"--model_dir={reference_dir}"]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        **options,
    )
    victim = subprocess.run(
        [sys.executable, str(driver), *args, f"--model_dir={killed_dir}"],
        capture_output=True,
        timeout=400,
        **options,
    )
    assert victim.returncode == -signal.SIGKILL, victim.stderr[-3000:]
    _, reference_err = reference.communicate(timeout=400)
    assert reference.returncode == 0, reference_err[-3000:]
    backup = killed_dir / "backup"
    try:
        cut = read_weights(backup / "latest.weights.h5")
    except OSError:
        cut = {}
    whole = read_weights(reference_dir / "backup" / "latest.weights.h5")
    assert 0 < len(cut) < len(whole)  # the latest backup opens but is cut short
    assert json.loads((backup / "training_metadata.json").read_text())["epoch"] == 1

    resumed = subprocess.run(
        binary_command("train", [*args, f"--model_dir={killed_dir}"]),
        capture_output=True,
        timeout=400,
        **options,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming after epoch 1" in resumed.stdout
    for name in ("last.weights.h5", "best.weights.h5"):
        assert_same_weights(reference_dir / name, killed_dir / name)
    assert (reference_dir / "metrics.csv").read_text() == (killed_dir / "metrics.csv").read_text()


def _backup_pair(backup, epoch, arrays=3, suffix=""):
    """A weights file of `arrays` arrays and its metadata, as BackupAndRestore writes them."""
    import h5py

    backup.mkdir(exist_ok=True)
    with h5py.File(backup / f"latest.weights.h5{suffix}", "w") as f:
        for i in range(arrays):
            f.create_dataset(f"layers/dense/vars/{i}", data=np.full(4, epoch, "float32"))
    (backup / f"training_metadata.json{suffix}").write_text(json.dumps({"epoch": epoch}))


def test_resume_epoch_and_repair_of_a_backup_killed_while_written(tmp_path):
    backup_dir = tmp_path / "backup"
    _backup_pair(backup_dir, 1, suffix=".bkp")
    _backup_pair(backup_dir, 2)
    assert backup.resume_epoch(tmp_path) == 2  # both pairs whole: the latest
    # weights cut short (2 of 3 arrays), metadata not yet rewritten: epoch 1's pair
    _backup_pair(backup_dir, 2, arrays=2)
    (backup_dir / "training_metadata.json").write_text(json.dumps({"epoch": 1}))
    assert backup.resume_epoch(tmp_path) == 1
    backup.repair_backup(tmp_path)
    restored = read_weights(backup_dir / "latest.weights.h5")
    assert sorted(restored) == [f"layers/dense/vars/{i}" for i in range(3)]
    assert all(np.all(v == 1) for v in restored.values())
    # weights whole, metadata half written
    _backup_pair(backup_dir, 2)
    (backup_dir / "training_metadata.json").write_text('{"epo')
    assert backup.resume_epoch(tmp_path) == 1
    # the first backup cut short: nothing to resume, start from epoch 0
    for p in backup_dir.iterdir():
        p.unlink()
    (backup_dir / "latest.weights.h5").write_bytes(b"\x89HDF\r\n\x1a\n")
    assert backup.resume_epoch(tmp_path) == 0
    backup.repair_backup(tmp_path)
    assert not (backup_dir / "latest.weights.h5").exists()
    # a broken latest pair and no previous one: refused, not silently restarted
    (backup_dir / "latest.weights.h5").write_bytes(b"\x89HDF\r\n\x1a\n")
    (backup_dir / "training_metadata.json").write_text(json.dumps({"epoch": 3}))
    with pytest.raises(SetupError, match="is broken .* no usable previous backup: delete"):
        backup.resume_epoch(tmp_path)


def test_a_run_written_before_the_validation_and_random_init_flags_still_resumes(tmp_path):
    model_dir = tmp_path / "run"
    checked = _checked_settings(
        settings("train", [*FINETUNE_ARGS, "--pretrained=x.weights.h5", f"--model_dir={model_dir}"])
    )
    older = {
        k: v
        for k, v in checked.items()
        if k not in ("validation", "allow_random_init", "skip_bad_images")
    }
    run_files.write_config(model_dir, older)
    assert run_files.check_model_dir(str(model_dir), checked) == "resume"
    with pytest.raises(SetupError, match="validation: 'carve' in the run, 'none' now"):
        run_files.check_model_dir(str(model_dir), {**checked, "validation": "none"})


def test_a_deterministic_run_leaves_op_determinism_as_it_found_it(tmp_path, pretrained):
    """--deterministic is TensorFlow-global: a later run in the process must not inherit it."""
    from tensorflow.python.framework import config as tf_config

    assert not tf_config.is_op_determinism_enabled()
    # refused after prepare() has turned determinism on (the batch check comes later)
    with pytest.raises(SetupError, match="batch"):
        loop.run(
            settings(
                "train", _args(pretrained, tmp_path / "run", "--deterministic", "--batch_size=15")
            ),
            verbose=0,
        )
    assert not tf_config.is_op_determinism_enabled()


def _checked_settings(settings):
    """The settings dict config.json stores: every value checked, dataset defaults filled in."""
    return Settings.from_dict(settings).to_dict()
