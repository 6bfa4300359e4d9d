"""timm-layout Vision Transformers (ViT-S/16, ViT-B/16) and their ConvStem variants.

Robust ImageNet ViTs are published as timm state dicts: Singh et al. 2023 ("Revisiting
Adversarial Training for ImageNet", NeurIPS 2023; RobustBench's Singh2023Revisiting_*) train
timm's `vit_small_patch16_224` / `vit_base_patch16_224`, in the ConvStem variants with the
16x16 patch projection `patch_embed.proj` replaced by a stack of convolutions.  keras-hub's
ViT has other names and a different head, so this module builds the network layer by layer
with timm's structure: pre-norm blocks, LayerNorm epsilon 1e-6, one `qkv` Dense with bias
(timm's `attn.qkv`), exact GELU, a final `norm`, the head on the class token.

Layer names follow timm's module paths with "." replaced by "_" (Keras layer names cannot
contain "."); `twins_tf.weights.vit_keys` maps them back:

    timm key                            Keras layer                 Keras weight
    cls_token (1, 1, C)                 embed                       cls_token
    pos_embed (1, 1 + N, C)             embed                       pos_embed (resampled
                                                                    for another grid)
    patch_embed.proj.weight (C,3,16,16) patch_embed_proj            kernel (16, 16, 3, C)
    patch_embed.proj.stem.3.weight      patch_embed_proj_stem_3     kernel (ConvStem)
    blocks.0.norm1.weight / bias        blocks_0_norm1              gamma / beta
    blocks.0.attn.qkv.weight (3C, C)    blocks_0_attn_qkv           kernel (C, 3C)
    blocks.0.mlp.fc2.bias               blocks_0_mlp_fc2            bias
    norm.weight, head.weight            norm, head

ConvStem (Singh et al.'s `ConvBlock`, read from github.com/nmndeep/revisiting-at and
RobustBench's `convstem_models.py`): four 3x3 convolutions with stride 2 and padding 1
(3 -> 48 -> 96 -> 192 -> 384 channels, each with bias), each followed by a LayerNorm over
channels (epsilon 1e-6) and exact GELU, then a 1x1 convolution to the embedding width;
`nn.Sequential` indices 0, 3, 6, 9, 12 are the convolutions and 1, 4, 7, 10 the LayerNorms.
It has no BatchNormalization, so no ViT here can be twinned.

Inside the model, in order: nearest-neighbour upsampling by `upsample` (`upsample` layer,
absent when 1), clamp to [0, 1] and mean/std normalisation (`normalize`), then the network.
The mean/std are ImageNet's for every arch but `vit_b16_convstem`: RobustBench builds
Singh2023Revisiting_ViT-B-ConvStem without an input normaliser (it is on RobustBench's list
of models loaded without one, unlike the ViT-S ConvStem), so that network takes [0, 1] pixels
as they are; its `normalize` layer only clamps (mean 0, std 1).

Attention runs in float32 under a mixed-precision policy (the softmax over the tokens is where
low precision hurts); `qkv` and `proj` are plain Dense layers, so AutoLoRa (`twins_tf.lora`),
which adapts every Dense but the head, reaches the attention projections.
"""

import math

import keras
from keras import ops

from twins_tf.models.common import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageNetNormalization,
    check_build_arguments,
    head_initializer,
    no_twin,
)

LN_EPSILON = 1e-6
PATCH = 16  # patch size, and the ConvStem's total stride
MLP_RATIO = 4
CONVSTEM_WIDTHS = (48, 96, 192, 384)  # channels of the ConvStem's four stride-2 convolutions

