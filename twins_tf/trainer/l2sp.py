"""L2-SP's state on the trainer: which weights are pre-trained, and their starting values.

L2-SP (`methods.l2sp_penalty`) pulls every weight that has a pre-trained value towards it and
decays the new head's weights towards zero.  Which are which is decided here: every trainable
variable outside the head's layers (`l2sp_exclude`; by default the layers producing the
output, `twins_tf.models.heads`) counts as pre-trained, BatchNormalization's gamma and beta
included.  The starting values are the trainer's own non-trainable weights, so a saved trainer
and a resumed run keep them.
"""

from twins_tf.models.heads import output_layer_names
from twins_tf.platform import keras_private


def add_state(trainer, model, exclude):
    """Gives `trainer` L2-SP's variables (`_l2sp_variables` pre-trained, `_l2sp_new` the
    head's) and an anchor weight per pre-trained variable, zero until
    `trainer.snapshot_pretrained()`.  The order of creation is the order of the trainer's
    weights in a saved file: keep it."""
    trainer._l2sp_variables = pretrained_variables(model, exclude)
    anchored = {id(v) for v in trainer._l2sp_variables}
    trainer._l2sp_new = [v for v in model.trainable_variables if id(v) not in anchored]
    trainer._l2sp_anchors = [
        trainer.add_weight(
            shape=v.shape,
            dtype=v.dtype,
            initializer="zeros",
            trainable=False,
            name=f"l2sp_anchor_{i}",
        )
        for i, v in enumerate(trainer._l2sp_variables)
    ]


def pretrained_variables(model, exclude):
    """`model`'s trainable variables outside the layers named `exclude` ("auto": the layers
    producing its output), at any depth."""
    if exclude == "auto":
        exclude = output_layer_names(model)
        if not exclude:
            raise ValueError(
                f"cannot find the output layer of {model.name!r} (not a functional model): "
                "pass l2sp_exclude=[names of the new head's layers] (or [] to anchor every "
                "weight)."
            )
    exclude = set(exclude or ())
    layers = keras_private.flatten_layers(model)
    known = {layer.name for layer in layers}
    unknown = exclude - known
    if unknown:
        raise ValueError(f"l2sp_exclude names layers not in the model: {sorted(unknown)}.")
    skipped = {id(v) for layer in layers if layer.name in exclude for v in layer.weights}
    return [v for v in model.trainable_variables if id(v) not in skipped]
