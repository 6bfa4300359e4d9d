"""SavedModel export of a trained classifier (the library side of `python -m twins_tf.export`).

    python -m twins_tf.export --model_dir=runs/dogs --output=exported/dogs

rebuilds the run's network from `model_dir/config.json` (arch, num_classes, image_size,
upsample, twin), loads `best.weights.h5` (or `--weights=`), turns a twin model into the
plain-BatchNorm network that carries the Adaptive wing (`twins_tf.untwin`: the inference
network of spec §2) and writes a TensorFlow SavedModel with Keras's `ExportArchive`.

The serving signature (`serving_default`, also `serve`):

* input `images`: float32, shape (batch, image_size, image_size, 3), RGB, NHWC, pixel values
  in [0, 1] (not 0-255, not mean/std-normalised).  The ImageNet mean/std normalisation and,
  for CIFAR, the x7 nearest-neighbour upsampling happen inside the model, so a CIFAR model
  takes 32x32 images.  Resize / crop images to image_size as the evaluation pipeline does
  (`twins_tf.data.evaluation_transform`).
* the signature checks its input and refuses, with an InvalidArgumentError whose message
  starts with `twins_tf serving:` and says what to fix, images of another size or channel
  count, and values outside [0, 1] (more than `RANGE_TOLERANCE` = 1e-3 outside, so float
  rounding of a resize passes and is clamped inside the model) or NaN.  It neither resizes nor
  rescales: a served 0-255 image or a 16x16 crop for a 32x32 model is a bug in the client's
  preprocessing, and silently clamping or resizing it would return confident wrong answers.
* outputs: `logits` (batch, num_classes) float32 and `probabilities`, their softmax.

Example (Python):
  >>> served = tf.saved_model.load("exported/dogs")
  >>> out = served.signatures["serving_default"](images=tf.zeros((1, 224, 224, 3)))
  >>> out["logits"].shape
  TensorShape([1, 120])
"""

import keras
import tensorflow as tf

from twins_tf import lora
from twins_tf.layers import twin_layers
from twins_tf.twinify import untwin

SERVING_INPUT = "images"
RANGE_TOLERANCE = 1e-3
SERVING_ERROR = "twins_tf serving:"


def _check_input_size(model, image_size):
    shape = tuple(model.input_shape)
    if len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"Expected a model taking NHWC RGB images, its input shape is {shape}.")
    fixed = [s for s in shape[1:3] if s is not None]
    if any(s != image_size for s in fixed):
        raise ValueError(
            f"image_size={image_size} does not match the model's input {shape[1]}x{shape[2]}."
        )


def _serving_input_checks(images, image_size):
    """The Assert ops of the serving signature: shape (N, size, size, 3), values in [0, 1].

    A loaded SavedModel signature does not enforce its TensorSpec's static shape (a 16x16
    batch runs through a 32x32 signature), so the size is checked here at run time.
    """
    shape = tf.shape(images)
    expected = tf.constant([image_size, image_size, 3])
    size_ok = tf.cond(
        tf.equal(tf.size(shape), 4),
        lambda: tf.reduce_all(tf.equal(shape[1:], expected)),
        lambda: tf.constant(False),
    )
    size = tf.debugging.Assert(
        size_ok,
        [
            f"{SERVING_ERROR} images must have shape (batch, {image_size}, {image_size}, 3); "
            f"resize and crop them to {image_size}x{image_size} RGB before serving (as "
            "twins_tf.data.evaluation_transform does). Shape given:",
            shape,
        ],
    )
    in_range = tf.logical_and(
        tf.reduce_all(images >= -RANGE_TOLERANCE), tf.reduce_all(images <= 1.0 + RANGE_TOLERANCE)
    )
    with tf.control_dependencies([size]):
        value_range = tf.debugging.Assert(
            in_range,
            [
                f"{SERVING_ERROR} pixel values must be in [0, 1] (divide 0-255 images by 255; do "
                "not mean/std-normalise: the model does). Smallest and largest value given:",
                tf.reduce_min(images),
                tf.reduce_max(images),
            ],
        )
    return [size, value_range]


def export_saved_model(model, output_dir, *, image_size):
    """Writes the inference network of `model` as a SavedModel with an image signature.

    Args:
      model: a Keras classifier taking [0, 1] NHWC images and returning logits; a twin model
        is exported through `untwin` (Adaptive wing with its moving statistics), a model
        with AutoLoRa branches through `lora.main_branch` (the path the paper evaluates).
      output_dir: the SavedModel directory to write.
      image_size: side of the square images the signature takes.

    Returns:
      The exported plain-BN Keras model (the one whose inference the SavedModel serves).
    """
    image_size = int(image_size)
    _check_input_size(model, image_size)
    if lora.lora_branches(model):
        model = lora.main_branch(model)
    plain = untwin(model) if twin_layers(model) else model

    @tf.function
    def serve(images):
        with tf.control_dependencies(_serving_input_checks(images, image_size)):
            images = tf.identity(images)
        logits = tf.cast(plain(images, training=False), tf.float32)
        return {"logits": logits, "probabilities": tf.nn.softmax(logits, axis=-1)}

    archive = keras.export.ExportArchive()
    archive.track(plain)
    archive.add_endpoint(
        name="serve",
        fn=serve,
        input_signature=[
            tf.TensorSpec((None, image_size, image_size, 3), tf.float32, name=SERVING_INPUT)
        ],
    )
    archive.write_out(output_dir, verbose=False)
    return plain


def export_run(model_dir, output_dir, *, weights=None):
    """Exports a `train`/`pretrain` run: `twins_tf.load_run`, then `export_saved_model`.

    Args:
      model_dir: the run's `--model_dir` (holding config.json).
      output_dir: the SavedModel directory to write.
      weights: a `.weights.h5` file of that run's model, or "best" / "last"; default
        `model_dir/best.weights.h5`.

    Returns:
      The run's settings (the parsed config.json).

    Raises:
      FileNotFoundError: no run directory, config.json or weights file.
      ValueError: the config lacks a key the model needs, or the weights do not fit or hold
        a NaN or infinity.
    """
    from twins_tf.training import runs

    config = runs.read_run_config(model_dir)
    model = runs.load_run(model_dir, weights or "best")
    export_saved_model(model, output_dir, image_size=int(config["image_size"]))
    return config
