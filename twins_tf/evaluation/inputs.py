"""What an evaluation runs on: the parsed attack list, the resolved settings, model and data.

`resolve` turns the flat settings of `python -m twins_tf.evaluate` (one key per flag) into
complete ones, filling what the flags leave open from the run's `config.json`, and checks every
value before anything is loaded, so a typo costs a one-line `SetupError`, not a traceback
after minutes of data loading.
"""

import fractions
import hashlib
import json
import os
import re

from twins_tf.input_checks import (
    NORM_NAMES,
    budget_text,
    check_norm,
    check_pixel_budget,
)
from twins_tf.training import model_dir as run_files
from twins_tf.training.flags import DATA_FLAGS
from twins_tf.training.settings import SetupError

SPLITS = ("test", "validation")
CLEAN = "clean"
AUTOATTACK = "autoattack"
REPORT_PREFIX = "evaluation_"
# --precision of an evaluation: float32, or bfloat16 (clean and PGD with the model in Keras's
# mixed_bfloat16 policy and PGD computing in it, to measure what a bfloat16 attack costs).
# AutoAttack is float32 only: it is the reference measurement.
PRECISIONS = ("float32", "bfloat16")
_PGD_NAME = re.compile(r"pgd(\d+)$")

# Every evaluation setting (one per flag of `python -m twins_tf.evaluate`) and its default.
# None: taken from the run's config.json (with --model_dir), else from the dataset or the
# defaults written in `resolve`.
DEFAULTS = {
    "model_dir": None,
    "weights": None,
    "arch": None,
    "dataset": None,
    "data_dir": None,
    "tfds_data_dir": None,
    "image_size": None,
    "upsample": None,
    "train_per_class": None,
    "split": "test",
    "attacks": [CLEAN, "pgd10", AUTOATTACK],
    "attack_norm": None,
    "attack_eps": None,
    "attack_step": None,
    "pgd_restarts": 1,
    "autoattack_version": "standard",
    "batch_size": 128,
    "max_examples": None,
    "skip_bad_images": None,
    "seed": 0,
    "precision": "float32",
    "output": None,
    "allow_unfinished": False,
    "strategy": "default",
    "tpu_address": None,
}

# The settings that do not change an evaluation's numbers, left out of the hash in its
# report's name (the norm and the radius do, and the name spells them out).
_NOT_IN_THE_RESULT = (
    "model_dir",
    "weights",
    "data_dir",
    "tfds_data_dir",
    "attack_norm",
    "attack_eps",
    "output",
    "allow_unfinished",
    "strategy",
    "tpu_address",
)

# Settings an evaluation takes from the run's config.json when its flag is not given.
_FROM_THE_RUN = (
    "arch",
    *DATA_FLAGS,
    "attack_norm",
    "attack_eps",
    "attack_step",
)


def parse_attacks(names):
    """Checks `--attacks`; returns [(name, steps or None)] in the given order."""
    attacks = []
    for name in names:
        name = name.strip().lower()
        match = _PGD_NAME.match(name)
        if name in (CLEAN, AUTOATTACK):
            attacks.append((name, None))
        elif match and int(match.group(1)) >= 1:
            attacks.append((name, int(match.group(1))))
        else:
            raise SetupError(
                f"unknown attack {name!r} in --attacks; use clean, pgdK (e.g. pgd10) or autoattack."
            )
    if not attacks:
        raise SetupError("--attacks is empty; use e.g. --attacks=clean,pgd10,autoattack.")
    if len({a for a, _ in attacks}) != len(attacks):
        raise SetupError(f"--attacks names an attack twice: {','.join(names)}.")
    return attacks


