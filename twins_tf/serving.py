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
* the signature checks its input and refuses, with an InvalidArgumentError that says what
  to fix, images of another size or channel count, NaN or infinite values, and values above 1
  (0-255 images) or below 0 (mean/std-normalised ones), each with its own message; more than
  `RANGE_TOLERANCE` = 1e-3 outside [0, 1] is refused, so float rounding of a resize passes and
  is clamped inside the model.  The status TensorFlow's runtime returns (which TF Serving
  passes on) starts with `twins_tf serving:`, after only its `{{function_node ...}}` tags;
  TensorFlow's Python runtime writes its `Graph execution error:` header (and the node, e.g.
  `twins_tf_serving_pixels_at_most_1`) above every error raised inside a graph, and
  `twins_tf serving:` then starts the first line of the message proper.  It neither resizes
  nor rescales: a served 0-255 image or a 16x16 crop for a 32x32 model is a bug in the
  client's preprocessing, and silently clamping or resizing it would return confident wrong
  answers.
* an empty batch (0, image_size, image_size, 3) returns empty outputs (0, num_classes).
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
TWIN_NAME_SUFFIX = "_twin"  # build_resnet(twin=True) names its network `<arch>_twin`


def _check_input_size(model, image_size):
    shape = tuple(model.input_shape)
    if len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"Expected a model taking NHWC RGB images, its input shape is {shape}.")
    fixed = [s for s in shape[1:3] if s is not None]
    if any(s != image_size for s in fixed):
        raise ValueError(
            f"image_size={image_size} does not match the model's input {shape[1]}x{shape[2]}."
        )


def _refuse_unless(condition, message, name):
    """An op that raises InvalidArgumentError with `message` when `condition` is False.

    `tf.debugging.Assert` would prefix its message with `assertion failed: [`; CheckNumerics
    is the TensorFlow op whose error starts with the caller's text (followed by its own
    ` : Tensor had NaN values`), so the runtime's status starts with `twins_tf serving:`.
    TensorFlow's Python runtime still writes its own header (`Graph execution error:`, the
    node) above any error raised inside a graph, whatever the op; our text then starts the
    first line of the message proper.
    """
    return tf.debugging.check_numerics(
        tf.where(condition, tf.constant(0.0), tf.constant(float("nan"))), message, name=name
    )


def _serving_input_checks(images, image_size):
    """The checks of the serving signature: shape (N, size, size, 3), finite values in [0, 1].

    A loaded SavedModel signature does not enforce its TensorSpec's static shape (a 16x16
    batch runs through a 32x32 signature), so the size is checked here at run time.  Each
    refusal has its own message (NaN, above 1, below 0): the fix differs.  They run in this
    order, so an image with several faults gets the first one's message.
    """
    shape = tf.shape(images)
    # Flat: the spec's rank 4 is not enforced either, and a reduction over its 4 axes would
    # fail on a batch of another rank before the shape check could say why.
    pixels = tf.reshape(images, [-1])
    # Padded, so that a batch of another rank compares (and fails) without a cond.
    padded = tf.concat([shape, tf.zeros([4], tf.int32)], axis=0)
    size_ok = tf.logical_and(
        tf.equal(tf.size(shape), 4),
        tf.reduce_all(tf.equal(padded[1:4], tf.constant([image_size, image_size, 3]))),
    )
    checks = [
        (
            size_ok,
            f"{SERVING_ERROR} images must have shape (batch, {image_size}, {image_size}, 3); "
            f"resize and crop them to {image_size}x{image_size} RGB before serving (as "
            "twins_tf.data.evaluation_transform does).",
            "twins_tf_serving_image_shape",
        ),
        (
            tf.reduce_all(tf.math.is_finite(pixels)),
            f"{SERVING_ERROR} pixel values must be finite numbers in [0, 1]; the images hold "
            "NaN or infinite values (a failed decode or a division by zero upstream).",
            "twins_tf_serving_finite_pixels",
        ),
        (
            tf.reduce_all(pixels <= 1.0 + RANGE_TOLERANCE),
            f"{SERVING_ERROR} pixel values must be in [0, 1]; some are above 1 (divide 0-255 "
            "images by 255).",
            "twins_tf_serving_pixels_at_most_1",
        ),
        (
            tf.reduce_all(pixels >= -RANGE_TOLERANCE),
            f"{SERVING_ERROR} pixel values must be in [0, 1]; some are below 0 (do not "
            "mean/std-normalise: the model does).",
            "twins_tf_serving_pixels_at_least_0",
        ),
    ]
    ops = []
    for condition, message, name in checks:
        with tf.control_dependencies(ops[-1:]):  # in order: the first fault found is reported
            ops.append(_refuse_unless(condition, message, name))
    return ops


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
    plain = model
    if twin_layers(model):
        plain = untwin(model)
        # The graph's node names come from the network's name: a served network has no wings,
        # so it does not keep build_resnet's `<arch>_twin` name.
        plain.name = model.name.removesuffix(TWIN_NAME_SUFFIX)
    num_classes = int(plain.output_shape[-1])

    @tf.function
    def serve(images):
        with tf.control_dependencies(_serving_input_checks(images, image_size)):
            images = tf.identity(images)
        # An empty batch (a client's last, empty chunk) is a valid request with an empty
        # answer; the network's kernels are not all defined on zero rows, so it is not run.
        logits = tf.cond(
            tf.shape(images)[0] > 0,
            lambda: tf.cast(plain(images, training=False), tf.float32),
            lambda: tf.zeros([0, num_classes], tf.float32),
        )
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
