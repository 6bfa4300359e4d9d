"""Flags, run settings and the model_dir contract shared by `train` and `pretrain`.

`python -m twins_tf.train` and `python -m twins_tf.pretrain` take the same flag groups (data,
model, method, attack, optimisation, run/distribution); `pretrain` only differs in its
defaults, in its methods (plain-BN ones) and in having no `--pretrained`.  This module defines
those flags once, turns parsed flags into a plain JSON-able *settings* dict, checks every value
before anything runs, and owns the files a run keeps in `--model_dir`:

    config.json           the settings of the run (what `evaluate` and `export` rebuild from)
    best.weights.h5       the classifier's weights at the epoch of best validation PGD accuracy
    best.json             that epoch and accuracy
    last.weights.h5       the classifier's weights after the latest finished epoch
    metrics.csv           one row of training and validation metrics per epoch
    summary.json          written when the run finishes
    tensorboard/          TensorBoard logs
    backup/               Keras BackupAndRestore state (`double_checkpoint`: the latest and
                          the previous epoch's), kept after the run finishes so that it can
                          be extended

A second start with the same settings resumes from `backup/`; a model_dir that holds a run
with *different* settings is refused with the differing keys, so nothing is overwritten.
Settings that only say where things are or how to execute (data locations, strategy, XLA)
may change between restarts; everything that changes the numbers may not, except `--epochs`,
which may be raised to extend a run (the learning-rate schedule, `--lr_decay_epochs`, must stay
the same: the epochs already trained followed it).  Paths in config.json are absolute, so
`evaluate` and `export` find them from any working directory.

The flags are defined on a `FlagValues` passed in, so tests can parse argument lists without
touching the global `absl.flags.FLAGS` (and `train` and `pretrain` can live in one process).
"""
import json
import math
import os
import shutil

from absl import flags

from twins_tf import data as data_lib
from twins_tf import methods as methods_lib
from twins_tf.models.resnet import ARCHITECTURES
from twins_tf.training.flags import DATA_FLAGS, define_data_flags, define_fraction  # noqa: F401

TRAIN = "train"
PRETRAIN = "pretrain"
BINARIES = (TRAIN, PRETRAIN)
# Methods a from-scratch run can use: plain BatchNorm (a twin needs a pre-trained Frozen wing).
PRETRAIN_METHODS = ("at", "trades", "clean")
STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")
JIT_CHOICES = ("auto", "true", "false")
MIXED_PRECISION = ("none", "mixed_bfloat16", "mixed_float16")

# Keys that may differ between a run and its resumption: where data lives, how to execute.
LOCATION_KEYS = ("model_dir", "data_dir", "tfds_data_dir")
EXECUTION_KEYS = ("strategy", "tpu_address", "jit_compile", "deterministic")
# `epochs` may be raised to extend a run; check_model_dir compares it on its own.
UNCOMPARED_KEYS = LOCATION_KEYS + EXECUTION_KEYS + ("epochs",)
# Settings holding paths, stored absolute in config.json.
PATH_KEYS = ("model_dir", "data_dir", "tfds_data_dir", "pretrained")
# Settings newer than some config.json files, with the value such runs had.
_ADDED_SETTINGS = {"validation": "carve", "allow_random_init": False, "skip_bad_images": False}
# What best.json records as the selection rule of a --validation=none run.
FINAL_EPOCH_SELECTION = "final epoch (--validation=none)"

CONFIG_FILE = "config.json"
BEST_WEIGHTS = "best.weights.h5"
BEST_RECORD = "best.json"
LAST_WEIGHTS = "last.weights.h5"
METRICS_FILE = "metrics.csv"
SUMMARY_FILE = "summary.json"
TENSORBOARD_DIR = "tensorboard"
BACKUP_DIR = "backup"
RUN_ARTEFACTS = (BEST_WEIGHTS, BEST_RECORD, LAST_WEIGHTS, METRICS_FILE, SUMMARY_FILE, BACKUP_DIR)

# The defaults of the two binaries where they differ (spec §6 for fine-tuning; a common
# PGD-AT recipe, shortened, for training from scratch).
_DEFAULTS = {
    TRAIN: dict(method="twins_at", arch="resnet50", epochs=60, lr=0.003,
                lr_decay_epochs=["30", "50"], weight_decay=1e-3),
    PRETRAIN: dict(method="at", arch="resnet18", epochs=100, lr=0.1,
                   lr_decay_epochs=["50", "75"], weight_decay=5e-4),
}


