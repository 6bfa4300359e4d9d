"""torchvision-layout ResNets (v1.5) for robust PyTorch checkpoints, with twin or plain BN.

The robust pre-trained models TWINS starts from (Salman et al. 2020) are torchvision ResNets:
v1.5 (a downsampling bottleneck strides on its 3x3 conv, not its first 1x1), symmetric zero
padding, BN epsilon 1e-5.  `keras.applications.ResNet50` is v1 and keras-hub's ResNet differs in
names and padding, and Keras's `padding="same"` pads asymmetrically at stride 2, so none of them
can take these weights exactly.  This module builds the network layer by layer: strided
convolutions (and the max pool) as an explicit `ZeroPadding2D` + `padding="valid"`, stride-1
ones with `padding="same"` (the same symmetric zeros there), which gives PyTorch's numbers.

Layer names follow torchvision's module paths with "." replaced by "_" (Keras layer names
cannot contain "."), so the weight mapping is mechanical:

    torchvision key                        Keras layer           Keras weight
    conv1.weight (O, I, kh, kw)            conv1                 kernel (kh, kw, I, O)
    bn1.weight / bias                      bn1                   gamma / beta
    bn1.running_mean / running_var         bn1                   moving_mean / moving_variance
    layer3.1.conv2.weight                  layer3_1_conv2        kernel
    layer2.0.downsample.0.weight           layer2_0_downsample_0 kernel
    layer2.0.downsample.1.running_var      layer2_0_downsample_1 moving_variance
    fc.weight (out, in) / fc.bias          fc                    kernel (in, out) / bias

With `twin=True` every BN is a `TwinBatchNormalization`; a loaded BN goes into both of its
wings (see `twins_tf.weights`).  Layers without weights carry derived names (`conv1_pad`,
`layer1_0_relu2`, `layer1_0_add`, ...) that match no torchvision key.

Inside the model, in order (spec §3): nearest-neighbour upsampling by `upsample` (`upsample`
layer, absent when 1), clamp to [0, 1] and ImageNet mean/std normalisation (`normalize`
layer), then the network.  The clamp's gradient is 1 on the closed interval [0, 1], as
`torch.clamp`'s, so attacks see the same gradients for saturated pixels.

Max-pooling: PyTorch pads a max-pool with -inf; we pad with zeros.  The two agree here only
because the pool follows a ReLU (every value is >= 0 and every window holds at least one real
value).  Do not reuse `_stem`'s pooling on inputs that can be negative.
"""

import keras

from twins_tf.layers import BatchNormalization, TwinBatchNormalization
from twins_tf.models.common import (
    ImageNetNormalization,
    check_build_arguments,
    head_initializer,
)

BN_MOMENTUM = 0.9  # Keras convention; PyTorch's 0.1
BN_EPSILON = 1e-5

# arch -> (block kind, blocks per stage, width factor of a bottleneck's inner convs)
ARCHITECTURES = {
    "resnet18": ("basic", (2, 2, 2, 2), 1),
    "resnet34": ("basic", (3, 4, 6, 3), 1),
    "resnet50": ("bottleneck", (3, 4, 6, 3), 1),
    "resnet101": ("bottleneck", (3, 4, 23, 3), 1),
    "resnet152": ("bottleneck", (3, 8, 36, 3), 1),
    "wide_resnet50_2": ("bottleneck", (3, 4, 6, 3), 2),
}
_EXPANSION = {"basic": 1, "bottleneck": 4}


def build_resnet(
    arch, num_classes, *, twin=True, input_shape=(224, 224, 3), upsample=1, synchronized=False
):
    """A torchvision-layout ResNet taking [0, 1] NHWC images and returning logits.

    Args:
      arch: one of `ARCHITECTURES` (resnet18/34/50/101/152, wide_resnet50_2).
      num_classes: width of the fresh `fc` head.
      twin: `TwinBatchNormalization` layers if True, plain BN otherwise
        (`twins_tf.layers.BatchNormalization`: Keras's layer with `nn.BatchNorm2d`'s training
        step); both momentum 0.9, epsilon 1e-5, both update the moving variance as PyTorch.
      input_shape: (height, width, 3) of the images fed to the model, before upsampling;
        spatial sizes may be None.
      upsample: integer nearest-neighbour upsampling factor applied inside the model
        (7 for 32x32 CIFAR images, spec §3).
      synchronized: BN batch statistics over all replicas of a `tf.distribute` strategy.
        For a plain model (`twin=False`) trained on several replicas this is what keeps the
        replicas' moving statistics equal: Keras BatchNormalization keeps one copy per
        replica, updated from that replica's batch, and saving reads replica 0's.  Twin
        layers average their moving statistics across replicas either way; for them it
        makes the Adaptive wing's batch statistics cross-replica (spec §2 splits per replica,
        so `train` leaves it off).  No effect without a strategy.

    Returns:
      A functional `keras.Model`. Convolutions start from torchvision's initialisation
      (He normal, fan_out); the head `fc` from U(+-1/sqrt(fan_in)) for kernel and bias, and it
      computes in float32 under a mixed-precision policy.

    Raises:
      ValueError: unknown arch, num_classes < 1, upsample < 1, or an input shape that is not
        (height, width, 3).

    Example:
      >>> model = build_resnet("resnet18", num_classes=10, upsample=7, input_shape=(32, 32, 3))
      >>> model(keras.ops.zeros((2, 32, 32, 3))).shape
      (2, 10)
    """
    input_shape = check_build_arguments(arch, ARCHITECTURES, num_classes, upsample, input_shape)
    kind, depths, width_factor = ARCHITECTURES[arch]
    norm = _norm_factory(twin, synchronized)

    images = keras.Input(shape=input_shape, name="images")
    x = images
    if upsample != 1:
        x = keras.layers.UpSampling2D(int(upsample), interpolation="nearest", name="upsample")(x)
    x = ImageNetNormalization(name="normalize")(x)
    x = _stem(x, norm)
    block = _basic_block if kind == "basic" else _bottleneck_block
    for stage, depth in enumerate(depths):
        planes = 64 * 2**stage
        for index in range(depth):
            stride = 2 if (stage > 0 and index == 0) else 1
            x = block(x, planes, stride, width_factor, norm, f"layer{stage + 1}_{index}")
    x = keras.layers.GlobalAveragePooling2D(name="avgpool")(x)
    fan_in = 512 * _EXPANSION[kind]
    logits = keras.layers.Dense(
        int(num_classes),
        kernel_initializer=head_initializer(fan_in),
        bias_initializer=head_initializer(fan_in),
        dtype="float32",
        name="fc",
    )(x)
    suffix = "_twin" if twin else ""
    return keras.Model(images, logits, name=f"{arch}{suffix}")


