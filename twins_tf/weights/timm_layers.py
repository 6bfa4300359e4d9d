"""The timm keys of the layers ConvNeXt and ViT share, and how each value changes layout.

timm's convolutions and Linear layers carry a bias and its LayerNorms a weight and bias, so a
Keras layer named after a timm module path takes `<path>.weight` and `<path>.bias`: conv
kernels from OIHW to HWIO, depthwise kernels from (C, 1, kh, kw) to (kh, kw, C, 1), Linear
weights from (out, in) to (in, out), LayerNorm weight/bias to gamma/beta.  Each family's
layout module (`convnext_keys`, `vit_keys`) maps its layer names to paths and adds its own
layers (LayerScale, the class token and position embeddings).
"""

import keras
import numpy as np


def conv_kernel(weight):
    return np.transpose(weight, (2, 3, 1, 0))  # (O, I, kh, kw) -> (kh, kw, I, O)


def depthwise_kernel(weight):
    return np.transpose(weight, (2, 3, 0, 1))  # (C, 1, kh, kw) -> (kh, kw, C, 1)


def layer_keys(layer, path):
    """{timm key: ([variable], transform or None)} of a conv, Linear or LayerNorm at `path`;
    None for a layer of another kind."""
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        weight = ([layer.kernel], depthwise_kernel)
    elif isinstance(layer, keras.layers.Conv2D):
        weight = ([layer.kernel], conv_kernel)
    elif isinstance(layer, keras.layers.Dense):
        weight = ([layer.kernel], np.transpose)
    elif isinstance(layer, keras.layers.LayerNormalization):
        return {f"{path}.weight": ([layer.gamma], None), f"{path}.bias": ([layer.beta], None)}
    else:
        return None
    return {f"{path}.weight": weight, f"{path}.bias": ([layer.bias], None)}
