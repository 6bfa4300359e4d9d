"""Model builders: one table of architectures (registry.py) over the families that build them
(resnet.py: torchvision-layout ResNets; convnext.py and vit.py: timm-layout ConvNeXts and
ViTs), and the BN-folded inference view (folding.py)."""

from twins_tf.models.convnext import build_convnext
from twins_tf.models.folding import FoldedConvBatchNormalization, fold_batch_norm
from twins_tf.models.registry import ARCHITECTURES, arch_of, build_model, has_batch_norm
from twins_tf.models.resnet import build_resnet
from twins_tf.models.vit import build_vit

__all__ = [
    "ARCHITECTURES",
    "FoldedConvBatchNormalization",
    "arch_of",
    "build_convnext",
    "build_model",
    "build_resnet",
    "build_vit",
    "fold_batch_norm",
    "has_batch_norm",
]
