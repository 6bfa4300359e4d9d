"""SavedModel export of a trained classifier: `python -m twins_tf.export`, `export_saved_model`.

    python -m twins_tf.export --model_dir=runs/dogs --output=exported/dogs

rebuilds the run's network from `model_dir/config.json` (arch, num_classes, image_size,
upsample, twin), loads `best.weights.h5` (or `--weights=`), turns a twin model into the
plain-BatchNorm network that carries the Adaptive wing (`twins_tf.untwin`: the inference
network of spec §2) and writes a TensorFlow SavedModel with Keras's `ExportArchive`.

The serving signature (`serving_default`, also `serve`):

* input `images`: float32, shape (batch, image_size, image_size, 3), RGB, NHWC, pixel values
  in [0, 1] (not 0-255, not mean/std-normalised).  Values outside [0, 1] are clamped.  The
  ImageNet mean/std normalisation and, for CIFAR, the x7 nearest-neighbour upsampling happen
  inside the model, so a CIFAR model takes 32x32 images.  Resize / crop images to
  image_size as the evaluation pipeline does (`twins_tf.data.evaluation_transform`).
* outputs: `logits` (batch, num_classes) float32 and `probabilities`, their softmax.

Example (Python):
  >>> served = tf.saved_model.load("exported/dogs")
  >>> out = served.signatures["serving_default"](images=tf.zeros((1, 224, 224, 3)))
  >>> out["logits"].shape
  TensorShape([1, 120])
"""
import os
import sys

import keras
import tensorflow as tf
from absl import app, flags, logging

from twins_tf.layers import TwinBatchNormalization
from twins_tf.twinify import untwin

SERVING_INPUT = "images"


def _has_twin_layers(model):
    return any(isinstance(layer, TwinBatchNormalization)
               for layer in model._flatten_layers(include_self=False))


def _check_input_size(model, image_size):
    shape = tuple(model.input_shape)
    if len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"Expected a model taking NHWC RGB images, its input shape is {shape}.")
    fixed = [s for s in shape[1:3] if s is not None]
    if any(s != image_size for s in fixed):
        raise ValueError(f"image_size={image_size} does not match the model's input "
                         f"{shape[1]}x{shape[2]}.")


def export_saved_model(model, output_dir, *, image_size):
    """Writes the inference network of `model` as a SavedModel with an image signature.

    Args:
      model: a Keras classifier taking [0, 1] NHWC images and returning logits; a twin model
        is exported through `untwin` (Adaptive wing with its moving statistics).
      output_dir: the SavedModel directory to write.
      image_size: side of the square images the signature takes.

    Returns:
      The exported plain-BN Keras model (the one whose inference the SavedModel serves).
    """
    image_size = int(image_size)
    _check_input_size(model, image_size)
    plain = untwin(model) if _has_twin_layers(model) else model

    @tf.function
    def serve(images):
        logits = tf.cast(plain(images, training=False), tf.float32)
        return {"logits": logits, "probabilities": tf.nn.softmax(logits, axis=-1)}

    archive = keras.export.ExportArchive()
    archive.track(plain)
    archive.add_endpoint(
        name="serve", fn=serve,
        input_signature=[tf.TensorSpec((None, image_size, image_size, 3), tf.float32,
                                       name=SERVING_INPUT)])
    archive.write_out(output_dir, verbose=False)
    return plain


def export_run(model_dir, output_dir, *, weights=None):
    """Exports a `train`/`pretrain` run: rebuild from config.json, load weights, export.

    Args:
      model_dir: the run's `--model_dir` (holding config.json).
      output_dir: the SavedModel directory to write.
      weights: a `.weights.h5` file of that run's model; default `model_dir/best.weights.h5`.

    Returns:
      The run's settings (the parsed config.json).

    Raises:
      FileNotFoundError: no config.json or no weights file.
      ValueError: the config lacks a key the model needs, or the weights do not fit or hold
        a NaN or infinity.
    """
    from twins_tf import run_callbacks, run_config
    from twins_tf.models import build_resnet

    try:
        config = run_config.read_config(model_dir)
    except run_config.SetupError as error:
        raise FileNotFoundError(str(error)) from None
    missing = [k for k in ("arch", "num_classes", "image_size", "upsample", "twin")
               if k not in config]
    if missing:
        raise ValueError(f"{os.path.join(model_dir, run_config.CONFIG_FILE)} lacks "
                         f"{', '.join(missing)}; was it written by twins_tf.train?")
    weights = weights or os.path.join(model_dir, run_config.BEST_WEIGHTS)
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"No weights file {weights}: the run has not finished an "
                                "epoch yet, or pass --weights=.../last.weights.h5.")
    size = int(config["image_size"])
    model = build_resnet(config["arch"], int(config["num_classes"]), twin=bool(config["twin"]),
                         input_shape=(size, size, 3), upsample=int(config["upsample"]))
    try:
        model.load_weights(weights)
    except (ValueError, OSError) as error:
        raise ValueError(f"{weights} does not fit the run's {config['arch']} "
                         f"({'twin' if config['twin'] else 'plain'} BN, "
                         f"{config['num_classes']} classes): {error}") from None
    run_callbacks.check_finite_weights(model, weights)
    export_saved_model(model, output_dir, image_size=size)
    return config


def define_flags(flag_values):
    """Defines the binary's flags on `flag_values`.

    Called only when run as a program, so importing this module (e.g. next to
    `twins_tf.convert`, which also has an `--output`) defines no global flags.
    """
    flags.DEFINE_string("model_dir", None, "The --model_dir of a train or pretrain run.",
                        flag_values=flag_values)
    flags.DEFINE_string("output", None, "SavedModel directory to write (must not exist yet, or "
                        "be empty).", flag_values=flag_values)
    flags.DEFINE_string("weights", None, "Weights file to export (default: "
                        "<model_dir>/best.weights.h5; e.g. <model_dir>/last.weights.h5).",
                        flag_values=flag_values)


def main(argv, flag_values=flags.FLAGS):
    """Exports the run named by the flags; exits with a one-line error on bad input."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    model_dir, output = flag_values.model_dir, flag_values.output
    if not model_dir or not output:
        raise app.UsageError("--model_dir and --output are required.")
    if "verbosity" in flag_values and not flag_values["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # SavedModel writing logs pages of INFO lines
    if tf.io.gfile.exists(output) and tf.io.gfile.listdir(output):
        sys.exit(f"error: --output={output} exists and is not empty; refusing to overwrite "
                 "it: choose a new directory.")
    try:
        config = export_run(model_dir, output, weights=flag_values.weights)
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")
    size = int(config["image_size"])
    print(f"Exported {config['arch']} ({config['num_classes']} classes) to {output}\n"
          f"  signature serving_default: images float32 [N, {size}, {size}, 3] in [0, 1] -> "
          f"logits, probabilities [N, {config['num_classes']}]")


if __name__ == "__main__":
    define_flags(flags.FLAGS)
    app.run(main)
