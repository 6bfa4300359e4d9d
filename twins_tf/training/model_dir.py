"""The files a run keeps in `--model_dir`, and what a run may do with a model_dir.

    config.json           the settings of the run (what `evaluate` and `export` rebuild from)
    best.weights.h5       the classifier's weights at the epoch of best validation PGD accuracy,
                          with that epoch and accuracy inside it (an HDF5 attribute)
    best.json             a copy of that record, for people and tools
    last.weights.h5       the classifier's weights after the latest finished epoch (and its number)
    metrics.csv           one row of training and validation metrics per epoch
    summary.json          written when the run finishes
    tensorboard/          TensorBoard logs
    backup/               Keras BackupAndRestore state (`double_checkpoint`: the latest and
                          the previous epoch's), kept after the run finishes so that it can
                          be extended (see `training.backup`)

A second start with the same settings resumes from `backup/`; a model_dir that holds a run
with *different* settings is refused with the differing keys, so nothing is overwritten.
Settings that only say where things are or how to execute (data locations, strategy, XLA)
may change between restarts; everything that changes the numbers may not, except `--epochs`,
which may be raised to extend a run (the learning-rate schedule, `--lr_decay_epochs`, must stay
the same: the epochs already trained followed it).  The number of replicas a run trains on is
stored too: a twin method's run may not change it (each replica splits its own batch into the
two wings, so the Adaptive wing's statistics and the PGD starts would not be those of the
uninterrupted run); a plain-BN run may (its synchronized BN sees the whole batch on any
number of replicas; only its PGD starts, drawn per replica, differ from the uninterrupted
run's), and `prepare` says so.  Paths in config.json are absolute, so
`evaluate` and `export` find them from any working directory.

Each file above but the two directories is replaced in one step (`platform.atomic_files`): a
kill leaves it as it was before its write or after it, and metadata that must agree with
weights is inside the weights file.  Keras writes backup/ in place; `training.backup` repairs
what a kill leaves there.
"""

import json
import math
import os

from twins_tf.platform import atomic_files
from twins_tf.training.backup import BACKUP_DIR, has_backup, resume_epoch
from twins_tf.training.settings import (
    ADDED_SETTINGS,
    UNCOMPARED_KEYS,
    Settings,
    SetupError,
    with_current_names,
)

CONFIG_FILE = "config.json"
BEST_WEIGHTS = "best.weights.h5"
BEST_RECORD = "best.json"
LAST_WEIGHTS = "last.weights.h5"
METRICS_FILE = "metrics.csv"
SUMMARY_FILE = "summary.json"
# What `twins_tf.interpolation` writes last into the run directory it makes (it has no
# summary.json): with it, that directory is complete.
INTERPOLATION_FILE = "interpolation.json"
TENSORBOARD_DIR = "tensorboard"
RUN_ARTEFACTS = (BEST_WEIGHTS, BEST_RECORD, LAST_WEIGHTS, METRICS_FILE, SUMMARY_FILE, BACKUP_DIR)
# What best.json records as the selection rule of a --validation=none run.
FINAL_EPOCH_SELECTION = "final epoch (--validation=none)"
# The HDF5 attribute of best.weights.h5 and last.weights.h5 that says what they hold (JSON:
# the epoch, and for best the monitored value), written inside the file before it gets its name.
WEIGHTS_RECORD_ATTRIBUTE = "twins_tf_record"


