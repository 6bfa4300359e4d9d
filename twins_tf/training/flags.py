"""absl flag definitions of the run binaries, and the data flags shared with `evaluate`.

`python -m twins_tf.train` and `python -m twins_tf.pretrain` take the same flag groups (data,
model, method, attack, optimisation, run/distribution); `pretrain` only differs in its
defaults, in its methods (plain-BN ones) and in having no `--pretrained`. `evaluate` takes
the data flags too (`define_data_flags`), so a dataset is named the same way everywhere.

The flags are defined on a `FlagValues` passed in, so tests can parse argument lists without
touching the global `absl.flags.FLAGS` (and `train` and `pretrain` can live in one process).

Where a value came from matters for one thing: a method with its own published schedule
(AutoLoRa, `methods.Method.schedule`) runs it for each of `--lr`, `--weight_decay` and
`--lr_decay_epochs` not chosen for it.  Chosen means set on the command line, or in a
flagfile that itself sets `--method` to such a method (one written for it).  The shipped
flagfiles carry the TWINS recipe of spec §6 (lr 0.003, x0.1 at epochs 30 and 50, the
dataset's weight decay), tuned for other methods: absl cannot tell their lines from typed
ones, so `explicit_flags` reads the command line itself, and `settings_from_flags` hands
what it finds to `Settings` as `explicit_schedule`.

It is long because it holds every flag of the two run binaries with its help text.
"""

import fractions
import os
import sys

from absl import flags

from twins_tf import data as data_lib
from twins_tf import methods as methods_lib
from twins_tf.models.registry import ARCHITECTURES
from twins_tf.training.settings import (
    ADDED_SETTINGS,
    BINARIES,
    DEFAULTS,
    INIT_CHOICES,
    JIT_CHOICES,
    PRECISIONS,
    PRETRAIN,
    PRETRAIN_METHODS,
    SCHEDULE_SETTINGS,
    STRATEGIES,
    TRAIN,
)

# How the attack flags of every binary (train, pretrain, evaluate, compare, interpolate)
# explain the threat model: the norm, and the radius and step in its units.
NORM_HELP = (
    "Threat model: linf (L-inf, the default) or l2 (L2, e.g. the robust ImageNet models of "
    "Salman et al. 2020, eps 3)."
)
RADIUS_HELP = (
    "Attack radius in [0, 1] pixel units, in --attack_norm: L-inf as a fraction of 255 or a "
    "number (8/255 or 0.0314), at most 1; L2 as a plain number (0.5, 3.0), the L2 length of "
    "the perturbation over all pixels and channels, at most the diagonal of the image box"
)
STEP_HELP = (
    "PGD step size in [0, 1] pixel units, in --attack_norm: L-inf per pixel (2/255), L2 the "
    "L2 length of each step (e.g. eps/4 = 0.125 for eps 0.5)"
)

# The flags `define_data_flags` defines, in order.
DATA_FLAGS = (
    "dataset",
    "data_dir",
    "tfds_data_dir",
    "image_size",
    "upsample",
    "train_per_class",
    "skip_bad_images",
)


class _FractionParser(flags.FloatParser):
    """A float flag that also takes fractions such as `8/255`."""

    def convert(self, argument):
        if isinstance(argument, str) and "/" in argument:
            try:
                return float(fractions.Fraction(argument.strip()))
            except (ValueError, ZeroDivisionError):
                raise ValueError(
                    f"{argument!r} is neither a number nor a fraction like 8/255"
                ) from None
        return super().convert(argument)


def define_fraction(name, default, help_text, flag_values, module_name):
    """Defines a float flag that accepts `a/b` (used for the attack radius and step)."""
    flags.DEFINE(
        _FractionParser(),
        name,
        default,
        help_text,
        flag_values=flag_values,
        serializer=flags.ArgumentSerializer(),
        module_name=module_name,
    )


