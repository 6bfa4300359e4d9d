"""`python -m twins_tf.demo` (`make demo`): the whole product on a laptop CPU, without network.

    python -m twins_tf.demo --output_dir=demo_out

A real transfer task from data that ships with scikit-learn (its 1,797 handwritten 8x8
digits, resized to 32x32 by `twins_tf.data`):
  1. robust pre-training: PGD-AT of a ResNet-18 from scratch on the *source* task, digits
     0-4 (`python -m twins_tf.pretrain`);
  2. robust fine-tuning on the *target* task, digits 5-9, from those weights, with AT and
     TWINS-AT (and, with `--methods`, TRADES / TWINS-TRADES) (`python -m twins_tf.train`);
  3. evaluation of every fine-tuned model on the target test split: clean accuracy, PGD-10
     and, when `twins_tf.attacks.AutoAttack` is available, AutoAttack
     (`python -m twins_tf.evaluate`);
  4. SavedModel export of the TWINS model (`python -m twins_tf.export`), reloaded with
     `tf.saved_model.load` and checked against the evaluation;
  5. a table of clean and robust accuracy per method, also in `output_dir/results.json`.
Each step prints the equivalent command line and runs that binary's code in this process
(one TensorFlow start-up instead of seven).  A second run reuses finished steps.

The settings are small so that everything finishes in minutes on 2 CPU cores: 32-pixel
images, PGD-5 during training (PGD-10 at evaluation), a few epochs.  The numbers show the
mechanics, not the paper's results: five-class digits are an easy task.
"""
import os
import sys
import time

from absl import app, flags

from twins_tf import run_config

SOURCE = "digits_0_4"
TARGET = "digits_5_9"
METHOD_NAMES = {"at": "AT", "trades": "TRADES", "twins_at": "TWINS-AT",
                "twins_trades": "TWINS-TRADES"}
EXPORTED_METHOD = "twins_at"
RESULTS_FILE = "results.json"

# Shared by every training run (the source's and the fine-tunings').
COMMON = ["--arch=resnet18", "--batch_size=64", "--attack_eps=8/255", "--attack_step=2/255",
          "--attack_steps=5", "--seed=0"]
FULL = {
    "pretrain": ["--method=at", "--epochs=10", "--lr=0.05", "--lr_decay_epochs=7,9",
                 "--weight_decay=5e-4"],
    "train": ["--epochs=5", "--lr=0.01", "--lr_decay_epochs=4", "--weight_decay=1e-4",
              "--lambda_twins=1.0", "--beta=6.0"],
    "evaluate": ["--attacks=clean,pgd10"],
}
# --quick: the same pipeline on a few batches (the tests' smoke run).
QUICK = {
    "pretrain": ["--method=at", "--epochs=1", "--lr=0.02", "--lr_decay_epochs=",
                 "--weight_decay=5e-4", "--image_size=16", "--max_train_examples=32",
                 "--max_validation_examples=16", "--batch_size=16", "--attack_steps=1"],
    "train": ["--epochs=1", "--lr=0.01", "--lr_decay_epochs=", "--weight_decay=1e-4",
              "--image_size=16", "--max_train_examples=32", "--max_validation_examples=16",
              "--batch_size=16", "--attack_steps=1"],
    "evaluate": ["--attacks=clean,pgd2", "--max_examples=32"],
}

FLAGS = flags.FLAGS


def define_flags(flag_values):
    """Defines the demo's flags on `flag_values`."""
    flags.DEFINE_string("output_dir", "demo_out", "Where the runs, reports and the exported "
                        "model go.", flag_values=flag_values)
    flags.DEFINE_list("methods", ["at", "twins_at"], "Fine-tuning methods to compare: "
                      + ", ".join(METHOD_NAMES) + ".", flag_values=flag_values)
    flags.DEFINE_enum("autoattack", "auto", ["auto", "on", "off"], "Evaluate with AutoAttack "
                      "too (auto: when twins_tf.attacks.AutoAttack is available).",
                      flag_values=flag_values)
    flags.DEFINE_bool("quick", False, "Tiny settings (seconds per step) to check the "
                      "pipeline, not to read the numbers.", flag_values=flag_values)