def read_config(model_dir):
    """The settings stored in `model_dir/config.json`, as the JSON dict it holds (settings
    stored under an earlier name read under their current one).

    Raises:
      SetupError: no config.json there, or it is not valid JSON.
    """
    path = os.path.join(model_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise SetupError(
            f"{model_dir} holds no {CONFIG_FILE}: pass the --model_dir of a train or pretrain run."
        )
    try:
        with open(path) as f:
            return with_current_names(json.load(f))
    except (OSError, json.JSONDecodeError) as error:
        raise SetupError(
            f"{path} is unreadable ({error}); it was not written by twins_tf."
        ) from None


def read_settings(model_dir):
    """The `Settings` of the run in `model_dir` (its config.json, checked; settings newer
    than the run take the values it had).

    Raises:
      SetupError: no or an unreadable config.json, or a value the checks refuse.
    """
    return Settings.from_dict(read_config(model_dir))


def _as_dict(settings):
    return settings.to_dict() if isinstance(settings, Settings) else settings


def differing_keys(stored, settings):
    """Sorted keys whose values differ between two settings, except uncompared ones."""
    stored, settings = _as_dict(stored), _as_dict(settings)
    keys = (set(stored) | set(settings)) - set(UNCOMPARED_KEYS)
    return sorted(k for k in keys if _normalise(stored.get(k)) != _normalise(settings.get(k)))


def _normalise(value):
    return json.loads(json.dumps(value))  # tuples -> lists, as config.json stores them


def check_model_dir(model_dir, settings):
    """Decides what a run may do with `model_dir`, before anything is written.

    Args:
      model_dir: the directory.
      settings: the run's `Settings` (or its dict).

    Returns:
      "new" (nothing of a run there), "resume" (a run with the same settings, unfinished, or
      finished with fewer `epochs` than asked for now: it is extended from its backup) or
      "finished" (a run with the same settings that has completed).

    Raises:
      SetupError: the model_dir holds a run with different settings (listing the keys and
        both values), or run files without a config.json, or fewer `--epochs` than it has
        trained, or a finished run to extend whose backup is gone.
    """
    settings = _as_dict(settings)
    config_path = os.path.join(model_dir, CONFIG_FILE)
    if not os.path.exists(config_path):
        leftovers = [n for n in RUN_ARTEFACTS if os.path.exists(os.path.join(model_dir, n))]
        if leftovers:
            raise SetupError(
                f"--model_dir={model_dir} holds {', '.join(leftovers)} but no "
                f"{CONFIG_FILE}; refusing to overwrite it: use a new --model_dir."
            )
        return "new"
    # settings added since earlier runs were written: their values in those runs
    added = {k: v for k, v in ADDED_SETTINGS.items() if k in settings}
    stored = {**added, **read_config(model_dir)}
    differing = differing_keys(stored, settings)
    if differing:
        changes = "; ".join(
            f"{k}: {stored.get(k)!r} in the run, {settings.get(k)!r} now" for k in differing
        )
        why = (
            " (--lr_decay_epochs is the learning-rate schedule the trained epochs "
            "followed, so it must stay the same to extend a run)"
            if "lr_decay_epochs" in differing
            else ""
        )
        raise SetupError(
            f"--model_dir={model_dir} holds a run with different settings "
            f"({changes}){why}; refusing to resume into it: use a new --model_dir "
            "or the run's own flags."
        )
    _check_replicas(model_dir, stored, settings)
    trained = resume_epoch(model_dir)
    finished = os.path.exists(os.path.join(model_dir, SUMMARY_FILE))
    if finished and not os.path.isdir(os.path.join(model_dir, BACKUP_DIR)):
        trained = int(stored.get("epochs", 0))  # a run finished before backups were kept
    if settings.get("epochs") is not None and settings["epochs"] < trained:
        raise SetupError(
            f"--model_dir={model_dir} holds a run that has trained {trained} "
            f"epochs; --epochs={settings['epochs']} cannot undo them: pass "
            f"--epochs={trained} or more, or use a new --model_dir."
        )
    if not finished:
        return "resume"
    if settings.get("epochs") is None or settings["epochs"] == trained:
        return "finished"
    summary = read_summary(model_dir)
    if summary.get("trained_epochs", summary["epochs"]) < summary["epochs"]:
        if settings["epochs"] == summary["epochs"]:
            return "finished"  # stopped early: what it would train next, it stopped to avoid
        raise SetupError(
            f"--model_dir={model_dir} holds a run that stopped early after "
            f"{summary['trained_epochs']} of its {summary['epochs']} epochs "
            "(AutoLoRa's learning rate fell below its floor); more epochs would "
            "not train it further: use a new --model_dir."
        )
    if not has_backup(model_dir):
        raise SetupError(
            f"--model_dir={model_dir} holds a finished run of {trained} epochs "
            f"but no {BACKUP_DIR}/ to extend it to --epochs={settings['epochs']} "
            "from (deleted?): use a new --model_dir."
        )
    return "resume"


def changed_replicas(model_dir, settings):
    """(replicas the run in `model_dir` trained on, replicas now) if they differ, else None
    (also for a run stored before replicas were recorded)."""
    settings = _as_dict(settings)
    path = os.path.join(model_dir, CONFIG_FILE)
    if not os.path.exists(path):
        return None
    before, now = read_config(model_dir).get("replicas"), settings.get("replicas")
    return (before, now) if None not in (before, now) and before != now else None


def _check_replicas(model_dir, stored, settings):
    before, now = stored.get("replicas"), settings.get("replicas")
    if None in (before, now) or before == now or not settings.get("twin"):
        return
    raise SetupError(
        f"--model_dir={model_dir} holds a {settings.get('method')} run trained on {before} "
        f"replica(s), and this process has {now}: each replica splits its own batch into the "
        "two BN wings, so the Adaptive wing's statistics and the PGD starts would change; "
        f"continue it on {before} replica(s) (--strategy) or use a new --model_dir."
    )


def write_config(model_dir, settings):
    """Writes `config.json` (atomically) unless it exists already; a raised `epochs` (a run
    being extended) is recorded in it, the rest of the stored settings is kept."""
    settings = _as_dict(settings)
    os.makedirs(model_dir, exist_ok=True)
    path = os.path.join(model_dir, CONFIG_FILE)
    if os.path.exists(path):
        stored = read_config(model_dir)
        if stored.get("epochs") != settings.get("epochs"):
            write_json(path, {**stored, "epochs": settings["epochs"]})
        return
    write_json(path, settings)


def read_summary(model_dir):
    """The summary.json of a finished run."""
    with open(os.path.join(model_dir, SUMMARY_FILE)) as f:
        return json.load(f)


def write_json(path, payload):
    """Writes JSON in one step (`platform.atomic_files`), so a kill never leaves half a file:
    every JSON record of a run, an evaluation or a comparison goes through here.

    NaN and infinities are not JSON (Python's json writes a bare `NaN` other readers reject):
    they are written as null.
    """
    atomic_files.write_text(path, _json_text(payload) + "\n")


def save_weights(model, path, record):
    """`model.save_weights(path)` in one step, with `record` (a JSON dict: which epoch, and why
    these weights) inside the file: a kill can leave the old file or the new one, never new
    weights under an old record or the reverse."""
    atomic_files.save_weights(model, path, {WEIGHTS_RECORD_ATTRIBUTE: _json_text(record)})


def read_weights_record(path):
    """The record `save_weights` put inside a weights file; None when the file is missing or
    unreadable, or holds none (written by a twins_tf from before records went inside)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            text = f.attrs.get(WEIGHTS_RECORD_ATTRIBUTE)
    except (OSError, KeyError):
        return None
    if text is None:
        return None
    return json.loads(text.decode() if isinstance(text, bytes) else str(text))


def _json_text(payload):
    return json.dumps(_finite_or_null(payload), indent=2, sort_keys=True, allow_nan=False)


def _finite_or_null(value):
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if type(value).__module__ == "numpy" and hasattr(value, "item"):  # numpy scalars
        return _finite_or_null(value.item())
    return value