class SetupError(ValueError):
    """A flag value, a file or the model_dir is wrong; raised before any training starts."""


def define_flags(flag_values, binary):
    """Defines the flags of `binary` ("train" or "pretrain") on `flag_values`.

    Flags are registered under one pseudo-module per group ("twins_tf.train: data", ...) so
    `--helpfull` lists them by group.

    Returns:
      The names of the defined flags.
    """
    if binary not in BINARIES:
        raise ValueError(f"binary must be one of {BINARIES}, got {binary!r}.")
    defaults = _DEFAULTS[binary]
    names = []

    def group(name):
        return f"twins_tf.{binary}: {name} flags"

    def define(kind, name, default, help_text, module, enum_values=None):
        options = dict(flag_values=flag_values, module_name=group(module))
        if kind == "enum":
            flags.DEFINE_enum(name, default, enum_values, help_text, **options)
        else:
            getattr(flags, f"DEFINE_{kind}")(name, default, help_text, **options)
        names.append(name)

    # data
    names += define_data_flags(flag_values, group("data"))
    define("integer", "max_train_examples", None,
           "Use only N training examples, a class-stratified subset seeded by the split seed "
           "(quick runs and tests).", "data")
    define("integer", "max_validation_examples", None,
           "Use only N validation examples, stratified by class like --max_train_examples.",
           "data")
    define("enum", "validation", "carve",
           "carve: hold out part of the training data (or use the official validation split) "
           "to select the best epoch; none: train on the whole official train split and keep "
           "the final epoch (the protocol of the published numbers).", "data",
           enum_values=list(data_lib.VALIDATION_PROTOCOLS))
    # model
    define("string", "arch", defaults["arch"],
           "Architecture: " + ", ".join(sorted(ARCHITECTURES)) + ".", "model")
    if binary == TRAIN:
        define("string", "pretrained", None,
               "Robust pre-trained weights (.weights.h5 from `python -m twins_tf.convert` or "
               "`python -m twins_tf.pretrain`); the head is always fresh.", "model")
        define("bool", "allow_random_init", False,
               "Let a twin method (twins_at, twins_trades) start without --pretrained, from "
               "random weights (its Frozen wing then normalises with 0/1 statistics).", "model")
    # method
    methods = PRETRAIN_METHODS if binary == PRETRAIN else tuple(methods_lib.METHODS)
    define("string", "method", defaults["method"],
           "Training objective: " + ", ".join(methods) + ".", "method")
    if binary == TRAIN:
        define("float", "lambda_twins", 1.0, "TWINS: weight of the Frozen wing's loss.",
               "method")
        define("float", "l2sp_alpha", 0.01, "L2-SP (Li et al. 2018): alpha of the pull "
               "alpha/2 * ||w - w_pre||^2 of every pre-trained weight (BN gamma/beta included) "
               "to its pre-trained value; --weight_decay then decays only the new head.",
               "method")
    define("float", "beta", 6.0, "TRADES / TWINS-TRADES: weight of the KL term.", "method")
    # attack
    define_fraction("attack_eps", 8 / 255, "L-inf radius in [0, 1] pixel units (8/255 or "
                    "0.0314 both work), training and validation PGD.", flag_values,
                    group("attack"))
    define_fraction("attack_step", 2 / 255, "PGD step size in [0, 1] pixel units.",
                    flag_values, group("attack"))
    names += ["attack_eps", "attack_step"]
    define("integer", "attack_steps", 10, "PGD steps (training and validation).", "attack")
    # optimisation
    define("integer", "epochs", defaults["epochs"], "Training epochs.", "optimisation")
    define("integer", "batch_size", 128,
           "Global batch size (a multiple of 2 x replicas for twin methods).", "optimisation")
    define("float", "lr", defaults["lr"], "Initial learning rate of SGD (momentum 0.9).",
           "optimisation")
    define("list", "lr_decay_epochs", defaults["lr_decay_epochs"],
           "Epochs at which the learning rate is multiplied by 0.1 (stepped per iteration).",
           "optimisation")
    define("float", "weight_decay", defaults["weight_decay"],
           "Coupled L2 weight decay (added to every gradient; with --method=l2sp only to the "
           "new head's, L2-SP's beta).", "optimisation")
    # run / distribution
    define("string", "model_dir", None,
           "Where the run keeps config.json, weights, metrics, TensorBoard logs and its "
           "backup; start again with the same flags to resume.", "run")
    define("integer", "seed", 0, "Seed of initialisation, data order, augmentation and "
           "attacks.", "run")
    define("enum", "strategy", "default", "tf.distribute strategy.", "run",
           enum_values=list(STRATEGIES))
    define("string", "tpu_address", None, "TPU name or grpc://host:port for --strategy=tpu.",
           "run")
    define("enum", "jit_compile", "auto", "XLA compilation of the train step (Keras 'auto': "
           "on for GPUs/TPUs, off on CPUs).", "run", enum_values=list(JIT_CHOICES))
    define("enum", "mixed_precision", "none", "Keras dtype policy of the model.", "run",
           enum_values=list(MIXED_PRECISION))
    define("bool", "deterministic", False, "Deterministic TensorFlow ops "
           "(tf.config.experimental.enable_op_determinism); slower.", "run")
    return names


