"""Input checks: attack budgets, images and labels, each refused in one line that says the fix.

twins_tf's images are [0, 1] NHWC floats and its labels class ids (or one-hot rows of the
model's width, taken by argmax); a budget is in the same [0, 1] pixel units.  A mistake in any
of them does not fail: it trains or evaluates something else (PGD with epsilon=8 replaces each
image by anything, 0-255 images saturate the model).  So every entry point refuses it, and
this module is the one home of those checks:

  * norms and budgets (`check_norm`, `check_pixel_budget`, `check_radius_fits`): the
    attacks' constructors and calls, the trainer (a user's attack object), and the settings
    and flags of every binary.  A budget is checked in its norm: an L-inf one is at most 1
    (more is 0-255 units), an L2 one at most the diagonal of the [0, 1] image box (3.0 is an
    ordinary L2 radius); `budget_text` and `threat_model_text` print them one way everywhere;
  * images and labels, numpy arrays or eager tensors (`check_images_and_labels`,
    `checked_arrays`): every attack's call, the trainer's numpy inputs, and the pieces of the
    trainer's tf.data checks (`twins_tf.trainer.checks`).  Values are checked where they
    are concrete; inside a traced function (the trainer's compiled step) only dtypes and
    shapes are.  Nothing is clipped or converted silently.

Why here, at the top of the package and not in `trainer/`: the attacks, below the trainer in
the import graph, and the run settings need the same checks, and a lower module must not import
a higher one.  This module imports only TensorFlow and numpy, so anything in twins_tf can.
"""

import numpy as np
import tensorflow as tf

# --- budgets -----------------------------------------------------------------------------------
# The norms the attacks measure perturbations in, and how messages and tables name them.
NORMS = ("linf", "l2")
NORM_NAMES = {"linf": "L-inf", "l2": "L2"}

# The wording names the fix for where the value came from: a flag or run setting is written on
# a command line or in a config, an argument in code, an attribute on a user's attack object.
_BUDGET_MESSAGES = {
    "flag": (
        "{label}={value:g} is outside [0, 1]: L-inf images are in [0, 1] pixel units, so "
        "write e.g. 8/255 (not 8); an L2 radius such as 3.0 needs --attack_norm=l2."
    ),
    "argument": (
        "{label}={value:g} is more than the whole [0, 1] pixel range: give it in [0, 1] units, "
        "e.g. {value:g}/255 = {fraction:.6g} for {value:g} levels of 255."
    ),
    "attribute": (
        "{label}={value:g} is in 0-255 units, but twins_tf images are in [0, 1]: pass "
        "{name}={value:g}/255 (e.g. PGD(8 / 255, 2 / 255, 10))."
    ),
}


def budget_text(value, norm):
    """A radius or step as people write it: L-inf `8/255` when it is a whole number of 255ths,
    else its 6 significant digits (L2 always: `0.5`, `3`)."""
    in_255ths = value * 255
    if norm == "linf" and abs(in_255ths - round(in_255ths)) < 1e-6:
        return f"{round(in_255ths)}/255"
    return f"{value:.6g}"


def threat_model_text(norm, radius):
    """The threat model as tables and logs print it: `L-inf eps 8/255`, `L2 eps 0.5`."""
    return f"{NORM_NAMES[norm]} eps {budget_text(radius, norm)}"


def check_norm(norm, label, *, error=ValueError):
    """The canonical norm name, "linf" or "l2", of `norm`; else `error` listing the norms.

    Accepts the reference spellings ("Linf", "L2") and "inf" / float("inf") for L-inf.

    Args:
      norm: the norm as given.
      label: how the message names it: "--attack_norm", "PGD norm".
      error: the exception class (the binaries raise their `SetupError`).
    """
    name = str(norm).lower()
    name = "linf" if name == "inf" else name
    if name not in NORMS:
        raise error(f"{label} must be one of {', '.join(NORMS)}, got {norm!r}.")
    return name


def l2_diameter(image_shape):
    """The L2 length of the diagonal of the [0, 1] box of images of `image_shape` (no batch
    axis): no perturbation that keeps the image in [0, 1] is longer."""
    return float(np.sqrt(np.prod(image_shape)))


