"""timm-layout ConvNeXts (Liu et al. 2022) and the ConvStem ConvNeXts of Singh et al. 2023.

The robust ConvNeXts twins_tf fine-tunes are timm models: `convnext_tiny|small|base|large`,
and the ConvStem variants of "Revisiting Adversarial Training for ImageNet" (Singh, Croce,
Hein, NeurIPS 2023; RobustBench `Singh2023Revisiting_ConvNeXt-{T,S,B,L}-ConvStem`), which are
timm ConvNeXts whose 4x4 patchify stem is replaced by a small stack of 3x3 convolutions.

Why not `keras.applications.ConvNeXtTiny` & co.: its numerics are right (LayerNorm eps 1e-6,
exact GELU, LayerScale, symmetric "same" padding of the stride-1 7x7 depthwise conv), but
  * its stem and its three downsampling layers are nested `Sequential` models, and AutoLoRa's
    `lora.add_lora` (a `clone_model` with a `call_function`) only sees the top-level layers of
    a functional model, so it could not place a branch inside them; nesting also hides layers
    from code that walks `model.layers`;
  * it builds its patchify stem internally, so the ConvStem variants cannot be expressed;
  * its layer names carry the model name (`convnext_tiny_stage_0_block_0_depthwise_conv`)
    and Keras's block numbering, not timm's module paths.
So this module builds the network layer by layer, flat, with timm's module paths as names.

Layer names are timm's module paths with "." replaced by "_", so the weight mapping is
mechanical (the only timm name with its own "_" is `conv_dw`; `twins_tf.weights.convnext_keys`
reads it back):

    timm key                                   Keras layer                    Keras weight
    stem.0.weight (O, I, 4, 4) / bias          stem_0 (Conv2D)                kernel / bias
    stem.1.weight / bias                       stem_1 (LayerNormalization)    gamma / beta
    stem.stem.3.weight (ConvStem)              stem_stem_3 (Conv2D)           kernel
    stages.1.downsample.0.weight / bias        stages_1_downsample_0 (LN)     gamma / beta
    stages.1.downsample.1.weight (O, I, 2, 2)  stages_1_downsample_1 (Conv)   kernel
    stages.0.blocks.2.conv_dw.weight (C,1,7,7) stages_0_blocks_2_conv_dw      kernel (7,7,C,1)
    stages.0.blocks.2.norm.weight / bias       stages_0_blocks_2_norm (LN)    gamma / beta
    stages.0.blocks.2.mlp.fc1.weight (out, in) stages_0_blocks_2_mlp_fc1      kernel (in, out)
    stages.0.blocks.2.gamma (C,)               stages_0_blocks_2_gamma        gamma (LayerScale)
    head.norm.weight / bias                    head_norm (LN)                 gamma / beta
    head.fc.weight (classes, C) / bias         head_fc (Dense)                kernel / bias

A block is timm's: depthwise 7x7 conv (stride 1, zero padding 3) -> LayerNorm over channels
-> Linear (4C) -> exact GELU -> Linear (C) -> per-channel LayerScale -> + input.  Every
LayerNorm has epsilon 1e-6.  The head is global average pooling -> LayerNorm -> Linear.

ConvStem (Singh et al., github nmndeep/revisiting-at, `ConvBlock1`/`ConvBlock3`): Conv2d 3x3
(PyTorch padding 1, with bias) -> channels-first LayerNorm (eps 1e-6) -> GELU, repeated; their
LayerNorm normalises over channels exactly as LayerNorm2d.  Tiny and small: 3->48 (stride 2),
48->96 (stride 2).  Base: 3->64 (s2), 64->96 (s2), 96->128 (s1).  Large: 3->96 (s2), 96->144
(s2), 144->192 (s1).  Keys `stem.stem.{0,1,3,4,6,7}`.  No BatchNormalization anywhere, so no
ConvNeXt can be a twin model.  Their ConvStem ConvNeXts were trained on raw [0, 1] pixels
(their run_train.sh passes `--model.add_normalization 0`, and RobustBench loads them with no
normaliser in front), so the ConvStem models normalise with mean 0 and std 1 (a clamp to
[0, 1] only).  The patchify ConvNeXts use ImageNet's mean/std, as timm's checkpoints do; a
patchify ConvNeXt trained by Singh et al.'s script on raw pixels is not one of these archs.

Stride-2 3x3 convolutions use an explicit ZeroPadding2D(1) + "valid": Keras's "same" pads a
stride-2 conv of an even input only at the bottom/right, PyTorch's padding=1 on both sides
(stride-1 ones use "same", which is PyTorch's padding there).

Sizes: the network downsamples by 32 (stem 4 or ConvStem 4, then three 2x2 stride-2 convs);
PyTorch and Keras both drop the rows a strided "valid" conv does not reach, which would leave
pixels with zero gradient, so the (upsampled) input must be a multiple of 32, at least 32.
"""