def settings_from_flags(flag_values, binary):
    """The run settings of `binary` from parsed flags, as a JSON-able dict (not yet checked)."""
    names = [n for n in _flag_names(binary) if n in flag_values]
    settings = {name: flag_values[name].value for name in names}
    settings["binary"] = binary
    if binary == PRETRAIN:
        settings["pretrained"] = None
    return settings


def _flag_names(binary):
    probe = flags.FlagValues()
    return define_flags(probe, binary)


def check_settings(settings):
    """Checks every flag value of a settings dict; resolves dataset defaults.

    Returns:
      A new settings dict with `lr_decay_epochs` as ints, the image size and upsampling of the
      dataset filled in, and `twin` (whether the method trains a twin model).

    Raises:
      SetupError: the first wrong value, with what to do about it.
    """
    s = dict(settings)
    binary = s["binary"]
    if not s.get("dataset"):
        raise SetupError("--dataset is required (e.g. --dataset=cifar10 or "
                         "--flagfile=flags/cifar10.flags).")
    try:
        spec = data_lib.get_dataset_spec(s["dataset"], image_size=s.get("image_size"),
                                         upsample=s.get("upsample"))
    except ValueError as error:
        raise SetupError(str(error)) from None
    s["dataset"] = spec.name
    s["image_size"], s["upsample"] = spec.image_size, spec.upsample
    if s["arch"] not in ARCHITECTURES:
        raise SetupError(f"Unknown arch {s['arch']!r}; choose one of "
                         f"{', '.join(sorted(ARCHITECTURES))}.")
    methods = PRETRAIN_METHODS if binary == PRETRAIN else tuple(methods_lib.METHODS)
    if s["method"] not in methods:
        hint = (" (twin methods fine-tune a pre-trained model: use python -m twins_tf.train)"
                if binary == PRETRAIN and s["method"] in methods_lib.METHODS else "")
        raise SetupError(f"Unknown --method={s['method']!r} for {binary}; choose one of "
                         f"{', '.join(methods)}{hint}.")
    s["twin"] = bool(methods_lib.get(s["method"]).twin)
    for name in ("attack_eps", "attack_step"):
        if not 0.0 <= s[name] <= 1.0:
            raise SetupError(f"--{name}={s[name]:g} is outside [0, 1]: images are in [0, 1] "
                             "pixel units, so write e.g. 8/255 (not 8).")
    _require(s["attack_steps"] >= 0, "--attack_steps must be >= 0.")
    _require(s["epochs"] >= 1, "--epochs must be at least 1.")
    _require(s["batch_size"] >= 1, "--batch_size must be at least 1.")
    _require(s["lr"] > 0, "--lr must be positive.")
    _require(s["weight_decay"] >= 0, "--weight_decay must be >= 0.")
    _require(s["beta"] >= 0, "--beta must be >= 0.")
    if binary == TRAIN:
        _require(s["lambda_twins"] >= 0, "--lambda_twins must be >= 0.")
        _require(s["l2sp_alpha"] >= 0, "--l2sp_alpha must be >= 0.")
    for name in ("max_train_examples", "max_validation_examples", "train_per_class"):
        _require(s.get(name) is None or s[name] >= 1, f"--{name} must be at least 1.")
    try:
        decay = [int(e) for e in s["lr_decay_epochs"] or []]
    except ValueError:
        raise SetupError(f"--lr_decay_epochs must be comma-separated epoch numbers, got "
                         f"{','.join(s['lr_decay_epochs'])!r}.") from None
    _require(all(e >= 1 for e in decay) and decay == sorted(set(decay)),
             "--lr_decay_epochs must be increasing positive epoch numbers, e.g. 30,50.")
    s["lr_decay_epochs"] = decay
    if s["twin"] and not s.get("pretrained") and not s.get("allow_random_init"):
        raise SetupError(f"--method={s['method']} fine-tunes a pre-trained model but no "
                         "--pretrained was given: its Frozen wing would normalise with the 0/1 "
                         "statistics of random init, which defeats TWINS; pass --pretrained=... "
                         "or --allow_random_init if you mean it.")
    if not s.get("model_dir"):
        raise SetupError("--model_dir is required: the run writes its config, weights, "
                         "metrics and backup there.")
    for key in PATH_KEYS:  # config.json names the files used, from wherever it is read
        if s.get(key) and "://" not in s[key]:  # gs://... and other URLs are absolute already
            s[key] = os.path.abspath(os.path.expanduser(s[key]))
    if s["strategy"] == "tpu" and s["jit_compile"] == "false":
        raise SetupError("--strategy=tpu always compiles with XLA; drop --jit_compile=false.")
    return s


