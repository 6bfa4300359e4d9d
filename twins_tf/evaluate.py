r"""`python -m twins_tf.evaluate`: clean, PGD-k and AutoAttack accuracy of a trained model.

    python -m twins_tf.evaluate --model_dir=runs/dogs --attacks=clean,pgd10,autoattack
    python -m twins_tf.evaluate --weights=robust.weights.h5 --arch=resnet18 --dataset=cifar10 \
        --split=test --attacks=clean,pgd20 --pgd_restarts=5 --output=report.json

The model: with `--model_dir`, the run's `config.json` says what to build and
`best.weights.h5` (or `--weights`) what to load; without it, `--weights`, `--arch` and
`--dataset` do.  Twin weights are evaluated through their Adaptive wing (inference mode, the
network `export` ships), so every model is evaluated as a plain-BN network in float32.

Attacks (`--attacks`, comma-separated, in [0, 1] pixel space, L-inf radius `--attack_eps`):
  clean        accuracy on the unperturbed images;
  pgdK         accuracy on PGD-K examples (step `--attack_step`); with `--pgd_restarts=1` no
               random start (spec §7), with R > 1 restarts R random starts and an example
               counts as robust only if no restart fools it;
  autoattack   `twins_tf.attacks.AutoAttack` (`--autoattack_version`, standard: APGD-CE,
               APGD-T, FAB-T, Square), with the accuracy left after each sub-attack and its
               time; APGD-T and FAB-T target the reference's 9 classes, or every other class
               when the dataset has fewer than 10 (and APGD-T, whose loss needs 4 classes, is
               skipped below 4: the report says so).  The report records what a rerun needs:
               versions, eps, norm, examples, targets, budgets and seed.  Resumable: progress
               is kept in `autoattack_<split>_<hash>.npz` beside the report, and a second
               start with the same weights and data continues from it.

Before the attacks, the sanity checks of `twins_tf.attacks.checks` (randomised model,
probabilities instead of logits, zero gradients, test-time dynamics) run on the first batch;
what they find is printed and kept in the report's "checks".

Results go to a printed table and a JSON report (`--output`, by default
`model_dir/evaluation_<split>.json`).  The split is the test split or the validation split
carved from train (`--split`); `--max_examples` evaluates N examples only, a class-stratified
subset seeded by the split seed.
"""
import json
import os
import re
import sys
import time

from absl import app, flags

from twins_tf import run_config
from twins_tf.run_config import SetupError

SPLITS = ("test", "validation")
CLEAN = "clean"
AUTOATTACK = "autoattack"
_PGD_NAME = re.compile(r"pgd(\d+)$")
REPORT_PREFIX = "evaluation_"


