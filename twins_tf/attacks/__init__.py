"""Adversarial attacks in [0, 1] pixel space: PGD for training, AutoAttack for evaluation.

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
