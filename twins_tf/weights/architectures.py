"""Which twins_tf ResNet a state dict or a Keras model holds, and its weighted layers.

Every loader checks the architecture first, so that a file of another ResNet is refused with
its name ("the checkpoint holds a resnet50") instead of a list of shape mismatches.
"""

import keras

from twins_tf import bn_wings
from twins_tf.layers import TwinBatchNormalization
from twins_tf.models.resnet import ARCHITECTURES
from twins_tf.weights.errors import CheckpointError


def infer_arch_from_state_dict(state_dict):
    """The `ARCHITECTURES` name whose torchvision keys `state_dict` has, or None."""
    depths = []
    for stage in range(1, 5):
        blocks = {int(k.split(".")[1]) for k in state_dict if k.startswith(f"layer{stage}.")}
        depths.append(max(blocks) + 1 if blocks else 0)
    kind = "bottleneck" if any(".conv3." in k for k in state_dict) else "basic"
    first = state_dict.get("layer1.0.conv1.weight")
    factor = 1
    if kind == "bottleneck" and first is not None:
        factor = int(first.shape[0]) // 64
    for name, spec in ARCHITECTURES.items():
        if spec == (kind, tuple(depths), factor):
            return name
    return None


def infer_arch(model):
    """The `ARCHITECTURES` name of a `build_resnet` model, from its layer names (ResNets only:
    the other families are told by `twins_tf.models.arch_of`).

    Raises:
      CheckpointError: the model is not a torchvision-layout ResNet from `build_resnet`.
    """
    layers = {layer.name: layer for layer in bn_wings.nested_layers(model)}
    depths = tuple(
        sum(1 for i in range(200) if f"layer{stage}_{i}_conv1" in layers) for stage in range(1, 5)
    )
    kind = "bottleneck" if "layer1_0_conv3" in layers else "basic"
    factor = layers["layer1_0_conv1"].filters // 64 if "layer1_0_conv1" in layers else 0
    factor = factor if kind == "bottleneck" else 1
    for name, spec in ARCHITECTURES.items():
        if spec == (kind, depths, factor) and "conv1" in layers and "fc" in layers:
            return name
    raise CheckpointError(
        f"model {model.name!r} is not a twins_tf.models.build_resnet ResNet (blocks per stage "
        f"{depths}); build it with build_resnet(arch, ...) to load pre-trained weights."
    )


def conv_layer_count(arch):
    """Number of Conv2D layers of `arch` (stem, blocks, downsample shortcuts)."""
    kind, depths, _ = ARCHITECTURES[arch]
    return 1 + (2 if kind == "basic" else 3) * sum(depths) + (3 if kind == "basic" else 4)


def weighted_layers(model):
    """{layer name: layer} for the layers that carry torchvision weights."""
    kinds = (
        keras.layers.Conv2D,
        keras.layers.BatchNormalization,
        TwinBatchNormalization,
        keras.layers.Dense,
    )
    return {
        layer.name: layer for layer in bn_wings.nested_layers(model) if isinstance(layer, kinds)
    }
