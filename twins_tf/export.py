"""`python -m twins_tf.export`: a run's network as a SavedModel to ship.

    python -m twins_tf.export --model_dir=runs/dogs --output=exported/dogs

The export and its serving signature (input checks, outputs) are `twins_tf.serving`
(`export_run` for a run, `export_saved_model` for any model); this file defines the flags and
calls `export_run`.
"""

import sys

import tensorflow as tf
from absl import app, flags, logging

from twins_tf.serving import export_run


def define_flags(flag_values):
    """Defines the binary's flags on `flag_values`.

    Called only when run as a program, so importing this module (e.g. next to
    `twins_tf.convert`, which also has an `--output`) defines no global flags.
    """
    flags.DEFINE_string(
        "model_dir", None, "The --model_dir of a train or pretrain run.", flag_values=flag_values
    )
    flags.DEFINE_string(
        "output",
        None,
        "SavedModel directory to write (must not exist yet, or be empty).",
        flag_values=flag_values,
    )
    flags.DEFINE_string(
        "weights",
        None,
        "Weights file to export (default: "
        "<model_dir>/best.weights.h5; e.g. <model_dir>/last.weights.h5).",
        flag_values=flag_values,
    )


def main(argv, flag_values=flags.FLAGS):
    """Exports the run named by the flags; exits 1 with a one-line `export: error:` on bad input,
    as train, evaluate and convert do."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    model_dir, output = flag_values.model_dir, flag_values.output
    if not model_dir or not output:
        sys.exit(
            "export: error: --model_dir and --output are required (e.g. "
            "--model_dir=runs/dogs --output=exported/dogs)."
        )
    if "verbosity" in flag_values and not flag_values["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # SavedModel writing logs pages of INFO lines
    if tf.io.gfile.exists(output) and tf.io.gfile.listdir(output):
        sys.exit(
            f"export: error: --output={output} exists and is not empty; refusing to overwrite "
            "it: choose a new directory."
        )
    try:
        config = export_run(model_dir, output, weights=flag_values.weights)
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"export: error: {error}")
    size = int(config["image_size"])
    print(
        f"Exported {config['arch']} ({config['num_classes']} classes) to {output}\n"
        f"  signature serving_default: images float32 [N, {size}, {size}, 3] in [0, 1] -> "
        f"logits, probabilities [N, {config['num_classes']}]"
    )


if __name__ == "__main__":
    define_flags(flags.FLAGS)
    app.run(main)
