"""The demo's pipeline (`python -m twins_tf.demo`, `make demo`): pre-train, compare, export.

What it runs and why is the docstring of `twins_tf.demo`, the binary that defines the flags
and calls `run_demo`; this module is the library side, so a test or a notebook runs the
demo without absl flags.  It lives with the comparison because the demo is one: a source
run, then a methods x seeds grid on the target task, its report, and one model exported.
"""

import json
import os
import time

from twins_tf.comparison.grid import EVALUATION_FILE, compare
from twins_tf.comparison.rows import run_dir
from twins_tf.training import model_dir as run_files
from twins_tf.training.flags import settings_from_args
from twins_tf.training.settings import PRETRAIN, TRAIN, SetupError

SOURCE = "digits_0_4"
TARGET = "digits_5_9"
TARGET_PER_CLASS = 30
METHOD_NAMES = {
    "at": "AT",
    "twins_at": "TWINS-AT",
    "trades": "TRADES",
    "twins_trades": "TWINS-TRADES",
}
DEFAULT_METHODS = ("at", "twins_at")
DEFAULT_SEEDS = (0, 1, 2)
EXPORTED_METHOD = "twins_at"
RESULTS_FILE = "results.json"

# Shared by every training run (the source's and the fine-tunings').
COMMON = [
    "--arch=resnet18",
    "--attack_eps=8/255",
    "--attack_step=2/255",
    "--attack_steps=3",
    "--deterministic",
]
FULL = {
    "pretrain": [
        "--method=at",
        "--epochs=10",
        "--lr=0.05",
        "--lr_decay_epochs=7,9",
        "--weight_decay=5e-4",
        "--batch_size=64",
        "--seed=0",
    ],
    "train": [
        "--epochs=15",
        "--lr=0.01",
        "--lr_decay_epochs=10",
        "--weight_decay=1e-3",
        "--lambda_twins=0.4",
        "--beta=6.0",
        "--batch_size=32",
        "--validation=none",
        f"--max_train_examples={5 * TARGET_PER_CLASS}",
    ],
    "attacks": ["clean", "pgd10"],
    "max_examples": None,
}
# --quick: the same pipeline on a few batches (the tests' smoke run).
QUICK = {
    "pretrain": [
        "--method=at",
        "--epochs=1",
        "--lr=0.02",
        "--lr_decay_epochs=",
        "--weight_decay=5e-4",
        "--image_size=16",
        "--max_train_examples=32",
        "--max_validation_examples=16",
        "--batch_size=16",
        "--attack_steps=1",
        "--seed=0",
    ],
    "train": [
        "--epochs=1",
        "--lr=0.01",
        "--lr_decay_epochs=",
        "--weight_decay=1e-3",
        "--lambda_twins=0.4",
        "--image_size=16",
        "--max_train_examples=32",
        "--validation=none",
        "--batch_size=16",
        "--attack_steps=1",
    ],
    "attacks": ["clean", "pgd2"],
    "max_examples": 32,
}


def _command(binary, args):
    return f"$ python -m twins_tf.{binary} " + " ".join(args)


def run_training(binary, args, log):
    """Runs `python -m twins_tf.<binary> <args>` (train or pretrain) in this process."""
    from twins_tf.training import loop

    log(_command(binary, args))
    return loop.run(settings_from_args(binary, args), verbose=2)


def export_and_check(model_dir, output_dir, evaluation_report, log):
    """Exports a run as a SavedModel, reloads it and checks its clean test accuracy.

    Returns:
      The SavedModel's accuracy on the examples `evaluation_report` (an `evaluate` report of the
      run) was computed on, which must equal the clean accuracy `evaluate` measured on the
      Keras model.
    """
    import numpy as np
    import tensorflow as tf

    from twins_tf import evaluation, serving

    log(f"$ python -m twins_tf.export --model_dir={model_dir} --output={output_dir}")
    if not tf.io.gfile.exists(os.path.join(output_dir, "saved_model.pb")):
        serving.export_run(model_dir, output_dir)
    served = tf.saved_model.load(output_dir).signatures["serving_default"]
    settings = evaluation.resolve(
        {
            "model_dir": model_dir,
            "split": evaluation_report["split"],
            "max_examples": evaluation_report["examples"],
        }
    )
    batches, _ = evaluation.load_examples(settings)
    correct = total = 0
    for images, labels in batches:
        predictions = np.argmax(served(images=images)["logits"].numpy(), axis=-1)
        correct += int(np.sum(predictions == labels.numpy()))
        total += int(labels.shape[0])
    accuracy = correct / total
    log(
        f"SavedModel {output_dir} reloaded: clean test accuracy {100 * accuracy:.2f}% "
        f"(evaluate on the Keras model: "
        f"{100 * evaluation_report['results']['clean']['accuracy']:.2f}%)"
    )
    return accuracy


