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
import sys

from absl import app, flags

from twins_tf import run_config
from twins_tf.evaluation import (AUTOATTACK, CLEAN, REPORT_PREFIX, SPLITS,  # noqa: F401
                                 autoattack_state_path, evaluate, evaluate_batched,
                                 format_table, load_examples, load_model, model_checks,
                                 parse_attacks, report_path, resolve, run_autoattack)
from twins_tf.run_config import SetupError

# The names above are the library's (twins_tf.evaluation); they stay importable from here for
# code written against this module before the split.


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


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        report = evaluate(settings_from_flags(flags.FLAGS))
    except SetupError as error:
        sys.exit(f"evaluate: error: {error}")
    print(format_table(report))
    if report.get("model_dir") or flags.FLAGS.output:
        print(f"report: {flags.FLAGS.output or report_path(report['model_dir'], report['split'])}")


if __name__ == "__main__":
    for _name in define_flags(flags.FLAGS):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[_name])
    app.run(main)
