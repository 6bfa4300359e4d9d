"""`Settings`: the typed, frozen, checked settings of one `train` or `pretrain` run.

A run is described by one value per flag (see `training.flags`); `Settings` holds them with
their types, resolves what the flags leave open (the dataset's image size and upsampling,
absolute paths, whether the method trains a twin model) and refuses a wrong value with a
one-line `SetupError` that says what to do, before anything is built or written.  It is
frozen so that nothing downstream (the trainer, the callbacks, the report) can change what
config.json records: a changed value is a new object (`dataclasses.replace`, checked again).

A method with its own published schedule (AutoLoRa: `methods.Method.schedule`) takes that
schedule for each of `lr`, `weight_decay` and `lr_decay_epochs` that was not chosen for the
run: left None, or, when `explicit_schedule` lists what was chosen, not listed there.  The
flags fill `explicit_schedule` with what the command line sets (`training.flags`), so a
flagfile's recipe for the TWINS methods does not replace the paper's schedule of AutoLoRa;
`replace` counts what it changes as chosen.

config.json holds `to_dict()`: the same keys and JSON values the untyped settings dict of
earlier versions had, so runs written before `Settings` existed resume, and `evaluate` and
`export` read them as before.  Settings added since (`ADDED_SETTINGS`) take, for a run that
predates them, the value those runs had; renamed ones (`RENAMED_SETTINGS`) are read under
their current names.

It is long because every rule a run's settings obey is here, so they can be read in one place.
"""

import dataclasses
import os

from twins_tf import data as data_lib
from twins_tf import methods as methods_lib
from twins_tf.input_checks import check_norm, check_pixel_budget
from twins_tf.models import registry
from twins_tf.models.registry import ARCHITECTURES
from twins_tf.training import distribute

TRAIN = "train"
PRETRAIN = "pretrain"
BINARIES = (TRAIN, PRETRAIN)
# Methods a from-scratch run can use: plain BatchNorm (a twin needs a pre-trained Frozen wing).
PRETRAIN_METHODS = ("at", "trades", "clean")
STRATEGIES = distribute.STRATEGIES
JIT_CHOICES = ("auto", "true", "false")
# --precision: the Keras dtype policy of the training step, and the dtype the training attack
# computes in.  "bfloat16" runs both in bfloat16 (the attack with the model's own policy);
# "mixed_bfloat16" and "mixed_float16" run the step in that policy and the attack in float32,
# whose gradient signs the low-precision formats round away (twins_tf.attacks.pgd).
# Variables, BatchNorm statistics and the loss stay float32 under every one.
PRECISIONS = ("float32", "bfloat16", "mixed_bfloat16", "mixed_float16")
# The Keras dtype policy of each precision, for train and for evaluate (which takes float32 and
# bfloat16).
DTYPE_POLICIES = {
    "float32": "float32",
    "bfloat16": "mixed_bfloat16",
    "mixed_bfloat16": "mixed_bfloat16",
    "mixed_float16": "mixed_float16",
}


def attack_compute_dtype(precision):
    """The `compute_dtype` of a PGD attack under a `--precision` (train's or evaluate's): None
    (the model's own policy) for bfloat16, else float32."""
    return None if precision == "bfloat16" else "float32"


# --init: how the fresh head starts (training.init_stage).  A probe is a sub-run in
# <model_dir>/init/ training the head alone with this method; `stage` says which run it is.
INIT_METHODS = {"linear_probe": "clean", "robust_linear_probe": "at"}
INIT_CHOICES = ("random", *INIT_METHODS)
STAGES = ("main", "init")

# Keys that may differ between a run and its resumption: where data lives, how to execute.
LOCATION_KEYS = ("model_dir", "data_dir", "tfds_data_dir")
EXECUTION_KEYS = ("strategy", "tpu_address", "jit_compile", "deterministic")
# `epochs` may be raised to extend a run, and a plain-BN run may change its replicas;
# check_model_dir compares them on their own.
UNCOMPARED_KEYS = LOCATION_KEYS + EXECUTION_KEYS + ("epochs", "replicas")
# Settings holding paths, stored absolute in config.json.
PATH_KEYS = ("model_dir", "data_dir", "tfds_data_dir", "pretrained")
# Settings newer than some config.json files, with the value such runs had.
ADDED_SETTINGS = {
    "validation": "carve",
    "allow_random_init": False,
    "skip_bad_images": False,
    "init": "random",
    "init_epochs": 20,
    "init_lr": 0.1,
    "init_weight_decay": 1e-3,
    "stage": "main",
    "lora_rank": 0,
    "attack_norm": "linf",
}
# Settings stored under an earlier name: old name -> (name, {old value: value}).
RENAMED_SETTINGS = {"mixed_precision": ("precision", {"none": "float32"})}