import keras

from twins_tf.models.common import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageNetNormalization,
    check_build_arguments,
    head_initializer,
    no_twin,
)

LN_EPSILON = 1e-6
LAYER_SCALE_INIT = 1e-6
STRIDE = 32

# arch -> (blocks per stage, channels per stage, stem): stem "patch" is timm's 4x4 stride-4
# conv + LayerNorm; otherwise the ConvStem's (out channels, stride) per conv.
_TINY_STEM = ((48, 2), (96, 2))
ARCHITECTURES = {
    "convnext_tiny": ((3, 3, 9, 3), (96, 192, 384, 768), "patch"),
    "convnext_small": ((3, 3, 27, 3), (96, 192, 384, 768), "patch"),
    "convnext_base": ((3, 3, 27, 3), (128, 256, 512, 1024), "patch"),
    "convnext_large": ((3, 3, 27, 3), (192, 384, 768, 1536), "patch"),
    "convnext_tiny_convstem": ((3, 3, 9, 3), (96, 192, 384, 768), _TINY_STEM),
    "convnext_small_convstem": ((3, 3, 27, 3), (96, 192, 384, 768), _TINY_STEM),
    "convnext_base_convstem": (
        (3, 3, 27, 3),
        (128, 256, 512, 1024),
        ((64, 2), (96, 2), (128, 1)),
    ),
    "convnext_large_convstem": (
        (3, 3, 27, 3),
        (192, 384, 768, 1536),
        ((96, 2), (144, 2), (192, 1)),
    ),
}
# The timm model (pretrained=False) each arch is, the ConvStem ones before their stem swap.
TIMM_NAMES = {arch: arch.removesuffix("_convstem") for arch in ARCHITECTURES}


def input_normalization(arch):
    """(mean, std) the model of `arch` normalises its [0, 1] input with."""
    if ARCHITECTURES[arch][2] == "patch":
        return IMAGENET_MEAN, IMAGENET_STD
    return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)


@keras.saving.register_keras_serializable(package="twins_tf")
class LayerScale(keras.layers.Layer):
    """x * gamma, one learned scale per channel (timm's ConvNeXt `gamma`, init 1e-6)."""

    def __init__(self, init_value=LAYER_SCALE_INIT, **kwargs):
        super().__init__(**kwargs)
        self.init_value = float(init_value)

    def build(self, input_shape):
        self.gamma = self.add_weight(
            shape=(int(input_shape[-1]),),
            initializer=keras.initializers.Constant(self.init_value),
            name="gamma",
        )

    def call(self, inputs):
        return inputs * keras.ops.cast(self.gamma, inputs.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "init_value": self.init_value}


def check_spatial_size(size, upsample):
    """ValueError unless `size * upsample` is a multiple of 32, at least 32 (None passes)."""
    if size is None:
        return
    total = int(size) * int(upsample)
    if total >= STRIDE and total % STRIDE == 0:
        return
    below = [s for s in range(1, size + 1) if (s * upsample) % STRIDE == 0][-1:]
    above = next(s for s in range(size + 1, size + STRIDE + 1) if (s * upsample) % STRIDE == 0)
    nearest = " or ".join(str(s) for s in [*below, above] if s * upsample >= STRIDE)
    raise ValueError(
        f"ConvNeXt needs an input of a multiple of {STRIDE} pixels (at least {STRIDE}) after "
        f"upsampling, got {size} x upsample {upsample} = {total}: use {nearest} pixels."
    )


def input_size_problem(arch, size):
    """None if `arch` takes `size` x `size` images (after upsampling), else why not, in a line."""
    del arch  # every ConvNeXt downsamples by 32
    try:
        check_spatial_size(size, 1)
    except ValueError as error:
        return str(error)
    return None


