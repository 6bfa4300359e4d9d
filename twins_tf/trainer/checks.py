"""What the trainer is given, checked before any compiled code runs: model, attacks, data.

The constructor checks its arguments (`check_arguments`): the model against the method (twin
or plain BN), the attacks' budgets; `fit`, `evaluate` and `*_on_batch` check
their data (`checked_inputs`).  XLA removes runtime assertions, so nothing is checked inside
the compiled step.  Numpy inputs are checked at once (`twins_tf.input_checks`, the checks the
attacks make too).  A `tf.data.Dataset` is checked as far as its element spec and structure
tell: dtypes, an unbatched dataset, label shapes, the batch size, and for a twin method an odd
*last* batch (`batch()` without drop_remainder over a dataset of known cardinality), which
would otherwise fail a whole epoch later.  It is then wrapped in a `map` that asserts, per
batch and outside the compiled step, images in [0, 1], labels in [0, num_classes) and
(training a twin method) a batch divisible by 2 x replicas.  A pipeline check that fires while
training is re-raised as one line (`InputCheckError`, `one_line_data_errors`) instead of
TensorFlow's graph error.  Data passed as an already distributed dataset, or to `train_step`
directly, is not checked.
"""

import contextlib
import math

import keras
import numpy as np
import tensorflow as tf

from twins_tf import methods as methods_lib
from twins_tf.input_checks import (
    SOFT_LABELS,
    check_label_shape,
    check_pixel_budget,
    checked_arrays,
    input_rank,
    is_one_hot_shape,
    num_classes_of,
)
from twins_tf.layers import TWIN, twin_layers
from twins_tf.platform import keras_private

_TRAINER = "AdversarialTrainer"


def check_arguments(model, method, attacks, **hyperparameters):
    """The constructor's arguments: a built model of the method's kind (twin or plain BN), an
    attack for an adversarial method, budgets in [0, 1] units, hyperparameters >= 0.

    Args:
      attacks: {argument name: attack or None}.
    """
    if not isinstance(model, keras.Model) or not model.built:
        raise TypeError(
            f"AdversarialTrainer needs a built keras.Model, got {type(model).__name__}; "
            "build it (e.g. call it on a batch) first."
        )
    check_model_kind(model, method)
    if method.adversarial and attacks["attack"] is None:
        raise ValueError(
            f"method {method.name!r} trains on adversarial examples: pass an attack, "
            "e.g. attack=twins_tf.attacks.PGD(8/255, 2/255, 10, random_start=True)."
        )
    for arg, value in hyperparameters.items():
        if not value >= 0:
            raise ValueError(f"{arg} must be >= 0, got {value}.")
    for arg, attack in attacks.items():
        check_attack_units(attack, arg)


def check_model_kind(model, method):
    """A twin method needs every TwinBatchNormalization in "twin" mode, a plain one none."""
    layers = twin_layers(model)
    active = [layer for layer in layers if layer.mode == TWIN]
    if method.twin and (not layers or len(active) != len(layers)):
        if not layers:
            raise ValueError(
                f"method {method.name!r} needs a twin model but {model.name!r} has no "
                "TwinBatchNormalization layers: build it with twin=True or use "
                "twins_tf.twinify(model)."
            )
        raise ValueError(
            f"method {method.name!r} needs every TwinBatchNormalization in 'twin' mode; "
            f"{len(layers) - len(active)} of {len(layers)} are not: call "
            "twins_tf.layers.set_twin_mode(model, 'twin')."
        )
    if not method.twin and active:
        raise ValueError(
            f"method {method.name!r} trains a plain-BN model but {model.name!r} has "
            f"{len(active)} TwinBatchNormalization layers in 'twin' mode (they would split "
            "every batch between two wings): use twins_tf.untwin(model), or "
            "twins_tf.layers.set_twin_mode(model, 'adaptive') for plain BN with PyTorch numerics."
        )


