"""Helpers the AutoAttack modules share: norm names, per-example norms, projections, input checks.

Every attack of the AutoAttack suite works on a batch of [0, 1] NHWC images and measures
perturbations per example in L-inf or L2; these few functions keep that arithmetic (and the
error messages for bad input) identical across `apgd.py`, `fab.py`, `square.py` and
`autoattack.py`.
"""

import numpy as np
import tensorflow as tf

NORMS = ("linf", "l2")
TINY = 1e-12  # guards divisions by a zero gradient or perturbation norm


def check_norm(norm, who):
    """Canonical norm name ("linf" or "l2"); accepts the reference spellings "Linf"/"L2"."""
    name = str(norm).lower()
    if name not in NORMS:
        raise ValueError(f"{who} norm must be one of {NORMS}, got {norm!r}.")
    return name


def check_epsilon(epsilon, who, norm="linf", *, name="epsilon", allow_zero=False):
    """`epsilon` as a float in [0, 1] pixel units, or a one-line error.

    An L-inf radius (or step) above 1 is more than the whole pixel range, which only happens
    when it was given in 0-255 units (`PGD(8, 2, 1)`); an L2 radius may legitimately exceed 1
    and is checked against the image's L2 diameter when the images are known
    (`check_radius_fits`).
    """
    epsilon = float(epsilon)
    if not (epsilon >= 0 if allow_zero else epsilon > 0):
        raise ValueError(
            f"{who} {name} must be {'>=' if allow_zero else '>'} 0 (in [0, 1] "
            f"pixel units, e.g. 8/255), got {epsilon}."
        )
    if norm == "linf" and epsilon > 1:
        raise ValueError(
            f"{who} {name}={epsilon:g} is more than the whole [0, 1] pixel range: "
            f"give it in [0, 1] units, e.g. {epsilon:g}/255 = "
            f"{epsilon / 255:.6g} for {epsilon:g} levels of 255."
        )
    return epsilon


def check_radius_fits(value, norm, x, who, name):
    """An L2 radius or step longer than the diagonal of the [0, 1] image box means 0-255 units."""
    if norm != "l2" or value is None or not x.shape[1:].is_fully_defined():
        return
    diameter = float(np.sqrt(np.prod(x.shape[1:])))
    if value > diameter:
        raise ValueError(
            f"{who} L2 {name}={value:g} is longer than the diagonal of the [0, 1] "
            f"image box ({diameter:.4g} for {tuple(x.shape[1:])} images): give it "
            f"in [0, 1] pixel units (a value in 0-255 units divided by 255)."
        )


def check_positive_int(value, name, who):
    if int(value) != value or value < 1:
        raise ValueError(f"{who} {name} must be a positive integer, got {value!r}.")
    return int(value)


def per_example(values, like):
    """Reshape a (batch,) tensor to broadcast against `like` (batch, ...)."""
    return tf.reshape(values, [-1] + [1] * (like.shape.rank - 1))


def lp_norm(t, norm):
    """Per-example L-inf or L2 norm over every axis but the first."""
    axes = list(range(1, t.shape.rank))
    if norm == "linf":
        return tf.reduce_max(tf.abs(t), axis=axes)
    return tf.sqrt(tf.reduce_sum(tf.square(t), axis=axes))


def normalize(t, norm):
    """`t` divided per example by its norm (zero stays zero)."""
    return t / per_example(lp_norm(t, norm) + TINY, t)


def project(x_adv, x, epsilon, norm):
    """Onto the epsilon-ball around `x` (L-inf: clip; L2: rescale), then clip to [0, 1]."""
    if norm == "linf":
        x_adv = tf.clip_by_value(x_adv, x - epsilon, x + epsilon)
    else:
        delta = x_adv - x
        scale = tf.minimum(1.0, epsilon / (lp_norm(delta, "l2") + TINY))
        x_adv = x + delta * per_example(scale, x)
    return tf.clip_by_value(x_adv, 0.0, 1.0)


def logits_of(model, x):
    """Float32 logits of `model` in inference mode (BN moving statistics, no dropout)."""
    return tf.cast(model(x, training=False), tf.float32)


def predict(model, x):
    return tf.argmax(logits_of(model, x), axis=-1, output_type=tf.int32)


def num_classes_of(model):
    """The model's number of outputs from its static output shape, or None if unknown."""
    try:
        classes = model.output_shape[-1]
    except (AttributeError, TypeError, ValueError, IndexError, RuntimeError):
        return None
    return int(classes) if isinstance(classes, int) else None


def _is_concrete(t):
    return tf.executing_eagerly() and hasattr(t, "numpy")


