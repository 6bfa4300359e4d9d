"""Saving an AdversarialTrainer like any Keras model: its config, and the trainer from it.

The trainer is a registered Keras serialisable (`twins_tf>AdversarialTrainer`), so
`trainer.save("x.keras")`, `keras.models.load_model` and `ModelCheckpoint("ckpt.keras")` bring
back the wrapped model, method, attacks and hyperparameters (`trainer_config`), every weight
and the optimizer state.  The file names twins_tf's classes; Keras imports only its own
packages when loading, so `import twins_tf` first (that import registers every twins_tf
serialisable).
"""

import inspect

import keras

from twins_tf import methods as methods_lib


def serialize_attack(attack, arg):
    """`attack` as a Keras config, or a ValueError saying how to make it serialisable."""
    if attack is None:
        return None
    function = inspect.isfunction(attack)
    registered = keras.saving.get_registered_name(attack if function else type(attack))
    if ">" not in registered or not (function or hasattr(attack, "get_config")):
        raise ValueError(
            f"AdversarialTrainer cannot be serialised: its {arg} {attack!r} is not a registered "
            "Keras serialisable. Decorate its class with "
            "@keras.saving.register_keras_serializable(package=...) and give it get_config() "
            "and from_config(), or save the weights only (trainer.model.save_weights, "
            "ModelCheckpoint(..., save_weights_only=True))."
        )
    return keras.saving.serialize_keras_object(attack)


def trainer_config(trainer):
    """The constructor arguments of `trainer`, its model and attacks as Keras configs.

    The weights (model, L2-SP anchors, eval counter, AutoLoRa's state) and the optimizer
    state are in the file's weights, not here.  The attacks must be registered Keras
    serialisables (twins_tf's are); a custom attack that is not is an error naming the fix.
    """
    registered = methods_lib.METHODS.get(trainer.method.name)
    if registered is not trainer.method:
        raise ValueError(
            f"AdversarialTrainer.get_config: method {trainer.method.name!r} is not the one "
            "registered under that name, so a loaded trainer could not find it: "
            "twins_tf.methods.register() it first."
        )
    return {
        "name": trainer.name,
        "trainable": trainer.trainable,
        "model": keras.saving.serialize_keras_object(trainer.model),
        "method": trainer.method.name,
        "attack": serialize_attack(trainer.attack, "attack"),
        "eval_attack": serialize_attack(trainer.eval_attack, "eval_attack"),
        "lambda_twins": trainer.lambda_twins,
        "beta": trainer.beta,
        "weight_decay": trainer.weight_decay,
        "l2sp_alpha": trainer.l2sp_alpha,
        "l2sp_exclude": trainer.l2sp_exclude,
        "check_inputs": trainer.check_inputs,
    }


def constructor_arguments(config, custom_objects=None):
    """(model, keyword arguments) of the trainer `trainer_config` describes."""
    config = dict(config)
    model = keras.saving.deserialize_keras_object(
        config.pop("model"), custom_objects=custom_objects
    )
    for key in ("attack", "eval_attack"):
        if config.get(key) is not None:
            config[key] = keras.saving.deserialize_keras_object(
                config[key], custom_objects=custom_objects
            )
    return model, config
