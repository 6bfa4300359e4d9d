"""twinify / untwin: convert between plain-BatchNorm and twin-BatchNorm Keras models.

`keras.models.clone_model` with a `clone_function` rebuilds the graph with one layer type
swapped; the weights are then copied layer by layer (matched by name, which cloning keeps).
"""
import keras
import numpy as np
from keras.src.models.functional import Functional  # Keras 3 exports no public name

from twins_tf.layers import TwinBatchNormalization


def _iter_layers(model):
    return {layer.name: layer for layer in model._flatten_layers(include_self=False)}


def _require_graph_model(model):
    if not isinstance(model, (keras.Sequential, Functional)):
        raise TypeError(
            f"twins_tf can only convert functional or Sequential Keras models; got "
            f"{type(model).__name__}. Subclassed models have no graph to rebuild: build the "
            "model with TwinBatchNormalization directly instead."
        )


def _clone(model, swap):
    def clone_layer(layer):
        new = swap(layer)
        if new is not None:
            return new
        return layer.__class__.from_config(layer.get_config())

    return keras.models.clone_model(model, clone_function=clone_layer, recursive=True)


def _copy_weights(source, target, copy_one):
    old = _iter_layers(source)
    for name, new_layer in _iter_layers(target).items():
        if isinstance(new_layer, keras.Model):
            continue  # nested models: their layers are visited individually
        old_layer = old.get(name)
        if old_layer is None or not old_layer.weights:
            continue
        if not copy_one(old_layer, new_layer):
            new_layer.set_weights(old_layer.get_weights())


def _bn_params(bn):
    channels = bn.moving_mean.shape[0]
    gamma = np.asarray(bn.gamma) if bn.scale else np.ones(channels, "float32")
    beta = np.asarray(bn.beta) if bn.center else np.zeros(channels, "float32")
    return gamma, beta, np.asarray(bn.moving_mean), np.asarray(bn.moving_variance)


def twinify(model, momentum=None):
    """Clone `model` with every BatchNormalization replaced by a TwinBatchNormalization.

    Both wings of each twin layer start from the BN's gamma, beta, moving mean and variance;
    every other weight is copied unchanged.

    Args:
      model: a functional or Sequential Keras model.
      momentum: EMA momentum for the twin layers; None keeps each BN's own momentum.

    Returns:
      A new model; `model` is left untouched.
    """

    def swap(layer):
        if type(layer) is keras.layers.BatchNormalization:
            if getattr(layer, "renorm", False):
                raise ValueError(f"{layer.name}: batch renormalisation has no twin equivalent.")
            return TwinBatchNormalization(
                axis=layer.axis,
                momentum=layer.momentum if momentum is None else momentum,
                epsilon=layer.epsilon,
                synchronized=layer.synchronized,
                name=layer.name,
                dtype=layer.dtype_policy,
            )
        return None

    def copy_one(old, new):
        if not isinstance(new, TwinBatchNormalization):
            return False
        gamma, beta, mean, var = _bn_params(old)
        for variable, value in (
            (new.gamma, gamma), (new.beta, beta), (new.moving_mean, mean),
            (new.moving_variance, var), (new.frozen_gamma, gamma), (new.frozen_beta, beta),
            (new.frozen_mean, mean), (new.frozen_variance, var),
        ):
            variable.assign(value)
        return True

    _require_graph_model(model)
    if not any(type(l) is keras.layers.BatchNormalization
               for l in model._flatten_layers(include_self=False)):
        raise ValueError(f"twinify: model '{model.name}' has no BatchNormalization layer to twin.")
    twin = _clone(model, swap)
    _copy_weights(model, twin, copy_one)
    return twin


def untwin(model):
    """Clone a twin model back to plain BatchNormalization, keeping the Adaptive wing.

    The result's inference output equals the twin model's inference output (which uses the
    Adaptive wing with its moving statistics); it is what gets exported.
    """

    def swap(layer):
        if isinstance(layer, TwinBatchNormalization):
            return keras.layers.BatchNormalization(
                axis=layer.axis,
                momentum=layer.momentum,
                epsilon=layer.epsilon,
                synchronized=layer.synchronized,
                name=layer.name,
                dtype=layer.dtype_policy,
            )
        return None

    def copy_one(old, new):
        if not isinstance(old, TwinBatchNormalization):
            return False
        new.set_weights([np.asarray(v) for v in (
            old.gamma, old.beta, old.moving_mean, old.moving_variance)])
        return True

    _require_graph_model(model)
    if not any(isinstance(l, TwinBatchNormalization)
               for l in model._flatten_layers(include_self=False)):
        raise ValueError(f"untwin: model '{model.name}' has no TwinBatchNormalization layer.")
    plain = _clone(model, swap)
    _copy_weights(model, plain, copy_one)
    return plain
