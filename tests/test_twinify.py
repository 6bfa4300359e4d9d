"""twinify / untwin on keras.applications.ResNet50 and a small Sequential model."""

import keras
import numpy as np
import pytest

import twins_tf
from twins_tf import bn_wings
from twins_tf.layers import BatchNormalization, TwinBatchNormalization


def randomize_batchnorms(model, rng):
    """Gives every BN non-trivial weights so that copying mistakes show up in outputs."""
    for layer in model._flatten_layers(include_self=False):
        if type(layer) is keras.layers.BatchNormalization:
            c = layer.moving_mean.shape[0]
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, c),
                    rng.normal(0, 0.1, c),
                    rng.normal(0, 0.1, c),
                    rng.uniform(0.5, 1.5, c),
                ]
            )


def batchnorms(model):
    return [l for l in model._flatten_layers(include_self=False) if bn_wings.is_plain_bn(l)]


def check_twin_of(plain, twin, momentum=0.9):
    """`twin` is `plain` with every BN a twin layer: both wings from the BN, the BN's epsilon,
    `momentum` (None: the BN's own), every other weight unchanged."""
    assert not batchnorms(twin)
    twin_layers = {
        l.name: l
        for l in twin._flatten_layers(include_self=False)
        if isinstance(l, TwinBatchNormalization)
    }
    assert len(twin_layers) == len(batchnorms(plain)) > 0
    for bn in batchnorms(plain):
        layer = twin_layers[bn.name]
        gamma, beta, mean, var = [np.asarray(w) for w in bn.weights]
        for wing in (
            ("gamma", "beta", "moving_mean", "moving_variance"),
            ("frozen_gamma", "frozen_beta", "frozen_mean", "frozen_variance"),
        ):
            for name, want in zip(wing, (gamma, beta, mean, var)):
                np.testing.assert_array_equal(getattr(layer, name), want)
        want_momentum = bn.momentum if momentum is None else momentum
        assert (layer.epsilon, layer.momentum) == (bn.epsilon, want_momentum)
    plain_other = {
        l.name: l
        for l in plain._flatten_layers(include_self=False)
        if not bn_wings.is_plain_bn(l) and l.weights
    }
    for name, layer in plain_other.items():
        for a, b in zip(layer.weights, twin.get_layer(name).weights):
            np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def resnet50():
    model = keras.applications.ResNet50(weights=None, input_shape=(64, 64, 3), classes=10)
    randomize_batchnorms(model, np.random.default_rng(1))
    return model


def test_resnet50_twin_copies_weights_and_matches_inference(resnet50):
    twin = twins_tf.twinify(resnet50)
    check_twin_of(resnet50, twin)
    x = np.random.default_rng(2).uniform(0, 255, (2, 64, 64, 3)).astype(np.float32)
    np.testing.assert_allclose(
        twin(x, training=False), resnet50(x, training=False), rtol=1e-5, atol=1e-6
    )


def test_twinify_takes_the_specs_momentum_unless_told_otherwise(resnet50):
    """keras.applications builds its BN with Keras's momentum 0.99; TWINS's EMA is
    0.9 * old + 0.1 * batch (spec §1), so a twinified model gets 0.9 by default, the source's
    momentum with momentum=None, any other on request, and its Adaptive wing's EMA runs
    with it."""
    sources = {bn.momentum for bn in batchnorms(resnet50)}
    assert sources == {0.99}
    check_twin_of(resnet50, twins_tf.twinify(resnet50))
    check_twin_of(resnet50, twins_tf.twinify(resnet50, momentum=None), momentum=None)
    check_twin_of(resnet50, twins_tf.twinify(resnet50, momentum=0.5), momentum=0.5)

    # The EMA itself: one twin training forward moves the Adaptive wing's moving mean a
    # tenth of the way from its start to the batch mean of its half.
    twin = twins_tf.twinify(resnet50)
    layer = twin.get_layer("conv1_bn")
    start = np.asarray(layer.moving_mean)
    x = np.random.default_rng(8).uniform(0, 255, (4, 64, 64, 3)).astype(np.float32)
    conv = keras.Model(twin.inputs, twin.get_layer("conv1_conv").output)(x).numpy()
    layer(conv, training=True)
    want = 0.9 * start + 0.1 * conv[2:].astype(np.float64).mean((0, 1, 2))
    # float32 sums of 2048 values per channel: relative error up to ~2048 * 2^-24 = 1.2e-4.
    np.testing.assert_allclose(layer.moving_mean, want, rtol=2e-4, atol=1e-4)