def build_convnext(
    arch, num_classes, *, twin=False, input_shape=(224, 224, 3), upsample=1, synchronized=False
):
    """A timm-layout ConvNeXt taking [0, 1] NHWC images and returning logits.

    Args:
      arch: one of `ARCHITECTURES`.
      num_classes: width of the fresh `head_fc`.
      twin: must be False: ConvNeXt has no BatchNormalization for TWINS to split.
      input_shape: (height, width, 3) before upsampling; spatial sizes may be None, otherwise
        size * upsample must be a multiple of 32 (and at least 32).
      upsample: integer nearest-neighbour upsampling factor applied inside the model.
      synchronized: ignored (no BN statistics to synchronise); accepted so every family
        builds through `registry.build_model`.

    Returns:
      A functional `keras.Model` named `arch`.  Convolutions and Linear layers start from
      timm's initialisation (truncated normal, std 0.02, zero bias), LayerScale from 1e-6;
      the head from U(+-1/sqrt(fan_in)), computing in float32 (as does its LayerNorm) under
      a mixed-precision policy.

    Raises:
      ValueError: unknown arch, twin=True, num_classes < 1, upsample < 1, or a bad input shape.
    """
    input_shape = check_build_arguments(arch, ARCHITECTURES, num_classes, upsample, input_shape)
    if twin:
        raise no_twin(arch)
    for size in input_shape[:2]:
        check_spatial_size(size, int(upsample))
    depths, dims, stem = ARCHITECTURES[arch]
    mean, std = input_normalization(arch)

    images = keras.Input(shape=input_shape, name="images")
    x = images
    if upsample != 1:
        x = keras.layers.UpSampling2D(int(upsample), interpolation="nearest", name="upsample")(x)
    x = ImageNetNormalization(mean=mean, std=std, name="normalize")(x)
    x = _patch_stem(x, dims[0]) if stem == "patch" else _conv_stem(x, stem)
    for stage, (depth, channels) in enumerate(zip(depths, dims)):
        if stage > 0:
            x = _layer_norm(f"stages_{stage}_downsample_0")(x)
            x = _conv(x, channels, 2, 2, 0, f"stages_{stage}_downsample_1")
        for index in range(depth):
            x = _block(x, channels, f"stages_{stage}_blocks_{index}")
    x = keras.layers.GlobalAveragePooling2D(name="head_global_pool")(x)
    x = _layer_norm("head_norm", dtype="float32")(x)
    logits = keras.layers.Dense(
        int(num_classes),
        kernel_initializer=head_initializer(dims[-1]),
        bias_initializer=head_initializer(dims[-1]),
        dtype="float32",
        name="head_fc",
    )(x)
    return keras.Model(images, logits, name=arch)


def _layer_norm(name, dtype=None):
    return keras.layers.LayerNormalization(epsilon=LN_EPSILON, name=name, dtype=dtype)


def _trunc_normal():
    return keras.initializers.TruncatedNormal(stddev=0.02)


def _conv(x, filters, kernel_size, stride, padding, name):
    """PyTorch Conv2d(padding=padding, bias=True); stride 1 with k // 2 as Keras's "same" (the
    same zeros, and an input gradient at the input's size: models/resnet.py's `_conv`),
    strided ones as an explicit zero pad + "valid"."""
    same = stride == 1 and padding == kernel_size // 2 and kernel_size % 2 == 1
    if padding and not same:
        x = keras.layers.ZeroPadding2D(padding, name=f"{name}_pad")(x)
    return keras.layers.Conv2D(
        filters,
        kernel_size,
        strides=stride,
        padding="same" if same else "valid",
        kernel_initializer=_trunc_normal(),
        name=name,
    )(x)


def _gelu(name):
    """Exact (erf) GELU, as PyTorch's nn.GELU(): Keras's "gelu" defaults to approximate=False."""
    return keras.layers.Activation("gelu", name=name)


def _patch_stem(x, channels):
    x = _conv(x, channels, 4, 4, 0, "stem_0")
    return _layer_norm("stem_1")(x)


def _conv_stem(x, convs):
    """Singh et al.'s ConvStem: (Conv 3x3 -> LayerNorm -> GELU) per entry of `convs`."""
    for index, (channels, stride) in enumerate(convs):
        x = _conv(x, channels, 3, stride, 1, f"stem_stem_{3 * index}")
        x = _layer_norm(f"stem_stem_{3 * index + 1}")(x)
        x = _gelu(f"stem_stem_{3 * index + 2}")(x)
    return x


def _block(x, channels, name):
    y = keras.layers.DepthwiseConv2D(
        7, padding="same", depthwise_initializer=_trunc_normal(), name=f"{name}_conv_dw"
    )(x)
    y = _layer_norm(f"{name}_norm")(y)
    y = keras.layers.Dense(
        4 * channels, kernel_initializer=_trunc_normal(), name=f"{name}_mlp_fc1"
    )(y)
    y = _gelu(f"{name}_mlp_act")(y)
    y = keras.layers.Dense(channels, kernel_initializer=_trunc_normal(), name=f"{name}_mlp_fc2")(y)
    y = LayerScale(name=f"{name}_gamma")(y)
    return keras.layers.Add(name=f"{name}_add")([y, x])
