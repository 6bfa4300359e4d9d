"""Pins the Keras / TensorFlow internals the training side relies on (keras_private, training).

Each test runs the real Keras or TensorFlow code and checks the behaviour a
`twins_tf.platform.keras_private` function documents, so a Keras upgrade that changes it fails here:
BackupAndRestore's file names and metadata format (what `training.backup` repairs), the op
determinism getter and the way back, and the two trainer internals the multi-worker fixes
replace, which must be Keras's own again once the fixes' scope is left (also after a run).
"""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from binaries_testlib import SOURCE_ARGS, settings

from twins_tf.platform import keras_private
from twins_tf.training import backup, loop, multi_worker


def _tiny_model():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    return model


def _data():
    x = np.arange(24, dtype="float32").reshape(8, 3) / 24
    return x, np.ones((8, 2), "float32")


class _EpochsSeen(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.epochs = []

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs.append(epoch)


def test_backup_and_restore_writes_the_files_and_format_training_backup_reads(tmp_path):
    x, y = _data()
    weights, metadata, suffix = keras_private.backup_file_names()
    model = _tiny_model()
    model.fit(
        x,
        y,
        epochs=2,
        batch_size=4,
        verbose=0,
        callbacks=[
            keras.callbacks.BackupAndRestore(
                str(tmp_path), double_checkpoint=True, delete_checkpoint=False
            )
        ],
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [weights, metadata, weights + suffix, metadata + suffix]
    )
    # the metadata is JSON with the number of finished epochs, read here without twins_tf
    assert json.loads((tmp_path / metadata).read_text())["epoch"] == 2
    assert json.loads((tmp_path / (metadata + suffix)).read_text())["epoch"] == 1
    assert keras_private.backup_epoch(tmp_path / metadata) == 2
    assert keras_private.backup_epoch(tmp_path / (metadata + suffix)) == 1
    # the latest weights are the model's, the previous pair's are not (one more epoch since)
    restored = _tiny_model()
    restored.load_weights(tmp_path / weights)
    for a, b in zip(restored.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)
    # fit resumes at the recorded epoch: epochs 2 and 3 (0-based) of 4 are left
    seen = _EpochsSeen()
    resumed = _tiny_model()
    resumed.fit(
        x,
        y,
        epochs=4,
        batch_size=4,
        verbose=0,
        callbacks=[
            seen,
            keras.callbacks.BackupAndRestore(
                str(tmp_path), double_checkpoint=True, delete_checkpoint=False
            ),
        ],
    )
    assert seen.epochs == [2, 3]
    # a half-written metadata file: no epoch (training.backup then uses the previous pair)
    (tmp_path / metadata).write_text('{"epo')
    assert keras_private.backup_epoch(tmp_path / metadata) is None
    assert keras_private.backup_epoch(tmp_path / "missing.json") is None


def test_training_backup_uses_keras_names(tmp_path):
    """resume_epoch reads model_dir/backup/ under the names Keras writes."""
    x, y = _data()
    model = _tiny_model()
    model.fit(
        x,
        y,
        epochs=3,
        batch_size=4,
        verbose=0,
        callbacks=[
            keras.callbacks.BackupAndRestore(
                str(tmp_path / backup.BACKUP_DIR), double_checkpoint=True, delete_checkpoint=False
            )
        ],
    )
    assert backup.resume_epoch(tmp_path) == 3
    assert backup.has_backup(tmp_path)
    backup.drop_previous_pair(tmp_path)
    assert sorted(p.name for p in (tmp_path / backup.BACKUP_DIR).iterdir()) == sorted(
        [backup.BACKUP_WEIGHTS, backup.BACKUP_METADATA]
    )


def test_op_determinism_getter_and_way_back():
    before = keras_private.op_determinism_enabled()
    try:
        tf.config.experimental.enable_op_determinism()  # the public switch
        assert keras_private.op_determinism_enabled() is True
        keras_private.disable_op_determinism()
        assert keras_private.op_determinism_enabled() is False
    finally:
        if before:
            tf.config.experimental.enable_op_determinism()
        else:
            keras_private.disable_op_determinism()


def _spies():
    """Factories for multi_worker_trainer_fixes that count Keras's calls, then delegate."""
    calls = {"reduce": 0, "build": 0}

    def reduce_factory(original):
        def reduce_per_replica(values, strategy, reduction):
            calls["reduce"] += 1
            return original(values, strategy, reduction)

        return reduce_per_replica

    def build_factory(original):
        def maybe_symbolic_build(self, iterator=None, data_batch=None):
            calls["build"] += 1
            return original(self, iterator=iterator, data_batch=data_batch)

        return maybe_symbolic_build

    return calls, dict(reduce_per_replica=reduce_factory, maybe_symbolic_build=build_factory)


def test_fit_calls_the_two_replaced_internals_and_they_are_restored_on_exit():
    originals = keras_private.keras_trainer_functions()
    calls, spies = _spies()
    x, y = _data()
    with keras_private.multi_worker_trainer_fixes(**spies):
        assert keras_private.keras_trainer_functions() != originals
        _tiny_model().fit(x, y, epochs=1, batch_size=4, verbose=0)
    # fit builds through _maybe_symbolic_build and reduces every step's outputs through the
    # module-level reduce_per_replica: replacing them is what reaches Keras
    assert calls["build"] >= 1 and calls["reduce"] >= 1
    restored = keras_private.keras_trainer_functions()
    assert restored[0] is originals[0] and restored[1] is originals[1]


def test_the_fixes_are_restored_after_an_exception_and_pass_through_outside_multi_worker():
    originals = keras_private.keras_trainer_functions()
    x, y = _data()
    with pytest.raises(RuntimeError, match="inside"):
        with keras_private.multi_worker_trainer_fixes():
            # the real fixes on one worker: Keras's own behaviour (same loss as without)
            keras.utils.set_random_seed(1)
            with_fix = _tiny_model()
            history = with_fix.fit(x, y, epochs=1, batch_size=4, verbose=0, shuffle=False)
            raise RuntimeError("inside")
    restored = keras_private.keras_trainer_functions()
    assert restored[0] is originals[0] and restored[1] is originals[1]
    keras.utils.set_random_seed(1)
    plain = _tiny_model()
    plain_history = plain.fit(x, y, epochs=1, batch_size=4, verbose=0, shuffle=False)
    assert history.history["loss"] == pytest.approx(plain_history.history["loss"])
    assert not keras_private.in_multi_worker_mode(tf.distribute.get_strategy())


def test_a_run_fits_inside_the_fixes_and_leaves_keras_originals(tmp_path, monkeypatch):
    """train/pretrain runs fit inside `multi_worker.keras_fixes_for`; forced on here (one
    process cannot be a multi-worker job), the run must end with Keras's own functions."""
    originals = keras_private.keras_trainer_functions()
    calls, spies = _spies()
    monkeypatch.setattr(
        multi_worker,
        "keras_fixes_for",
        lambda strategy: keras_private.multi_worker_trainer_fixes(**spies),
    )
    loop.run(
        settings(
            "pretrain",
            [
                *SOURCE_ARGS,
                "--epochs=1",
                "--max_validation_examples=16",
                f"--model_dir={tmp_path / 'run'}",
            ],
        ),
        verbose=0,
    )
    assert calls["build"] >= 1 and calls["reduce"] >= 1
    restored = keras_private.keras_trainer_functions()
    assert restored[0] is originals[0] and restored[1] is originals[1]


def test_forget_tracing_history_counts_each_run_alone(caplog):
    """TensorFlow's retracing warning counts the traces of every tf.function of one Python
    function together, as compare's runs make them (one new model each); forgetting the record
    at each run's start counts each run alone."""

    def new_function():
        def step(x):
            return x + 1.0

        return tf.function(step)

    def trace_new_functions(count):
        caplog.clear()
        with caplog.at_level("WARNING", logger="tensorflow"):
            for _ in range(count):
                new_function()(tf.constant(0.0))  # a new function: one trace
        return "triggered tf.function retracing" in caplog.text

    keras_private.forget_tracing_history()
    assert trace_new_functions(5)  # what TensorFlow does: 5 new functions read as 5 retraces
    keras_private.forget_tracing_history()
    assert not trace_new_functions(4)
    keras_private.forget_tracing_history()  # a new run
    assert not trace_new_functions(4)
