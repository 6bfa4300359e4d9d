"""Model builders: torchvision-layout ResNets (see resnet.py)."""
from twins_tf.models.resnet import ARCHITECTURES, build_resnet

__all__ = ["ARCHITECTURES", "build_resnet"]
