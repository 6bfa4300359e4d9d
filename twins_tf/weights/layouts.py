"""Which PyTorch layout each family's checkpoints are written in, and telling a state dict's arch.

A family's layout module (`resnet_keys`: torchvision's ResNets; `convnext_keys` and
`vit_keys`: timm's ConvNeXts and ViTs) lists which Keras variables each PyTorch key fills
(`torch_keys`), which keys are the head (`HEAD_PREFIX`) and which arch a state dict holds
(`arch_from_state_dict`).  Reading a checkpoint and loading it both ask this table.
"""

from twins_tf.models import registry
from twins_tf.weights import convnext_keys, resnet_keys, vit_keys

# family -> the module listing its PyTorch keys
LAYOUTS = {"resnet": resnet_keys, "convnext": convnext_keys, "vit": vit_keys}


def layout_of(arch):
    """The layout module of `arch`'s family; ValueError naming the archs if unknown."""
    return LAYOUTS[registry.family_of(arch)]


def arch_from_state_dict(state_dict):
    """The first arch, over every family, whose PyTorch keys `state_dict` has, or None."""
    for layout in LAYOUTS.values():
        arch = layout.arch_from_state_dict(state_dict)
        if arch:
            return arch
    return None
