"""Pins the private tf.data and Keras behaviour the trainer relies on (keras_private,
"serialisation and the trainer" section): a TensorFlow or Keras upgrade that changes it fails
here, not in a user's first epoch.

`dataset_batch_sizes` is checked against the sizes the dataset really yields (iterating it),
`flatten_layers` against layers built into known places.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from twins_tf.platform import keras_private


def _examples(count):
    return tf.data.Dataset.from_tensor_slices((np.zeros((count, 2), "float32"), np.arange(count)))


def _real_sizes(dataset, limit=50):
    return {int(tf.shape(x)[0]) for x, _ in dataset.take(limit)}


@pytest.mark.parametrize(
    "build",
    [
        lambda: _examples(7).batch(4),
        lambda: _examples(8).batch(4),
        lambda: _examples(7).batch(4, drop_remainder=True),
        lambda: _examples(7).batch(4, num_parallel_calls=2),
        lambda: _examples(7).batch(4).prefetch(2),
        lambda: _examples(7).batch(4).map(lambda x, y: (x, y), num_parallel_calls=2),
        lambda: _examples(7).batch(4).map(lambda x, y: (x, y)).with_options(tf.data.Options()),
        lambda: _examples(7).shuffle(7, seed=0).batch(4).repeat(2),
        lambda: _examples(7).batch(4).shuffle(2, seed=0).cache(),
        lambda: _examples(3).batch(4),
        lambda: _examples(7).repeat().batch(4),
        lambda: _examples(9).map(lambda x, y: (x, y)).padded_batch(4),
        lambda: _examples(7).batch(tf.constant(4, tf.int64) + 0),
    ],
    ids=[
        "tail",
        "exact",
        "drop",
        "parallel",
        "prefetch",
        "map",
        "options",
        "repeat",
        "shuffle_cache",
        "short",
        "infinite",
        "padded",
        "tensor_size",
    ],
)
def test_dataset_batch_sizes_are_the_sizes_the_dataset_yields(build):
    dataset = build()
    assert keras_private.dataset_batch_sizes(dataset) == _real_sizes(dataset)


def test_dataset_batch_sizes_is_none_when_the_structure_does_not_tell():
    assert keras_private.dataset_batch_sizes(_examples(7)) is None  # not batched
    assert (
        keras_private.dataset_batch_sizes(_examples(7).batch(4).unbatch().batch(3)) is None
    )  # unknown cardinality
    assert (
        keras_private.dataset_batch_sizes(_examples(7).filter(lambda x, y: True).batch(4)) is None
    )  # unknown cardinality
    # take() is not size-preserving: it may drop the odd batch, so no answer
    assert keras_private.dataset_batch_sizes(_examples(7).batch(4).take(1)) is None


def test_flatten_layers_reaches_nested_models_and_layers_inside_layers():
    class Block(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.inner = keras.layers.Dense(3, name="inside_block")

        def call(self, x):
            return self.inner(x)

    inner_input = keras.Input((3,))
    inner = keras.Model(
        inner_input, keras.layers.Dense(3, name="inside_model")(inner_input), name="inner"
    )
    inputs = keras.Input((3,))
    outputs = keras.layers.Dense(2, name="head")(inner(Block(name="block")(inputs)))
    model = keras.Model(inputs, outputs)
    names = [layer.name for layer in keras_private.flatten_layers(model)]
    assert {"block", "inside_block", "inner", "inside_model", "head"} <= set(names)
    assert model.name not in names and len(names) == len(set(names))
    assert "inside_block" not in [layer.name for layer in model.layers]  # what public misses
