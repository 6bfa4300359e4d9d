"""`python -m twins_tf.demo` (`make demo`): the whole product on a laptop CPU, without network.

    python -m twins_tf.demo --output_dir=demo_out

A real transfer task from data that ships with scikit-learn (its 1,797 handwritten 8x8
digits, resized to 32x32 by `twins_tf.data`):
  1. robust pre-training: PGD-AT of a ResNet-18 from scratch on the *source* task, digits
     0-4 (`python -m twins_tf.pretrain`);
  2. robust fine-tuning on the *target* task, digits 5-9, from those weights, with AT,
     TWINS-AT, TRADES and TWINS-TRADES (`--methods` picks some) (`python -m twins_tf.train`);
  3. evaluation of every fine-tuned model on the target test split: clean accuracy and
     PGD-10 (`python -m twins_tf.evaluate`); with `--autoattack=on` also AutoAttack
     (standard) on the first `--autoattack_examples` test images, off by default because it
     alone would take longer than the rest of the demo on 2 CPU cores;
  4. SavedModel export of the TWINS model (`python -m twins_tf.export`), reloaded with
     `tf.saved_model.load` and checked against the evaluation;
  5. a table of clean and robust accuracy per method, also in `output_dir/results.json`.
Each step prints the equivalent command line and runs that binary's code in this process
(one TensorFlow start-up instead of seven).  A second run reuses finished steps.

The settings are small so that everything finishes within 10 minutes on 2 CPU cores
(measured: 554 s; `results.json` records the seconds of every step): 32-pixel images, PGD-3
during training (PGD-10 at evaluation), 10 epochs of pre-training and 4 of fine-tuning.  The
numbers show the mechanics, not the paper's results: five-class digits are an easy task, and
every method gets the same small budget.
"""
import os
import sys
import time

from absl import app, flags

from twins_tf import run_config

SOURCE = "digits_0_4"
TARGET = "digits_5_9"
METHOD_NAMES = {"at": "AT", "twins_at": "TWINS-AT", "trades": "TRADES",
                "twins_trades": "TWINS-TRADES"}
EXPORTED_METHOD = "twins_at"
RESULTS_FILE = "results.json"

# Shared by every training run (the source's and the fine-tunings').
COMMON = ["--arch=resnet18", "--batch_size=64", "--attack_eps=8/255", "--attack_step=2/255",
          "--attack_steps=3", "--seed=0"]
FULL = {
    "pretrain": ["--method=at", "--epochs=10", "--lr=0.05", "--lr_decay_epochs=7,9",
                 "--weight_decay=5e-4"],
    "train": ["--epochs=4", "--lr=0.01", "--lr_decay_epochs=3", "--weight_decay=1e-4",
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
    flags.DEFINE_list("methods", list(METHOD_NAMES), "Fine-tuning methods to compare: "
                      + ", ".join(METHOD_NAMES) + ".", flag_values=flag_values)
    flags.DEFINE_enum("autoattack", "off", ["on", "off"], "Also run AutoAttack (standard) on "
                      "the first --autoattack_examples test images of each model. Off by "
                      "default: on 2 CPU cores it costs about 5 minutes per model and 64 "
                      "images (Square's 5000 queries dominate).", flag_values=flag_values)
    flags.DEFINE_integer("autoattack_examples", 64, "Test images AutoAttack runs on.",
                         flag_values=flag_values)
    flags.DEFINE_bool("quick", False, "Tiny settings (seconds per step) to check the "
                      "pipeline, not to read the numbers.", flag_values=flag_values)


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


def results_table(accuracy):
    """The final table: one row per method, clean and robust accuracy in %.

    Args:
      accuracy: {method: {column: accuracy in [0, 1]}}, the same columns for every method.
    """
    columns = list(next(iter(accuracy.values())))
    header = f"{'method':<14}" + "".join(f"{name:>12}" for name in columns)
    lines = [header, "-" * len(header)]
    for method, row in accuracy.items():
        cells = "".join(f"{100 * row[c]:>11.2f}%" for c in columns)
        lines.append(f"{METHOD_NAMES[method]:<14}{cells}")
    return "\n".join(lines)


def run_demo(output_dir, *, methods=tuple(METHOD_NAMES), autoattack="off",
             autoattack_examples=64, quick=False, log=print):
    """The whole demo; returns the results written to `output_dir/results.json`.

    Raises:
      SetupError: a bad method name, or an output_dir holding runs with other settings.
    """
    unknown = [m for m in methods if m not in METHOD_NAMES]
    if unknown or not methods:
        raise run_config.SetupError(f"--methods must name some of {', '.join(METHOD_NAMES)}; "
                                    f"got {','.join(methods) or 'nothing'}.")
    if autoattack not in ("on", "off") or autoattack_examples < 1:
        raise run_config.SetupError("--autoattack must be on or off and "
                                    "--autoattack_examples at least 1.")
    use_autoattack = autoattack == "on"
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

    reports, autoattack_reports = {}, {}
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
                                          *recipe["evaluate"]], log)
        if use_autoattack:
            autoattack_reports[method] = run_evaluation([
                f"--model_dir={model_dir}", "--split=test", "--attacks=autoattack",
                f"--max_examples={autoattack_examples}",
                f"--output={os.path.join(model_dir, 'evaluation_test_autoattack.json')}"], log)
        timings[f"evaluate_{method}"] = time.time() - step

    exported = None
    if EXPORTED_METHOD in reports:
        log(f"== 4. SavedModel export of the {METHOD_NAMES[EXPORTED_METHOD]} model")
        exported = os.path.join(output_dir, f"exported_{EXPORTED_METHOD}")
        served_accuracy = export_and_check(os.path.join(output_dir, f"target_{EXPORTED_METHOD}"),
                                           exported, reports[EXPORTED_METHOD], log)
    accuracy = {m: {a: r["accuracy"] for a, r in report["results"].items()}
                for m, report in reports.items()}
    for method, report in autoattack_reports.items():
        accuracy[method]["autoattack"] = report["results"]["autoattack"]["accuracy"]
    log(f"== 5. results: {TARGET} test split ({reports[methods[0]]['examples']} images), "
        f"L-inf eps 8/255, fine-tuned from a PGD-AT ResNet-18 pre-trained on {SOURCE}")
    log(results_table(accuracy))
    if use_autoattack:
        examples = next(iter(autoattack_reports.values()))["examples"]
        log(f"autoattack: AutoAttack standard on the first {examples} test images only.")
    else:
        log("AutoAttack: not run (--autoattack=on adds it; about 5 minutes per model and 64 "
            "images on 2 CPU cores).")
    results = {
        "source": SOURCE, "target": TARGET, "quick": quick,
        "accuracy": accuracy,
        "reports": {m: os.path.join(output_dir, f"target_{m}", "evaluation_test.json")
                    for m in reports},
        "autoattack_reports": {
            m: os.path.join(output_dir, f"target_{m}", "evaluation_test_autoattack.json")
            for m in autoattack_reports},
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
                 autoattack_examples=FLAGS.autoattack_examples, quick=FLAGS.quick,
                 log=lambda line: print(line, flush=True))
    except run_config.SetupError as error:
        sys.exit(f"demo: error: {error}")


if __name__ == "__main__":
    define_flags(FLAGS)
    app.run(main)