# arch -> (embedding width, blocks, heads, ConvStem instead of the patch projection,
#          input mean, input std)
ARCHITECTURES = {
    "vit_s16": (384, 12, 6, False, IMAGENET_MEAN, IMAGENET_STD),
    "vit_b16": (768, 12, 12, False, IMAGENET_MEAN, IMAGENET_STD),
    "vit_s16_convstem": (384, 12, 6, True, IMAGENET_MEAN, IMAGENET_STD),
    "vit_b16_convstem": (768, 12, 12, True, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}


@keras.saving.register_keras_serializable(package="twins_tf")
class ClassTokenPositionEmbedding(keras.layers.Layer):
    """Prepends the learned class token to the patch tokens and adds the position embeddings.

    Keras has no layer holding a free (1, 1, C) token and a (1, 1 + N, C) table; timm keeps
    them as the model's `cls_token` and `pos_embed` parameters.  The table is for the grid of
    this model's input size: a checkpoint from another size is resampled on loading
    (`twins_tf.weights.vit_keys`), as timm does.

    Args:
      grid: (rows, columns) of the patch grid; the tokens come row by row, as timm flattens.

    Input (batch, rows * columns, C) patch tokens; output (batch, 1 + rows * columns, C).
    """

    def __init__(self, grid, **kwargs):
        super().__init__(**kwargs)
        self.grid = tuple(int(g) for g in grid)
        if len(self.grid) != 2 or min(self.grid) < 1:
            raise ValueError(f"grid must be (rows, columns) >= 1, got {grid!r}.")

    def build(self, input_shape):
        tokens, width = input_shape[1], input_shape[2]
        if tokens != self.grid[0] * self.grid[1] or width is None:
            raise ValueError(
                f"{self.name}: expected (batch, {self.grid[0] * self.grid[1]}, width) tokens "
                f"for a {self.grid[0]}x{self.grid[1]} grid, got {tuple(input_shape)}."
            )
        # timm: cls_token ~ N(0, 1e-6), pos_embed ~ trunc_normal(0.02) (at +-2: a normal)
        self.cls_token = self.add_weight(
            shape=(1, 1, width),
            initializer=keras.initializers.RandomNormal(stddev=1e-6),
            name="cls_token",
        )
        self.pos_embed = self.add_weight(
            shape=(1, 1 + tokens, width),
            initializer=keras.initializers.RandomNormal(stddev=0.02),
            name="pos_embed",
        )

    def call(self, tokens):
        batch = ops.shape(tokens)[0]
        cls = ops.cast(self.cls_token, tokens.dtype)
        cls = ops.broadcast_to(cls, (batch, 1, ops.shape(tokens)[2]))
        return ops.concatenate([cls, tokens], axis=1) + ops.cast(self.pos_embed, tokens.dtype)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], 1 + self.grid[0] * self.grid[1], input_shape[2])

    def get_config(self):
        return {**super().get_config(), "grid": list(self.grid)}


@keras.saving.register_keras_serializable(package="twins_tf")
class SelfAttention(keras.layers.Layer):
    """Multi-head scaled dot-product attention from a fused (batch, N, 3C) qkv projection.

    The projections stay outside as Dense layers (timm's `attn.qkv` / `attn.proj`), so that
    they load by name and AutoLoRa can adapt them; this layer has no weights.  The last axis
    of qkv is ordered (q/k/v, head, head channel), as timm's reshape reads it, and the
    output is (batch, N, C) with the heads concatenated in order.
    """

    def __init__(self, num_heads, **kwargs):
        super().__init__(**kwargs)
        if int(num_heads) != num_heads or num_heads < 1:
            raise ValueError(f"num_heads must be a positive integer, got {num_heads!r}.")
        self.num_heads = int(num_heads)

    def call(self, qkv):
        batch, tokens = ops.shape(qkv)[0], ops.shape(qkv)[1]
        width = qkv.shape[-1] // 3
        head_dim = width // self.num_heads
        qkv = ops.reshape(qkv, (batch, tokens, 3, self.num_heads, head_dim))
        qkv = ops.transpose(qkv, (2, 0, 3, 1, 4))  # (3, batch, heads, N, head_dim)
        q, k, v = ops.unstack(qkv, 3, axis=0)  # one gradient (a stack), not three padded slices
        scores = ops.matmul(q, ops.transpose(k, (0, 1, 3, 2))) * (head_dim**-0.5)
        weights = ops.softmax(scores, axis=-1)
        out = ops.transpose(ops.matmul(weights, v), (0, 2, 1, 3))  # (batch, N, heads, hd)
        return ops.reshape(out, (batch, tokens, width))

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], input_shape[-1] // 3)

    def get_config(self):
        return {**super().get_config(), "num_heads": self.num_heads}