def _norm_factory(twin, synchronized):
    def norm(name):
        if twin:
            return TwinBatchNormalization(
                momentum=BN_MOMENTUM, epsilon=BN_EPSILON, synchronized=synchronized, name=name
            )
        return BatchNormalization(
            momentum=BN_MOMENTUM, epsilon=BN_EPSILON, synchronized=synchronized, name=name
        )

    return norm


def _conv(x, filters, kernel_size, stride, name):
    """PyTorch Conv2d(padding=kernel_size // 2, bias=False).

    With stride 1, Keras's "same" is that padding exactly (k // 2 zeros on every side of an odd
    kernel), and its input gradient is computed at the input's size.  A strided convolution
    gets an explicit ZeroPadding2D + "valid" instead, because Keras's "same" pads a stride-2
    convolution of an even input at the bottom/right only.  The explicit pad is not used for
    every convolution on purpose: oneDNN fuses it into the forward convolution, but the
    gradient w.r.t. the padded input then covers the border too (1.27x the pixels of a 16x16
    map, 4x of a 2x2 one) before the pad's gradient slices it away, and every attack step
    takes that gradient (docs/benchmarks.md, "one attack iteration by layer kind").
    """
    pad = kernel_size // 2
    if pad and stride != 1:
        x = keras.layers.ZeroPadding2D(pad, name=f"{name}_pad")(x)
    return keras.layers.Conv2D(
        filters,
        kernel_size,
        strides=stride,
        padding="same" if stride == 1 else "valid",
        use_bias=False,
        kernel_initializer=keras.initializers.VarianceScaling(
            2.0, mode="fan_out", distribution="untruncated_normal"
        ),
        name=name,
    )(x)


def _stem(x, norm):
    x = _conv(x, 64, 7, 2, "conv1")
    x = norm("bn1")(x)
    x = keras.layers.ReLU(name="relu")(x)
    # Zero padding equals PyTorch's -inf padding only because x >= 0 after the ReLU.
    x = keras.layers.ZeroPadding2D(1, name="maxpool_pad")(x)
    return keras.layers.MaxPooling2D(3, strides=2, padding="valid", name="maxpool")(x)


def _shortcut(x, out_channels, stride, norm, name):
    if stride == 1 and x.shape[-1] == out_channels:
        return x
    shortcut = _conv(x, out_channels, 1, stride, f"{name}_downsample_0")
    return norm(f"{name}_downsample_1")(shortcut)


def _basic_block(x, planes, stride, width_factor, norm, name):
    del width_factor  # torchvision has no wide basic block
    shortcut = _shortcut(x, planes, stride, norm, name)
    y = _conv(x, planes, 3, stride, f"{name}_conv1")
    y = keras.layers.ReLU(name=f"{name}_relu1")(norm(f"{name}_bn1")(y))
    y = norm(f"{name}_bn2")(_conv(y, planes, 3, 1, f"{name}_conv2"))
    y = keras.layers.Add(name=f"{name}_add")([y, shortcut])
    return keras.layers.ReLU(name=f"{name}_relu2")(y)


def _bottleneck_block(x, planes, stride, width_factor, norm, name):
    width = planes * width_factor
    out_channels = planes * _EXPANSION["bottleneck"]
    shortcut = _shortcut(x, out_channels, stride, norm, name)
    y = _conv(x, width, 1, 1, f"{name}_conv1")
    y = keras.layers.ReLU(name=f"{name}_relu1")(norm(f"{name}_bn1")(y))
    y = _conv(y, width, 3, stride, f"{name}_conv2")  # v1.5: the stride sits on the 3x3
    y = keras.layers.ReLU(name=f"{name}_relu2")(norm(f"{name}_bn2")(y))
    y = norm(f"{name}_bn3")(_conv(y, out_channels, 1, 1, f"{name}_conv3"))
    y = keras.layers.Add(name=f"{name}_add")([y, shortcut])
    return keras.layers.ReLU(name=f"{name}_relu3")(y)