def define_flags(flag_values):
    """Defines evaluate's flags on `flag_values`; returns their names."""
    names = []

    def define(kind, name, default, help_text, **kwargs):
        getattr(flags, f"DEFINE_{kind}")(name, default, help_text, flag_values=flag_values,
                                         **kwargs)
        names.append(name)

    define("string", "model_dir", None, "A train/pretrain run: config.json and weights.")
    define("string", "weights", None, "Weights file (default: model_dir/best.weights.h5).")
    define("string", "arch", None, "Architecture (without --model_dir).")
    define("string", "dataset", None, "Registered dataset (without --model_dir: required).")
    define("string", "data_dir", None, "Image folder of folder/caltech256 datasets.")
    define("string", "tfds_data_dir", None, "tensorflow-datasets data_dir.")
    define("integer", "image_size", None, "Input size (default: the run's or dataset's).")
    define("integer", "upsample", None, "Upsampling inside the model (default: as trained).")
    define("integer", "train_per_class", None, "As for train (folder datasets).")
    flags.DEFINE_enum("split", "test", list(SPLITS), "Split to evaluate on.",
                      flag_values=flag_values)
    names.append("split")
    define("list", "attacks", [CLEAN, "pgd10", AUTOATTACK],
           "Comma-separated: clean, pgdK (K steps, e.g. pgd10), autoattack.")
    run_config.define_fraction("attack_eps", None, "L-inf radius in [0, 1] pixel units "
                               "(default: the run's, else 8/255).", flag_values, None)
    run_config.define_fraction("attack_step", None, "PGD step size (default: the run's, else "
                               "2/255).", flag_values, None)
    names += ["attack_eps", "attack_step"]
    define("integer", "pgd_restarts", 1, "PGD restarts (> 1 uses random starts).")
    flags.DEFINE_enum("autoattack_version", "standard", ["standard", "rand"],
                      "AutoAttack version (rand: for randomised defences).",
                      flag_values=flag_values)
    names.append("autoattack_version")
    define("integer", "batch_size", 128, "Evaluation batch size.")
    define("integer", "max_examples", None,
           "Evaluate only N examples of the split, stratified by class (seeded).")
    define("bool", "skip_bad_images", None,
           "Leave out folder images that are not whole JPEG/PNG/GIF/BMP files (count logged) "
           "instead of stopping (default: the run's, else false).")
    define("integer", "seed", 0, "Seed of random starts and AutoAttack.")
    define("string", "output", None, "JSON report path (default: "
           "model_dir/evaluation_<split>.json; none without --model_dir).")
    return names


def settings_from_flags(flag_values):
    """The evaluation settings (one key per flag) from parsed flags."""
    return {name: flag_values[name].value for name in _FLAG_NAMES if name in flag_values}


_FLAG_NAMES = define_flags(flags.FlagValues())


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
            raise SetupError(f"unknown attack {name!r} in --attacks; use clean, pgdK (e.g. "
                             "pgd10) or autoattack.")
    if not attacks:
        raise SetupError("--attacks is empty; use e.g. --attacks=clean,pgd10,autoattack.")
    if len({a for a, _ in attacks}) != len(attacks):
        raise SetupError(f"--attacks names an attack twice: {','.join(names)}.")
    return attacks


def _path_exists(path):
    """Local paths and URLs (gs://...) alike; tensorflow is imported only for a URL."""
    if "://" not in path:
        return os.path.exists(path)
    import tensorflow as tf

    return tf.io.gfile.exists(path)