def define_data_flags(flag_values, module_name=None, *, from_run=False):
    """Defines the flags that say which data a model sees (`DATA_FLAGS`) on `flag_values`.

    One definition for every binary, so `--dataset=folder --data_dir=...` means the same in
    `train`, `pretrain`, `compare` and `evaluate`.

    Args:
      flag_values: the `absl.flags.FlagValues` to define them on.
      module_name: the absl module the flags are listed under by `--helpfull`.
      from_run: the binary can read a run's config.json (`evaluate --model_dir`): every
        default is then None, meaning "the run's value, else the dataset's" (so
        `--skip_bad_images` too is None, not False, unless given).

    Returns:
      The names of the defined flags, `DATA_FLAGS`.
    """
    run = "the run's, else " if from_run else ""

    def define(kind, name, default, help_text):
        getattr(flags, f"DEFINE_{kind}")(
            name, default, help_text, flag_values=flag_values, module_name=module_name
        )

    define(
        "string",
        "dataset",
        None,
        "Registered dataset (twins_tf.data.DATASETS): "
        + ", ".join(sorted(data_lib.DATASETS))
        + (" (default: the run's; without --model_dir: required)." if from_run else "."),
    )
    define(
        "string",
        "data_dir",
        None,
        "Image folder of --dataset=folder (train/ and test/ of class folders) or caltech256"
        + (" (default: the run's)." if from_run else "."),
    )
    define(
        "string",
        "tfds_data_dir",
        None,
        f"tensorflow-datasets data_dir holding prepared tfds datasets (default: {run}"
        "$TFDS_DATA_DIR or ~/tensorflow_datasets). Nothing is ever downloaded.",
    )
    define(
        "integer",
        "image_size",
        None,
        f"Side of the images fed to the model (default: {run}the dataset's).",
    )
    define(
        "integer",
        "upsample",
        None,
        f"Nearest-neighbour upsampling inside the model (default: {run}the dataset's; CIFAR: 7).",
    )
    define(
        "integer",
        "train_per_class",
        None,
        "For a folder of class folders without train/ and test/: training images per class "
        f"(a seeded split, the rest is the test set; default: {run}caltech256's 60).",
    )
    define(
        "bool",
        "skip_bad_images",
        None if from_run else False,
        "Leave out folder images that are not whole JPEG/PNG/GIF/BMP files (their count is "
        "logged) instead of stopping before anything is written"
        + (" (default: the run's, else false)." if from_run else "."),
    )
    return list(DATA_FLAGS)


