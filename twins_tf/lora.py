"""AutoLoRa's low-rank branch (Xu et al., ICLR 2024) on a Keras classifier's kernels.

AutoLoRa gives every convolution inside the backbone's residual blocks (not the stem, not
the downsampling shortcuts, not the fresh head) a second, *natural* path: the kernel W of the
main (adversarial) path plus a low-rank update,

    W_nat = W + (1 / r) * reshape(B @ A),  conv: A (r*k, in*k) ~ N(0, 1), B (out*k, r*k) = 0,
                                           dense: A (r, in) Kaiming-uniform, B (out, r) = 0,

reshape taking the (out*k, in*k) product to PyTorch's (out, in, k, k) kernel layout (then to
Keras's (k, k, in, out)).  The main path is the plain network; only the natural forward of
the AutoLoRa step sees the branch, and the model the paper evaluates (and so `evaluate`,
`export` and `load_run`) is the main path alone.  See docs/autolora.md.

Design: a branch is its own layer (`LoRABranch`) placed after the layer it adapts, adding
`conv(x, Delta)` (or `x A^T B^T / r`) to that layer's output while `natural_branch()` is
active and passing the output through otherwise.  By linearity this is the forward with the
merged kernel W + Delta.  Keeping the adapted layers untouched (the same Conv2D objects, the
same class) means a LoRA model's `.weights.h5` holds the plain network under the names and
layout every plain loader reads (`twins_tf.weights.load_pretrained`, `evaluate`,
`load_run`), with the branches as extra layers those loaders ignore: an AutoLoRa run's weights
file *is* the evaluated model's.  (A Conv2D subclass with extra variables would change that
layout; Keras's own `enable_lora` has no switchable branch, no conv support in this shape
and cannot be dropped for evaluation.)

The switch is read when a layer is called, so inside one traced train step the natural
forward (in `with natural_branch():`) and the adversarial forward trace different graphs.
It is thread-local: tf.distribute runs each replica's step in its own thread.
"""

import contextlib
import math
import threading

import keras
import numpy as np

from twins_tf.models.heads import output_layer_names
from twins_tf.platform import keras_private

_SWITCH = threading.local()


def branch_active():
    """Whether the natural (LoRA) branch is on for forwards called in this thread now."""
    return getattr(_SWITCH, "depth", 0) > 0


@contextlib.contextmanager
def natural_branch():
    """Forwards of a LoRA model called inside run its natural path (W + Delta)."""
    _SWITCH.depth = getattr(_SWITCH, "depth", 0) + 1
    try:
        yield
    finally:
        _SWITCH.depth -= 1