def test_resnet50_untwin_keeps_adaptive_wing_after_training(resnet50):
    twin = twins_tf.twinify(resnet50)
    rng = np.random.default_rng(3)
    for layer in twin._flatten_layers(include_self=False):
        if isinstance(layer, TwinBatchNormalization):  # make the wings differ
            c = layer.gamma.shape[0]
            layer.gamma.assign(rng.uniform(0.5, 1.5, c))
            layer.frozen_beta.assign(rng.normal(0, 0.1, c))
    x = rng.uniform(0, 255, (4, 64, 64, 3)).astype(np.float32)
    twin(x, training=True)  # moves the adaptive statistics away from the frozen ones
    plain = twins_tf.untwin(twin)
    assert not any(
        isinstance(l, TwinBatchNormalization) for l in plain._flatten_layers(include_self=False)
    )
    assert {type(bn) for bn in batchnorms(plain)} == {BatchNormalization}  # PyTorch's BN step
    for bn in batchnorms(plain):
        layer = twin.get_layer(bn.name)
        for got, want in zip(
            bn.weights, (layer.gamma, layer.beta, layer.moving_mean, layer.moving_variance)
        ):
            np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(
        plain(x, training=False), twin(x, training=False), rtol=1e-5, atol=1e-6
    )


def small_model(rng):
    model = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(4, 3, use_bias=False),
            keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5),
            keras.layers.ReLU(),
            keras.layers.BatchNormalization(center=False),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(3),
        ]
    )
    randomize_batchnorms_partial(model, rng)
    return model


def randomize_batchnorms_partial(model, rng):
    for layer in batchnorms(model):
        layer.set_weights(
            [
                rng.uniform(0.5, 1.5, w.shape)
                if "var" in w.name or "gamma" in w.name
                else rng.normal(0, 0.3, w.shape)
                for w in layer.weights
            ]
        )


def test_small_sequential_round_trip_and_numpy_reference():
    rng = np.random.default_rng(4)
    model = small_model(rng)
    twin = twins_tf.twinify(model)
    x = rng.normal(size=(6, 8, 8, 3)).astype(np.float32)
    np.testing.assert_allclose(twins_tf.untwin(twin)(x), model(x), rtol=1e-5, atol=1e-6)

    # Independent numpy forward of the twin training pass through the first BN.
    conv = model.layers[0](x).numpy()
    gamma, beta, mean, var = [np.asarray(w) for w in model.layers[1].weights]
    half = 3
    frozen = gamma * (conv[:half] - mean) / np.sqrt(var + 1e-5) + beta
    adaptive_in = conv[half:].astype(np.float64)
    mu, v = adaptive_in.mean((0, 1, 2)), adaptive_in.var((0, 1, 2))
    adaptive = gamma * (adaptive_in - mu) / np.sqrt(v + 1e-5) + beta
    stem = keras.Model(twin.inputs[0], twin.layers[1].output)
    np.testing.assert_allclose(
        stem(x, training=True), np.concatenate([frozen, adaptive]), rtol=1e-4, atol=1e-5
    )

    # center=False BN: beta absent in the BN, zeros in both wings.
    second = twin.layers[3]
    np.testing.assert_array_equal(second.beta, np.zeros(4))
    np.testing.assert_array_equal(second.frozen_beta, np.zeros(4))


def test_nested_model_inside_functional():
    rng = np.random.default_rng(5)
    inner = small_model(rng)
    inputs = keras.Input((8, 8, 3))
    outer = keras.Model(inputs, keras.layers.Dense(2)(inner(inputs)))
    twin = twins_tf.twinify(outer)
    assert len([l for l in twin._flatten_layers() if isinstance(l, TwinBatchNormalization)]) == 2
    x = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
    np.testing.assert_allclose(
        twin(x, training=False), outer(x, training=False), rtol=1e-5, atol=1e-6
    )