def parse_radii(value, label="--attack_eps", norm="linf", image_shape=None):
    """The radii of `--attack_eps` in `norm` (a comma list such as `2/255,4/255,8/255` or
    `0.25,0.5,1`, a number, or a list of either) as floats, in the order given.

    Args:
      value: the flag's value.
      label: how messages name it.
      norm: "linf" (each radius in (0, 1]) or "l2" (each radius positive and at most the
        diagonal of the [0, 1] box of images of `image_shape`, when given).
      image_shape: (height, width, channels) of the images.

    Raises:
      SetupError: an entry that is no number, outside the norm's range, or given twice.
    """
    items = value.split(",") if isinstance(value, str) else value
    items = list(items) if isinstance(items, (list, tuple)) else [items]
    text = ",".join(str(item) for item in items)
    example = "0.25,0.5,1" if norm == "l2" else "2/255,4/255,8/255"
    if not items or any(isinstance(i, str) and not i.strip() for i in items):
        raise SetupError(
            f"{label}={text} has an empty entry; give radii like --attack_eps={example}."
        )
    radii = []
    for item in items:
        try:
            radius = float(fractions.Fraction(item.strip()) if isinstance(item, str) else item)
        except (TypeError, ValueError, ZeroDivisionError):
            raise SetupError(
                f"{label}: {item!r} is neither a number nor a fraction like 8/255."
            ) from None
        if norm == "l2":
            if not radius > 0:
                raise SetupError(
                    f"{label}={text}: the L2 radius {item} is not positive (e.g. 0.5 or 3.0)."
                )
            check_pixel_budget(
                radius,
                f"{label}={text}: the L2 radius",
                norm="l2",
                given_as="flag",
                error=SetupError,
                image_shape=image_shape,
            )
        elif not 0 < radius <= 1:
            raise SetupError(
                f"{label}={text}: the radius {item} is outside (0, 1]; L-inf radii are in "
                f"[0, 1] pixel units (8/255 or 0.0314, not 8; an L2 radius such as 3.0 needs "
                "--attack_norm=l2)."
            )
        labels = [radius_label(r, norm) for r in radii]
        if radius_label(radius, norm) in labels:
            raise SetupError(f"{label}={text} names the radius {radius_label(radius, norm)} twice.")
        radii.append(radius)
    return radii


def radius_label(radius, norm="linf"):
    """A radius as file names show it: L-inf `8-255` for 8/255, else its 6 significant
    digits (L2 always: `0.5`, `3`)."""
    return budget_text(radius, norm).replace("/", "-")


def report_paths(settings):
    """Where each radius's report goes (one path per radius, in order), and the radius
    plot's path (None for one radius); ([None...], None) with neither --output nor
    --model_dir.

    `--output` is the report's file for one radius; for several, each radius's report is
    `<output stem>_eps<radius><ext>` and the plot `<output stem>_radii.png`.  By default the
    reports go into the run's directory, named by the split, the norm, the radius and a hash
    of every other setting that changes the numbers
    (`evaluation_<split>_<norm>_eps<radius>_<hash>.json`), so an evaluation of another
    configuration adds a report and never replaces one, and an L2 and an L-inf evaluation at
    the same number never share a file.
    """
    s = settings
    radii = s["radii"]
    labels = [radius_label(r, s["attack_norm"]) for r in radii]
    several = len(radii) > 1
    if s.get("output"):
        if not several:
            return [s["output"]], None
        stem, extension = os.path.splitext(s["output"])
        paths = [f"{stem}_eps{label}{extension or '.json'}" for label in labels]
        return paths, f"{stem}_radii.png"
    if not s.get("model_dir"):
        return [None] * len(radii), None
    key = configuration_key(s)
    stem = os.path.join(s["model_dir"], f"{REPORT_PREFIX}{s['split']}_{s['attack_norm']}")
    paths = [f"{stem}_eps{label}_{key}.json" for label in labels]
    return paths, (f"{stem}_radii_{key}.png" if several else None)


def configuration_key(settings):
    """A hash of the resolved settings that change an evaluation's numbers, but its radius."""
    kept = {k: v for k, v in settings.items() if k in DEFAULTS and k not in _NOT_IN_THE_RESULT}
    if kept.get("precision") == "float32":  # the hash of evaluations from before --precision
        del kept["precision"]
    kept["attacks"] = [name for name, _ in settings["attack_list"]]
    kept["weights_sha1"] = settings["weights_sha1"]
    return hashlib.sha1(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:8]


def file_sha1(path):
    """The SHA-1 of a file's bytes (a weights file names the model an evaluation saw)."""
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def unfinished_run(model_dir):
    """None for a finished run directory; for an unfinished one, a sentence saying so.

    A run writes summary.json when it finishes (an interpolation, its interpolation.json
    last), so without it the directory holds a run that was killed or is still training:
    its best weights are of an epoch chosen among the first ones only.
    """
    if any(
        os.path.exists(os.path.join(model_dir, name))
        for name in (run_files.SUMMARY_FILE, run_files.INTERPOLATION_FILE)
    ):
        return None
    trained = 0
    metrics = os.path.join(model_dir, run_files.METRICS_FILE)
    if os.path.isfile(metrics):
        with open(metrics) as f:
            trained = max(0, sum(1 for line in f if line.strip()) - 1)  # rows under the header
    try:
        epochs = f" of its {int(run_files.read_config(model_dir)['epochs'])}"
    except (KeyError, TypeError, ValueError, SetupError):
        epochs = ""
    return (
        f"{model_dir} holds an unfinished run (no {run_files.SUMMARY_FILE}: killed, or still "
        f"training; {trained}{epochs} epochs done)"
    )