def check_pixel_budget(
    value, label, *, norm="linf", given_as="argument", error=ValueError, image_shape=None
):
    """`value`, an attack radius or step in [0, 1] pixel units, as a float; else `error`.

    An L-inf budget above 1 is more than the whole pixel range, which only happens when it was
    given in 0-255 units (8 for 8/255).  An L2 budget above 1 is ordinary (ImageNet's L2 threat
    model is 3.0): it is refused only when it is longer than the diagonal of the [0, 1] image
    box, checked here when `image_shape` is given and by `check_radius_fits` once an attack
    sees its images.

    Args:
      value: the budget.
      label: how the message names it: "--attack_eps", "PGD epsilon", "attack step_size".
      norm: the threat model's norm ("linf", "Linf", "inf" or float("inf") for L-inf; "l2").
      given_as: "flag" (a flag or run setting: anything negative is refused, and for L-inf
        anything above 1), "argument" (an attack's constructor argument) or "attribute" (the
        `epsilon` or `step_size` of a user's attack object); it decides the fix the message
        names.
      error: the exception class (the binaries raise their `SetupError`).
      image_shape: the shape of one image (height, width, channels), when known: an L2
        budget longer than its diagonal is refused.
    """
    value = float(value)
    norm = check_norm(norm, f"the norm of {label}", error=error)
    if norm == "l2":
        if given_as == "flag" and value < 0:
            raise error(f"{label}={value:g} is negative: an L2 radius or step is >= 0.")
        if image_shape is not None and value > l2_diameter(image_shape):
            raise error(_too_long(label, value, image_shape))
        return value
    if value > 1 or (given_as == "flag" and value < 0):
        raise error(
            _BUDGET_MESSAGES[given_as].format(
                label=label, value=value, fraction=value / 255, name=label.split(" ")[-1]
            )
        )
    return value


def _too_long(label, value, image_shape):
    return (
        f"{label}={value:g} is longer than the diagonal of the [0, 1] image box, the longest "
        f"L2 perturbation ({l2_diameter(image_shape):.4g} for {tuple(image_shape)} images): "
        "give it in [0, 1] pixel units (a value in 0-255 units divided by 255)."
    )


def check_radius_fits(value, norm, x, who, name):
    """An L2 radius or step longer than the diagonal of the [0, 1] image box means 0-255 units."""
    if norm != "l2" or value is None or not x.shape[1:].is_fully_defined():
        return
    if value > l2_diameter(x.shape[1:]):
        raise ValueError(_too_long(f"{who} L2 {name}", value, tuple(x.shape[1:])))


# --- images and labels ---------------------------------------------------------------------------
SOFT_LABELS = (
    "labels are 2-D but not one-hot (soft or mixed labels?): the objectives and attacks take "
    "hard labels; pass class ids (batch,) or one-hot rows."
)


def input_rank(model):
    """The rank of the model's input batches (4 for images), None if it has no single input."""
    try:
        shape = model.input_shape
    except (AttributeError, TypeError, ValueError, RuntimeError):
        return None
    if isinstance(shape, tuple) and all(d is None or isinstance(d, int) for d in shape):
        return len(shape)
    return None


def num_classes_of(model):
    """The model's number of outputs from its static output shape, or None if unknown."""
    try:
        classes = model.output_shape[-1]
    except (AttributeError, TypeError, ValueError, IndexError, RuntimeError):
        return None
    return int(classes) if isinstance(classes, int) else None


def _dtype(t):
    try:
        return tf.as_dtype(t.dtype)
    except TypeError:  # numpy strings or objects
        return None


def _shape(t):
    shape = t.shape
    if isinstance(shape, tf.TensorShape):
        return None if shape.rank is None else tuple(shape.as_list())
    return tuple(shape)


def _is_concrete(t):
    """Whether `t` has values to check: a numpy array or an eager tensor (not a traced one)."""
    return isinstance(t, np.ndarray) or (tf.executing_eagerly() and hasattr(t, "numpy"))


def _bounds(t):
    """(min, max) of `t` as numpy scalars; None if it is traced or empty."""
    if not _is_concrete(t) or not np.prod(t.shape):
        return None
    if isinstance(t, np.ndarray):
        return t.min(), t.max()
    return tf.reduce_min(t).numpy(), tf.reduce_max(t).numpy()


def is_one_hot_shape(shape, num_classes):
    width = shape[1] if len(shape) == 2 else None
    return width is not None and width > 1 and num_classes in (None, width)


def check_images(images, who, rank=None):
    """Float images of rank `rank` (when given) with values in [0, 1] (when concrete)."""
    dtype, shape = _dtype(images), _shape(images)
    if dtype is None or not dtype.is_floating:
        raise ValueError(
            f"{who}: images must be floats in [0, 1], got dtype "
            f"{dtype.name if dtype else images.dtype}: convert them with "
            "tf.cast(images, tf.float32) / 255 (numpy: images.astype('float32') / 255)."
        )
    if rank is not None and shape is not None and len(shape) != rank:
        if len(shape) == rank - 1:
            raise ValueError(
                f"{who}: images of shape {shape} are one image, not a batch: add a batch axis "
                "(images[None]) or .batch() the dataset."
            )
        raise ValueError(
            f"{who}: images must be a batch of rank {rank}, (batch, height, width, channels), "
            f"got shape {shape}."
        )
    bounds = _bounds(images)
    if bounds is not None and (bounds[0] < 0 or bounds[1] > 1):
        raise ValueError(
            f"{who}: images must lie in [0, 1] (pixel space), got values in "
            f"[{bounds[0]:.4g}, {bounds[1]:.4g}]: pass images in [0, 1] (divide uint8 images "
            "by 255) and do not normalise them (the model normalises inside)."
        )


