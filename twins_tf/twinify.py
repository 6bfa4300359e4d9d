"""twinify / untwin: convert between plain-BatchNorm and twin-BatchNorm Keras models.

`keras.models.clone_model` with a `clone_function` rebuilds the graph with one layer type
swapped; the weights are then copied layer by layer (matched by name, which cloning keeps).
Which BN weight goes into which wing, and how the replacement layer is configured, is
`twins_tf.bn_wings`'s job, shared with the pre-trained weight loaders.
"""

import keras

from twins_tf import bn_wings


def _require_graph_model(model):
    if not bn_wings.is_graph_model(model):
        raise TypeError(
            f"twins_tf can only convert functional or Sequential Keras models; got "
            f"{type(model).__name__}. Subclassed models have no graph to rebuild: build the "
            "model with TwinBatchNormalization directly instead."
        )


def _convert(model, is_source_bn, make_replacement, missing):
    """Clones `model` with every `is_source_bn` layer replaced, then copies all weights.

    `missing` is the error message (formatted with the model's name) for a model without
    such a layer: converting it would silently return a copy.
    """
    _require_graph_model(model)
    if not any(is_source_bn(layer) for layer in bn_wings.nested_layers(model)):
        raise ValueError(missing.format(name=model.name))

    def clone_layer(layer):
        if is_source_bn(layer):
            return make_replacement(layer)
        return layer.__class__.from_config(layer.get_config())

    clone = keras.models.clone_model(model, clone_function=clone_layer, recursive=True)
    old = {layer.name: layer for layer in bn_wings.nested_layers(model)}
    for new_layer in bn_wings.nested_layers(clone):
        if isinstance(new_layer, keras.Model):
            continue  # nested models: their layers are visited individually
        old_layer = old.get(new_layer.name)
        if old_layer is None or not old_layer.weights:
            continue
        if is_source_bn(old_layer):
            for variable, value in bn_wings.bn_assignments(old_layer, new_layer):
                variable.assign(value)
        else:
            new_layer.set_weights(old_layer.get_weights())
    return clone


def twinify(model, momentum=0.9):
    """Clone `model` with every BatchNormalization replaced by a TwinBatchNormalization.

    Both wings of each twin layer start from the BN's gamma, beta, moving mean and variance;
    every other weight is copied unchanged.  The Adaptive wing's moving statistics follow
    TWINS's EMA, `new = 0.9 * old + 0.1 * batch` (PyTorch's BN momentum 0.1, the reference
    code's), whatever momentum the source BN was built with: keras.applications models use
    Keras's default 0.99, which would make the Adaptive wing's statistics follow the
    downstream data ten times more slowly than the method prescribes.

    Args:
      model: a functional or Sequential Keras model.
      momentum: EMA momentum of the twin layers in Keras's convention (0.9 = PyTorch's 0.1,
        TWINS's); None keeps each BN's own momentum.

    Returns:
      A new model; `model` is left untouched.

    Example:
      >>> base = keras.applications.ResNet50(weights=None)  # BN momentum 0.99
      >>> twin = twinify(base)  # every twin layer's momentum is 0.9
    """
    return _convert(
        model,
        bn_wings.is_plain_bn,
        lambda bn: bn_wings.twin_from_plain(bn, momentum),
        "twinify: model '{name}' has no BatchNormalization layer to twin.",
    )


def untwin(model):
    """Clone a twin model back to plain BatchNormalization, keeping the Adaptive wing.

    The result's inference output equals the twin model's inference output (which uses the
    Adaptive wing with its moving statistics); it is what gets exported.
    """
    return _convert(
        model,
        bn_wings.is_twin_bn,
        bn_wings.plain_from_twin,
        "untwin: model '{name}' has no TwinBatchNormalization layer.",
    )
