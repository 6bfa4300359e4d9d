"""A classifier's head: the layer producing its logits.

Fine-tuning treats the head apart from the backbone: L2-SP decays it instead of pulling it to
pre-trained weights, AutoLoRa's natural path trains it and adapts no LoRA branch onto it, the
init stage trains it alone and copies it into the main run.  All of them find it here: for a
Sequential model its last layer, for a functional one the layers its outputs come from (Keras's
public `output_names`); a subclassed model does not say.
"""

import keras


def output_layer_names(model):
    """The names of the layers producing `model`'s outputs; [] if the model does not say."""
    if isinstance(model, keras.Sequential) and model.layers:
        return [model.layers[-1].name]
    return list(getattr(model, "output_names", None) or [])


def head_layer(model):
    """The one layer producing the classifier's logits (`fc` of `build_resnet`)."""
    names = output_layer_names(model)
    if len(names) != 1:
        raise ValueError(
            f"cannot find the single output layer of {model.name!r}: a functional or "
            "Sequential classifier with one output has one."
        )
    return model.get_layer(names[0])