def _path_exists(path):
    """Local paths and URLs (gs://...) alike; tensorflow is imported only for a URL."""
    if "://" not in path:
        return os.path.exists(path)
    import tensorflow as tf

    return tf.io.gfile.exists(path)


def resolve(settings):
    """Fills the model and data settings from the run's config.json; checks every value.

    Args:
      settings: {name: value} of evaluate's flags; a missing name takes its `DEFAULTS` value.

    Returns:
      A new dict with arch, dataset, num_classes, image_size, upsample, the weights path,
      attack radius and step, parsed attacks and the output path.

    Raises:
      SetupError: a missing or wrong value.
    """
    from twins_tf import data as data_lib
    from twins_tf.models.registry import ARCHITECTURES

    unknown = sorted(set(settings) - set(DEFAULTS))
    if unknown:
        raise SetupError(
            f"unknown evaluation setting(s) {', '.join(unknown)}; the settings "
            f"are {', '.join(DEFAULTS)} (evaluate's flags)."
        )
    s = {**DEFAULTS, **settings}
    config = {}
    if s.get("model_dir"):
        config = run_files.read_config(s["model_dir"])
        s["weights"] = s.get("weights") or os.path.join(s["model_dir"], run_files.BEST_WEIGHTS)
        for key in _FROM_THE_RUN:
            if s.get(key) is None:
                s[key] = config.get(key)
        for key in ("data_dir", "tfds_data_dir"):
            if settings.get(key) is None and s.get(key) is not None and not _path_exists(s[key]):
                raise SetupError(
                    f"{key}={s[key]} (from the run's "
                    f"{os.path.join(s['model_dir'], run_files.CONFIG_FILE)}) "
                    f"does not exist: pass --{key}= to say where the data is now."
                )
        s["unfinished"] = unfinished_run(s["model_dir"])
        if s["unfinished"] and not s["allow_unfinished"]:
            raise SetupError(
                f"{s['unfinished']}: its weights are not the finished run's; pass "
                "--allow_unfinished to evaluate them anyway (the report records it)."
            )
        if s["split"] == "validation" and config.get("validation") == "none":
            raise SetupError(
                "the run trained on the whole train split (--validation=none), so "
                "it has no held-out validation split: use --split=test."
            )
    for key, example in (
        ("weights", "--weights=model.weights.h5"),
        ("arch", "--arch=resnet50"),
        ("dataset", "--dataset=cifar10"),
    ):
        if not s.get(key):
            raise SetupError(
                f"without --model_dir, {example.split('=')[0]} is required "
                f"(e.g. {example}); or pass the --model_dir of a run."
            )
    if s["arch"] not in ARCHITECTURES:
        raise SetupError(
            f"Unknown arch {s['arch']!r}; choose one of {', '.join(sorted(ARCHITECTURES))}."
        )
    try:
        spec = data_lib.get_dataset_spec(
            s["dataset"], image_size=s.get("image_size"), upsample=s.get("upsample")
        )
    except ValueError as error:
        raise SetupError(str(error)) from None
    s["dataset"], s["image_size"], s["upsample"] = spec.name, spec.image_size, spec.upsample
    s["attack_list"] = parse_attacks(s["attacks"])
    _check_precision(s)
    _resolve_attack(s, settings, config)
    if s["pgd_restarts"] < 1 or s["batch_size"] < 1:
        raise SetupError("--pgd_restarts and --batch_size must be at least 1.")
    if s.get("max_examples") is not None and s["max_examples"] < 1:
        raise SetupError("--max_examples must be at least 1.")
    if not os.path.isfile(s["weights"]):
        raise SetupError(
            f"weights file not found: {s['weights']}"
            + (" (the run has not finished an epoch yet?)" if config else "")
        )
    s["weights_sha1"] = file_sha1(s["weights"])
    s["num_classes"] = config.get("num_classes")
    return s


def _check_precision(s):
    """--precision: one of `PRECISIONS`; bfloat16 only for clean and PGD (AutoAttack is the
    float32 reference measurement)."""
    if s["precision"] not in PRECISIONS:
        raise SetupError(f"--precision={s['precision']!r} is not one of {', '.join(PRECISIONS)}.")
    if s["precision"] == "bfloat16" and any(name == AUTOATTACK for name, _ in s["attack_list"]):
        raise SetupError(
            "--precision=bfloat16 runs clean and PGD in bfloat16 but AutoAttack only in "
            "float32: drop autoattack from --attacks (e.g. --attacks=clean,pgd10) or evaluate "
            "it in a float32 run."
        )


