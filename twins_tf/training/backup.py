"""The backup of a run (`keras.callbacks.BackupAndRestore`, `double_checkpoint=True`).

At an epoch's end Keras copies the latest pair (weights, metadata) to `<name>.bkp`, then
writes the weights, then the metadata, each in place.  It falls back to the copy only when
the weights file does not open, so a kill leaves three states it gets wrong:
  * weights that open but are cut short (fewer arrays), on which Keras crashes;
  * a half-written metadata file, on which Keras crashes;
  * whole new weights under the previous epoch's metadata (killed between the two writes):
    Keras restores the new weights and trains their epoch again on top of them, silently.
The weights carry the optimizer, whose iteration count says how far they were trained: more
steps than the weights the metadata was written with (the previous pair's, when its metadata
names the same epoch; none at all before the first backup) means the weights are one epoch
past their metadata.  `resume_epoch` says which epoch a restart continues from, the epoch the
weights are at, and `repair_backup` makes the files say so (the metadata rewritten to match
the weights, or the previous pair put back when the latest weights are broken), each repair a
one-step replace.  The file names and format are Keras's
(`twins_tf.platform.keras_private.backup_file_names`).
"""

import dataclasses
import os

from twins_tf.platform import atomic_files, keras_private
from twins_tf.training.settings import SetupError

BACKUP_DIR = "backup"
BACKUP_WEIGHTS, BACKUP_METADATA, PREVIOUS_SUFFIX = keras_private.backup_file_names()


def _array_names(weights_path):
    """The names of the arrays of a weights file, each read back whole; None if it cannot."""
    import h5py

    names = []

    def read(name, obj):
        if isinstance(obj, h5py.Dataset):
            obj[()]
            names.append(name)

    try:
        with h5py.File(weights_path, "r") as f:
            f.visititems(read)
    except (OSError, ValueError, KeyError, RuntimeError):
        return None
    return set(names)


@dataclasses.dataclass
class _Pair:
    """One pair of backup files as read back: arrays None when the weights do not read back
    (or are absent), epoch None when the metadata does not (or is absent)."""

    weights: str
    metadata: str
    arrays: object
    epoch: object
    iterations: object

    @classmethod
    def read(cls, weights, metadata):
        arrays = _array_names(weights) if os.path.exists(weights) else None
        return cls(
            weights,
            metadata,
            arrays,
            keras_private.backup_epoch(metadata),
            keras_private.saved_optimizer_iterations(weights) if arrays else None,
        )


@dataclasses.dataclass
class _Plan:
    """Where a restart continues: `epoch`, and what to do to the files first: "none", "metadata"
    (rewrite the latest metadata to `epoch`), "previous" (put the previous pair back) or
    "afresh" (remove a first backup that cannot be used)."""

    epoch: int
    repair: str


def _trained_further(latest, previous):
    """Whether the latest weights hold more optimizer steps than the previous pair's (False
    when either count is unknown: weights saved without an optimizer)."""
    if latest.iterations is None or previous.iterations is None:
        return False
    return latest.iterations > previous.iterations


def _plan(model_dir):
    backup = os.path.join(model_dir, BACKUP_DIR)
    weights, metadata = (os.path.join(backup, n) for n in (BACKUP_WEIGHTS, BACKUP_METADATA))
    latest = _Pair.read(weights, metadata)
    previous = _Pair.read(weights + PREVIOUS_SUFFIX, metadata + PREVIOUS_SUFFIX)
    usable_previous = bool(previous.arrays) and previous.epoch is not None
    # whole: reads back, and holds every array of the previous pair (cut short holds fewer)
    whole = latest.arrays is not None and not (usable_previous and latest.arrays < previous.arrays)
    if whole and latest.epoch is not None:
        if (
            usable_previous
            and previous.epoch == latest.epoch
            and _trained_further(latest, previous)
        ):
            return _Plan(latest.epoch + 1, "metadata")  # killed between weights and metadata
        return _Plan(latest.epoch, "none")
    if whole and usable_previous and _trained_further(latest, previous):
        return _Plan(previous.epoch + 1, "metadata")  # killed while writing the metadata
    if usable_previous:
        return _Plan(previous.epoch, "previous")
    # Keras copies the latest pair before every save but the first: without a copy, this is
    # the first backup, killed before its metadata was whole.  Its weights have nothing
    # earlier to be checked against, so the run starts over (consistently: from the initial
    # weights).  Broken weights under metadata of their own were complete once: refused.
    first = not any(os.path.exists(p) for p in (previous.weights, previous.metadata))
    if os.path.exists(metadata) and not (first and whole):
        raise SetupError(
            f"{backup} is broken (the run was killed while writing it?) and holds "
            f"no usable previous backup: delete {backup} to restart the run from "
            "epoch 0, or use a new --model_dir."
        )
    return _Plan(0, "afresh")


def has_backup(model_dir):
    """Whether `model_dir` holds a backup a finished run can be extended from."""
    return os.path.isfile(os.path.join(model_dir, BACKUP_DIR, BACKUP_METADATA))


def resume_epoch(model_dir):
    """The epoch a restarted run continues from: the number of epochs its backup's weights
    have trained, 0 when there is no backup or only a first one cut short.

    That is the latest pair's epoch; one more when the latest weights were trained past what
    their metadata says (a kill between Keras's two writes, told by the optimizer's step
    count); the previous pair's when the latest weights are broken.

    Raises:
      SetupError: the latest backup is broken and there is no usable previous one.
    """
    return _plan(model_dir).epoch


def repair_backup(model_dir):
    """Makes the backup's files say what `resume_epoch` says, for Keras to restore exactly
    that: the latest metadata rewritten to the epoch of the latest weights, or the previous
    pair put back over a broken latest one, or a first backup cut short removed (the run
    starts from epoch 0).  Each file is replaced in one step, so a kill during the repair
    leaves a backup this repairs again."""
    plan = _plan(model_dir)
    backup = os.path.join(model_dir, BACKUP_DIR)
    weights, metadata = (os.path.join(backup, n) for n in (BACKUP_WEIGHTS, BACKUP_METADATA))
    if plan.repair == "metadata":
        atomic_files.write_text(metadata, keras_private.backup_metadata(plan.epoch))
    elif plan.repair == "previous":
        # a kill between the two copies leaves a backup planned the same way again
        for name in (weights, metadata):
            atomic_files.copy(name + PREVIOUS_SUFFIX, name)
    elif plan.repair == "afresh":
        # the metadata first: weights left without it still plan "afresh", not a refusal
        for name in (metadata, weights, weights + PREVIOUS_SUFFIX, metadata + PREVIOUS_SUFFIX):
            if os.path.exists(name):
                os.remove(name)


def drop_previous_pair(model_dir):
    """Removes the previous pair once a run has finished: the latest is whole then, and the
    copy would only double the backup's disk space."""
    for name in (BACKUP_WEIGHTS, BACKUP_METADATA):
        previous = os.path.join(model_dir, BACKUP_DIR, name + PREVIOUS_SUFFIX)
        if os.path.exists(previous):
            os.remove(previous)