def with_current_names(values):
    """A stored settings dict with every `RENAMED_SETTINGS` key under its current name and
    value, so a run written before the rename reads, resumes and compares as its own."""
    values = dict(values)
    for old, (new, value_map) in RENAMED_SETTINGS.items():
        if old in values and new not in values:
            value = values.pop(old)
            values[new] = value_map.get(value, value)
    return values


# Settings only `train` has: a pretrain run's config.json leaves them out.
TRAIN_ONLY = (
    "allow_random_init",
    "lambda_twins",
    "l2sp_alpha",
    "init",
    "init_epochs",
    "init_lr",
    "init_weight_decay",
    "stage",
    "lora_rank",
)

# The settings a method may have its own values of (`methods.Method.schedule`).
SCHEDULE_SETTINGS = methods_lib.SCHEDULE_SETTINGS

# The defaults of the two binaries where they differ (spec §6 for fine-tuning; a common
# PGD-AT recipe, shortened, for training from scratch).  `Settings` fills them in for the
# fields left None, and the flags show them.
DEFAULTS = {
    TRAIN: dict(
        method="twins_at",
        arch="resnet50",
        epochs=60,
        lr=0.003,
        lr_decay_epochs=("30", "50"),
        weight_decay=1e-3,
    ),
    PRETRAIN: dict(
        method="at",
        arch="resnet18",
        epochs=100,
        lr=0.1,
        lr_decay_epochs=("50", "75"),
        weight_decay=5e-4,
    ),
}


class SetupError(ValueError):
    """A flag value, a file or the model_dir is wrong; raised before any training starts."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """The settings of one run, one field per flag of its binary; checked when built.

    Fields left None that have a per-binary default (`DEFAULTS`) take it, so
    `Settings(binary="pretrain", dataset="cifar10", model_dir="runs/x")` is the from-scratch
    recipe.  `twin` is derived from `method`; `num_classes` is filled in by the run from its
    data (None until then).  A method with its own schedule (AutoLoRa) takes it for `lr`,
    `weight_decay` and `lr_decay_epochs` where they were not chosen (`explicit_schedule`):
    `Settings(method="autolora", ...)` runs at the paper's lr 0.01, weight decay 1e-4 and
    without step decay, `Settings(method="autolora", lr=0.02, ...)` at lr 0.02.

    Raises (when built):
      SetupError: the first wrong value, with what to do about it.
    """

    binary: str = TRAIN
    # data
    dataset: str = None
    data_dir: str = None
    tfds_data_dir: str = None
    image_size: int = None
    upsample: int = None
    train_per_class: int = None
    skip_bad_images: bool = False
    max_train_examples: int = None
    max_validation_examples: int = None
    validation: str = "carve"
    # model
    arch: str = None
    pretrained: str = None
    allow_random_init: bool = False
    # method
    method: str = None
    lambda_twins: float = 1.0
    l2sp_alpha: float = 0.01
    beta: float = 6.0
    lora_rank: int = 0  # AutoLoRa's branch rank (twins_tf.lora); 0: no branch
    # initialisation of the head (training.init_stage; defaults: RoLI's CIFAR-100 probe)
    init: str = "random"
    init_epochs: int = 20
    init_lr: float = 0.1
    init_weight_decay: float = 1e-3
    stage: str = "main"
    # attack: the threat model's norm, and the radius and step in it ([0, 1] pixel units)
    attack_norm: str = "linf"
    attack_eps: float = 8 / 255
    attack_step: float = 2 / 255
    attack_steps: int = 10
    # optimisation
    epochs: int = None
    batch_size: int = 128
    lr: float = None
    lr_decay_epochs: tuple = None
    weight_decay: float = None
    # which of SCHEDULE_SETTINGS were chosen for this run (None: each one not None); a method
    # with its own schedule takes its values for the others.  Kept when built (a `replace` to
    # such a method needs it) but not in config.json, whose values are the run's.
    explicit_schedule: tuple = dataclasses.field(default=None, compare=False)
    # run
    model_dir: str = None
    seed: int = 0
    strategy: str = "default"
    tpu_address: str = None
    jit_compile: str = "auto"
    precision: str = "float32"
    deterministic: bool = False
    # derived
    twin: bool = None
    num_classes: int = None
    # the strategy's replicas the run trains on (each replica splits its own batch into the
    # twin wings and draws its own PGD starts), filled in by the run: see model_dir.py
    replicas: int = None

    def __post_init__(self):
        for name, value in _checked_values(self).items():
            object.__setattr__(self, name, value)  # frozen: only the checks resolve values

    @classmethod
    def from_dict(cls, values):
        """The checked `Settings` of a settings dict: flags' values or a config.json.

        Keys a config.json written before a setting existed lacks take `ADDED_SETTINGS`'
        values (renamed ones are renamed by `model_dir.read_config`, which reads every stored
        config); a stored `twin` is recomputed from the method.

        Raises:
          SetupError: an unknown key, or a wrong value.
        """
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SetupError(
                f"unknown setting(s) {', '.join(unknown)}; settings are the flags "
                "of python -m twins_tf.train (see --helpfull)."
            )
        values = {k: v for k, v in values.items() if k != "twin"}
        return cls(**{**ADDED_SETTINGS, **values})

    def to_dict(self):
        """The JSON-able dict config.json stores (lists for tuples; a pretrain run without
        the train-only keys; no `num_classes` before the data set it)."""
        out = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name in TRAIN_ONLY and self.binary == PRETRAIN:
                continue
            if field.name in ("num_classes", "replicas") and value is None:
                continue
            if field.name == "explicit_schedule":  # resolved into the values stored
                continue
            if field.name == "lora_rank" and not value:  # runs without a LoRA branch keep
                continue  # the keys they always had (read back as ADDED_SETTINGS' 0)
            out[field.name] = list(value) if isinstance(value, tuple) else value
        return out

    def replace(self, **changes):
        """A copy with `changes`, checked again; a schedule setting changed is chosen."""
        if "explicit_schedule" not in changes:
            chosen = set(self.explicit_schedule or ()) | set(changes)
            changes["explicit_schedule"] = tuple(n for n in SCHEDULE_SETTINGS if n in chosen)
        return dataclasses.replace(self, **changes)

    @property
    def keras_jit_compile(self):
        """The `compile(jit_compile=...)` value of `--jit_compile`."""
        return jit_compile_value(self.jit_compile)

    @property
    def dtype_policy(self):
        """The Keras dtype policy `--precision` builds and trains the model in."""
        return DTYPE_POLICIES[self.precision]

    @property
    def attack_compute_dtype(self):
        """The training PGD's `compute_dtype` under `--precision`."""
        return attack_compute_dtype(self.precision)


