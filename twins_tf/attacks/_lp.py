"""Helpers the attacks share: norm names, argument checks, per-example norms, projections.

Every attack works on a batch of [0, 1] NHWC images and measures perturbations per example in
L-inf or L2; these few functions keep that arithmetic (and the messages for bad arguments)
identical across `pgd.py`, `apgd.py`, `fab.py`, `square.py` and `autoattack.py`.  The checks
of budgets, images and labels that the trainer and the binaries share live in
`twins_tf.input_checks`.
"""

import numpy as np
import tensorflow as tf

from twins_tf import input_checks
from twins_tf.input_checks import check_pixel_budget

NORMS = input_checks.NORMS
TINY = 1e-12  # guards divisions by a zero gradient or perturbation norm


def check_norm(norm, who):
    """Canonical norm name ("linf" or "l2"); accepts the reference spellings "Linf"/"L2"
    (`input_checks.check_norm`, the one home of the norms)."""
    return input_checks.check_norm(norm, f"{who} norm")


def check_epsilon(epsilon, who, norm="linf", *, name="epsilon", allow_zero=False):
    """`epsilon` as a float in [0, 1] pixel units, or a one-line error.

    An L-inf radius (or step) above 1 is more than the whole pixel range, which only happens
    when it was given in 0-255 units (`PGD(8, 2, 1)`: `input_checks.check_pixel_budget`); an L2
    radius may legitimately exceed 1 and is checked against the image's L2 diameter when the
    images are known (`input_checks.check_radius_fits`).
    """
    epsilon = float(epsilon)
    if not (epsilon >= 0 if allow_zero else epsilon > 0):
        raise ValueError(
            f"{who} {name} must be {'>=' if allow_zero else '>'} 0 (in [0, 1] "
            f"pixel units, e.g. 8/255), got {epsilon}."
        )
    return check_pixel_budget(epsilon, f"{who} {name}", norm=norm)


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


def check_num_classes(num_classes, needed, who, why):
    if num_classes < needed:
        raise ValueError(
            f"{who} needs at least {needed} classes ({why}); the model has {num_classes}."
        )


def run_seed(seed, *salt):
    """A stateless-RNG seed (int32 pair) derived from an attack seed and run counters."""
    mixed = np.random.SeedSequence([int(seed) & 0x7FFFFFFF, *[int(s) for s in salt]])
    return tf.constant(mixed.generate_state(2) & 0x7FFFFFFF, dtype=tf.int32)
