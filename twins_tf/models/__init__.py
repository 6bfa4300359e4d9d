"""Model builders: torchvision-layout ResNets (resnet.py) and their BN-folded inference view
(folding.py)."""

from twins_tf.models.folding import FoldedConvBatchNormalization, fold_batch_norm
from twins_tf.models.resnet import ARCHITECTURES, build_resnet

__all__ = ["ARCHITECTURES", "FoldedConvBatchNormalization", "build_resnet", "fold_batch_norm"]