def test_bad_input():
    class Subclassed(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(TypeError, match="functional or Sequential"):
        twins_tf.twinify(Subclassed())
    plain = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="no BatchNormalization"):
        twins_tf.twinify(plain)
    with pytest.raises(ValueError, match="no TwinBatchNormalization"):
        twins_tf.untwin(plain)


# --- twins_tf.bn_wings: the one plain BN <-> twin wings mapping ------------------------------
def _built(layer, channels=3):
    layer.build((None, 2, 2, channels))
    return layer


def _fill(layer, names, rng):
    values = {}
    for name in names:
        variable = getattr(layer, name)
        values[name] = rng.uniform(0.5, 1.5, variable.shape).astype(np.float32)
        variable.assign(values[name])
    return values


def _apply(assignments):
    for variable, value in assignments:
        variable.assign(value)


def test_bn_assignments_map_each_direction():
    rng = np.random.default_rng(6)
    adaptive = ("gamma", "beta", "moving_mean", "moving_variance")
    frozen = ("frozen_gamma", "frozen_beta", "frozen_mean", "frozen_variance")
    source_twin = _built(TwinBatchNormalization())
    twin_values = _fill(source_twin, adaptive + frozen, rng)
    source_plain = _built(keras.layers.BatchNormalization())
    plain_values = _fill(source_plain, adaptive, rng)

    # twin -> twin: wing by wing (the Frozen wing from the Frozen wing, not the Adaptive one).
    target = _built(TwinBatchNormalization())
    _apply(bn_wings.bn_assignments(source_twin, target))
    for name in adaptive + frozen:
        np.testing.assert_array_equal(getattr(target, name), twin_values[name])
    # twin -> plain: the Adaptive wing.
    target = _built(keras.layers.BatchNormalization())
    _apply(bn_wings.bn_assignments(source_twin, target))
    for name in adaptive:
        np.testing.assert_array_equal(getattr(target, name), twin_values[name])
    # plain -> twin: both wings from the BN.
    target = _built(TwinBatchNormalization())
    _apply(bn_wings.bn_assignments(source_plain, target))
    for a, f in zip(adaptive, frozen):
        np.testing.assert_array_equal(getattr(target, a), plain_values[a])
        np.testing.assert_array_equal(getattr(target, f), plain_values[a])
    # plain -> plain.
    target = _built(keras.layers.BatchNormalization())
    _apply(bn_wings.bn_assignments(source_plain, target))
    for name in adaptive:
        np.testing.assert_array_equal(getattr(target, name), plain_values[name])


def test_wing_variables_and_bad_input():
    twin = _built(TwinBatchNormalization())
    assert bn_wings.wing_variables(twin, "moving_variance") == [
        twin.moving_variance,
        twin.frozen_variance,
    ]
    plain = _built(keras.layers.BatchNormalization())
    assert bn_wings.wing_variables(plain, "beta") == [plain.beta]
    with pytest.raises(ValueError, match="not a BatchNormalization weight"):
        bn_wings.wing_variables(twin, "kernel")
    no_scale = _built(keras.layers.BatchNormalization(scale=False))
    with pytest.raises(ValueError, match="without gamma .*scale=True"):
        bn_wings.bn_assignments(twin, no_scale)
    with pytest.raises(TypeError, match="not a \\(twin\\) BN layer"):
        bn_wings.bn_assignments(_built(keras.layers.Dense(2)), twin)


