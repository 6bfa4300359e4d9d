"""The timm keys of a `build_convnext` model: which Keras variables each one fills.

The Keras layers of `build_convnext` are named after timm's modules with `_` for `.`
(`stages_0_blocks_1_mlp_fc1` is `stages.0.blocks.1.mlp.fc1`; timm's `conv_dw` keeps its `_`),
so each timm key names its layer and variable: conv kernels go from OIHW to HWIO, depthwise
kernels from (C, 1, kh, kw) to (kh, kw, C, 1), Linear weights from (out, in) to (in, out),
LayerNorm weight/bias to gamma/beta, and a block's LayerScale `gamma` is the key itself.
"""

import numpy as np

from twins_tf import bn_wings
from twins_tf.models.convnext import ARCHITECTURES, LayerScale
from twins_tf.weights import timm_layers

# Only the Linear is the head a fine-tuning run replaces: timm's `head.norm` normalises the
# pooled features the pre-trained backbone produces, so it is loaded with the backbone.
HEAD_PREFIX = "head.fc."
_CONV_DW = "conv.dw"


def arch_from_state_dict(state_dict):
    """The ConvNeXt whose timm keys `state_dict` has, or None.

    Told by blocks per stage, the first stage's width and the stem (`stem.0` patchify or
    `stem.stem.*` ConvStem, the ConvStem by its convolutions' widths and strides' count).
    """
    if "stages.0.blocks.0.conv_dw.weight" not in state_dict:
        return None
    depths = []
    for stage in range(4):
        prefix = f"stages.{stage}.blocks."
        blocks = {int(k[len(prefix) :].split(".")[0]) for k in state_dict if k.startswith(prefix)}
        depths.append(max(blocks) + 1 if blocks else 0)
    width = int(np.shape(state_dict["stages.0.blocks.0.conv_dw.weight"])[0])
    stem_widths = tuple(
        int(np.shape(state_dict[f"stem.stem.{3 * i}.weight"])[0])
        for i in range(4)
        if f"stem.stem.{3 * i}.weight" in state_dict
    )
    for arch, (arch_depths, dims, stem) in ARCHITECTURES.items():
        if arch_depths != tuple(depths) or dims[0] != width:
            continue
        if stem == "patch" and not stem_widths and "stem.0.weight" in state_dict:
            return arch
        if stem != "patch" and stem_widths == tuple(c for c, _ in stem):
            return arch
    return None


def torch_keys(model):
    """{timm key: (the Keras variables it goes into, transform or None)} of `model`."""
    keys = {}
    for layer in bn_wings.nested_layers(model):
        keys.update(_layer_keys(layer))
    return keys


def _torch_prefix(layer_name):
    return layer_name.replace("_", ".").replace(_CONV_DW, "conv_dw")


def _layer_keys(layer):
    prefix = _torch_prefix(layer.name)
    shared = timm_layers.layer_keys(layer, prefix)
    if shared is not None:
        return shared
    if isinstance(layer, LayerScale):
        return {prefix: ([layer.gamma], None)}
    return {}
