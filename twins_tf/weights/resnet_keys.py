"""The torchvision keys of a `build_resnet` model: which Keras variables each one fills.

The Keras layers of `build_resnet` are named after torchvision's modules with `_` for `.`
(`layer1_0_bn1` is `layer1.0.bn1`), so each torchvision key names its layer and variable:
conv kernels go from OIHW to HWIO, the `fc` weight from (out, in) to (in, out), and every BN
key goes into the BN's variable, in both wings of a twin layer (`twins_tf.bn_wings`).
"""

import keras
import numpy as np

from twins_tf import bn_wings
from twins_tf.weights.architectures import infer_arch_from_state_dict, weighted_layers

HEAD_PREFIX = "fc."
TORCH_BN = ("weight", "bias", "running_mean", "running_var")


def arch_from_state_dict(state_dict):
    """The ResNet whose torchvision keys `state_dict` has, or None."""
    return infer_arch_from_state_dict(state_dict)


def torch_keys(model):
    """{torchvision key: (the Keras variables it goes into, transform or None)} of `model`."""
    keys = {}
    for layer in weighted_layers(model).values():
        keys.update(_layer_keys(layer))
    return keys


def _layer_keys(layer):
    prefix = layer.name.replace("_", ".")
    if isinstance(layer, keras.layers.Conv2D):
        return {f"{prefix}.weight": ([layer.kernel], lambda w: np.transpose(w, (2, 3, 1, 0)))}
    if isinstance(layer, keras.layers.Dense):
        return {
            f"{prefix}.weight": ([layer.kernel], np.transpose),
            f"{prefix}.bias": ([layer.bias], None),
        }
    return {  # BatchNormalization (one variable each) and TwinBatchNormalization (both wings)
        f"{prefix}.{torch_name}": (bn_wings.wing_variables(layer, attribute), None)
        for torch_name, attribute in zip(TORCH_BN, bn_wings.PLAIN)
    }