def _resolve_attack(s, given, config):
    """The norm, radii and PGD step of an evaluation: as given, else the run's (when the
    evaluation is in the run's norm), else L-inf 8/255 with step 2/255.

    A run's radius and step are in its own norm (config.json's `attack_norm`; a run that
    predates it trained at L-inf), so an evaluation in the other norm must give its own.
    """
    run_norm = None
    if config:
        run_norm = check_norm(
            config.get("attack_norm", "linf"), "the run's attack_norm", error=SetupError
        )
    norm = check_norm(
        given.get("attack_norm") or run_norm or "linf", "--attack_norm", error=SetupError
    )
    s["attack_norm"] = norm
    shape = (s["image_size"], s["image_size"], 3)
    needs_step = any(steps for _, steps in s["attack_list"])
    for key, needed, example in (
        ("attack_eps", True, "0.5" if norm == "l2" else "8/255"),
        ("attack_step", needs_step, "0.125" if norm == "l2" else "2/255"),
    ):
        if given.get(key) is None and needed and norm != (run_norm or "linf"):
            whose = (
                f"the run's {key} is an {NORM_NAMES[run_norm]} one"
                if config
                else "it has no default"
            )
            raise SetupError(
                f"--attack_norm={norm}: {whose}; pass --{key} in {NORM_NAMES[norm]} units "
                f"(e.g. --{key}={example})."
            )
    if given.get("attack_eps") is not None:
        s["radii"] = parse_radii(s["attack_eps"], norm=norm, image_shape=shape)
    elif config.get("attack_eps") is not None and norm == run_norm:
        label = "the run's attack_eps (in its config.json)"
        s["radii"] = parse_radii(config["attack_eps"], label, norm, shape)
    else:
        s["radii"] = [8 / 255]
    s["attack_eps"] = s["radii"][0]  # each radius's evaluation sets its own
    step = given.get("attack_step")
    if step is None and norm == run_norm:
        step = config.get("attack_step")
    s["attack_step"] = 2 / 255 if step is None else step
    check_pixel_budget(
        s["attack_step"],
        "--attack_step",
        norm=norm,
        given_as="flag",
        error=SetupError,
        image_shape=shape,
    )


def load_model(settings):
    """A plain-BN `build_model` model carrying the weights (Adaptive wing of twins), in the
    global dtype policy (the evaluation's: float32, or mixed_bfloat16 for --precision=bfloat16).

    Raises:
      SetupError: the weights file is corrupt or of another architecture or head size.
    """
    from twins_tf import weights
    from twins_tf.models.registry import build_model
    from twins_tf.training import run_callbacks

    s = settings
    model = build_model(
        s["arch"],
        s["num_classes"],
        twin=False,
        input_shape=(s["image_size"], s["image_size"], 3),
        upsample=s["upsample"],
    )
    try:
        weights.load_pretrained(model, s["weights"], head=True)
        run_callbacks.check_finite_weights(model, s["weights"])
    except (FileNotFoundError, weights.CheckpointError, ValueError) as error:
        raise SetupError(f"--weights: {error}") from None
    return model


def load_examples(settings, *, whose_classes="the model has"):
    """The evaluation batches of the chosen split and the number of examples in them.

    Sets `settings["num_classes"]` to the dataset's when the run did not record it, and
    refuses a dataset whose class count differs from the model's; `whose_classes` opens that
    refusal.  The one loader of held-out examples: `twins_tf.interpolation` chooses its alpha
    on the validation split loaded here too ("the runs have").
    """
    from twins_tf import data as data_lib

    s = settings
    spec = data_lib.get_dataset_spec(
        s["dataset"], image_size=s["image_size"], upsample=s["upsample"]
    )
    try:
        splits = data_lib.load_splits(
            spec,
            data_dir=s.get("data_dir"),
            tfds_data_dir=s.get("tfds_data_dir"),
            train_per_class=s.get("train_per_class"),
            skip_bad_images=bool(s.get("skip_bad_images")),
        )
    except (ValueError, FileNotFoundError) as error:
        raise SetupError(str(error)) from None
    if s["num_classes"] is not None and s["num_classes"] != splits.num_classes:
        raise SetupError(
            f"{whose_classes} {s['num_classes']} classes but {spec.name} has {splits.num_classes}."
        )
    s["num_classes"] = splits.num_classes
    split = splits.source(s["split"])
    count = splits.num_examples[s["split"]]
    if s.get("max_examples"):  # a class-stratified subset, not the first (sorted) classes
        split, count = (
            data_lib.stratified_subset(split, s["max_examples"]),
            min(count, s["max_examples"]),
        )
    batches = data_lib.make_pipeline(split, spec, training=False, batch_size=s["batch_size"])
    return batches, count