def jit_compile_value(setting):
    """The `compile(jit_compile=...)` value of a `--jit_compile` setting."""
    return {"auto": "auto", "true": True, "false": False}[setting]


def as_settings(settings):
    """`settings` as `Settings`: a `Settings` is returned as is, a dict is checked."""
    return settings if isinstance(settings, Settings) else Settings.from_dict(settings)


def _require(condition, message):
    if not condition:
        raise SetupError(message)


# Fields whose values must have these types (bool is refused where a number is meant).
_NUMBERS = {
    "image_size": int,
    "upsample": int,
    "train_per_class": int,
    "max_train_examples": int,
    "max_validation_examples": int,
    "attack_steps": int,
    "epochs": int,
    "batch_size": int,
    "seed": int,
    "num_classes": int,
    "replicas": int,
    "lambda_twins": float,
    "l2sp_alpha": float,
    "beta": float,
    "attack_eps": float,
    "attack_step": float,
    "lr": float,
    "weight_decay": float,
    "init_epochs": int,
    "init_lr": float,
    "init_weight_decay": float,
    "lora_rank": int,
}
_CHOICES = {
    "binary": BINARIES,
    "validation": data_lib.VALIDATION_PROTOCOLS,
    "strategy": STRATEGIES,
    "jit_compile": JIT_CHOICES,
    "precision": PRECISIONS,
    "init": INIT_CHOICES,
    "stage": STAGES,
}


def _check_types(s):
    for name, kind in _NUMBERS.items():
        value = s[name]
        ok = value is None or (
            isinstance(value, (int, float) if kind is float else int)
            and not isinstance(value, bool)
        )
        _require(
            ok, f"--{name} must be a{'n integer' if kind is int else ' number'}, got {value!r}."
        )
    for name, choices in _CHOICES.items():
        _require(
            s[name] in choices,
            f"--{name}={s[name]!r} is not one of {', '.join(map(str, choices))}.",
        )


