"""BatchNorm folded into the preceding convolution, for the attack's inference passes.

In inference mode a BatchNorm (plain, or the wing a `TwinBatchNormalization` uses there) is a
per-channel affine map `y = a * z + b` with `a = gamma / sqrt(var + eps)` and
`b = beta - mean * a`.  Applied to a convolution's output `z = conv(x, W)` it equals
`conv(x, W * a) + b`: the kernel scaled along its output channels plus a bias.  A PGD-k
training step runs k forward + input-gradient passes in inference mode, so with the folded
network those passes skip every BN (forward and backward) and TensorFlow's graph optimiser
can fuse Conv2D + BiasAdd (+ Relu) into one kernel; the BN-free backward is a plain
transposed convolution.

`fold_batch_norm(model)` returns a second functional model over the *same* variables: the
folded kernels and biases are recomputed from the current weights and moving statistics on
every call (a few per-channel multiplications, negligible next to the convolutions), so it
stays exact while the source model trains and never needs re-folding.  It is inference-only.
Numerics: folding changes the order of float32 rounding, so logits differ from the unfolded
model's by rounding error (tests/test_models.py bounds it against PyTorch).

TensorFlow's own route to this, grappler's remapper fusing Conv2D + FusedBatchNormV3
(is_training=False), does not apply to an attack: its backward pass needs the BN's input, so
the convolution's output stays alive and the fusion is refused.
"""

import keras
import tensorflow as tf

from twins_tf.layers import FROZEN, TwinBatchNormalization

_NORMS = (TwinBatchNormalization, keras.layers.BatchNormalization)