def define_flags(flag_values, binary):
    """Defines the flags of `binary` ("train" or "pretrain") on `flag_values`.

    Flags are registered under one pseudo-module per group ("twins_tf.train: data", ...) so
    `--helpfull` lists them by group.  The defaults are `settings.DEFAULTS[binary]`.

    Returns:
      The names of the defined flags.
    """
    if binary not in BINARIES:
        raise ValueError(f"binary must be one of {BINARIES}, got {binary!r}.")
    defaults = DEFAULTS[binary]
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
    define(
        "integer",
        "max_train_examples",
        None,
        "Use only N training examples, a class-stratified subset seeded by the split seed "
        "(quick runs and tests).",
        "data",
    )
    define(
        "integer",
        "max_validation_examples",
        None,
        "Use only N validation examples, stratified by class like --max_train_examples.",
        "data",
    )
    define(
        "enum",
        "validation",
        "carve",
        "carve: hold out part of the training data (or use the official validation split) "
        "to select the best epoch; none: train on the whole official train split and keep "
        "the final epoch (the protocol of the published numbers).",
        "data",
        enum_values=list(data_lib.VALIDATION_PROTOCOLS),
    )
    # model
    define(
        "string",
        "arch",
        defaults["arch"],
        "Architecture: " + ", ".join(sorted(ARCHITECTURES)) + ".",
        "model",
    )
    if binary == TRAIN:
        define(
            "string",
            "pretrained",
            None,
            "Robust pre-trained weights (.weights.h5 from `python -m twins_tf.convert` or "
            "`python -m twins_tf.pretrain`); the head is always fresh.",
            "model",
        )
        define(
            "bool",
            "allow_random_init",
            False,
            "Let a twin method (twins_at, twins_trades) start without --pretrained, from "
            "random weights (its Frozen wing then normalises with 0/1 statistics).",
            "model",
        )
    # method
    methods = PRETRAIN_METHODS if binary == PRETRAIN else tuple(methods_lib.METHODS)
    define(
        "string",
        "method",
        defaults["method"],
        "Training objective: " + ", ".join(methods) + ".",
        "method",
    )
    if binary == TRAIN:
        define("float", "lambda_twins", 1.0, "TWINS: weight of the Frozen wing's loss.", "method")
        define(
            "float",
            "l2sp_alpha",
            0.01,
            "L2-SP (Li et al. 2018): alpha of the pull "
            "alpha/2 * ||w - w_pre||^2 of every pre-trained weight (BN gamma/beta included) "
            "to its pre-trained value; --weight_decay then decays only the new head.",
            "method",
        )
    define(
        "float",
        "beta",
        6.0,
        "TRADES / TWINS-TRADES: weight of the KL term; AutoLoRa: "
        "lambda2 = beta x the LoRA branch's training accuracy (the paper: 6).",
        "method",
    )
    if binary == TRAIN:
        define(
            "integer",
            "lora_rank",
            0,
            "AutoLoRa (--method=autolora, required there, refused elsewhere): rank r of "
            "the low-rank branch on every convolution and Linear layer inside the residual "
            "blocks (the paper: 8; docs/backbones.md for ConvNeXt and ViT). AutoLoRa runs "
            "the paper's schedule (lr 0.01, weight decay 1e-4, no "
            "step decay) for each of --lr, --weight_decay, --lr_decay_epochs not set on the "
            "command line, and halves the lr automatically on the validation robust "
            "accuracy (so --validation=none is refused).",
            "method",
        )
    if binary == TRAIN:  # the head's initialisation (training.init_stage)
        define(
            "enum",
            "init",
            "random",
            "How the fresh head starts: random; linear_probe (natural CE) or "
            "robust_linear_probe (PGD-AT, RoLI) on the frozen --pretrained backbone for "
            "--init_epochs first, a sub-run in <model_dir>/init, then --method from there.",
            "init",
            enum_values=list(INIT_CHOICES),
        )
        define(
            "integer",
            "init_epochs",
            ADDED_SETTINGS["init_epochs"],
            "Epochs of the --init probe (RoLI's CIFAR linear probes: 20).",
            "init",
        )
        define(
            "float",
            "init_lr",
            ADDED_SETTINGS["init_lr"],
            "Learning rate of the --init probe: SGD (momentum 0.9), cosine decay to 0 over "
            "its steps (RoLI's CIFAR-100: 0.1).",
            "init",
        )
        define(
            "float",
            "init_weight_decay",
            ADDED_SETTINGS["init_weight_decay"],
            "Coupled L2 weight decay of the head during the --init probe (RoLI's CIFAR-100: 1e-3).",
            "init",
        )
    # attack
    define(
        "string",
        "attack_norm",
        "linf",
        f"{NORM_HELP} Training and validation PGD attack in it.",
        "attack",
    )
    define_fraction(
        "attack_eps",
        8 / 255,
        f"{RADIUS_HELP} (training and validation PGD).",
        flag_values,
        group("attack"),
    )
    define_fraction(
        "attack_step",
        2 / 255,
        f"{STEP_HELP}.",
        flag_values,
        group("attack"),
    )
    names += ["attack_eps", "attack_step"]
    define("integer", "attack_steps", 10, "PGD steps (training and validation).", "attack")
    # optimisation
    define("integer", "epochs", defaults["epochs"], "Training epochs.", "optimisation")
    define(
        "integer",
        "batch_size",
        128,
        "Global batch size (a multiple of 2 x replicas for twin methods).",
        "optimisation",
    )
    define(
        "float",
        "lr",
        defaults["lr"],
        "Initial learning rate of SGD (momentum 0.9); --method=autolora: the paper's 0.01 "
        "unless set on the command line.",
        "optimisation",
    )
    define(
        "list",
        "lr_decay_epochs",
        list(defaults["lr_decay_epochs"]),
        "Epochs at which the learning rate is multiplied by 0.1 (stepped per iteration); "
        "--method=autolora: none (the paper's) unless set on the command line.",
        "optimisation",
    )
    define(
        "float",
        "weight_decay",
        defaults["weight_decay"],
        "Coupled L2 weight decay (added to every gradient; with --method=l2sp only to the "
        "new head's, L2-SP's beta); --method=autolora: the paper's 1e-4 unless set on the "
        "command line.",
        "optimisation",
    )
    # run / distribution
    define(
        "string",
        "model_dir",
        None,
        "Where the run keeps config.json, weights, metrics, TensorBoard logs and its "
        "backup; start again with the same flags to resume.",
        "run",
    )
    define(
        "integer", "seed", 0, "Seed of initialisation, data order, augmentation and attacks.", "run"
    )
    define(
        "enum",
        "strategy",
        "default",
        "tf.distribute strategy.",
        "run",
        enum_values=list(STRATEGIES),
    )
    define("string", "tpu_address", None, "TPU name or grpc://host:port for --strategy=tpu.", "run")
    define(
        "enum",
        "jit_compile",
        "auto",
        "XLA compilation of the train step (Keras 'auto': on for GPUs/TPUs, off on CPUs).",
        "run",
        enum_values=list(JIT_CHOICES),
    )
    define(
        "enum",
        "precision",
        "float32",
        "Numerics of training: float32; bfloat16 (Keras mixed_bfloat16 policy for the train "
        "step and the training attack); mixed_bfloat16 or mixed_float16 (that policy for the "
        "train step, the training attack in float32).  Variables, BatchNorm statistics, loss "
        "and the validation attack stay float32.",
        "run",
        enum_values=list(PRECISIONS),
    )
    define(
        "bool",
        "deterministic",
        False,
        "Deterministic TensorFlow ops (tf.config.experimental.enable_op_determinism); slower.",
        "run",
    )
    return names


