"""Adversarial attacks in [0, 1] pixel space: PGD for training, AutoAttack for evaluation.

One protocol for every attack (`base.py` says why it is this one):

    attack = PGD(8 / 255, 2 / 255, 10)     # or APGD(eps, ...), FAB, Square, AutoAttack(eps)
    x_adv = attack(model, x, y, seed=None)

  * built from hyperparameters only (epsilon first, in [0, 1] pixel units), never from the
    model, so one attack serves any model and is a Keras serialisable ("twins_tf>PGD", ...:
    `get_config` / `from_config`, `keras.saving.serialize_keras_object`);
  * called on a batch of [0, 1] NHWC images and class ids (or one-hot rows of the model's
    width); returns float32 x_adv within epsilon of x and in [0, 1];
  * bad input is a one-line ValueError (budgets in 0-255 units, images outside [0, 1], a
    single image, soft or wrong-width labels, class ids outside the model's classes);
  * the official AutoAttack's `APGDAttack(model, eps=e).perturb(x, y)` is `APGD(e)(model, x, y)`;
    `AutoAttack(e).run(model, data)` evaluates a whole test set (resumable, per sub-attack).

One attack per module, as in the auto-attack reference; names are imported on first use.
"""

import importlib

_EXPORTS = {
    "PGD": "twins_tf.attacks.pgd",
    "APGD": "twins_tf.attacks.apgd",
    "FAB": "twins_tf.attacks.fab",
    "Square": "twins_tf.attacks.square",
    "AutoAttack": "twins_tf.attacks.autoattack",
}


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'twins_tf.attacks' has no attribute {name!r}")


__all__ = list(_EXPORTS)
