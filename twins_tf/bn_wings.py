"""The one mapping between a plain BatchNormalization and the two wings of a twin layer.

A Keras `BatchNormalization` holds gamma, beta, moving mean and moving variance; a
`TwinBatchNormalization` (twins_tf.layers) holds the same four for its Adaptive wing under the
same names and four more for its Frozen wing (`frozen_gamma`, ...).  Every conversion in
twins_tf goes through this module, so the pairing is written once:

  * plain -> twin: both wings start from the BN (twinify, loading a plain file into a twin
    model, loading a torchvision state dict into a twin model);
  * twin -> plain: the Adaptive wing, the one a twin model uses at inference (untwin, loading a
    twin file into a plain model);
  * twin -> twin and plain -> plain: wing by wing.

It also builds the replacement layer for either direction with the BN's axis, momentum,
epsilon, synchronisation, name and dtype policy, and walks the layers of graph models.
"""

import keras
import numpy as np

from twins_tf import layers as twins_layers
from twins_tf.layers import TwinBatchNormalization

# Attribute names, in the order Keras's BatchNormalization lists its weights.
PLAIN = ("gamma", "beta", "moving_mean", "moving_variance")
ADAPTIVE_WING = PLAIN  # the twin layer's Adaptive wing keeps the plain names
FROZEN_WING = ("frozen_gamma", "frozen_beta", "frozen_mean", "frozen_variance")
FROZEN_OF = dict(zip(ADAPTIVE_WING, FROZEN_WING))


def is_plain_bn(layer):
    """True for exactly Keras's BatchNormalization or twins_tf's (`twins_tf.layers`: the same
    weights and inference, PyTorch's training step); other subclasses may compute something
    else."""
    return type(layer) in (keras.layers.BatchNormalization, twins_layers.BatchNormalization)


def is_twin_bn(layer):
    return isinstance(layer, TwinBatchNormalization)


def is_graph_model(model):
    """True for a Sequential or functional Keras model, the kinds `clone_model` can rebuild.

    A functional model (`keras.Model(inputs, outputs)`, keras.applications, a subclass that
    calls `super().__init__(inputs, outputs)`) is a `keras.Function`, Keras's public class of
    a graph of operations; a subclassed model with its own `call` is not.
    """
    return isinstance(model, keras.Sequential) or (
        isinstance(model, keras.Model) and isinstance(model, keras.Function)
    )


def nested_layers(model):
    """Every layer of a graph model, descending into nested models, each layer once.

    Public attributes only (`.layers`): a layer that builds sublayers of its own counts as one
    layer, which is how `clone_model` treats it too (it is cloned from its config, not
    rebuilt sublayer by sublayer).
    """
    out, seen, stack = [], set(), list(reversed(model.layers))
    while stack:
        layer = stack.pop()
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        out.append(layer)
        if isinstance(layer, keras.Model):
            stack.extend(reversed(layer.layers))
    return out


def _plain_values(bn):
    """gamma, beta, mean, variance of a plain BN as float32 numpy arrays.

    A BN built with `scale=False` / `center=False` has no gamma / beta; it normalises as if
    gamma were ones and beta zeros, so those are the values a twin wing needs.
    """
    channels = bn.moving_mean.shape[0]
    gamma = np.asarray(bn.gamma) if bn.scale else np.ones(channels, "float32")
    beta = np.asarray(bn.beta) if bn.center else np.zeros(channels, "float32")
    return dict(
        zip(PLAIN, (gamma, beta, np.asarray(bn.moving_mean), np.asarray(bn.moving_variance)))
    )


def wing_variables(layer, attribute):
    """The variables of a BN or twin layer that receive the plain BN weight `attribute`.

    A plain BN has one; a twin layer has two, the Adaptive wing's and the Frozen wing's, as
    both wings start from the same pre-trained BN (spec §1).
    """
    if attribute not in PLAIN:
        raise ValueError(
            f"{attribute!r} is not a BatchNormalization weight; expected one of {PLAIN}."
        )
    variables = [getattr(layer, attribute)]
    if is_twin_bn(layer):
        variables.append(getattr(layer, FROZEN_OF[attribute]))
    return variables


def bn_assignments(source, target):
    """[(target variable, value)] that copy BN layer `source` into BN layer `target`.

    Plain -> plain and twin -> twin copy weight for weight (both wings of a twin); plain ->
    twin fills both wings from the BN; twin -> plain takes the Adaptive wing.  Values are
    numpy arrays or variables, not yet assigned, so a caller can check every shape before it
    changes anything.
    """
    if not (is_twin_bn(source) or isinstance(source, keras.layers.BatchNormalization)):
        raise TypeError(f"{source.name} is a {type(source).__name__}, not a (twin) BN layer.")
    if not (is_twin_bn(target) or isinstance(target, keras.layers.BatchNormalization)):
        raise TypeError(f"{target.name} is a {type(target).__name__}, not a (twin) BN layer.")
    if is_twin_bn(source):
        adaptive = {name: getattr(source, name) for name in ADAPTIVE_WING}
        frozen = {name: getattr(source, FROZEN_OF[name]) for name in ADAPTIVE_WING}
    else:
        adaptive = frozen = _plain_values(source)
    if not is_twin_bn(target):
        missing = [n for n in ("gamma", "beta") if getattr(target, n, None) is None]
        if missing:
            raise ValueError(
                f"{target.name}: a BatchNormalization without {' and '.join(missing)}"
                " (scale/center=False) cannot take another BN's weights; build it "
                "with scale=True, center=True."
            )
        return [(getattr(target, name), adaptive[name]) for name in PLAIN]
    return [(getattr(target, name), adaptive[name]) for name in ADAPTIVE_WING] + [
        (getattr(target, FROZEN_OF[name]), frozen[name]) for name in ADAPTIVE_WING
    ]


def _shared_config(layer):
    return dict(
        axis=layer.axis,
        epsilon=layer.epsilon,
        synchronized=layer.synchronized,
        name=layer.name,
        dtype=layer.dtype_policy,
    )


def twin_from_plain(bn, momentum=None):
    """A new TwinBatchNormalization configured like `bn` (momentum=None keeps the BN's)."""
    if getattr(bn, "renorm", False):
        raise ValueError(f"{bn.name}: batch renormalisation has no twin equivalent.")
    return TwinBatchNormalization(
        momentum=bn.momentum if momentum is None else momentum, **_shared_config(bn)
    )


def plain_from_twin(twin):
    """A new plain BatchNormalization configured like the twin layer (its Adaptive wing).

    twins_tf's layer (`twins_tf.layers.BatchNormalization`), not Keras's: an untwinned model
    is exported and evaluated, where the two compute the same, but it is also what a plain
    method trains, and there it must keep the twin layer's (PyTorch's) training step.
    """
    return twins_layers.BatchNormalization(momentum=twin.momentum, **_shared_config(twin))