@keras.saving.register_keras_serializable(package="twins_tf")
class ClassTokenPool(keras.layers.Layer):
    """The class token, (batch, 1 + N, C) -> (batch, C): what timm's head reads."""

    def call(self, tokens):
        return tokens[:, 0]

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[2])


def build_vit(
    arch,
    num_classes,
    *,
    twin=False,
    input_shape=(224, 224, 3),
    upsample=1,
    synchronized=False,
    _depth=None,
):
    """A timm-layout ViT taking [0, 1] NHWC images and returning logits.

    Args:
      arch: one of `ARCHITECTURES` (vit_s16, vit_b16, vit_s16_convstem, vit_b16_convstem).
      num_classes: width of the fresh `head`.
      twin: must be False: no ViT here has BatchNormalization, so there is nothing to twin.
      input_shape: (height, width, 3) of the images fed to the model, before upsampling;
        height and width must be known (the position embeddings are per grid cell), and
        times `upsample` multiples of 16 (the patch size, or the ConvStem's total stride).
      upsample: integer nearest-neighbour upsampling factor applied inside the model.
      synchronized: no effect (there is no BatchNormalization); accepted so that every
        family builds from the same arguments.
      _depth: number of blocks instead of the arch's 12, for small test networks; the
        model keeps the arch's name and timm's key layout.

    Returns:
      A functional `keras.Model` named `arch`.  Dense kernels start from timm's
      N(0, 0.02), convolutions from PyTorch's default U(+-1/sqrt(fan_in)); the head from
      U(+-1/sqrt(fan_in)) (nn.Linear's) and it computes in float32 under a mixed policy.

    Raises:
      ValueError: unknown arch, twin=True, num_classes < 1, upsample < 1, an input shape
        that is not (height, width, 3), or a size that is not a multiple of 16.

    Example:
      >>> model = build_vit("vit_s16", num_classes=10, input_shape=(32, 32, 3))
      >>> model(keras.ops.zeros((2, 32, 32, 3))).shape
      (2, 10)
    """
    del synchronized  # no BatchNormalization to synchronise
    input_shape = check_build_arguments(arch, ARCHITECTURES, num_classes, upsample, input_shape)
    if twin:
        raise no_twin(arch)
    width, depth, heads, convstem, mean, std = ARCHITECTURES[arch]
    depth = depth if _depth is None else int(_depth)
    for axis, size in zip(("height", "width"), input_shape[:2]):
        _check_size(arch, axis, size, int(upsample))

    images = keras.Input(shape=input_shape, name="images")
    x = images
    if upsample != 1:
        x = keras.layers.UpSampling2D(int(upsample), interpolation="nearest", name="upsample")(x)
    x = ImageNetNormalization(mean=mean, std=std, name="normalize")(x)
    x = _conv_stem(x, width) if convstem else _conv(x, width, PATCH, PATCH, "patch_embed_proj")
    grid = (x.shape[1], x.shape[2])
    x = keras.layers.Reshape((grid[0] * grid[1], width), name="patch_embed_flatten")(x)
    x = ClassTokenPositionEmbedding(grid, name="embed")(x)
    for index in range(depth):
        x = _block(x, width, heads, f"blocks_{index}")
    x = _layer_norm("norm")(x)
    x = ClassTokenPool(name="pool")(x)
    logits = keras.layers.Dense(
        int(num_classes),
        kernel_initializer=head_initializer(width),
        bias_initializer=head_initializer(width),
        dtype="float32",
        name="head",
    )(x)
    return keras.Model(images, logits, name=arch)