def check_images_and_labels(x, y, who, *, model=None, image_rank=4):
    """Float32 images in [0, 1] and int32 class ids of matching length, or a one-line error.

    Checks what fails late and obscurely otherwise: integer images (0-255), a single image
    instead of a batch, values outside [0, 1], one-hot or soft labels, a label count that is
    not the image count, class ids outside the model's classes.  One-hot labels of the
    model's width are accepted and taken by argmax (Keras's categorical labels); other 2-D
    labels are refused.  Value checks need concrete tensors: inside a traced function (the
    trainer's compiled step) only the static checks run, the trainer checks its data itself.

    Args:
      model: the classifier, for its input rank and number of classes (when known).
      image_rank: the rank x must have; None: the model's input rank (PGD takes any layout).
    """
    x = tf.convert_to_tensor(x)
    if not x.dtype.is_floating:
        raise ValueError(
            f"{who} expects float images in [0, 1], got dtype {x.dtype.name}; "
            "convert with tf.cast(images, tf.float32) / 255."
        )
    x = tf.cast(x, tf.float32)
    rank = image_rank
    if rank is None and model is not None:
        try:
            rank = len(model.input_shape)
        except (AttributeError, TypeError, ValueError, RuntimeError):
            rank = None
    if rank is not None and x.shape.rank is not None and x.shape.rank != rank:
        hint = (
            "one image, not a batch: add a batch axis (x[None]) or .batch() the dataset"
            if x.shape.rank == rank - 1
            else "expected (batch, height, width, channels)"
        )
        raise ValueError(
            f"{who} expects a batch of images of rank {rank}, got shape {tuple(x.shape)}: {hint}."
        )
    classes = num_classes_of(model) if model is not None else None
    y = tf.convert_to_tensor(y)
    if y.dtype == tf.bool or not (y.dtype.is_integer or y.dtype.is_floating):
        raise ValueError(
            f"{who} expects integer class ids or one-hot labels, got dtype {y.dtype.name}."
        )
    if y.shape.rank == 2 and y.shape[1] is not None and y.shape[1] > 1:
        if classes is not None and y.shape[1] != classes:
            raise ValueError(
                f"{who} got labels of shape {tuple(y.shape)}, but the model has "
                f"{classes} classes: pass class ids (batch,) or one-hot rows of "
                f"width {classes}."
            )
        if _is_concrete(y):
            rows = y.numpy()
            if not (np.all((rows == 0) | (rows == 1)) and np.all(rows.sum(1) == 1)):
                raise ValueError(
                    f"{who} got 2-D labels that are not one-hot (soft or mixed "
                    "labels?): pass class ids (batch,) or one-hot rows."
                )
        y = tf.argmax(y, axis=-1, output_type=tf.int32)
    elif y.dtype.is_floating:
        raise ValueError(
            f"{who} expects integer class labels, got dtype {y.dtype.name} and shape "
            f"{tuple(y.shape)}; cast them with tf.cast(labels, tf.int32)."
        )
    elif y.shape.rank is not None and y.shape.rank > 1 and y.shape[1:].num_elements() != 1:
        raise ValueError(f"{who} expects class ids of shape (batch,), got {tuple(y.shape)}.")
    y = tf.reshape(tf.cast(y, tf.int32), [-1])
    if (
        x.shape.rank
        and x.shape[0] is not None
        and y.shape[0] is not None
        and y.shape[0] != x.shape[0]
    ):
        raise ValueError(f"{who} got {x.shape[0]} images but {y.shape[0]} labels.")
    if _is_concrete(x) and x.shape[0]:
        low, high = float(tf.reduce_min(x)), float(tf.reduce_max(x))
        if low < 0.0 or high > 1.0:
            raise ValueError(
                f"{who} expects images in [0, 1], got values in [{low:.4g}, "
                f"{high:.4g}]; divide uint8 images by 255 and leave "
                "normalisation to the model."
            )
    if _is_concrete(y) and y.shape[0]:
        low, high = int(tf.reduce_min(y)), int(tf.reduce_max(y))
        if low < 0:
            raise ValueError(f"{who} got a negative class id ({low}); class ids are 0, 1, ...")
        if classes is not None and high >= classes:
            raise ValueError(
                f"{who} got class ids in [{low}, {high}], but the model has "
                f"{classes} classes (ids 0 to {classes - 1})."
            )
    return x, y


def check_num_classes(num_classes, needed, who, why):
    if num_classes < needed:
        raise ValueError(
            f"{who} needs at least {needed} classes ({why}); the model has {num_classes}."
        )


def run_seed(seed, *salt):
    """A stateless-RNG seed (int32 pair) derived from an attack seed and run counters."""
    mixed = np.random.SeedSequence([int(seed) & 0x7FFFFFFF, *[int(s) for s in salt]])
    return tf.constant(mixed.generate_state(2) & 0x7FFFFFFF, dtype=tf.int32)
