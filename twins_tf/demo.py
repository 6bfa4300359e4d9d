"""`python -m twins_tf.demo` (`make demo`): the whole product on a laptop CPU, without network.

    python -m twins_tf.demo --output_dir=demo_out

TWINS's regime in miniature: fine-tune a robust model pre-trained on a *larger* source task
onto a *small* downstream task (the paper's Caltech-256 setting: 60 images per class), from
data that ships with scikit-learn (its 1,797 handwritten 8x8 digits, resized to 32x32):
  1. robust pre-training: PGD-AT of a ResNet-18 from scratch on the *source* task, the whole
     training split of digits 0-4 (10 % of it held out to pick the best epoch)
     (`python -m twins_tf.pretrain`);
  2. robust fine-tuning on the *target* task, digits 5-9 with only 30 training images per
     class, from those weights, with AT and TWINS-AT (`--methods` adds TRADES and
     TWINS-TRADES), each with seeds 0, 1 and 2 (`python -m twins_tf.compare`);
  3. evaluation of every fine-tuned model on the whole target test split: clean accuracy and
     PGD-10; with `--autoattack=on` also AutoAttack (standard) on `--autoattack_examples`
     test images (a class-stratified subset), off by default because it alone would take longer
     than the rest of the demo on 2 CPU cores;
  4. SavedModel export of the TWINS-AT model of seed 0 (`python -m twins_tf.export`),
     reloaded with `tf.saved_model.load` and checked against the evaluation;
  5. the table: mean +- sd over seeds per method, and TWINS-AT minus AT paired by seed with
     a 95 % Student-t interval, also in `output_dir/report.html` with the per-epoch and
     per-wing plots, and in `output_dir/results.json`.
Each step prints the equivalent command line and runs that binary's code in this process
(one TensorFlow start-up).  A second run reuses finished runs.

Settings follow the spec's small-task row (Caltech-256: weight decay 1e-3, lambda 0.4) and
the published protocol (train on the whole small training split, keep the final epoch:
`--validation=none`), with what the budget forces: 32-pixel images, PGD-3 during training
(PGD-10 at evaluation), a learning rate of 0.01 for 15 epochs of 4 steps instead of 0.003 for
60 epochs of ~120 steps.  They were not chosen by which method comes out ahead, and the table
prints whatever comes out: with three seeds on ~180 test images an interval that contains 0
separates nothing.  `--deterministic` makes the same command give the same table.

The work is `twins_tf.comparison.demo_pipeline.run_demo`; this binary parses flags.
"""

import sys

from absl import app, flags

from twins_tf.comparison.demo_pipeline import (
    DEFAULT_METHODS,
    DEFAULT_SEEDS,
    METHOD_NAMES,
    run_demo,
)
from twins_tf.training.settings import SetupError

FLAGS = flags.FLAGS


def define_flags(flag_values):
    """Defines the demo's flags on `flag_values`."""
    flags.DEFINE_string(
        "output_dir",
        "demo_out",
        "Where the runs, reports and the exported model go.",
        flag_values=flag_values,
    )
    flags.DEFINE_list(
        "methods",
        list(DEFAULT_METHODS),
        "Fine-tuning methods to compare "
        "(the first is the baseline): " + ", ".join(METHOD_NAMES) + ".",
        flag_values=flag_values,
    )
    flags.DEFINE_list(
        "seeds",
        [str(seed) for seed in DEFAULT_SEEDS],
        "Seeds of every fine-tuning method.",
        flag_values=flag_values,
    )
    flags.DEFINE_enum(
        "autoattack",
        "off",
        ["on", "off"],
        "Also run AutoAttack (standard) on "
        "--autoattack_examples test images (class-stratified) of each model. Off by "
        "default: on 2 CPU cores it costs minutes per model (Square's 5000 "
        "queries dominate).",
        flag_values=flag_values,
    )
    flags.DEFINE_integer(
        "autoattack_examples", 64, "Test images AutoAttack runs on.", flag_values=flag_values
    )
    flags.DEFINE_bool(
        "quick",
        False,
        "Tiny settings (seconds per step) to check the pipeline, not to read the numbers.",
        flag_values=flag_values,
    )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    import tensorflow as tf
    from absl import logging

    from twins_tf.comparison.rows import parse_seeds
    from twins_tf.training.run_callbacks import DivergenceError

    # Many runs in one process: keep TensorFlow's retracing notes and SavedModel chatter out
    # of the demo's output (errors still show).
    logging.set_verbosity(logging.ERROR)
    tf.get_logger().setLevel("ERROR")
    try:
        run_demo(
            FLAGS.output_dir,
            methods=FLAGS.methods,
            seeds=parse_seeds(FLAGS.seeds),
            autoattack=FLAGS.autoattack,
            autoattack_examples=FLAGS.autoattack_examples,
            quick=FLAGS.quick,
            log=lambda line: print(line, flush=True),
        )
    except (SetupError, DivergenceError) as error:
        sys.exit(f"demo: error: {error}")


if __name__ == "__main__":
    define_flags(FLAGS)
    app.run(main)
