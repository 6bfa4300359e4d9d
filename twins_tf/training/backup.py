"""The backup of a run (`keras.callbacks.BackupAndRestore`, `double_checkpoint=True`).

Keras copies the latest pair (weights, metadata) to `<name>.bkp`, then writes the weights,
then the metadata.  It falls back to the copy only when the weights file does not open; a
kill can also leave one that opens but is cut short (fewer arrays), or a half-written
metadata file, on which Keras crashes.  `repair_backup` puts the copy back in those cases, and
`resume_epoch` says which epoch a restart continues from.  The file names and format are
Keras's (`twins_tf.platform.keras_private.backup_file_names`).
"""

import os
import shutil

from twins_tf.platform import keras_private
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


def _backup_pairs(model_dir):
    """(latest epoch or None, previous epoch or None, backup dir, weights, metadata paths).

    The latest pair counts only if both files read back and it holds every array the
    previous one does (a file cut short while written holds fewer)."""
    backup = os.path.join(model_dir, BACKUP_DIR)
    weights, metadata = (os.path.join(backup, n) for n in (BACKUP_WEIGHTS, BACKUP_METADATA))
    previous_names = (
        _array_names(weights + PREVIOUS_SUFFIX)
        if os.path.exists(weights + PREVIOUS_SUFFIX)
        else None
    )
    previous = keras_private.backup_epoch(metadata + PREVIOUS_SUFFIX) if previous_names else None
    latest = keras_private.backup_epoch(metadata)
    if latest is not None:
        names = _array_names(weights)
        if names is None or (previous is not None and names < previous_names):
            latest = None
    return latest, previous, backup, weights, metadata


def has_backup(model_dir):
    """Whether `model_dir` holds a backup a finished run can be extended from."""
    return os.path.isfile(os.path.join(model_dir, BACKUP_DIR, BACKUP_METADATA))


def resume_epoch(model_dir):
    """The epoch a restarted run continues from: that of the backup's latest pair, or of the
    previous pair when the latest is broken (killed while Keras wrote it), or 0 when there is
    no backup or only a first one cut short.

    Raises:
      SetupError: the latest backup is broken and there is no usable previous one.
    """
    latest, previous, backup, weights, metadata = _backup_pairs(model_dir)
    if latest is not None:
        return latest
    if previous is not None:
        return previous
    if os.path.exists(metadata):  # a backup was complete once: refuse to start over silently
        raise SetupError(
            f"{backup} is broken (the run was killed while writing it?) and holds "
            f"no usable previous backup: delete {backup} to restart the run from "
            "epoch 0, or use a new --model_dir."
        )
    return 0


def repair_backup(model_dir):
    """Makes the backup's latest pair the one `resume_epoch` names, for Keras to restore.

    A broken latest pair is replaced by the previous one; a first backup cut short (weights
    without metadata, nothing before it) is removed, so the run starts from epoch 0.
    """
    epoch = resume_epoch(model_dir)
    latest, previous, backup, weights, metadata = _backup_pairs(model_dir)
    if latest is not None:
        return
    if epoch == 0:
        for name in (weights, weights + PREVIOUS_SUFFIX, metadata + PREVIOUS_SUFFIX):
            if os.path.exists(name):
                os.remove(name)
        return
    for name in (weights, metadata):
        shutil.copyfile(name + PREVIOUS_SUFFIX, name + ".partial")
        os.replace(name + ".partial", name)


def drop_previous_pair(model_dir):
    """Removes the previous pair once a run has finished: the latest is whole then, and the
    copy would only double the backup's disk space."""
    for name in (BACKUP_WEIGHTS, BACKUP_METADATA):
        previous = os.path.join(model_dir, BACKUP_DIR, name + PREVIOUS_SUFFIX)
        if os.path.exists(previous):
            os.remove(previous)