def settings_from_flags(flag_values, binary, argv=None):
    """The run settings of `binary` from parsed flags, as a JSON-able dict (not yet checked:
    `Settings.from_dict` checks it).

    Args:
      flag_values: the parsed `FlagValues`.
      binary: "train" or "pretrain".
      argv: the command line `flag_values` was parsed from, program name first (default
        `sys.argv`, what a binary's flags are parsed from): its schedule flags are the
        run's `explicit_schedule` (`explicit_flags`).
    """
    names = [n for n in define_flags(flags.FlagValues(), binary) if n in flag_values]
    settings = {name: flag_values[name].value for name in names}
    settings["binary"] = binary
    if binary == PRETRAIN:
        settings["pretrained"] = None
    chosen = explicit_flags(flag_values, sys.argv if argv is None else argv)
    settings["explicit_schedule"] = [n for n in SCHEDULE_SETTINGS if n in chosen]
    return settings


def explicit_flags(flag_values, argv):
    """The names of the flags whose value `argv` (program name first) chose for the run: the
    last setting of each was written on `argv` itself, or in a `--flagfile` whose own lines
    set `--method` to a method with its own schedule (a flagfile written for that method).
    A flagfile of the TWINS recipe then sets `--lr` for TWINS but not for AutoLoRa; a value
    typed after it sets it for both."""
    return command_line_flags(flag_values, argv, own_schedule_flagfiles=True)


def command_line_flags(flag_values, argv, *, own_schedule_flagfiles=False):
    """The names of the flags whose last setting is written on `argv` (program name first)
    itself, not read from a `--flagfile` (absl's `present` counts both); with
    `own_schedule_flagfiles`, also of a flagfile that names a method with its own schedule
    (`explicit_flags`).  Flagfiles are read as absl reads them (one flag a line, `#` and
    `//` comments), nested ones judged by their own lines."""
    chosen = {}

    def walk(tokens, typed):
        for index, token in enumerate(tokens):
            if token == "--":
                break
            name, _, value = token.lstrip("-").partition("=")
            if not token.startswith("-") or not name:
                continue
            if name == "flagfile":
                if not value and index + 1 < len(tokens):
                    value = tokens[index + 1]
                lines = _flagfile_lines(value)
                walk(lines, own_schedule_flagfiles and _names_own_schedule_method(lines))
            elif name in flag_values:
                chosen[name] = typed
            elif name.startswith("no") and name[2:] in flag_values:  # --noflag of a bool
                chosen[name[2:]] = typed

    walk(list(argv[1:]), True)
    return {name for name, typed in chosen.items() if typed}


def _flagfile_lines(path):
    with open(os.path.expanduser(path)) as f:
        lines = (line.strip() for line in f)
        return [line for line in lines if line and not line.startswith(("#", "//"))]


def _names_own_schedule_method(lines):
    """Whether a flagfile's own lines set --method to a method with its own schedule."""
    methods = [line.partition("=")[2] for line in lines if line.lstrip("-").startswith("method=")]
    method = methods[-1] if methods else None
    return method in methods_lib.METHODS and methods_lib.get(method).schedule is not None


def settings_from_args(binary, args):
    """The settings dict of `python -m twins_tf.<binary> <args>` (args without the program
    name), parsed as the binary parses them but on a fresh `FlagValues`: what compare, the
    demo and tests use to describe runs in flag syntax."""
    flag_values = flags.FlagValues()
    define_flags(flag_values, binary)
    flag_values([binary, *args])
    return settings_from_flags(flag_values, binary, argv=[binary, *args])
