"""twins_tf: TWINS robust fine-tuning, AT/TRADES baselines, PGD and AutoAttack in Keras 3.

Submodules are imported on first use, so `import twins_tf` stays light and binaries that do
not need PyTorch or tensorflow-datasets never import them.
"""

import importlib

# Before anything imports TensorFlow: oneDNN's CPU kernels on every x86 CPU (cpu_kernels),
# and TensorFlow's INFO logs off unless asked for (tensorflow_logs, which imports it).
from twins_tf.platform import cpu_kernels, tensorflow_logs

cpu_kernels.prefer_onednn()
tensorflow_logs.import_tensorflow()

# Registers every Keras serialisable (layers, models, trainer, attacks): `import twins_tf` is
# all keras.models.load_model needs, whichever attack a saved trainer holds.
from twins_tf import models, trainer  # noqa: F401,E402
from twins_tf.attacks import apgd, autoattack, fab, pgd, square  # noqa: F401,E402
from twins_tf.layers import TwinBatchNormalization  # noqa: E402
from twins_tf.twinify import twinify, untwin  # noqa: E402

__version__ = "0.1.0"

_LAZY_SUBMODULES = (
    "attacks",
    "data",
    "evaluation",
    "interpolation",
    "lora",
    "methods",
    "models",
    "trainer",
    "training",
    "weights",
)


def __getattr__(name):
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"twins_tf.{name}")
    if name == "AdversarialTrainer":
        return importlib.import_module("twins_tf.trainer").AdversarialTrainer
    if name == "load_run":  # the model of a train/pretrain run (twins_tf.training.runs)
        return importlib.import_module("twins_tf.training.runs").load_run
    if name == "interpolate_runs":  # WiSE-FT between two runs (twins_tf.interpolation)
        return importlib.import_module("twins_tf.interpolation").interpolate_runs
    raise AttributeError(f"module 'twins_tf' has no attribute {name!r}")


__all__ = [
    "TwinBatchNormalization",
    "twinify",
    "untwin",
    "AdversarialTrainer",
    "load_run",
    "interpolate_runs",
    *_LAZY_SUBMODULES,
]