def autoattack_available():
    """Whether this build of twins_tf has `twins_tf.attacks.AutoAttack`."""
    import importlib.util

    return importlib.util.find_spec("twins_tf.attacks.autoattack") is not None


def _command(binary, args):
    return f"$ python -m twins_tf.{binary} " + " ".join(args)


def _parse(define, binary, args):
    flag_values = flags.FlagValues()
    define(flag_values)
    flag_values([binary, *args])
    return flag_values


def run_training(binary, args, log):
    """Runs `python -m twins_tf.<binary> <args>` (train or pretrain) in this process."""
    from twins_tf import pretrain, train

    log(_command(binary, args))
    flag_values = _parse(lambda fv: run_config.define_flags(fv, binary), binary, args)
    settings = run_config.settings_from_flags(flag_values, binary)
    runner = pretrain.run if binary == run_config.PRETRAIN else train.run
    return runner(settings, verbose=2)


def run_evaluation(args, log):
    """Runs `python -m twins_tf.evaluate <args>` in this process; returns the report."""
    from twins_tf import evaluate

    log(_command("evaluate", args))
    flag_values = _parse(evaluate.define_flags, "evaluate", args)
    report = evaluate.evaluate(evaluate.settings_from_flags(flag_values), log=lambda _: None)
    log(evaluate.format_table(report))
    return report


def export_and_check(model_dir, output_dir, evaluation, log):
    """Exports a run as a SavedModel, reloads it and checks its clean test accuracy.

    Returns:
      The SavedModel's accuracy on the evaluated test examples, which must equal the clean
      accuracy `evaluate` measured on the Keras model.
    """
    import numpy as np
    import tensorflow as tf

    from twins_tf import data as data_lib
    from twins_tf import export

    log(f"$ python -m twins_tf.export --model_dir={model_dir} --output={output_dir}")
    if not tf.io.gfile.exists(os.path.join(output_dir, "saved_model.pb")):
        export.export_run(model_dir, output_dir)
    config = run_config.read_config(model_dir)
    served = tf.saved_model.load(output_dir).signatures["serving_default"]
    spec = data_lib.get_dataset_spec(config["dataset"], image_size=config["image_size"],
                                     upsample=config["upsample"])
    test = data_lib.load_splits(spec).test.take(evaluation["examples"])
    correct = total = 0
    for images, labels in data_lib.make_pipeline(test, spec, training=False, batch_size=64):
        predictions = np.argmax(served(images=images)["logits"].numpy(), axis=-1)
        correct += int(np.sum(predictions == labels.numpy()))
        total += int(labels.shape[0])
    accuracy = correct / total
    log(f"SavedModel {output_dir} reloaded: clean test accuracy {100 * accuracy:.2f}% "
        f"(evaluate on the Keras model: {100 * evaluation['results']['clean']['accuracy']:.2f}%)")
    return accuracy


def results_table(rows, attack_names):
    """The final table: one row per method, clean and robust accuracy in %."""
    header = f"{'method':<14}" + "".join(f"{name:>12}" for name in attack_names)
    lines = [header, "-" * len(header)]
    for method, report in rows.items():
        cells = "".join(f"{100 * report['results'][a]['accuracy']:>11.2f}%" for a in attack_names)
        lines.append(f"{METHOD_NAMES[method]:<14}{cells}")
    return "\n".join(lines)