class FoldedConvBatchNormalization(keras.layers.Layer):
    """`norm(conv(x))` in inference mode as one convolution with a folded kernel and bias.

    Holds references to the source `conv` (a channels-last `Conv2D`) and `norm` layers, not
    copies, so it always computes with their current variables.  Not serialisable on purpose:
    it is a view of another model, rebuilt with `fold_batch_norm` when needed.
    """

    def __init__(self, conv, norm, **kwargs):
        super().__init__(**kwargs)
        self.conv = conv
        self.norm = norm

    def _statistics(self):
        norm = self.norm
        if isinstance(norm, TwinBatchNormalization) and norm.mode == FROZEN:
            return norm.frozen_mean, norm.frozen_variance, norm.frozen_gamma, norm.frozen_beta
        gamma = norm.gamma if getattr(norm, "gamma", None) is not None else 1.0
        beta = norm.beta if getattr(norm, "beta", None) is not None else 0.0
        return norm.moving_mean, norm.moving_variance, gamma, beta

    def call(self, inputs, training=None):
        if training:
            raise ValueError(
                f"{self.name}: a BN-folded model is inference-only (it has no batch "
                "statistics); call the source model for training forwards."
            )
        mean, variance, gamma, beta = (tf.cast(v, tf.float32) for v in self._statistics())
        scale = gamma * tf.math.rsqrt(variance + self.norm.epsilon)
        bias = beta - mean * scale
        if self.conv.use_bias:
            bias = bias + tf.cast(self.conv.bias, tf.float32) * scale
        kernel = tf.cast(self.conv.kernel, tf.float32) * scale  # scales output channels
        x = tf.cast(inputs, tf.float32)
        y = tf.nn.conv2d(
            x,
            kernel,
            strides=self.conv.strides,
            padding=self.conv.padding.upper(),
            dilations=self.conv.dilation_rate,
        )
        y = tf.nn.bias_add(y, bias)
        return tf.cast(y, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return self.conv.compute_output_shape(input_shape)

    def get_config(self):
        raise NotImplementedError(
            f"{self.name}: a BN-folded model is a view of another model's variables and is "
            "not saved; save the source model and call fold_batch_norm(model) after loading."
        )


def _foldable_conv(layer):
    return (
        type(layer) is keras.layers.Conv2D
        and layer.data_format == "channels_last"
        and layer.groups == 1
        and layer.activation in (None, keras.activations.linear)
    )


def _foldable_norm(layer):
    axis = layer.axis if isinstance(layer, _NORMS) else None
    axis = axis[0] if isinstance(axis, (list, tuple)) and len(axis) == 1 else axis
    return axis in (-1, 3)


def _history(value):
    """Map a serialised inbound-node argument to nested (layer, node, tensor) references."""
    if isinstance(value, dict) and value.get("class_name") == "__keras_tensor__":
        return tuple(value["config"]["keras_history"])
    if isinstance(value, (list, tuple)):
        return [_history(v) for v in value]
    raise ValueError(
        f"fold_batch_norm: unsupported layer argument {value!r}; only functional models whose "
        "layers take tensors or lists of tensors are supported."
    )


def fold_batch_norm(model, name=None):
    """A BN-folded, inference-only functional copy of `model` sharing its variables.

    Every Conv2D whose only consumer is a BatchNormalization or TwinBatchNormalization over
    the channel axis becomes a `FoldedConvBatchNormalization`; every other layer is the
    source model's own layer object (shared).  Works on the models `build_resnet` builds and
    on other single-input, single-output functional models whose layers are called once.

    Args:
      model: a built functional `keras.Model`.
      name: name of the folded model (default: `<model name>_folded`).

    Returns:
      A `keras.Model` with the same inputs and outputs as `model` in inference mode.

    Raises:
      ValueError: `model` is not functional, has several inputs/outputs, or calls a layer more
        than once.

    Example:
      >>> folded = fold_batch_norm(model)
      >>> x_adv = twins_tf.attacks.PGD(8 / 255, 2 / 255, 10)(folded, images, labels)
    """
    config = model.get_config() if isinstance(model, keras.Model) else None
    if not config or "layers" not in config or "input_layers" not in config:
        raise ValueError(
            f"fold_batch_norm needs a functional keras.Model (built with keras.Input), got "
            f"{type(model).__name__}."
        )
    inputs_spec, outputs_spec = config["input_layers"], config["output_layers"]
    if isinstance(inputs_spec[0], list) or isinstance(outputs_spec[0], list):
        raise ValueError("fold_batch_norm supports one input and one output only.")
    nodes = {}
    consumers = {}
    for layer_config in config["layers"]:
        inbound = layer_config["inbound_nodes"]
        if len(inbound) > 1:
            raise ValueError(
                f"fold_batch_norm: layer {layer_config['name']!r} is called more than once; "
                "shared layers are not supported."
            )
        args = [_history(a) for a in inbound[0]["args"]] if inbound else []
        nodes[layer_config["name"]] = args
        for ref in _references(args):
            consumers.setdefault(ref[0], []).append(layer_config["name"])

    folded_norms = {}
    for layer_config in config["layers"]:
        layer = model.get_layer(layer_config["name"])
        after = consumers.get(layer.name, [])
        if _foldable_conv(layer) and len(after) == 1:
            norm = model.get_layer(after[0])
            if _foldable_norm(norm):
                folded_norms[norm.name] = layer

    tensors = {}
    images = keras.Input(
        batch_shape=model.inputs[0].shape, dtype=model.inputs[0].dtype, name=inputs_spec[0]
    )
    tensors[inputs_spec[0]] = images

    for layer_config in config["layers"]:
        layer_name = layer_config["name"]
        if layer_name == inputs_spec[0]:
            continue
        args = nodes[layer_name]
        layer = model.get_layer(layer_name)
        if any(conv is layer for conv in folded_norms.values()):
            continue  # computed by the folded layer that replaces its BN
        if layer_name in folded_norms:
            conv = folded_norms[layer_name]
            (conv_ref,) = nodes[conv.name]
            tensors[layer_name] = FoldedConvBatchNormalization(
                conv, layer, name=f"{conv.name}_{layer_name}_folded"
            )(tensors[conv_ref[0]])
            continue
        call_args = [_resolve_one(tensors, a) for a in args]
        tensors[layer_name] = layer(*call_args)
    outputs = tensors[outputs_spec[0]]
    return keras.Model(images, outputs, name=name or f"{model.name}_folded")


def _resolve_one(tensors, arg):
    if isinstance(arg, tuple):
        return tensors[arg[0]]
    return [_resolve_one(tensors, a) for a in arg]


def _references(args):
    """The (layer, node, tensor) references inside nested argument lists."""
    for arg in args:
        if isinstance(arg, tuple):
            yield arg
        else:
            yield from _references(arg)
