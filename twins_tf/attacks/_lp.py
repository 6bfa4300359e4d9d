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


def check_epsilon(epsilon, who):
    epsilon = float(epsilon)
    if not epsilon > 0:
        raise ValueError(f"{who} epsilon must be > 0 (in [0, 1] pixel units, e.g. 8/255), "
                         f"got {epsilon}.")
    return epsilon


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


def check_images_and_labels(x, y, who):
    """Float32 NHWC images in [0, 1] and int32 labels of matching length, or a clear error."""
    x = tf.convert_to_tensor(x)
    if not x.dtype.is_floating:
        raise ValueError(f"{who} expects float images in [0, 1], got dtype {x.dtype.name}; "
                         "convert with tf.cast(images, tf.float32) / 255.")
    x = tf.cast(x, tf.float32)
    if x.shape.rank != 4:
        raise ValueError(f"{who} expects a batch of images (batch, height, width, channels), "
                         f"got shape {x.shape}.")
    y = tf.convert_to_tensor(y)
    if y.dtype.is_floating or y.dtype == tf.bool:
        raise ValueError(f"{who} expects integer class labels, got dtype {y.dtype.name}; "
                         "pass sparse labels (argmax of one-hot labels).")
    y = tf.reshape(tf.cast(y, tf.int32), [-1])
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"{who} got {x.shape[0]} images but {y.shape[0]} labels.")
    if x.shape[0]:
        low, high = float(tf.reduce_min(x)), float(tf.reduce_max(x))
        if low < 0.0 or high > 1.0:
            raise ValueError(f"{who} expects images in [0, 1], got values in [{low:.4g}, "
                             f"{high:.4g}]; divide uint8 images by 255 and leave "
                             "normalisation to the model.")
    return x, y


def check_num_classes(num_classes, needed, who, why):
    if num_classes < needed:
        raise ValueError(f"{who} needs at least {needed} classes ({why}); the model has "
                         f"{num_classes}.")


def run_seed(seed, *salt):
    """A stateless-RNG seed (int32 pair) derived from an attack seed and run counters."""
    mixed = np.random.SeedSequence([int(seed) & 0x7FFFFFFF, *[int(s) for s in salt]])
    return tf.constant(mixed.generate_state(2) & 0x7FFFFFFF, dtype=tf.int32)