def run_demo(output_dir, *, methods=("at", "twins_at"), autoattack="auto", quick=False,
             log=print):
    """The whole demo; returns the results written to `output_dir/results.json`.

    Raises:
      SetupError: a bad method name, or an output_dir holding runs with other settings.
    """
    unknown = [m for m in methods if m not in METHOD_NAMES]
    if unknown or not methods:
        raise run_config.SetupError(f"--methods must name some of {', '.join(METHOD_NAMES)}; "
                                    f"got {','.join(methods) or 'nothing'}.")
    use_autoattack = {"on": True, "off": False, "auto": autoattack_available()}[autoattack]
    if use_autoattack and not autoattack_available():
        raise run_config.SetupError("--autoattack=on but this build has no "
                                    "twins_tf.attacks.AutoAttack.")
    recipe = QUICK if quick else FULL
    started = time.time()
    timings = {}
    source_dir = os.path.join(output_dir, "source_at")

    log(f"== 1. robust pre-training on the source task ({SOURCE}: digits 0-4)")
    step = time.time()
    run_training(run_config.PRETRAIN, [f"--dataset={SOURCE}", *COMMON, *recipe["pretrain"],
                                       f"--model_dir={source_dir}"], log)
    timings["pretrain"] = time.time() - step
    pretrained = os.path.join(source_dir, run_config.BEST_WEIGHTS)

    attack_args = list(recipe["evaluate"])
    if use_autoattack:
        attack_args = [a + ",autoattack" if a.startswith("--attacks=") else a
                       for a in attack_args]
    reports = {}
    for index, method in enumerate(methods):
        model_dir = os.path.join(output_dir, f"target_{method}")
        log(f"== 2.{index + 1} {METHOD_NAMES[method]} fine-tuning on the target task "
            f"({TARGET}: digits 5-9)")
        step = time.time()
        run_training(run_config.TRAIN, [f"--dataset={TARGET}", *COMMON, *recipe["train"],
                                        f"--method={method}", f"--pretrained={pretrained}",
                                        f"--model_dir={model_dir}"], log)
        timings[f"train_{method}"] = time.time() - step
        log(f"== 3.{index + 1} evaluation of {METHOD_NAMES[method]} on the target test split")
        step = time.time()
        reports[method] = run_evaluation([f"--model_dir={model_dir}", "--split=test",
                                          *attack_args], log)
        timings[f"evaluate_{method}"] = time.time() - step

    exported = None
    if EXPORTED_METHOD in reports:
        log(f"== 4. SavedModel export of the {METHOD_NAMES[EXPORTED_METHOD]} model")
        exported = os.path.join(output_dir, f"exported_{EXPORTED_METHOD}")
        served_accuracy = export_and_check(os.path.join(output_dir, f"target_{EXPORTED_METHOD}"),
                                           exported, reports[EXPORTED_METHOD], log)
    attack_names = list(next(iter(reports.values()))["results"])
    table = results_table(reports, attack_names)
    log(f"== 5. results: {TARGET} test split ({reports[methods[0]]['examples']} images), "
        f"L-inf eps 8/255, fine-tuned from a PGD-AT ResNet-18 pre-trained on {SOURCE}")
    log(table)
    if not use_autoattack:
        log("AutoAttack: not run (" + ("--autoattack=off" if autoattack == "off" else
                                       "this build has no twins_tf.attacks.AutoAttack") + ").")
    results = {
        "source": SOURCE, "target": TARGET, "quick": quick,
        "accuracy": {m: {a: r["results"][a]["accuracy"] for a in attack_names}
                     for m, r in reports.items()},
        "reports": {m: os.path.join(output_dir, f"target_{m}", "evaluation_test.json")
                    for m in reports},
        "exported": exported,
        "seconds": {k: round(v, 1) for k, v in timings.items()},
        "total_seconds": round(time.time() - started, 1),
    }
    if exported:
        results["saved_model_clean_accuracy"] = served_accuracy
    run_config.write_json(os.path.join(output_dir, RESULTS_FILE), results)
    log(f"total {results['total_seconds']:.0f} s; results in "
        f"{os.path.join(output_dir, RESULTS_FILE)}")
    return results


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    import tensorflow as tf
    from absl import logging

    # Seven runs in one process: keep TensorFlow's retracing notes and SavedModel chatter out
    # of the demo's output (errors still show).
    logging.set_verbosity(logging.ERROR)
    tf.get_logger().setLevel("ERROR")
    try:
        run_demo(FLAGS.output_dir, methods=FLAGS.methods, autoattack=FLAGS.autoattack,
                 quick=FLAGS.quick, log=lambda line: print(line, flush=True))
    except run_config.SetupError as error:
        sys.exit(f"demo: error: {error}")


if __name__ == "__main__":
    define_flags(FLAGS)
    app.run(main)
