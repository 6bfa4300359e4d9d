"""Records that survive any kill: every file a run or `convert` writes, killed at every write.

A kill is injected, never timed.  `KillAt(root, n)` wraps the calls through which files under
`root` get written and raises `Killed` at the n-th write boundary:
  * `open(path, <writing>)`: the kill comes with the file just created or emptied;
  * closing a writable `h5py.File`: once whole, once cut to half its bytes (does not open),
    once holding half its arrays (opens, cut short), the three states a kill during an HDF5
    write leaves;
  * `os.replace`: just before the rename and just after it.
`Killed` is a BaseException, as a kill runs no `except Exception` clean-up.  Each test runs the
operation with n = 1, 2, ... until it completes unkilled, and after each kill plays the restart
without the patches and checks what the restart reads: every boundary is killed once.
"""

import builtins
import json
import os

import h5py
import keras
import numpy as np
import pytest
from binaries_testlib import read_weights, source_run
from torch_resnet import torch_resnet

from twins_tf import weights
from twins_tf.models.resnet import build_resnet
from twins_tf.platform import atomic_files, keras_private
from twins_tf.training import backup, run_callbacks
from twins_tf.training import model_dir as run_files


class Killed(BaseException):
    """The process died here."""


class KillAt:
    """Kills the n-th write boundary under `root` (see the module's docstring)."""

    def __init__(self, root, n):
        self.root = os.path.abspath(root) + os.sep
        self.n = n
        self.count = 0
        self.label = None  # where the kill came; None: the operation ran to its end

    def _under_root(self, path):
        return isinstance(path, (str, os.PathLike)) and os.path.abspath(path).startswith(self.root)

    def _boundary(self, label, state=None):
        self.count += 1
        if self.count == self.n:
            if state is not None:
                state()
            self.label = label
            raise Killed(label)

    def install(self, monkeypatch):
        real_open, real_replace, real_close = builtins.open, os.replace, h5py.File.close

        def open_(file, mode="r", *args, **kwargs):
            handle = real_open(file, mode, *args, **kwargs)
            if self._under_root(file) and set(mode) & set("wax+"):
                try:
                    self._boundary(f"{os.path.basename(file)} opened to write")
                except Killed:
                    handle.close()
                    raise
            return handle

        def replace(source, target, *args, **kwargs):
            if not self._under_root(target):
                return real_replace(source, target, *args, **kwargs)
            names = f"{os.path.basename(source)} -> {os.path.basename(target)}"
            self._boundary(f"before renaming {names}")
            real_replace(source, target, *args, **kwargs)
            self._boundary(f"renamed {names}")

        def close(file):
            if not file.id.valid or file.mode == "r" or not self._under_root(file.filename):
                return real_close(file)
            path = file.filename
            real_close(file)
            name = os.path.basename(path)
            self._boundary(f"{name} written whole")
            self._boundary(f"{name} cut to half its bytes", lambda: _cut_bytes(path))
            self._boundary(f"{name} holding half its arrays", lambda: _cut_arrays(path, real_close))

        monkeypatch.setattr(builtins, "open", open_)
        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(h5py.File, "close", close)