def _require(condition, message):
    if not condition:
        raise SetupError(message)


def jit_compile_value(setting):
    """The `compile(jit_compile=...)` value of a `--jit_compile` setting."""
    return {"auto": "auto", "true": True, "false": False}[setting]


# --- the model_dir contract -------------------------------------------------------------------
def read_config(model_dir):
    """The settings stored in `model_dir/config.json`.

    Raises:
      SetupError: no config.json there, or it is not valid JSON.
    """
    path = os.path.join(model_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise SetupError(f"{model_dir} holds no {CONFIG_FILE}: pass the --model_dir of a "
                         "train or pretrain run.")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise SetupError(f"{path} is unreadable ({error}); it was not written by "
                         "twins_tf.") from None


def differing_keys(stored, settings):
    """Sorted keys whose values differ between two settings dicts, except uncompared ones."""
    keys = (set(stored) | set(settings)) - set(UNCOMPARED_KEYS)
    return sorted(k for k in keys if _normalise(stored.get(k)) != _normalise(settings.get(k)))


def _normalise(value):
    return json.loads(json.dumps(value))  # tuples -> lists, as config.json stores them


def check_model_dir(model_dir, settings):
    """Decides what a run may do with `model_dir`, before anything is written.

    Returns:
      "new" (nothing of a run there), "resume" (a run with the same settings, unfinished, or
      finished with fewer `epochs` than asked for now: it is extended from its backup) or
      "finished" (a run with the same settings that has completed).

    Raises:
      SetupError: the model_dir holds a run with different settings (listing the keys and
        both values), or run files without a config.json, or fewer `--epochs` than it has
        trained, or a finished run to extend whose backup is gone.
    """
    config_path = os.path.join(model_dir, CONFIG_FILE)
    if not os.path.exists(config_path):
        leftovers = [n for n in RUN_ARTEFACTS if os.path.exists(os.path.join(model_dir, n))]
        if leftovers:
            raise SetupError(f"--model_dir={model_dir} holds {', '.join(leftovers)} but no "
                             f"{CONFIG_FILE}; refusing to overwrite it: use a new --model_dir.")
        return "new"
    # settings added since earlier runs were written: their values in those runs
    added = {k: v for k, v in _ADDED_SETTINGS.items() if k in settings}
    stored = {**added, **read_config(model_dir)}
    differing = differing_keys(stored, settings)
    if differing:
        changes = "; ".join(f"{k}: {stored.get(k)!r} in the run, {settings.get(k)!r} now"
                            for k in differing)
        why = (" (--lr_decay_epochs is the learning-rate schedule the trained epochs "
               "followed, so it must stay the same to extend a run)"
               if "lr_decay_epochs" in differing else "")
        raise SetupError(f"--model_dir={model_dir} holds a run with different settings "
                         f"({changes}){why}; refusing to resume into it: use a new --model_dir "
                         "or the run's own flags.")
    trained = resume_epoch(model_dir)
    finished = os.path.exists(os.path.join(model_dir, SUMMARY_FILE))
    if finished and not os.path.isdir(os.path.join(model_dir, BACKUP_DIR)):
        trained = int(stored.get("epochs", 0))  # a run finished before backups were kept
    if settings.get("epochs") is not None and settings["epochs"] < trained:
        raise SetupError(f"--model_dir={model_dir} holds a run that has trained {trained} "
                         f"epochs; --epochs={settings['epochs']} cannot undo them: pass "
                         f"--epochs={trained} or more, or use a new --model_dir.")
    if not finished:
        return "resume"
    if settings.get("epochs") is None or settings["epochs"] == trained:
        return "finished"
    if not os.path.isfile(os.path.join(model_dir, BACKUP_DIR, BACKUP_METADATA)):
        raise SetupError(f"--model_dir={model_dir} holds a finished run of {trained} epochs "
                         f"but no {BACKUP_DIR}/ to extend it to --epochs={settings['epochs']} "
                         "from (deleted?): use a new --model_dir.")
    return "resume"


def write_config(model_dir, settings):
    """Writes `config.json` (atomically) unless it exists already; a raised `epochs` (a run
    being extended) is recorded in it, the rest of the stored settings is kept."""
    os.makedirs(model_dir, exist_ok=True)
    path = os.path.join(model_dir, CONFIG_FILE)
    if os.path.exists(path):
        stored = read_config(model_dir)
        if stored.get("epochs") != settings.get("epochs"):
            write_json(path, {**stored, "epochs": settings["epochs"]})
        return
    write_json(path, settings)


def write_json(path, payload):
    """Writes JSON through a temporary file and a rename, so a kill never leaves half a file.

    NaN and infinities are not JSON (Python's json writes a bare `NaN` other readers reject):
    they are written as null.
    """
    temporary = f"{path}.partial"
    with open(temporary, "w") as f:
        json.dump(_finite_or_null(payload), f, indent=2, sort_keys=True, allow_nan=False)
        f.write("\n")
    os.replace(temporary, path)


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


# --- the backup (keras.callbacks.BackupAndRestore with double_checkpoint=True) --------------
# Keras copies the latest pair (weights, metadata) to `<name>.bkp`, then writes the weights,
# then the metadata.  It falls back to the copy only when the weights file does not open; a
# kill can also leave one that opens but is cut short (fewer arrays), or a half-written
# metadata file, on which Keras crashes.  `repair_backup` puts the copy back in those cases.
BACKUP_WEIGHTS = "latest.weights.h5"
BACKUP_METADATA = "training_metadata.json"
PREVIOUS_SUFFIX = ".bkp"


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


def _metadata_epoch(metadata_path):
    try:
        with open(metadata_path) as f:
            return int(json.loads(f.read())["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _backup_pairs(model_dir):
    """(latest epoch or None, previous epoch or None, backup dir, weights, metadata paths).

    The latest pair counts only if both files read back and it holds every array the
    previous one does (a file cut short while written holds fewer)."""
    backup = os.path.join(model_dir, BACKUP_DIR)
    weights, metadata = (os.path.join(backup, n) for n in (BACKUP_WEIGHTS, BACKUP_METADATA))
    previous_names = _array_names(weights + PREVIOUS_SUFFIX) if os.path.exists(
        weights + PREVIOUS_SUFFIX) else None
    previous = _metadata_epoch(metadata + PREVIOUS_SUFFIX) if previous_names else None
    latest = _metadata_epoch(metadata)
    if latest is not None:
        names = _array_names(weights)
        if names is None or (previous is not None and names < previous_names):
            latest = None
    return latest, previous, backup, weights, metadata


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
        raise SetupError(f"{backup} is broken (the run was killed while writing it?) and holds "
                         f"no usable previous backup: delete {backup} to restart the run from "
                         "epoch 0, or use a new --model_dir.")
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