def _check_init(s):
    """--init and its settings (training.init_stage), and what an init stage's run must be."""
    if s["binary"] == PRETRAIN:
        _require(
            s["init"] == "random" and s["stage"] == "main",
            f"--init={s['init']} probes a pre-trained backbone; pretrain trains from "
            "scratch: drop --init, or fine-tune with python -m twins_tf.train.",
        )
        return
    _require(s["init_epochs"] >= 1, "--init_epochs must be at least 1.")
    _require(s["init_lr"] > 0, "--init_lr must be positive.")
    _require(s["init_weight_decay"] >= 0, "--init_weight_decay must be >= 0.")
    if s["init"] != "random" and not s.get("pretrained") and not s.get("allow_random_init"):
        raise SetupError(
            f"--init={s['init']} trains a head on the frozen --pretrained backbone "
            "but no --pretrained was given: pass --pretrained=... (or "
            "--allow_random_init to probe a random backbone)."
        )
    if s["stage"] == "init":
        _require(
            s["init"] in INIT_METHODS and s["method"] == INIT_METHODS[s["init"]],
            f"stage='init' is the head-probing sub-run of --init=linear_probe "
            f"(--method=clean) or robust_linear_probe (--method=at), not of "
            f"--init={s['init']} --method={s['method']}: run python -m twins_tf.train "
            "with --init instead.",
        )


def _resolve_schedule(s):
    """lr, weight_decay and lr_decay_epochs: the method's own schedule where it has one and
    they were not chosen (`explicit_schedule`), else as given, else the binary's defaults."""
    explicit = s["explicit_schedule"]
    if explicit is not None:
        if isinstance(explicit, str) or not all(name in SCHEDULE_SETTINGS for name in explicit):
            raise SetupError(
                f"explicit_schedule must list some of {', '.join(SCHEDULE_SETTINGS)}, "
                f"got {explicit!r}."
            )
    own = dict(methods_lib.get(s["method"]).schedule or ())
    chosen = [
        name
        for name in SCHEDULE_SETTINGS
        if s[name] is not None and (explicit is None or name in explicit)
    ]
    for name in SCHEDULE_SETTINGS:
        if own and name not in chosen:
            s[name] = own[name]
        elif s[name] is None:
            s[name] = DEFAULTS[s["binary"]][name]
    s["explicit_schedule"] = tuple(chosen)


def _check_validation(s):
    """AutoLoRa's learning rate is halved on the validation robust accuracy: it needs one."""
    method = methods_lib.get(s["method"])
    _require(
        not (method.lora and s["validation"] == "none"),
        f"--method={method.name} halves its learning rate on the validation robust "
        "accuracy (val_adv_acc), which --validation=none does not measure: use "
        "--validation=carve (the authors hold out 5 % of the training data).",
    )


def _check_lora(s):
    """--lora_rank goes with AutoLoRa's method (plain BN: the paper has no wings) and only."""
    rank, method = s["lora_rank"], methods_lib.get(s["method"])
    _require(rank >= 0, f"--lora_rank must be >= 0, got {rank}.")
    if method.lora:
        _require(
            rank > 0,
            f"--method={method.name} trains a low-rank branch: pass "
            "--lora_rank=R > 0 (the paper's rank: 8).",
        )
        _require(not method.twin, f"--method={method.name} has no twin (two-wing) variant.")
    else:
        _require(
            rank == 0,
            f"--lora_rank={rank} is AutoLoRa's branch and only "
            f"--method=autolora trains it; drop --lora_rank for "
            f"--method={method.name}.",
        )


def _check_attack(s):
    """The norm, then the radius and step in it: an L-inf budget is at most 1 (the whole pixel
    range), an L2 one at most the diagonal of the run's [0, 1] image box (3.0 is ordinary)."""
    s["attack_norm"] = check_norm(s["attack_norm"], "--attack_norm", error=SetupError)
    shape = (s["image_size"], s["image_size"], 3)
    for name in ("attack_eps", "attack_step"):
        check_pixel_budget(
            s[name],
            f"--{name}",
            norm=s["attack_norm"],
            given_as="flag",
            error=SetupError,
            image_shape=shape,
        )