def check_label_shape(shape, num_classes, who, *, dataset=False):
    """Labels are one class id per image, shape (batch,) or (batch, 1), or one-hot rows of the
    model's width (taken by argmax); anything else is refused.  `num_classes` None: unknown,
    any 2-D width counts as one-hot."""
    if len(shape) == 0 and dataset:
        raise ValueError(
            "the dataset's labels are scalars: the dataset is not batched. Call "
            "dataset.batch(batch_size) (drop_remainder=True for twin methods)."
        )
    if len(shape) <= 1 or (len(shape) == 2 and shape[1] == 1):
        return
    if is_one_hot_shape(shape, num_classes):
        return
    rows = "one-hot rows" + (f" of the model's {num_classes} classes" if num_classes else "")
    mismatch = (
        f"labels of shape {shape}, but the model has {num_classes} classes: "
        if len(shape) == 2 and num_classes
        else ""
    )
    raise ValueError(
        f"{who}: {mismatch}labels must be class ids, shape (batch,), or {rows}, got shape {shape}."
    )


def class_ids(labels, who, num_classes=None):
    """`labels` (numpy or tensor) as class ids: exact one-hot rows of the model's width by
    argmax, class ids checked and returned as given (values only when concrete)."""
    dtype, shape = _dtype(labels), _shape(labels)
    if dtype is None or not (dtype.is_integer or dtype.is_floating):
        raise ValueError(
            f"{who}: labels must be integer class ids or one-hot rows, got dtype "
            f"{dtype.name if dtype else labels.dtype}."
        )
    if shape is not None:
        check_label_shape(shape, num_classes, who)
    if shape is not None and is_one_hot_shape(shape, num_classes):
        if _is_concrete(labels):
            rows = np.asarray(labels)
            if not (np.isin(rows, (0, 1)).all() and (rows.sum(axis=-1) == 1).all()):
                raise ValueError(f"{who}: {SOFT_LABELS}")
        if isinstance(labels, np.ndarray):
            return labels.argmax(axis=-1)
        return tf.argmax(labels, axis=-1, output_type=tf.int32)
    if dtype.is_floating:
        raise ValueError(
            f"{who}: labels must be integer class labels, got dtype {dtype.name} and shape "
            f"{shape}: cast them with tf.cast(labels, tf.int32) (numpy: labels.astype(int))."
        )
    bounds = _bounds(labels)
    if bounds is not None:
        low, high = bounds
        if num_classes is not None and (low < 0 or high >= num_classes):
            raise ValueError(
                f"{who}: labels must be class ids in [0, {num_classes}), got class ids in "
                f"[{low}, {high}], but the model has {num_classes} classes."
            )
        if low < 0:
            raise ValueError(f"{who}: labels must be class ids 0, 1, ..., got {low}.")
    return labels


def checked_arrays(images, labels, who, *, rank=None, num_classes=None):
    """(images, class ids) of a batch, checked (`check_images`, `class_ids`) and of one length;
    the images as given, the labels as `class_ids` returns them."""
    check_images(images, who, rank)
    labels = class_ids(labels, who, num_classes)
    count, ids = _shape(images), _shape(labels)
    if count and ids and count[0] is not None and ids[0] is not None and count[0] != ids[0]:
        raise ValueError(f"{who} got {count[0]} images but {ids[0]} labels.")
    return images, labels


def check_images_and_labels(x, y, who, *, model=None, image_rank=4):
    """Float32 images in [0, 1] and int32 class ids (batch,) of an attack's call, or an error.

    Inside a traced function (the trainer's compiled step) only the static checks run; the
    trainer checks its data itself (`twins_tf.trainer.checks`).

    Args:
      model: the classifier, for its input rank and number of classes (when known).
      image_rank: the rank x must have; None: the model's input rank (PGD takes any layout).
    """
    x, y = tf.convert_to_tensor(x), tf.convert_to_tensor(y)
    if image_rank is None and model is not None:
        image_rank = input_rank(model)
    classes = num_classes_of(model) if model is not None else None
    x, y = checked_arrays(x, y, who, rank=image_rank, num_classes=classes)
    return tf.cast(x, tf.float32), tf.reshape(tf.cast(y, tf.int32), [-1])