def test_replacement_layers_keep_the_configuration():
    bn = keras.layers.BatchNormalization(
        axis=1, momentum=0.8, epsilon=1e-3, synchronized=True, name="bn_x", dtype="mixed_float16"
    )
    twin = bn_wings.twin_from_plain(bn)
    assert isinstance(twin, TwinBatchNormalization)
    assert (twin.axis, twin.momentum, twin.epsilon, twin.synchronized, twin.name) == (
        1,
        0.8,
        1e-3,
        True,
        "bn_x",
    )
    assert twin.dtype_policy.name == "mixed_float16"
    assert bn_wings.twin_from_plain(bn, momentum=0.5).momentum == 0.5
    plain = bn_wings.plain_from_twin(twin)
    # twins_tf's plain BN, so a plain method training an untwinned model keeps PyTorch's step
    assert type(plain) is BatchNormalization
    assert (plain.axis, plain.momentum, plain.epsilon, plain.synchronized, plain.name) == (
        1,
        0.8,
        1e-3,
        True,
        "bn_x",
    )
    assert plain.dtype_policy.name == "mixed_float16"


def test_graph_models_are_told_by_public_classes():
    inputs = keras.Input((3,))
    functional = keras.Model(inputs, keras.layers.Dense(2)(inputs))

    class FunctionalSubclass(keras.Model):  # keras-hub style: a subclass built from a graph
        def __init__(self):
            x = keras.Input((3,))
            super().__init__(x, keras.layers.Dense(2)(x))

    class Subclassed(keras.Model):
        def call(self, x):
            return x

    assert bn_wings.is_graph_model(functional)
    assert bn_wings.is_graph_model(FunctionalSubclass())
    assert bn_wings.is_graph_model(keras.Sequential([keras.layers.Dense(2)]))
    assert not bn_wings.is_graph_model(Subclassed())
    assert not bn_wings.is_graph_model(keras.layers.Dense(2))


def test_nested_layers_descend_into_models_and_list_shared_layers_once():
    rng = np.random.default_rng(7)
    inner = small_model(rng)
    shared = keras.layers.Dense(3, name="shared")
    wrapper = keras.Sequential([keras.Input((3,)), shared], name="wrapper")  # holds `shared`
    inputs = keras.Input((8, 8, 3))
    features = inner(inputs)
    outer = keras.Model(inputs, keras.layers.Add()([shared(features), wrapper(features)]))
    names = [layer.name for layer in bn_wings.nested_layers(outer)]
    assert len(names) == len(set(names))  # `shared` sits in outer and in wrapper: listed once
    assert {inner.name, "wrapper", "shared"} <= set(names)
    assert {layer.name for layer in inner.layers} <= set(names)
    assert sum(1 for l in bn_wings.nested_layers(outer) if bn_wings.is_plain_bn(l)) == 2


def test_build_resnets_fused_plain_bn_twins_and_untwins():
    """build_resnet(twin=False) holds twins_tf's own BatchNormalization:
    twinify must still find every BN (bn_wings.is_plain_bn), fill both wings from it, and
    untwin give back the same plain BN with the Adaptive wing."""
    from twins_tf.models import build_resnet

    plain = build_resnet("resnet18", 4, twin=False, input_shape=(16, 16, 3))
    fused = [l for l in plain.layers if type(l) is BatchNormalization]
    assert len(fused) == 20
    rng = np.random.default_rng(4)
    for layer in fused:
        c = layer.moving_mean.shape[0]
        layer.set_weights(
            [
                rng.uniform(0.5, 1.5, c),
                rng.normal(0, 0.1, c),
                rng.normal(0, 0.1, c),
                rng.uniform(0.5, 1.5, c),
            ]
        )
    twin = twins_tf.twinify(plain)
    for layer in fused:
        got = twin.get_layer(layer.name)
        assert isinstance(got, TwinBatchNormalization)
        for name, want in zip(bn_wings.PLAIN, layer.weights):
            np.testing.assert_array_equal(getattr(got, name), want)
            np.testing.assert_array_equal(getattr(got, bn_wings.FROZEN_OF[name]), want)
    x = rng.uniform(0, 1, (2, 16, 16, 3)).astype(np.float32)
    np.testing.assert_allclose(
        twin(x, training=False), plain(x, training=False), rtol=1e-5, atol=1e-6
    )
    back = twins_tf.untwin(twin)
    assert sum(type(l) is BatchNormalization for l in back.layers) == 20
    np.testing.assert_allclose(
        back(x, training=False), plain(x, training=False), rtol=1e-5, atol=1e-6
    )
