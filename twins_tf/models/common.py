"""What every backbone shares: the input normalisation inside the model and PyTorch's head init.

Every twins_tf model takes [0, 1] NHWC images, so that attack budgets are in pixel units, and
normalises inside; every head starts as `nn.Linear` does, so that a fresh head on a converted
backbone is the head PyTorch fine-tuning code would have drawn.
"""

import math

import keras
from keras import ops

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@keras.saving.register_keras_serializable(package="twins_tf")
class ImageNetNormalization(keras.layers.Layer):
    """Clamp [0, 1] images to [0, 1], then `(x - mean) / std` (ImageNet's statistics by default).

    Keras's `Normalization` layer divides by `sqrt(variance)` and has no clamp, so this small
    layer does both with the exact constants PyTorch uses.  The clamp's gradient is 1 on the
    closed interval [0, 1], as `torch.clamp`'s, so attacks see the same gradients for saturated
    pixels.
    """

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD, **kwargs):
        super().__init__(**kwargs)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def call(self, inputs):
        x = ops.clip(inputs, 0.0, 1.0)
        mean = ops.convert_to_tensor(self.mean, dtype=x.dtype)
        std = ops.convert_to_tensor(self.std, dtype=x.dtype)
        return (x - mean) / std

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mean": self.mean, "std": self.std}


def head_initializer(fan_in):
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)), PyTorch's nn.Linear default, for kernel and bias."""
    bound = 1.0 / math.sqrt(fan_in)
    return keras.initializers.RandomUniform(-bound, bound)


def check_build_arguments(arch, architectures, num_classes, upsample, input_shape):
    """The checks every family's builder makes; returns `input_shape` as a tuple.

    Raises:
      ValueError: an arch the family does not build, num_classes or upsample not a positive
        integer, or an input shape that is not (height, width, 3).
    """
    if arch not in architectures:
        raise ValueError(f"unknown arch {arch!r}: expected one of {sorted(architectures)}.")
    if int(num_classes) != num_classes or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}.")
    if int(upsample) != upsample or upsample < 1:
        raise ValueError(f"upsample must be a positive integer factor, got {upsample!r}.")
    input_shape = tuple(input_shape)
    if len(input_shape) != 3 or input_shape[-1] != 3:
        raise ValueError(
            f"input_shape must be (height, width, 3) for RGB NHWC images, got {input_shape}."
        )
    return input_shape


def no_twin(arch):
    """The refusal of twin=True for an arch without BatchNormalization."""
    return ValueError(
        f"{arch} has no BatchNormalization, so it has no twin model: build it with twin=False."
    )