def check_attack_units(attack, arg):
    """A budget of a user's attack in 0-255 units, found at construction rather than as a
    useless run.  Reads the `epsilon`/`step_size` attributes twins_tf's attacks have (they
    check their own at construction); other attacks check their own arguments."""
    for name in ("epsilon", "step_size"):
        value = getattr(attack, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            check_pixel_budget(
                value, f"{arg} {name}", norm=getattr(attack, "norm", "linf"), given_as="attribute"
            )


def step_batch(data):
    """A step's (images, labels) as float32 images and int32 class ids (batch,); sample
    weights refused (the objectives have none)."""
    if isinstance(data, (tuple, list)) and len(data) in (2, 3):
        if len(data) == 3 and data[2] is not None:
            raise ValueError(
                "AdversarialTrainer does not support sample weights: pass (images, labels)."
            )
        images, labels = data[0], data[1]
        return tf.cast(images, tf.float32), tf.reshape(tf.cast(labels, tf.int32), [-1])
    raise ValueError(
        "AdversarialTrainer steps take (images, labels) batches, got "
        f"{type(data).__name__} of {len(data) if isinstance(data, (tuple, list)) else 1} part(s)."
    )


class InputCheckError(tf.errors.InvalidArgumentError, ValueError):
    """Bad `fit`/`evaluate` data, found by a check of the trainer's tf.data pipeline.

    One line saying what is wrong and how to fix it, instead of TensorFlow's multi-line graph
    error.  A ValueError like the checks made before training, and still a
    `tf.errors.InvalidArgumentError`, which is what the pipeline's assertion raises, so code
    catching either keeps working.
    """

    def __init__(self, message):
        super().__init__(None, None, message)


def checked_inputs(x, y, batch_size, *, model, even, replicas, validation_split=0.0, whole=False):
    """The trainer's `(x, y)` for Keras, checked (see the module doc).

    Args:
      model: the wrapped classifier.
      even: the batches are split into two wings (a twin method training): every
        per-replica batch must be even.
      replicas: the strategy's replicas.
      validation_split, whole: `fit`'s validation_split; `*_on_batch` (one batch, handed whole
        to every replica).
    """
    if isinstance(x, tf.data.Dataset):
        if y is not None:
            raise ValueError("pass labels inside the dataset, not as y=, with a tf.data input.")
        return _checked_dataset(x, model, even, replicas), None
    if isinstance(x, tf.distribute.DistributedDataset) or hasattr(x, "element_spec"):
        return x, y  # already distributed or a custom iterator: not checked (module doc)
    if x is None or y is None:
        raise ValueError(
            "AdversarialTrainer needs (images, labels): a tf.data.Dataset yielding them, or "
            "x=images and y=integer labels."
        )
    labels = np.asarray(y)
    _, ids = checked_arrays(
        np.asarray(x), labels, _TRAINER, rank=input_rank(model), num_classes=num_classes_of(model)
    )
    if ids is not labels:
        y = ids  # one-hot rows, taken by argmax
    if even:
        count = len(x)
        if validation_split:
            count = int(math.ceil(count * (1.0 - validation_split)))
        if whole:  # Keras's *_on_batch hands every replica the whole batch
            replicas = 1
        for batch in [count] if whole else _numpy_batch_sizes(count, batch_size or 32):
            if batch % (2 * replicas):
                raise ValueError(methods_lib.odd_batch_message(batch, replicas=replicas))
    return x, y


def checked_validation(data, **kwargs):
    """`fit`'s validation_data, checked as evaluation data (`checked_inputs`' keywords)."""
    if isinstance(data, tf.data.Dataset):
        return checked_inputs(data, None, None, **kwargs)[0]
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return checked_inputs(data[0], data[1], None, **kwargs)
    raise ValueError(
        "validation_data must be a tf.data.Dataset of (images, labels) or a tuple "
        "(images, labels); sample weights are not supported."
    )


def _numpy_batch_sizes(count, batch_size):
    sizes = [batch_size] if count >= batch_size else []
    if count % batch_size:
        sizes.append(count % batch_size)
    return sizes


def _check_element_spec(dataset, model, num_classes):
    """What a dataset's element spec tells, checked before any element is read."""
    spec = dataset.element_spec
    if not isinstance(spec, tuple) or len(spec) != 2:
        raise ValueError(
            "AdversarialTrainer datasets must yield (images, labels) pairs; got elements "
            f"{spec}. Sample weights and dict inputs are not supported."
        )
    image_spec, label_spec = spec
    if not image_spec.dtype.is_floating:
        raise ValueError(
            f"images must be floats in [0, 1], got dtype {image_spec.dtype.name}: map "
            "`tf.cast(images, tf.float32) / 255.0` over the dataset."
        )
    one_hot = is_one_hot_shape(tuple(label_spec.shape), num_classes)
    if not (label_spec.dtype.is_integer or one_hot and label_spec.dtype.is_floating):
        raise ValueError(
            f"labels must be integer class ids, got dtype {label_spec.dtype.name} (one-hot "
            "labels: take tf.argmax(labels, -1))."
        )
    rank = input_rank(model)
    if rank is not None and image_spec.shape.rank == rank - 1:
        raise ValueError(
            f"the dataset is not batched: its images have shape {image_spec.shape} and the "
            f"model takes batches of rank {rank}. Call dataset.batch(batch_size) "
            "(drop_remainder=True for twin methods)."
        )
    if rank is not None and image_spec.shape.rank not in (None, rank):
        raise ValueError(
            f"the dataset's images have shape {image_spec.shape} but the model takes "
            f"batches of shape {tuple(model.input_shape)}."
        )
    check_label_shape(tuple(label_spec.shape), num_classes, _TRAINER, dataset=True)
    return image_spec, one_hot


def _check_batch_sizes(dataset, image_spec, replicas):
    """A twin method's batches, as far as tf.data's structure tells them: the batch size, and
    an odd *last* batch (`batch()` without drop_remainder over a known cardinality), which
    would otherwise fail a whole epoch later."""
    batch = image_spec.shape[0] if image_spec.shape.rank else None
    if batch is not None and batch % (2 * replicas):
        raise ValueError(methods_lib.odd_batch_message(batch, replicas=replicas))
    sizes = keras_private.dataset_batch_sizes(dataset) or ()
    odd = sorted(size for size in sizes if size % (2 * replicas))
    if odd:
        raise InputCheckError(
            methods_lib.odd_batch_message(odd[0], replicas=replicas)
            + f" (the dataset's batches have sizes {sorted(sizes)})"
        )


def _pipeline_messages(num_classes, replicas):
    """The messages of the tf.data checks of `_checked_dataset`, by check."""
    return {
        "low": "images must lie in [0, 1] (pixel space); found a value below 0. Scale images "
        "to [0, 1] (e.g. /255) and do not normalise them: the model normalises inside.",
        "high": "images must lie in [0, 1] (pixel space); found a value above 1. Scale images "
        "to [0, 1] (e.g. divide uint8 images by 255).",
        "negative": f"labels must be class ids in [0, {num_classes}); found a negative one.",
        "large": f"labels must be class ids in [0, {num_classes}) (the model has {num_classes} "
        "outputs); found a larger one.",
        "odd": methods_lib.odd_batch_message(
            f"not a multiple of {2 * replicas}", replicas=replicas
        ),
        "soft": SOFT_LABELS,
    }


# Every message a pipeline check of this process may raise, to recognise it in TF's error.
_PIPELINE_MESSAGES = set()


def _checked_dataset(dataset, model, even, replicas):
    num_classes = num_classes_of(model)
    image_spec, one_hot = _check_element_spec(dataset, model, num_classes)
    if even:
        _check_batch_sizes(dataset, image_spec, replicas)
    messages = _pipeline_messages(num_classes, replicas)
    _PIPELINE_MESSAGES.update(messages.values())

    def check(images, labels):
        if one_hot:  # exact one-hot rows, as the attacks take them (soft labels refused)
            hot = tf.logical_or(tf.equal(labels, 0), tf.equal(labels, 1))
            rows = tf.reduce_sum(tf.cast(labels, tf.float32), axis=-1)
            exact = tf.logical_and(tf.reduce_all(hot), tf.reduce_all(tf.equal(rows, 1.0)))
            with tf.control_dependencies(
                [tf.debugging.assert_equal(exact, True, message=messages["soft"])]
            ):
                labels = tf.argmax(labels, axis=-1)
        zero, classes = tf.constant(0, labels.dtype), tf.constant(num_classes, labels.dtype)
        checks = [
            tf.debugging.assert_greater_equal(
                tf.reduce_min(images), tf.constant(0, images.dtype), message=messages["low"]
            ),
            tf.debugging.assert_less_equal(
                tf.reduce_max(images), tf.constant(1, images.dtype), message=messages["high"]
            ),
            tf.debugging.assert_greater_equal(
                tf.reduce_min(labels), zero, message=messages["negative"]
            ),
            tf.debugging.assert_less(tf.reduce_max(labels), classes, message=messages["large"]),
        ]
        if even:
            batch = tf.shape(images)[0]
            checks.append(
                tf.debugging.assert_equal(batch % (2 * replicas), 0, message=messages["odd"])
            )
        with tf.control_dependencies(checks):
            return tf.identity(images), tf.identity(labels)

    return dataset.map(check)


@contextlib.contextmanager
def one_line_data_errors():
    """Re-raise a failed tf.data check of `checked_inputs` as one InputCheckError line
    (TensorFlow's own error is several lines of graph context around the message)."""
    try:
        yield
    except tf.errors.InvalidArgumentError as error:
        if isinstance(error, InputCheckError):
            raise
        text = str(error)
        found = [m for m in _PIPELINE_MESSAGES if m in text]
        if found:
            raise InputCheckError(max(found, key=len)) from None
        raise
