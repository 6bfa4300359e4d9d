"""Pins the Keras weights-file behaviour keras_private's models-and-weights part uses.

If an upgrade of Keras changes how `save_weights` names its HDF5 groups or how `load_weights`
reports a file that does not fit, these fail first, rather than `load_pretrained` misreading
a file's architecture deep inside a training run.  The expected group names and shapes are
written out by hand from the layers' definitions, not computed by the code under test.
"""

import h5py
import keras
import numpy as np
import pytest

from twins_tf.layers import TwinBatchNormalization
from twins_tf.platform import keras_private


def _model(convs, *, twin=True):
    """Input 4x4x3 -> `convs` 1x1 convs (2, 4, 4, ... filters) -> BN -> Dense(5)."""
    inputs = keras.Input((4, 4, 3))
    x = inputs
    for k in range(convs):
        x = keras.layers.Conv2D(2 if k == 0 else 4, 1)(x)
    x = (TwinBatchNormalization() if twin else keras.layers.BatchNormalization())(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(5)(x))


@pytest.fixture()
def saved(tmp_path):
    model = _model(3)
    path = tmp_path / "m.weights.h5"
    model.save_weights(path)
    return model, path


def test_group_names_are_snake_case_class_names_with_counters(saved):
    _, path = saved
    with h5py.File(path, "r") as f:
        groups = {name for name in f["layers"] if len(f["layers"][name].get("vars", ()))}
        assert groups == {"conv2d", "conv2d_1", "conv2d_2", "twin_batch_normalization", "dense"}
        assert f["layers/conv2d_1/vars/0"].shape == (1, 1, 2, 4)  # layer 1's kernel


def test_saved_layer_shapes_in_save_order(saved):
    _, path = saved
    with h5py.File(path, "r") as f:
        convs = keras_private.saved_layer_shapes(f, keras.layers.Conv2D)
        assert convs == [
            [(1, 1, 3, 2), (2,)],
            [(1, 1, 2, 4), (4,)],
            [(1, 1, 4, 4), (4,)],
        ]
        assert keras_private.saved_layer_shapes(f, keras.layers.Dense) == [[(4, 5), (5,)]]
        assert keras_private.saved_layer_shapes(f, TwinBatchNormalization) == [[(4,)] * 8]
        assert keras_private.saved_layer_shapes(f, keras.layers.BatchNormalization) == []


def test_a_plain_bn_file_has_no_twin_groups(tmp_path):
    path = tmp_path / "plain.weights.h5"
    _model(1, twin=False).save_weights(path)
    with h5py.File(path, "r") as f:
        assert keras_private.saved_layer_shapes(f, TwinBatchNormalization) == []
        assert keras_private.saved_layer_shapes(f, keras.layers.BatchNormalization) == [[(2,)] * 4]


def test_load_weights_collecting_skips(saved, tmp_path):
    source, path = saved
    rng = np.random.default_rng(0)
    for variable in source.weights:
        variable.assign(rng.normal(size=variable.shape).astype(np.float32))
    source.save_weights(path)
    expected = [v.numpy() for v in source.weights]

    same = _model(3)
    assert keras_private.load_weights_collecting_skips(same, path) == []
    for got, want in zip(same.weights, expected):
        np.testing.assert_array_equal(got.numpy(), want)

    # A model with a layer the file lacks: Keras refuses with ValueError.
    with pytest.raises(ValueError, match="could not be loaded"):
        keras_private.load_weights_collecting_skips(_model(4), path)

    # A model with fewer layers than the file: Keras loads what it finds and says nothing,
    # which is why load_pretrained compares the file's conv count with the arch's first.
    fewer = _model(2)
    assert keras_private.load_weights_collecting_skips(fewer, path) == []