def _checked_values(settings):
    """The resolved field values of `settings`, checked in the order of the flags' help."""
    s = {field.name: getattr(settings, field.name) for field in dataclasses.fields(settings)}
    _check_types(s)
    binary = s["binary"]
    for name, default in DEFAULTS[binary].items():
        if s[name] is None and name not in SCHEDULE_SETTINGS:  # those after the method's
            s[name] = default
    if not s.get("dataset"):
        raise SetupError(
            "--dataset is required (e.g. --dataset=cifar10 or --flagfile=flags/cifar10.flags)."
        )
    try:
        spec = data_lib.get_dataset_spec(
            s["dataset"], image_size=s.get("image_size"), upsample=s.get("upsample")
        )
    except ValueError as error:
        raise SetupError(str(error)) from None
    s["dataset"] = spec.name
    s["image_size"], s["upsample"] = spec.image_size, spec.upsample
    if s["arch"] not in ARCHITECTURES:
        raise SetupError(
            f"Unknown arch {s['arch']!r}; choose one of {', '.join(sorted(ARCHITECTURES))}."
        )
    methods = PRETRAIN_METHODS if binary == PRETRAIN else tuple(methods_lib.METHODS)
    if s["method"] not in methods:
        hint = (
            " (twin methods fine-tune a pre-trained model: use python -m twins_tf.train)"
            if binary == PRETRAIN and s["method"] in methods_lib.METHODS
            else ""
        )
        raise SetupError(
            f"Unknown --method={s['method']!r} for {binary}; choose one of "
            f"{', '.join(methods)}{hint}."
        )
    s["twin"] = bool(methods_lib.get(s["method"]).twin)
    if s["twin"] and not registry.has_batch_norm(s["arch"]):
        raise SetupError(
            f"--method={s['method']}: {registry.twin_methods_need_batch_norm(s['arch'])}"
        )
    size_problem = registry.input_size_problem(s["arch"], s["image_size"] * s["upsample"])
    if size_problem:
        raise SetupError(
            f"--image_size={s['image_size']} --upsample={s['upsample']} (the network sees "
            f"{s['image_size'] * s['upsample']} px): {size_problem} (sizes inside the network, "
            "after upsampling)"
        )
    _resolve_schedule(s)
    _check_attack(s)
    _require(s["attack_steps"] >= 0, "--attack_steps must be >= 0.")
    _require(s["epochs"] >= 1, "--epochs must be at least 1.")
    _require(s["batch_size"] >= 1, "--batch_size must be at least 1.")
    _require(s["lr"] > 0, "--lr must be positive.")
    _require(s["weight_decay"] >= 0, "--weight_decay must be >= 0.")
    _require(s["beta"] >= 0, "--beta must be >= 0.")
    if binary == TRAIN:
        _require(s["lambda_twins"] >= 0, "--lambda_twins must be >= 0.")
        _require(s["l2sp_alpha"] >= 0, "--l2sp_alpha must be >= 0.")
    _check_lora(s)
    _check_validation(s)
    for name in ("max_train_examples", "max_validation_examples", "train_per_class"):
        _require(s.get(name) is None or s[name] >= 1, f"--{name} must be at least 1.")
    try:
        decay = tuple(int(e) for e in s["lr_decay_epochs"] or ())
    except (TypeError, ValueError):
        raise SetupError(
            f"--lr_decay_epochs must be comma-separated epoch numbers, got "
            f"{','.join(map(str, s['lr_decay_epochs']))!r}."
        ) from None
    _require(
        all(e >= 1 for e in decay) and list(decay) == sorted(set(decay)),
        "--lr_decay_epochs must be increasing positive epoch numbers, e.g. 30,50.",
    )
    s["lr_decay_epochs"] = decay
    if s["twin"] and not s.get("pretrained") and not s.get("allow_random_init"):
        raise SetupError(
            f"--method={s['method']} fine-tunes a pre-trained model but no "
            "--pretrained was given: its Frozen wing would normalise with the 0/1 "
            "statistics of random init, which defeats TWINS; pass --pretrained=... "
            "or --allow_random_init if you mean it."
        )
    if binary == PRETRAIN:
        _require(
            not s["pretrained"],
            "pretrain trains from scratch and takes no "
            "--pretrained; fine-tune with python -m twins_tf.train.",
        )
    _check_init(s)
    if not s.get("model_dir"):
        raise SetupError(
            "--model_dir is required: the run writes its config, weights, metrics and backup there."
        )
    for key in PATH_KEYS:  # config.json names the files used, from wherever it is read
        if s.get(key) and "://" not in s[key]:  # gs://... and other URLs are absolute already
            s[key] = os.path.abspath(os.path.expanduser(s[key]))
    if s["strategy"] == "tpu" and s["jit_compile"] == "false":
        raise SetupError("--strategy=tpu always compiles with XLA; drop --jit_compile=false.")
    return s