def _check_choices(methods, seeds, autoattack, autoattack_examples):
    unknown = [m for m in methods if m not in METHOD_NAMES]
    if unknown or not methods:
        raise SetupError(
            f"--methods must name some of {', '.join(METHOD_NAMES)}; "
            f"got {','.join(methods) or 'nothing'}."
        )
    if not seeds or len(set(seeds)) != len(seeds):
        raise SetupError("--seeds must list distinct integers.")
    if autoattack not in ("on", "off") or autoattack_examples < 1:
        raise SetupError("--autoattack must be on or off and --autoattack_examples at least 1.")


def run_demo(
    output_dir,
    *,
    methods=DEFAULT_METHODS,
    seeds=DEFAULT_SEEDS,
    autoattack="off",
    autoattack_examples=64,
    quick=False,
    log=print,
):
    """The whole demo; returns the results written to `output_dir/results.json`.

    Raises:
      SetupError: a bad method name, or an output_dir holding runs with other settings.
    """
    methods, seeds = list(methods), [int(seed) for seed in seeds]
    _check_choices(methods, seeds, autoattack, autoattack_examples)
    output_dir = os.path.abspath(output_dir)
    recipe = QUICK if quick else FULL
    started = time.time()
    timings = {}
    source_dir = os.path.join(output_dir, "source_at")

    log(
        f"== 1. robust pre-training on the source task ({SOURCE}: the whole training split "
        "of digits 0-4)"
    )
    step = time.time()
    run_training(
        PRETRAIN,
        [f"--dataset={SOURCE}", *COMMON, *recipe["pretrain"], f"--model_dir={source_dir}"],
        log,
    )
    timings["pretrain"] = time.time() - step
    pretrained = os.path.join(source_dir, run_files.BEST_WEIGHTS)

    names = ", ".join(METHOD_NAMES[m] for m in methods)
    log(
        f"== 2-3. fine-tuning on the target task ({TARGET}, {TARGET_PER_CLASS} training "
        f"images per class) with {names}, seeds {','.join(map(str, seeds))}, and evaluation "
        "on its test split"
    )
    train_args = [f"--dataset={TARGET}", *COMMON, *recipe["train"], f"--pretrained={pretrained}"]
    evaluation = [f"--attacks={','.join(recipe['attacks'])}"]
    if recipe["max_examples"]:
        evaluation.append(f"--eval_max_examples={recipe['max_examples']}")
    aa = [f"--autoattack_examples={autoattack_examples}"] if autoattack == "on" else []
    log(
        _command(
            "compare",
            [
                *train_args,
                f"--methods={','.join(methods)}",
                f"--seeds={','.join(map(str, seeds))}",
                *evaluation,
                *aa,
                f"--output_dir={output_dir}",
            ],
        )
    )
    step = time.time()
    summary, table = compare(
        settings_from_args(TRAIN, train_args),
        methods=methods,
        seeds=seeds,
        baseline=methods[0],
        output_dir=output_dir,
        attacks=recipe["attacks"],
        max_examples=recipe["max_examples"],
        autoattack_examples=autoattack_examples if autoattack == "on" else 0,
        report_dir=output_dir,
        title=f"twins_tf demo: {SOURCE} -> {TARGET}",
        log=lambda line: log(line) if line.startswith("compare:") else None,
        verbose=0,
    )
    timings["compare"] = time.time() - step

    exported = served_accuracy = None
    if EXPORTED_METHOD in methods:
        log(
            f"== 4. SavedModel export of the {METHOD_NAMES[EXPORTED_METHOD]} model "
            f"(seed {seeds[0]})"
        )
        run = run_dir(output_dir, EXPORTED_METHOD, seeds[0])
        exported = os.path.join(output_dir, f"exported_{EXPORTED_METHOD}")
        with open(os.path.join(run, EVALUATION_FILE)) as f:
            report = json.load(f)
        served_accuracy = export_and_check(run, exported, report, log)
    log(
        f"== 5. results: {TARGET} test split, L-inf eps 8/255, fine-tuned from a PGD-AT "
        f"ResNet-18 pre-trained on {SOURCE}; accuracy in %, mean +- sd over "
        f"{len(seeds)} seeds"
    )
    log(table)
    if autoattack == "off":
        log("AutoAttack: not run (--autoattack=on adds it on --autoattack_examples images).")
    results = {
        "source": SOURCE,
        "target": TARGET,
        "quick": quick,
        "methods": methods,
        "seeds": seeds,
        "summary": summary,
        "report": os.path.join(output_dir, "report.html"),
        "runs": {f"{m}_seed{s}": run_dir(output_dir, m, s) for m in methods for s in seeds},
        "exported": exported,
        "saved_model_clean_accuracy": served_accuracy,
        "seconds": {k: round(v, 1) for k, v in timings.items()},
        "total_seconds": round(time.time() - started, 1),
    }
    run_files.write_json(os.path.join(output_dir, RESULTS_FILE), results)
    log(
        f"total {results['total_seconds']:.0f} s; plots and table in {results['report']}; "
        f"results in {os.path.join(output_dir, RESULTS_FILE)}"
    )
    return results
