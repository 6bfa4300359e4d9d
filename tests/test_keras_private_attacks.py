"""Pins the Keras behaviour `keras_private.float32_compute` (the attacks section) relies on.

Checked against keras 3.15.1 / TF 2.21.0 (the layer walk, `keras_private.flatten_layers`, is
pinned in tests/test_keras_private_trainer.py): assigning `Layer._dtype_policy` is what
`Layer.compute_dtype` and a call's computation dtype read, and it leaves the variables alone.
If an upgrade changes either, these fail before a mixed-precision PGD silently attacks in
bfloat16.
"""

import keras
import numpy as np
import pytest

from twins_tf.platform import keras_private


@pytest.fixture
def mixed_bfloat16():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    yield
    keras.mixed_precision.set_global_policy("float32")


def nested_model():
    """A functional model holding a Sequential sub-model and a layer used twice."""
    inner = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(5, name="inner_dense"),
            keras.layers.ReLU(name="inner_relu"),
        ],
        name="inner",
    )
    shared = keras.layers.Dense(4, name="shared")
    inputs = keras.Input((4,))
    outputs = keras.layers.Dense(3, name="head")(inner(shared(shared(inputs))))
    return keras.Model(inputs, outputs)


def test_dtype_policy_attribute_sets_the_compute_dtype_only(mixed_bfloat16):
    layer = keras.layers.Dense(3)
    layer.build((None, 4))
    assert layer.compute_dtype == "bfloat16" and layer.kernel.dtype == "float32"
    saved = layer._dtype_policy
    layer._dtype_policy = keras.DTypePolicy("float32")
    assert layer.compute_dtype == "float32"
    assert layer(np.ones((2, 4), "float32")).dtype == "float32"
    assert layer.kernel.dtype == "float32" and layer.variable_dtype == "float32"
    layer._dtype_policy = saved
    assert layer(np.ones((2, 4), "float32")).dtype == "bfloat16"


def test_float32_compute_switches_every_layer_and_restores(mixed_bfloat16):
    model = nested_model()
    x = np.ones((2, 4), "float32")
    assert model(x).dtype == "bfloat16"
    layers = [model, *model._flatten_layers(include_self=False)]
    before = [layer.dtype_policy for layer in layers]
    with keras_private.float32_compute(model):
        assert model(x).dtype == "float32"
        assert all(layer.compute_dtype == "float32" for layer in layers)
    assert model(x).dtype == "bfloat16"
    assert [layer.dtype_policy for layer in layers] == before