def resolve(settings):
    """Fills the model and data settings from the run's config.json; checks every value.

    Returns:
      A new dict with arch, dataset, num_classes, image_size, upsample, the weights path,
      attack radius and step, parsed attacks and the output path.

    Raises:
      SetupError: a missing or wrong value.
    """
    from twins_tf import data as data_lib
    from twins_tf.models.resnet import ARCHITECTURES

    s = dict(settings)
    config = {}
    if s.get("model_dir"):
        config = run_config.read_config(s["model_dir"])
        s["weights"] = s.get("weights") or os.path.join(s["model_dir"], run_config.BEST_WEIGHTS)
        for key in ("arch", "dataset", "data_dir", "tfds_data_dir", "image_size", "upsample",
                    "train_per_class", "skip_bad_images", "attack_eps", "attack_step"):
            if s.get(key) is None:
                s[key] = config.get(key)
        if s.get("output") is None:
            s["output"] = os.path.join(s["model_dir"], f"{REPORT_PREFIX}{s['split']}.json")
        for key in ("data_dir", "tfds_data_dir"):
            if (settings.get(key) is None and s.get(key) is not None
                    and not _path_exists(s[key])):
                raise SetupError(f"{key}={s[key]} (from the run's "
                                 f"{os.path.join(s['model_dir'], run_config.CONFIG_FILE)}) "
                                 f"does not exist: pass --{key}= to say where the data is now.")
        if s["split"] == "validation" and config.get("validation") == "none":
            raise SetupError("the run trained on the whole train split (--validation=none), so "
                             "it has no held-out validation split: use --split=test.")
    for key, example in (("weights", "--weights=model.weights.h5"),
                         ("arch", "--arch=resnet50"), ("dataset", "--dataset=cifar10")):
        if not s.get(key):
            raise SetupError(f"without --model_dir, {example.split('=')[0]} is required "
                             f"(e.g. {example}); or pass the --model_dir of a run.")
    if s["arch"] not in ARCHITECTURES:
        raise SetupError(f"Unknown arch {s['arch']!r}; choose one of "
                         f"{', '.join(sorted(ARCHITECTURES))}.")
    try:
        spec = data_lib.get_dataset_spec(s["dataset"], image_size=s.get("image_size"),
                                         upsample=s.get("upsample"))
    except ValueError as error:
        raise SetupError(str(error)) from None
    s["dataset"], s["image_size"], s["upsample"] = spec.name, spec.image_size, spec.upsample
    s["attack_eps"] = 8 / 255 if s.get("attack_eps") is None else s["attack_eps"]
    s["attack_step"] = 2 / 255 if s.get("attack_step") is None else s["attack_step"]
    for name in ("attack_eps", "attack_step"):
        if not 0.0 <= s[name] <= 1.0:
            raise SetupError(f"--{name}={s[name]:g} is outside [0, 1]: images are in [0, 1] "
                             "pixel units, so write e.g. 8/255 (not 8).")
    s["attack_list"] = parse_attacks(s["attacks"])
    if s["pgd_restarts"] < 1 or s["batch_size"] < 1:
        raise SetupError("--pgd_restarts and --batch_size must be at least 1.")
    if s.get("max_examples") is not None and s["max_examples"] < 1:
        raise SetupError("--max_examples must be at least 1.")
    if not os.path.isfile(s["weights"]):
        raise SetupError(f"weights file not found: {s['weights']}"
                         + (" (the run has not finished an epoch yet?)" if config else ""))
    s["num_classes"] = config.get("num_classes")
    return s


def load_model(settings):
    """A plain-BN `build_resnet` model in float32 carrying the weights (Adaptive wing of twins).

    Raises:
      SetupError: the weights file is corrupt or of another architecture or head size.
    """
    from twins_tf import run_callbacks, weights
    from twins_tf.models.resnet import build_resnet

    s = settings
    model = build_resnet(s["arch"], s["num_classes"], twin=False,
                         input_shape=(s["image_size"], s["image_size"], 3),
                         upsample=s["upsample"])
    try:
        weights.load_pretrained(model, s["weights"], head=True)
        run_callbacks.check_finite_weights(model, s["weights"])
    except (FileNotFoundError, weights.CheckpointError, ValueError) as error:
        raise SetupError(f"--weights: {error}") from None
    return model


def load_examples(settings):
    """The evaluation batches of the chosen split and the number of examples in them."""
    from twins_tf import data as data_lib

    s = settings
    spec = data_lib.get_dataset_spec(s["dataset"], image_size=s["image_size"],
                                     upsample=s["upsample"])
    try:
        splits = data_lib.load_splits(spec, data_dir=s.get("data_dir"),
                                      tfds_data_dir=s.get("tfds_data_dir"),
                                      train_per_class=s.get("train_per_class"),
                                      skip_bad_images=bool(s.get("skip_bad_images")))
    except (ValueError, FileNotFoundError) as error:
        raise SetupError(str(error)) from None
    if s["num_classes"] is not None and s["num_classes"] != splits.num_classes:
        raise SetupError(f"the model has {s['num_classes']} classes but {spec.name} has "
                         f"{splits.num_classes}.")
    s["num_classes"] = splits.num_classes
    split = splits.source(s["split"])
    count = splits.num_examples[s["split"]]
    if s.get("max_examples"):  # a class-stratified subset, not the first (sorted) classes
        split, count = (data_lib.stratified_subset(split, s["max_examples"]),
                        min(count, s["max_examples"]))
    batches = data_lib.make_pipeline(split, spec, training=False, batch_size=s["batch_size"])
    return batches, count