def input_size_problem(arch, size):
    """None if `arch` takes `size` x `size` images (after upsampling), else a one-line reason
    naming the nearest sizes it takes: multiples of 16, the patch size (or the ConvStem's
    total stride)."""
    if size % PATCH == 0 and size > 0:
        return None
    lower = size // PATCH * PATCH
    choices = " or ".join(str(s) for s in (lower, lower + PATCH) if s > 0)
    return (
        f"{arch} takes image sizes that are multiples of {_tiling(arch)} {PATCH}; got "
        f"{size}: use {choices}."
    )


def _tiling(arch):
    return "its ConvStem's total stride" if ARCHITECTURES[arch][3] else "its patch size"


def _check_size(arch, axis, size, upsample):
    if size is None:
        raise ValueError(
            f"{arch} needs a known image {axis} (its position embeddings are per patch), got "
            "None; pass input_shape=(height, width, 3)."
        )
    if (size * upsample) % PATCH == 0:
        return
    step = PATCH // math.gcd(upsample, PATCH)  # input sizes whose upsampled size fits
    lower = size // step * step
    choices = " or ".join(str(s) for s in (lower, lower + step) if s > 0)
    raise ValueError(
        f"{arch} needs an image {axis} that, times upsample={upsample}, is a multiple of "
        f"{_tiling(arch)} {PATCH}; got {size}: use {choices}."
    )


def _layer_norm(name):
    return keras.layers.LayerNormalization(epsilon=LN_EPSILON, name=name)


def _dense(units, name):
    """nn.Linear with timm's ViT init: weight N(0, 0.02) (trunc_normal_ at +-2 is a normal at
    this scale), bias zero."""
    return keras.layers.Dense(
        units, kernel_initializer=keras.initializers.RandomNormal(stddev=0.02), name=name
    )


def _conv(x, filters, kernel_size, stride, name, pad=0):
    """PyTorch Conv2d with bias: explicit zero pad + valid conv, PyTorch's default init."""
    if pad:
        x = keras.layers.ZeroPadding2D(pad, name=f"{name}_pad")(x)
    fan_in = kernel_size * kernel_size * x.shape[-1]
    return keras.layers.Conv2D(
        filters,
        kernel_size,
        strides=stride,
        padding="valid",
        kernel_initializer=head_initializer(fan_in),
        bias_initializer=head_initializer(fan_in),
        name=name,
    )(x)


def _conv_stem(x, width):
    """Singh et al.'s ConvStem under timm's `patch_embed.proj`, Sequential indices kept."""
    prefix = "patch_embed_proj_stem"
    for stage, channels in enumerate(CONVSTEM_WIDTHS):
        index = 3 * stage  # conv, LayerNorm, GELU per stage
        x = _conv(x, channels, 3, 2, f"{prefix}_{index}", pad=1)
        x = _layer_norm(f"{prefix}_{index + 1}")(x)
        x = keras.layers.Activation("gelu", name=f"{prefix}_{index + 2}")(x)
    return _conv(x, width, 1, 1, f"{prefix}_{3 * len(CONVSTEM_WIDTHS)}")


def _block(x, width, heads, name):
    """timm's pre-norm Block: x + proj(attn(norm1(x))), then x + fc2(gelu(fc1(norm2(x))))."""
    y = _layer_norm(f"{name}_norm1")(x)
    y = _dense(3 * width, f"{name}_attn_qkv")(y)
    y = SelfAttention(heads, dtype="float32", name=f"{name}_attn")(y)
    y = _dense(width, f"{name}_attn_proj")(y)
    x = keras.layers.Add(name=f"{name}_add1")([x, y])
    y = _layer_norm(f"{name}_norm2")(x)
    y = _dense(MLP_RATIO * width, f"{name}_mlp_fc1")(y)
    y = keras.layers.Activation("gelu", name=f"{name}_mlp_act")(y)  # exact (erf) GELU
    y = _dense(width, f"{name}_mlp_fc2")(y)
    return keras.layers.Add(name=f"{name}_add2")([x, y])
