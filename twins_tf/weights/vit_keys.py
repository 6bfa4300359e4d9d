"""The timm keys of a `build_vit` model: which Keras variables each one fills.

The Keras layers of `build_vit` are named after timm's module paths with "_" for "." (see
`twins_tf.models.vit`); timm's own names contain "_" too (`patch_embed`, `mlp.fc1`), so the
way back is a short table of patterns rather than a blanket replace.  Conv kernels go from
OIHW to HWIO, Linear weights from (out, in) to (in, out), LayerNorm weight/bias to
gamma/beta, and `cls_token` / `pos_embed` to the `embed` layer.

Position embeddings: robust ViT checkpoints are trained at 224 px (a 14x14 grid of 16 px
patches); a model built for 32 or 64 px images has a 2x2 or 4x4 grid.  As timm does when it
loads a checkpoint into a model of another `img_size` (`checkpoint_filter_fn` ->
`resample_abs_pos_embed`), the grid part of `pos_embed` is resized with
`F.interpolate(mode="bicubic", antialias=True, align_corners=False)` and the class token's
entry is kept apart.  With antialias PyTorch computes a separable PIL-style filter: for
output index i, centre c = s (i + 0.5) with s = in / out; taps j from
int(c - S + 0.5) to int(c + S + 0.5) (clipped to the input), S = 2 max(s, 1), weight
k((j - c + 0.5) / max(s, 1)) with Keys' cubic kernel at a = -0.5 (not the -0.75 of the
non-antialiased path), normalised to sum to one.  `resample_position_embedding` is that
computation in numpy (float64, returned as float32).
"""

import math
import re

import numpy as np

from twins_tf import bn_wings
from twins_tf.models import vit
from twins_tf.weights import timm_layers
from twins_tf.weights.errors import CheckpointError

HEAD_PREFIX = "head."
_CUBIC_A = -0.5  # PyTorch's bicubic with antialias=True (PIL's), UpSampleKernel.cpp

# Keras layer name -> timm module path, for the layers that hold weights.
_PATHS = (
    (re.compile(r"patch_embed_proj"), "patch_embed.proj"),
    (re.compile(r"patch_embed_proj_stem_(\d+)"), r"patch_embed.proj.stem.\1"),
    (re.compile(r"blocks_(\d+)_(norm1|norm2)"), r"blocks.\1.\2"),
    (re.compile(r"blocks_(\d+)_(attn_qkv|attn_proj|mlp_fc1|mlp_fc2)"), None),
    (re.compile(r"norm"), "norm"),
    (re.compile(r"head"), "head"),
)


def arch_from_state_dict(state_dict):
    """The ViT arch whose timm keys `state_dict` has (by width and stem), or None."""
    if "cls_token" not in state_dict or "blocks.0.attn.qkv.weight" not in state_dict:
        return None
    width = np.shape(state_dict["cls_token"])[-1]
    convstem = "patch_embed.proj.stem.0.weight" in state_dict
    depth = len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")})
    for arch, (arch_width, arch_depth, _, arch_convstem, _, _) in vit.ARCHITECTURES.items():
        if (arch_width, arch_depth, arch_convstem) == (width, depth, convstem):
            return arch
    return None


def torch_keys(model):
    """{timm key: (the Keras variables it goes into, transform or None)} of `model`."""
    keys = {}
    for layer in bn_wings.nested_layers(model):
        if layer.weights:
            keys.update(_layer_keys(layer))
    return keys


def _module_path(name):
    for pattern, path in _PATHS:
        match = pattern.fullmatch(name)
        if match:
            if path is None:  # blocks_3_attn_qkv -> blocks.3.attn.qkv
                block, module = match.groups()
                return f"blocks.{block}.{module.replace('_', '.')}"
            return match.expand(path)
    raise ValueError(f"layer {name!r} is not a build_vit layer with timm weights.")


def _layer_keys(layer):
    if isinstance(layer, vit.ClassTokenPositionEmbedding):
        grid = layer.grid
        return {
            "cls_token": ([layer.cls_token], None),
            "pos_embed": (
                [layer.pos_embed],
                lambda value: resample_position_embedding(value, grid),
            ),
        }
    prefix = _module_path(layer.name)
    shared = timm_layers.layer_keys(layer, prefix)
    if shared is not None:
        return shared
    raise ValueError(f"layer {layer.name!r} ({type(layer).__name__}) has no timm layout.")


def resample_position_embedding(pos_embed, grid, num_prefix_tokens=1):
    """timm's `resample_abs_pos_embed` (bicubic, antialias, align_corners=False) in numpy.

    Args:
      pos_embed: (1, prefix + rows0 * cols0, C) from a checkpoint; the old grid is taken to
        be square, as timm does for a checkpoint without its grid size.
      grid: (rows, cols) of the model.
      num_prefix_tokens: leading entries kept as they are (the class token's).

    Returns:
      float32 (1, prefix + rows * cols, C); `pos_embed` itself when the grid is the same.

    Raises:
      CheckpointError: `pos_embed` is not (1, tokens, C) or its grid is not square.
    """
    pos_embed = np.asarray(pos_embed)
    rows, cols = (int(g) for g in grid)
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise CheckpointError(
            f"pos_embed must have shape (1, tokens, width), got {pos_embed.shape}."
        )
    if pos_embed.shape[1] == num_prefix_tokens + rows * cols:
        return pos_embed
    old = pos_embed.shape[1] - num_prefix_tokens
    side = math.isqrt(max(old, 0))
    if old <= 0 or side * side != old:
        raise CheckpointError(
            f"pos_embed has {old} grid entries after {num_prefix_tokens} class token, not a "
            "square grid: the checkpoint's grid size cannot be told, so it cannot be "
            "resampled to this model's image size."
        )
    prefix, table = pos_embed[:, :num_prefix_tokens], pos_embed[0, num_prefix_tokens:]
    table = table.reshape(side, side, -1).astype(np.float64)
    table = np.einsum("ws,hsc->hwc", _antialiased_cubic_weights(side, cols), table)
    table = np.einsum("hs,swc->hwc", _antialiased_cubic_weights(side, rows), table)
    table = table.reshape(1, rows * cols, -1).astype(pos_embed.dtype)
    return np.concatenate([prefix, table], axis=1)


def _keys_cubic(x, a=_CUBIC_A):
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def _antialiased_cubic_weights(in_size, out_size):
    """(out_size, in_size) matrix of PyTorch's antialiased bicubic resize along one axis."""
    scale = in_size / out_size
    stretch = max(scale, 1.0)  # the kernel widens only when shrinking
    support = 2.0 * stretch
    weights = np.zeros((out_size, in_size))
    for i in range(out_size):
        center = scale * (i + 0.5)
        first = max(int(center - support + 0.5), 0)  # int() truncates, as the C++ cast
        last = min(int(center + support + 0.5), in_size)
        taps = np.arange(first, last)
        w = _keys_cubic((taps - center + 0.5) / stretch)
        weights[i, taps] = w / w.sum()
    return weights