def _accuracy_counter(model, attack):
    """A compiled function (images, labels) -> number of correct predictions after `attack`."""
    import tensorflow as tf

    @tf.function
    def correct(images, labels):
        labels = tf.cast(labels, tf.int32)
        if attack is not None:
            images = attack(model, images, labels)
        predictions = tf.argmax(model(images, training=False), axis=-1, output_type=tf.int32)
        return tf.reduce_sum(tf.cast(tf.equal(predictions, labels), tf.int32))

    return correct


def evaluate_batched(model, batches, attack):
    """Accuracy of `model` over `batches` on `attack(model, x, y)` examples (None: clean)."""
    correct_fn = _accuracy_counter(model, attack)
    correct = total = 0
    for images, labels in batches:
        correct += int(correct_fn(images, labels))
        total += int(labels.shape[0])
    return {"accuracy": correct / total if total else float("nan"), "correct": correct,
            "examples": total}


def autoattack_state_path(settings):
    """Where a resumable AutoAttack run keeps its progress, or None (no model_dir or output).

    The name holds a hash of the weights file and of the examples evaluated, so a state is
    only ever resumed for the same model and data (AutoAttack itself checks its settings).
    """
    import hashlib

    directory = settings.get("model_dir") or (
        os.path.dirname(os.path.abspath(settings["output"])) if settings.get("output") else None)
    if directory is None:
        return None
    digest = hashlib.sha1()
    with open(settings["weights"], "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    digest.update(json.dumps([settings["dataset"], settings["split"], settings["image_size"],
                              settings.get("max_examples")]).encode())
    return os.path.join(directory, f"autoattack_{settings['split']}_{digest.hexdigest()[:12]}.npz")


def run_autoattack(model, batches, settings, *, progress=True):
    """AutoAttack over the batches, resumable; accuracy after each sub-attack.

    The AutoAttack object sees the evaluation batches in their fixed order; its progress is
    saved every 10 batches to `autoattack_state_path(settings)`, so an interrupted evaluation
    started again continues where it stopped.
    """
    import twins_tf
    from twins_tf.attacks import AutoAttack

    attack = AutoAttack(settings["attack_eps"], norm="linf",
                        version=settings["autoattack_version"], seed=settings["seed"])
    state_path = autoattack_state_path(settings)
    result = attack.run(model, batches, batch_size=settings["batch_size"], state_path=state_path,
                        keep_adversarial=False, verbose=int(progress))
    accuracy = result.accuracy
    config = attack.get_config()
    return {
        "accuracy": float(result.robust_accuracy),
        "clean_accuracy": float(accuracy["clean"]),
        "after_each_attack": {name: float(accuracy[name]) for name in result.attacks},
        "seconds_each_attack": {name: round(result.seconds[name], 2) for name in result.attacks},
        "skipped": dict(result.skipped),
        "examples": int(len(result.labels)),
        "version": settings["autoattack_version"],
        "twins_tf_version": twins_tf.__version__,
        "epsilon": attack.epsilon,
        "norm": attack.norm,
        "n_target_classes": result.n_target_classes,
        "seed": attack.seed,
        "budget": {key: config[key] for key in ("apgd_steps", "fab_steps", "square_queries",
                                                "eot_iter")},
        "batch_size": settings["batch_size"],
        "checks": list(result.warnings),
        "state": state_path,
    }


def model_checks(model, batches, settings, log):
    """The sanity checks of `twins_tf.attacks.checks` on the first batch, logged; the messages.

    With autoattack in `--attacks`, AutoAttack runs them itself (with its version and targets)
    and its messages are the report's; otherwise they run here.
    """
    from twins_tf.attacks import checks

    if any(name == AUTOATTACK for name, _ in settings["attack_list"]):
        return None  # AutoAttack's own, in results["autoattack"]["checks"]
    for images, labels in batches.take(1):
        messages = checks.model_checks(model, images, labels)
        for message in messages:
            log(f"warning: {message}")
        return messages
    return []