def _cut_bytes(path):
    os.truncate(path, os.path.getsize(path) // 2)


def _cut_arrays(path, real_close):
    f = h5py.File(path, "r+")
    names = []
    f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    for name in names[len(names) // 2 :]:
        del f[name]
    real_close(f)


def kill_at_every_boundary(tmp_path, setup, operation, restart):
    """For n = 1, 2, ...: `setup(directory)` in a fresh directory, `operation(directory)` killed
    at its n-th write boundary there, then `restart(directory, label)` (label None once the
    operation ran unkilled, which ends the loop).  Returns the labels of the kills."""
    labels = []
    for n in range(1, 1000):
        directory = tmp_path / f"kill_{n}"
        directory.mkdir(parents=True)
        setup(directory)
        killer = KillAt(directory, n)
        with pytest.MonkeyPatch.context() as monkeypatch:
            killer.install(monkeypatch)
            try:
                operation(directory)
            except Killed:
                pass
        restart(directory, killer.label)
        if killer.label is None:
            return labels
        labels.append(killer.label)
    raise AssertionError("the operation never ran to its end")


# --- a run's files: best and last weights, metrics.csv, JSON records ----------------------------


def _tiny_classifier():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    return model


def _at_epoch(model, epoch):
    """The model's weights all equal to `epoch`, so that a file tells which epoch it holds."""
    model.set_weights([np.full(w.shape, epoch, "float32") for w in model.get_weights()])
    return model


def _epoch_in(path):
    """The epoch a weights file of `_at_epoch` holds (it must read back whole)."""
    values = {float(v) for a in read_weights(path).values() for v in np.ravel(a)}
    assert len(values) == 1, values
    return int(values.pop())


@pytest.mark.parametrize("monitor", ["val_adv_acc", None], ids=["validation", "no_validation"])
def test_best_weights_and_their_record_agree_whatever_the_kill(tmp_path, monitor):
    """Epoch 1 scores 0.5, epoch 2 (killed while saved) 0.9, epoch 3 after the restart 0.7: the
    restart compares with the value of the weights best.weights.h5 holds, so epoch 3 replaces
    epoch 1's weights but never epoch 2's."""
    model = _tiny_classifier()
    values = {1: 0.5, 2: 0.9, 3: 0.7}

    def epoch_end(directory, epoch):
        callback = run_callbacks.BestWeights(_at_epoch(model, epoch), str(directory), monitor)
        callback.on_train_begin()
        callback.on_epoch_end(epoch - 1, {"val_adv_acc": values[epoch]})
        return callback

    def restart(directory, label):
        best_path = directory / run_files.BEST_WEIGHTS
        callback = run_callbacks.BestWeights(model, str(directory), monitor)
        callback.on_train_begin()
        held = _epoch_in(best_path)
        assert callback.best["epoch"] == held, label
        if monitor:
            assert callback.best["value"] == values[held], label
        assert json.loads((directory / run_files.BEST_RECORD).read_text()) == callback.best, label
        after = epoch_end(directory, 3)
        expected = 3 if monitor is None or held == 1 else 2
        assert _epoch_in(best_path) == after.best["epoch"] == expected, label

    labels = kill_at_every_boundary(
        tmp_path, lambda d: epoch_end(d, 1), lambda d: epoch_end(d, 2), restart
    )
    # the weights (whole, cut, half), their rename, best.json's copy and its rename
    assert any(label.startswith("renamed") and "best.weights.h5" in label for label in labels)
    assert any(label.startswith("renamed") and "best.json" in label for label in labels)
    assert any("cut to half" in label for label in labels)


def test_last_weights_hold_the_epoch_they_say(tmp_path):
    model = _tiny_classifier()

    def epoch_end(directory, epoch):
        callback = run_callbacks.LastWeights(_at_epoch(model, epoch), str(directory))
        callback.on_epoch_end(epoch - 1)

    def restart(directory, label):
        path = directory / run_files.LAST_WEIGHTS
        held = _epoch_in(path)
        assert run_files.read_weights_record(path) == {"epoch": held}, label
        assert held in ((1, 2) if label else (2,)), label

    labels = kill_at_every_boundary(
        tmp_path, lambda d: epoch_end(d, 1), lambda d: epoch_end(d, 2), restart
    )
    assert len(labels) >= 5


def test_metrics_csv_keeps_whole_rows_whatever_the_kill(tmp_path):
    model = _tiny_classifier()
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")

    def epochs(directory, count):
        callback = run_callbacks.MetricsCsv(str(directory / run_files.METRICS_FILE))
        callback.set_model(model)
        for epoch in range(count):
            callback.on_epoch_begin(epoch)
            callback.on_epoch_end(epoch, {"loss": 1.0 / (epoch + 1), "val_adv_acc": 0.25})

    def restart(directory, label):
        rows = run_callbacks.read_metrics(directory / run_files.METRICS_FILE)
        assert [r["epoch"] for r in rows] in ([1], [1, 2]), label
        assert all(r["lr"] == pytest.approx(0.1) and r["val_adv_acc"] == 0.25 for r in rows)

    labels = kill_at_every_boundary(
        tmp_path, lambda d: epochs(d, 1), lambda d: epochs(d, 2), restart
    )
    assert len(labels) >= 3


def test_json_records_are_old_or_new_whatever_the_kill(tmp_path):
    """config.json, summary.json, best.json and the evaluation reports all go through
    `write_json`."""
    old, new = {"epochs": 2}, {"epochs": 3, "final": {"loss": float("nan")}}

    def restart(directory, label):
        text = (directory / "summary.json").read_text()
        assert json.loads(text) in (old, {"epochs": 3, "final": {"loss": None}}), label

    labels = kill_at_every_boundary(
        tmp_path,
        lambda d: run_files.write_json(d / "summary.json", old),
        lambda d: run_files.write_json(d / "summary.json", new),
        restart,
    )
    assert len(labels) >= 3


def test_an_exception_while_writing_leaves_the_file_and_no_temporary(tmp_path):
    path = tmp_path / "summary.json"
    run_files.write_json(path, {"epochs": 2})
    with pytest.raises(TypeError):
        run_files.write_json(path, {"epochs": object()})  # not JSON
    assert json.loads(path.read_text()) == {"epochs": 2}
    assert not os.path.exists(atomic_files.partial_path(path))


# --- convert: the head's origin is inside the file from its first appearance ----------------


@pytest.fixture(scope="module")
def headless_checkpoint(tmp_path_factory):
    state = torch_resnet("resnet18", 1000, seed=3).state_dict()
    backbone = {
        k: v.numpy()
        for k, v in state.items()
        if not k.startswith("fc.") and not k.endswith("num_batches_tracked")
    }
    path = tmp_path_factory.mktemp("headless") / "backbone.npz"
    np.savez(path, **backbone)
    return path


def test_an_interrupted_headless_conversion_never_loads_as_a_trained_head(
    tmp_path, headless_checkpoint
):
    """Killed anywhere, `convert` of a checkpoint without fc leaves no file, or one that says
    its head is not the checkpoint's: `load_pretrained(head=True)` never takes its random head."""
    model = build_resnet("resnet18", 10, twin=False, input_shape=(None, None, 3))
    output_name = "backbone.weights.h5"

    def convert(directory):
        weights.convert_checkpoint(
            headless_checkpoint, "resnet18", directory / output_name, num_classes=10
        )

    def restart(directory, label):
        output = directory / output_name
        if label is not None and not output.exists():
            return
        with pytest.raises(weights.CheckpointError, match="without a head"):
            weights.load_pretrained(model, output, head=True)
        with h5py.File(output, "r") as f:
            assert f.attrs[weights.HEAD_ATTRIBUTE] == False  # noqa: E712 (numpy bool)
        weights.load_pretrained(model, output)  # the backbone is whole

    labels = kill_at_every_boundary(tmp_path, lambda d: None, convert, restart)
    assert any(label.startswith("renamed") for label in labels)
    assert any("written whole" in label for label in labels)


# --- the backup: a kill between Keras's weights and metadata resumes exactly ------------------

_STEPS = 2  # 8 examples, batches of 4


def _data():
    x = np.arange(24, dtype="float32").reshape(8, 3) / 24
    y = np.stack([x.sum(axis=1), -x[:, 0]], axis=1)
    return x, y


def _compiled(optimizer=None):
    model = _tiny_classifier()
    model.set_weights([np.linspace(-1, 1, w.size).reshape(w.shape) for w in model.get_weights()])
    model.compile(
        optimizer=optimizer or keras.optimizers.SGD(0.05, momentum=0.9),
        loss="mse",
        run_eagerly=True,
    )
    return model


class _Seen(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.epochs = []

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs.append(epoch)


class _KillDuringBackup(keras.callbacks.Callback):
    """Before BackupAndRestore in the list: arms `install` at the end of epoch `epoch` and
    disarms it at the next epoch's start, so a kill can only come in that epoch's backup."""

    def __init__(self, epoch, install, monkeypatch):
        super().__init__()
        self.epoch, self.install, self.monkeypatch = epoch, install, monkeypatch

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.epoch:
            self.install(self.monkeypatch)

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            self.monkeypatch.undo()


def _fit(model, model_dir, epochs, *extra):
    x, y = _data()
    backup_callback = keras.callbacks.BackupAndRestore(
        str(model_dir / backup.BACKUP_DIR), double_checkpoint=True, delete_checkpoint=False
    )
    model.fit(
        x, y, batch_size=4, epochs=epochs, shuffle=False, verbose=0,
        callbacks=[*extra, backup_callback],
    )  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    model = _compiled()
    _fit(model, tmp_path_factory.mktemp("uninterrupted"), 4)
    return model.get_weights()


@pytest.mark.parametrize("kill_epoch", [1, 2, 3])
def test_a_kill_in_the_backup_resumes_at_the_epoch_its_weights_are_at(
    tmp_path, uninterrupted, kill_epoch
):
    """Killed at every boundary of Keras's backup writes of epoch `kill_epoch` (of 4), the
    repaired backup resumes where its weights are and ends with an uninterrupted run's weights:
    no epoch trained twice, none skipped.  Killed after the weights were written whole, it
    resumes after `kill_epoch` itself, not one earlier (from the second backup on; the first
    has nothing to check its weights against and starts over)."""
    backup_files = (backup.BACKUP_WEIGHTS, backup.BACKUP_METADATA)
    labels = []
    for n in range(1, 100):
        directory = tmp_path / f"kill_{n}"
        directory.mkdir()
        killer = KillAt(directory / backup.BACKUP_DIR, n)
        with pytest.MonkeyPatch.context() as monkeypatch:
            arm = _KillDuringBackup(kill_epoch, killer.install, monkeypatch)
            try:
                _fit(_compiled(), directory, 4, arm)
            except Killed:
                pass
        if killer.label is None:
            break
        labels.append(killer.label)
        # the restart, as loop.fit does it
        backup.repair_backup(directory)
        resumed = backup.resume_epoch(directory)
        weights_whole = killer.label.startswith(
            (f"{backup_files[0]} written whole", f"{backup_files[1]} opened")
        )
        assert resumed == kill_epoch - (0 if weights_whole and kill_epoch > 1 else 1), killer.label
        seen = _Seen()
        model = _compiled()
        _fit(model, directory, 4, seen)
        assert seen.epochs == list(range(resumed, 4)), killer.label
        for a, b in zip(model.get_weights(), uninterrupted):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7, err_msg=killer.label)
    # copies of the previous pair, the weights (whole, cut, half), the metadata
    assert len(labels) >= (4 if kill_epoch == 1 else 6), labels
    assert any(label.startswith(f"{backup_files[0]} written whole") for label in labels)


def test_a_backup_whose_metadata_lags_its_weights_is_repaired_to_them(tmp_path):
    """The state a kill between Keras's two writes leaves, made by hand: the metadata of
    epoch 2 under weights trained for 3 epochs; and the half-written metadata of a kill during
    the second write."""
    _fit(_compiled(), tmp_path, 3)
    backup_dir = tmp_path / backup.BACKUP_DIR
    metadata = backup_dir / backup.BACKUP_METADATA
    previous = backup_dir / (backup.BACKUP_METADATA + backup.PREVIOUS_SUFFIX)
    assert backup.resume_epoch(tmp_path) == 3
    metadata.write_text(previous.read_text())  # epoch 2's metadata, epoch 3's weights
    assert backup.resume_epoch(tmp_path) == 3
    backup.repair_backup(tmp_path)
    assert keras_private.backup_epoch(metadata) == 3
    metadata.write_text('{"epo')
    assert backup.resume_epoch(tmp_path) == 3
    backup.repair_backup(tmp_path)
    assert json.loads(metadata.read_text()) == {"epoch": 3, "batch": 0}


@pytest.mark.parametrize("state", ["metadata_behind", "weights_cut"])
def test_a_kill_during_the_repair_leaves_a_backup_repaired_the_same_way(tmp_path, state):
    """The repair's own writes killed at every boundary: planned again, the backup still
    resumes where it should and its latest pair ends as the files of that epoch."""
    import shutil

    base = tmp_path / "base"
    _fit(_compiled(), base, 3)
    base_backup = base / backup.BACKUP_DIR
    metadata = base_backup / backup.BACKUP_METADATA
    metadata.write_text(
        (base_backup / (backup.BACKUP_METADATA + backup.PREVIOUS_SUFFIX)).read_text()
    )
    if state == "weights_cut":
        _cut_bytes(base_backup / backup.BACKUP_WEIGHTS)
    expected = 3 if state == "metadata_behind" else 2

    def restart(directory, label):
        assert backup.resume_epoch(directory) == expected, label
        backup.repair_backup(directory)
        latest = directory / backup.BACKUP_DIR
        assert keras_private.backup_epoch(latest / backup.BACKUP_METADATA) == expected, label
        steps = keras_private.saved_optimizer_iterations(latest / backup.BACKUP_WEIGHTS)
        assert steps == expected * _STEPS, label

    labels = kill_at_every_boundary(
        tmp_path / "kills",
        lambda d: shutil.copytree(base_backup, d / backup.BACKUP_DIR),
        backup.repair_backup,
        restart,
    )
    assert len(labels) >= (2 if state == "metadata_behind" else 4), labels


# --- the Keras internals these rely on ---------------------------------------------------------


@pytest.mark.parametrize("loss_scale", [False, True], ids=["sgd", "loss_scale_sgd"])
def test_the_backup_weights_carry_the_optimizer_step_count(tmp_path, loss_scale):
    """Pins `keras_private.saved_optimizer_iterations` and `backup_metadata` on Keras's own
    BackupAndRestore files (a LossScaleOptimizer keeps the counting optimizer inside)."""
    optimizer = keras.optimizers.SGD(0.05)
    if loss_scale:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    _fit(_compiled(optimizer), tmp_path, 3)
    backup_dir = tmp_path / backup.BACKUP_DIR
    weights_file = backup_dir / backup.BACKUP_WEIGHTS
    assert keras_private.saved_optimizer_iterations(weights_file) == 3 * _STEPS
    assert (
        keras_private.saved_optimizer_iterations(str(weights_file) + backup.PREVIOUS_SUFFIX)
        == 2 * _STEPS
    )
    assert (backup_dir / backup.BACKUP_METADATA).read_text() == keras_private.backup_metadata(3)
    assert keras_private.saved_optimizer_iterations(tmp_path / "missing.weights.h5") is None


def test_a_runs_backup_counts_the_trainers_steps(tmp_path_factory):
    """The AdversarialTrainer's backup (a real run: 2 epochs of 64 examples in batches of 16)
    holds its optimizer where `saved_optimizer_iterations` reads it; and the run's weights
    files hold their records."""
    model_dir = source_run(tmp_path_factory)
    latest = model_dir / backup.BACKUP_DIR / backup.BACKUP_WEIGHTS
    assert keras_private.saved_optimizer_iterations(latest) == 2 * (64 // 16)
    assert backup.resume_epoch(model_dir) == 2
    assert run_files.read_weights_record(model_dir / run_files.LAST_WEIGHTS) == {"epoch": 2}
    best = run_files.read_weights_record(model_dir / run_files.BEST_WEIGHTS)
    assert best == json.loads((model_dir / run_files.BEST_RECORD).read_text())
    assert best["monitor"] == "val_adv_acc" and best["epoch"] in (1, 2)