@keras.saving.register_keras_serializable(package="twins_tf")
class LoRABranch(keras.layers.Layer):
    """The low-rank branch of one Conv2D or Dense layer, called as `branch([x, layer(x)])`.

    Returns `layer(x) + op(x, Delta)` inside `natural_branch()`, `layer(x)` otherwise.

    Args:
      kind: "conv" or "dense" (the adapted layer's type).
      rank: r.
      filters: output channels / units of the adapted layer.
      kernel_size: k (conv: square kernels only).
      strides, padding, dilation_rate: the adapted convolution's.
    """

    def __init__(
        self,
        kind,
        rank,
        filters,
        kernel_size=1,
        strides=(1, 1),
        padding="valid",
        dilation_rate=(1, 1),
        target=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if kind not in ("conv", "dense"):
            raise ValueError(f"LoRABranch kind must be 'conv' or 'dense', got {kind!r}.")
        if not (isinstance(rank, int) and rank > 0):
            raise ValueError(f"LoRABranch rank must be a positive integer, got {rank!r}.")
        self.kind, self.rank, self.filters = kind, rank, int(filters)
        self.kernel_size = int(kernel_size)
        self.strides, self.padding = tuple(strides), padding
        self.dilation_rate = tuple(dilation_rate)
        self.target = target  # the adapted layer's name
        self.scale = 1.0 / rank  # the paper's lora_alpha = 1

    def build(self, input_shape):
        in_channels = int(input_shape[0][-1])
        k, r = self.kernel_size, self.rank
        if self.kind == "conv":
            a_shape, b_shape = (r * k, in_channels * k), (self.filters * k, r * k)
            a_init = keras.initializers.RandomNormal(0.0, 1.0)
        else:
            a_shape, b_shape = (r, in_channels), (self.filters, r)
            bound = math.sqrt(6.0 / in_channels)  # torch kaiming_uniform_, a=0
            a_init = keras.initializers.RandomUniform(-bound, bound)
        self.lora_a = self.add_weight(shape=a_shape, initializer=a_init, name="lora_a")
        self.lora_b = self.add_weight(shape=b_shape, initializer="zeros", name="lora_b")
        self.in_channels = in_channels

    def delta_kernel(self):
        """scale * reshape(B @ A) in the adapted layer's Keras kernel layout."""
        product = keras.ops.matmul(self.lora_b, self.lora_a) * self.scale
        if self.kind == "dense":
            return keras.ops.transpose(product)  # (out, in) -> (in, out)
        k = self.kernel_size
        torch_layout = keras.ops.reshape(product, (self.filters, self.in_channels, k, k))
        return keras.ops.transpose(torch_layout, (2, 3, 1, 0))

    def call(self, inputs):
        x, main = inputs
        if not branch_active():
            return main
        if self.kind == "dense":
            low = keras.ops.matmul(
                keras.ops.matmul(x, keras.ops.transpose(self.lora_a)),
                keras.ops.transpose(self.lora_b),
            )
            return main + keras.ops.cast(low * self.scale, main.dtype)
        delta = keras.ops.cast(self.delta_kernel(), x.dtype)
        return main + keras.ops.conv(
            x, delta, strides=self.strides, padding=self.padding, dilation_rate=self.dilation_rate
        )

    def compute_output_shape(self, input_shape):
        return input_shape[1]

    def get_config(self):
        return {
            **super().get_config(),
            "kind": self.kind,
            "rank": self.rank,
            "filters": self.filters,
            "kernel_size": self.kernel_size,
            "strides": list(self.strides),
            "padding": self.padding,
            "dilation_rate": list(self.dilation_rate),
            "target": self.target,
        }


def default_targets(model):
    """The layers AutoLoRa adapts: the convolutions and Linear layers inside the backbone's
    residual blocks.  That is every Conv2D but the stem and the downsampling layers, and every
    Dense but the output layer (the fresh head).

    The stem is the first Conv2D, and every Conv2D named `stem_*` (ConvNeXt's patchify
    `stem_0`, the ConvStem's `stem_stem_<i>`).  The downsampling layers are the Conv2Ds
    named `*_downsample_*`:
    * ResNet's shortcuts `<block>_downsample_0` (torchvision's `downsample.0`), left out
      because the authors' ResNet never runs their branch: a block calls
      `self.downsample(x)` without `thread=`, and their `ConvLoRA.forward` defaults to the
      main thread, so the shortcut's natural kernel gets no gradient and stays at B = 0;
    * ConvNeXt's `stages_<i>_downsample_1` between stages, which like the stem sit outside
      the residual blocks the paper adapts.
    ConvNeXt's depthwise convolutions (`DepthwiseConv2D`, not a Conv2D) are not adapted: in
    AutoLoRa's (out*k, in*k) factorisation a depthwise kernel is (C*k, k), of rank at most
    k <= r*k, so its "low-rank" update would be a full one; a ConvNeXt block's branches are
    its two Linear layers `mlp_fc1` and `mlp_fc2` (timm's pointwise convolutions)."""
    layers = keras_private.flatten_layers(model)
    convs = [layer for layer in layers if isinstance(layer, keras.layers.Conv2D)]
    left_out = {id(layer) for layer in convs[:1]} | {
        id(layer)
        for layer in convs
        if layer.name.startswith("stem_") or "_downsample_" in layer.name
    }
    outputs = set(output_layer_names(model))
    dense = [
        layer
        for layer in layers
        if isinstance(layer, keras.layers.Dense) and layer.name not in outputs
    ]
    return [layer for layer in convs if id(layer) not in left_out] + dense


def _branch_for(layer, rank):
    if isinstance(layer, keras.layers.Conv2D):
        if layer.groups != 1 or len(set(layer.kernel_size)) != 1:
            raise ValueError(
                f"add_lora: {layer.name} has groups={layer.groups} or a "
                f"non-square kernel {layer.kernel_size}; AutoLoRa's conv branch "
                "needs groups=1 and a square kernel."
            )
        if layer.data_format != "channels_last":
            raise ValueError(f"add_lora: {layer.name} is channels_first; use channels_last.")
        return LoRABranch(
            "conv",
            rank,
            layer.filters,
            layer.kernel_size[0],
            layer.strides,
            layer.padding,
            layer.dilation_rate,
            target=layer.name,
            name=f"{layer.name}_lora",
        )
    if not isinstance(layer, keras.layers.Dense):
        raise ValueError(
            f"add_lora: {layer.name} is a {type(layer).__name__}; AutoLoRa branches adapt "
            "Conv2D and Dense layers only (see lora.default_targets)."
        )
    return LoRABranch("dense", rank, layer.units, target=layer.name, name=f"{layer.name}_lora")


def add_lora(model, rank, targets=None):
    """A functional model sharing `model`'s layers, with a `LoRABranch` after each target.

    Args:
      model: a built functional Keras model (e.g. `build_resnet`, pre-trained weights loaded).
      rank: r > 0.
      targets: the Conv2D / Dense layers to adapt; default `default_targets(model)`.

    Returns:
      The LoRA model (same inputs and outputs; the branches start at B = 0, so its natural
      forward equals the main one until trained).
    """
    if not (isinstance(rank, int) and not isinstance(rank, bool) and rank > 0):
        raise ValueError(f"add_lora rank must be a positive integer, got {rank!r}.")
    if lora_branches(model):
        raise ValueError(f"{model.name} already has LoRA branches.")
    targets = default_targets(model) if targets is None else list(targets)
    chosen = {id(layer): _branch_for(layer, rank) for layer in targets}

    def call(layer, *args, **kwargs):
        out = layer(*args, **kwargs)
        branch = chosen.get(id(layer))
        return out if branch is None else branch([args[0], out])

    return keras.models.clone_model(model, clone_function=lambda layer: layer, call_function=call)


def lora_branches(model):
    """The `LoRABranch` layers of `model`, in graph order."""
    return [layer for layer in keras_private.flatten_layers(model) if isinstance(layer, LoRABranch)]


def lora_variables(model):
    """Every LoRA A and B of `model` (the natural branch's trainable variables)."""
    return [v for branch in lora_branches(model) for v in (branch.lora_a, branch.lora_b)]


def _without_branches(model, replace=None):
    replace = replace or {}

    def clone(layer):
        return replace.get(id(layer), layer)

    def call(layer, *args, **kwargs):
        if isinstance(layer, LoRABranch):
            return args[0][1]
        return layer(*args, **kwargs)

    return keras.models.clone_model(model, clone_function=clone, call_function=call)


def main_branch(model):
    """The model AutoLoRa evaluates: the main (adversarially trained) path alone, as a plain
    model sharing `model`'s layers and variables (no LoRABranch left)."""
    return _without_branches(model)


def merge_lora(model):
    """A plain model whose adapted kernels hold W + Delta: the natural path, merged.

    The adapted layers are copies holding the merge (new variables); the others are shared
    with `model`.  AutoLoRa
    evaluates the main path (`main_branch`); this is the natural one, for inspection.
    """
    by_name = {layer.name: layer for layer in keras_private.flatten_layers(model)}
    copies = {}
    for branch in lora_branches(model):
        layer = by_name[branch.target]
        copy = layer.__class__.from_config(layer.get_config())
        copies[id(layer)] = (copy, layer, np.asarray(branch.delta_kernel()))
    plain = _without_branches(model, {k: c for k, (c, _, _) in copies.items()})
    for copy, layer, delta in copies.values():
        values = [np.asarray(w) for w in layer.get_weights()]
        values[0] = values[0] + delta  # the kernel comes first for Conv2D and Dense
        copy.set_weights(values)
    return plain