def evaluate(settings, *, log=print, progress=True):
    """Runs the requested attacks; returns the report dict (and writes it to `output`).

    `progress` shows AutoAttack's progress bar.

    Raises:
      SetupError: a problem with the inputs, found before any attack runs.
    """
    import keras

    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32")
    try:
        return _evaluate(resolve(settings), log, progress)
    finally:
        keras.config.set_dtype_policy(policy)


def _evaluate(s, log, progress):
    from twins_tf.attacks.pgd import PGD

    batches, count = load_examples(s)
    model = load_model(s)
    checks = model_checks(model, batches, s, log)
    results = {}
    for name, steps in s["attack_list"]:
        started = time.time()
        if name == CLEAN:
            results[name] = evaluate_batched(model, batches, None)
        elif name == AUTOATTACK:
            results[name] = run_autoattack(model, batches, s, progress=progress)
        else:
            restarts = s["pgd_restarts"]
            pgd = PGD(s["attack_eps"], s["attack_step"], steps, random_start=restarts > 1,
                      restarts=restarts, seed=s["seed"])
            results[name] = evaluate_batched(model, batches, pgd)
            results[name].update(steps=steps, step_size=s["attack_step"], restarts=restarts,
                                 random_start=restarts > 1)
        results[name]["seconds"] = round(time.time() - started, 2)
        log(f"{name}: {100 * results[name]['accuracy']:.2f}% of {results[name]['examples']}")
    report = {
        "model_dir": s.get("model_dir"),
        "weights": s["weights"],
        "arch": s["arch"],
        "dataset": s["dataset"],
        "split": s["split"],
        "examples": count,
        "epsilon": s["attack_eps"],
        "norm": "linf",
        "seed": s["seed"],
        "checks": checks,
        "results": results,
    }
    if s.get("output"):
        os.makedirs(os.path.dirname(os.path.abspath(s["output"])), exist_ok=True)
        run_config.write_json(s["output"], report)
    return report


def format_table(report):
    """The printed table: one row per attack (accuracy in %, examples)."""
    lines = [f"{report['arch']} on {report['dataset']} ({report['split']}, "
             f"{report['examples']} examples), L-inf eps {report['epsilon'] * 255:.4g}/255",
             f"{'attack':<24}{'accuracy':>10}{'time':>12}"]
    for name, result in report["results"].items():
        lines.append(f"{name:<24}{100 * result['accuracy']:>9.2f}%{result['seconds']:>10.1f} s")
        seconds = result.get("seconds_each_attack", {})
        for sub, accuracy in result.get("after_each_attack", {}).items():
            lines.append(f"{'  after ' + sub:<24}{100 * accuracy:>9.2f}%{seconds[sub]:>10.1f} s")
        for sub, why in result.get("skipped", {}).items():
            lines.append(f"{'  ' + sub:<24} skipped: {why}")
        if name == AUTOATTACK:
            lines.append(f"  {result['version']} version, {result['n_target_classes']} target "
                         f"classes, seed {result['seed']}, twins_tf {result['twins_tf_version']}")
    checks = report.get("checks")
    if checks is None:  # AutoAttack ran them
        checks = report["results"].get(AUTOATTACK, {}).get("checks", [])
    lines += [f"warning: {message}" for message in checks]
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        report = evaluate(settings_from_flags(flags.FLAGS))
    except SetupError as error:
        sys.exit(f"evaluate: error: {error}")
    print(format_table(report))
    if report.get("model_dir") or flags.FLAGS.output:
        output = flags.FLAGS.output or os.path.join(
            report["model_dir"], f"{REPORT_PREFIX}{report['split']}.json")
        print(f"report: {output}")


if __name__ == "__main__":
    for _name in define_flags(flags.FLAGS):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[_name])
    app.run(main)
