"""TwinBatchNormalization against a numpy re-implementation of spec §1-2, the plain
BatchNormalization against PyTorch's own nn.BatchNorm1d/2d/3d."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf
import torch

from twins_tf.layers import TwinBatchNormalization, set_twin_mode

EPS = 1e-5
MOMENTUM = 0.9
CHANNELS = 3
WEIGHT_NAMES = (
    "gamma",
    "beta",
    "moving_mean",
    "moving_variance",
    "frozen_gamma",
    "frozen_beta",
    "frozen_mean",
    "frozen_variance",
)


# --- the numpy reference (spec §1-2) -------------------------------------------------------
def np_bn(x, mean, var, gamma, beta):
    return gamma * (x - mean) / np.sqrt(var + EPS) + beta


def np_twin_train(x, p):
    """Returns (output, new moving mean, new moving variance) of one training forward."""
    half = x.shape[0] // 2
    frozen = np_bn(
        x[:half], p["frozen_mean"], p["frozen_variance"], p["frozen_gamma"], p["frozen_beta"]
    )
    xa = x[half:].astype(np.float64)
    axes = tuple(range(x.ndim - 1))
    mean, var = xa.mean(axes), xa.var(axes)
    n = xa.size / xa.shape[-1]
    adaptive = np_bn(xa, mean, var, p["gamma"], p["beta"])
    new_mean = MOMENTUM * p["moving_mean"] + (1 - MOMENTUM) * mean
    new_var = MOMENTUM * p["moving_variance"] + (1 - MOMENTUM) * var * n / (n - 1)
    return np.concatenate([frozen, adaptive]), new_mean, new_var


def random_params(rng):
    p = {
        name: rng.normal(size=CHANNELS)
        for name in ("gamma", "beta", "frozen_gamma", "frozen_beta", "moving_mean", "frozen_mean")
    }
    p["moving_variance"] = rng.uniform(0.5, 2.0, CHANNELS)
    p["frozen_variance"] = rng.uniform(0.5, 2.0, CHANNELS)
    return {k: v.astype(np.float32) for k, v in p.items()}


def make_layer(params, input_shape=(None, 5, 5, CHANNELS), **kwargs):
    layer = TwinBatchNormalization(**kwargs)
    layer.build(input_shape)
    for name in WEIGHT_NAMES:
        getattr(layer, name).assign(params[name])
    return layer


def layer_values(layer):
    return {name: np.asarray(getattr(layer, name)) for name in WEIGHT_NAMES}


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_training_forward_matches_numpy(rng):
    p = random_params(rng)
    layer = make_layer(p)
    x = (rng.normal(size=(8, 5, 5, CHANNELS)) * 2 + 1).astype(np.float32)
    y = layer(x, training=True)
    want, want_mean, want_var = np_twin_train(x, p)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.moving_mean, want_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.moving_variance, want_var, rtol=1e-5, atol=1e-6)


def test_many_steps_ema_and_frozen_statistics_untouched(rng):
    p = random_params(rng)
    layer = make_layer(p)
    ref = dict(p)
    for _ in range(25):
        x = (rng.normal(size=(6, 5, 5, CHANNELS)) * 3 - 1).astype(np.float32)
        layer(x, training=True)
        _, ref["moving_mean"], ref["moving_variance"] = np_twin_train(x, ref)
    got = layer_values(layer)
    np.testing.assert_allclose(got["moving_mean"], ref["moving_mean"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["moving_variance"], ref["moving_variance"], rtol=1e-5)
    for name in ("frozen_mean", "frozen_variance", "frozen_gamma", "frozen_beta"):
        np.testing.assert_array_equal(got[name], p[name])


def test_inference_uses_adaptive_wing_with_moving_statistics(rng):
    p = random_params(rng)
    layer = make_layer(p)
    x = rng.normal(size=(5, 5, 5, CHANNELS)).astype(np.float32)  # odd is fine in inference
    want = np_bn(x, p["moving_mean"], p["moving_variance"], p["gamma"], p["beta"])
    np.testing.assert_allclose(layer(x, training=False), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(layer.moving_mean, p["moving_mean"])  # no update


def test_frozen_only_mode(rng):
    p = random_params(rng)
    layer = make_layer(p, mode="frozen")
    x = rng.normal(size=(4, 5, 5, CHANNELS)).astype(np.float32)
    want = np_bn(x, p["frozen_mean"], p["frozen_variance"], p["frozen_gamma"], p["frozen_beta"])
    for training in (True, False):
        np.testing.assert_allclose(layer(x, training=training), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(layer.moving_mean, p["moving_mean"])


def test_set_twin_mode_switches_a_model(rng):
    p = random_params(rng)
    inputs = keras.Input((5, 5, CHANNELS))
    model = keras.Model(inputs, TwinBatchNormalization(name="bn")(inputs))
    for name in WEIGHT_NAMES:
        getattr(model.get_layer("bn"), name).assign(p[name])
    assert set_twin_mode(model, "frozen") == 1
    x = rng.normal(size=(2, 5, 5, CHANNELS)).astype(np.float32)
    want = np_bn(x, p["frozen_mean"], p["frozen_variance"], p["frozen_gamma"], p["frozen_beta"])
    np.testing.assert_allclose(model(x, training=False), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="mode must be one of"):
        set_twin_mode(model, "both")


def test_gradients_reach_each_wing_only_from_its_own_half(rng):
    p = random_params(rng)
    layer = make_layer(p)
    x = rng.normal(size=(8, 5, 5, CHANNELS)).astype(np.float32)
    upstream = rng.normal(size=x.shape).astype(np.float32)
    variables = [layer.gamma, layer.beta, layer.frozen_gamma, layer.frozen_beta]
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(x, training=True) * upstream)
    g_gamma, g_beta, g_fgamma, g_fbeta = [np.asarray(g) for g in tape.gradient(loss, variables)]

    half, axes = 4, (0, 1, 2)
    xhat_f = (x[:half] - p["frozen_mean"]) / np.sqrt(p["frozen_variance"] + EPS)
    xa = x[half:].astype(np.float64)
    xhat_a = (xa - xa.mean(axes)) / np.sqrt(xa.var(axes) + EPS)
    np.testing.assert_allclose(g_fgamma, (upstream[:half] * xhat_f).sum(axes), rtol=1e-4)
    np.testing.assert_allclose(g_fbeta, upstream[:half].sum(axes), rtol=1e-4)
    np.testing.assert_allclose(g_gamma, (upstream[half:] * xhat_a).sum(axes), rtol=1e-4)
    np.testing.assert_allclose(g_beta, upstream[half:].sum(axes), rtol=1e-4)

    # A loss on the first half only gives the Adaptive wing no gradient, and vice versa.
    for rows, silent in ((slice(0, half), variables[:2]), (slice(half, None), variables[2:])):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(x, training=True)[rows] * upstream[rows])
        for g in tape.gradient(loss, silent):
            assert g is None or not np.any(np.asarray(g))


def test_odd_training_batch_is_a_clear_error(rng):
    layer = make_layer(random_params(rng), name="stem_bn")
    x = np.zeros((7, 5, 5, CHANNELS), np.float32)
    with pytest.raises(ValueError, match=r"'stem_bn' got a training batch of size 7"):
        layer(x, training=True)

    @tf.function(input_signature=[tf.TensorSpec([None, 5, 5, CHANNELS])])
    def unknown_batch(x):
        return layer(x, training=True)

    with pytest.raises(tf.errors.InvalidArgumentError, match="stem_bn"):
        unknown_batch(x)


def test_channels_first_axis(rng):
    p = random_params(rng)
    layer = make_layer(p, input_shape=(None, CHANNELS, 4, 4), axis=1)
    x = rng.normal(size=(4, CHANNELS, 4, 4)).astype(np.float32)
    y = layer(x, training=True)
    want, want_mean, _ = np_twin_train(np.moveaxis(x, 1, -1), p)
    np.testing.assert_allclose(np.moveaxis(np.asarray(y), 1, -1), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.moving_mean, want_mean, rtol=1e-5, atol=1e-6)


def small_twin_model(p):
    inputs = keras.Input((5, 5, CHANNELS))
    outputs = TwinBatchNormalization(name="bn")(inputs)
    model = keras.Model(inputs, outputs)
    for name in WEIGHT_NAMES:
        getattr(model.get_layer("bn"), name).assign(p[name])
    return model


def test_keras_file_round_trip(rng, tmp_path):
    p = random_params(rng)
    model = small_twin_model(p)
    model.get_layer("bn").mode = "twin"
    path = os.path.join(tmp_path, "twin.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    layer = loaded.get_layer("bn")
    assert isinstance(layer, TwinBatchNormalization)
    assert (layer.momentum, layer.epsilon) == (MOMENTUM, EPS)
    x = rng.normal(size=(4, 5, 5, CHANNELS)).astype(np.float32)
    np.testing.assert_array_equal(loaded(x, training=False), model(x, training=False))
    np.testing.assert_array_equal(loaded(x, training=True), model(x, training=True))
    np.testing.assert_array_equal(layer.moving_mean, model.get_layer("bn").moving_mean)


def test_xla_matches_numpy(rng):
    p = random_params(rng)
    layer = make_layer(p)
    x = rng.normal(size=(8, 5, 5, CHANNELS)).astype(np.float32)

    @tf.function(jit_compile=True)
    def step(x):
        return layer(x, training=True), layer(x, training=False)

    y_train, y_infer = step(x)
    want, want_mean, want_var = np_twin_train(x, p)
    np.testing.assert_allclose(y_train, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.moving_mean, want_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.moving_variance, want_var, rtol=1e-5, atol=1e-6)
    want_infer = np_bn(x, want_mean, want_var, p["gamma"], p["beta"])
    np.testing.assert_allclose(y_infer, want_infer, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_keeps_statistics_in_float32(rng, policy):
    p = random_params(rng)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        layer = make_layer(p)
    finally:
        keras.config.set_dtype_policy(previous)
    x = rng.normal(size=(8, 5, 5, CHANNELS)).astype(np.float32)
    y = layer(tf.cast(x, layer.compute_dtype), training=True)
    assert y.dtype == layer.compute_dtype != "float32"
    for name in WEIGHT_NAMES:
        assert getattr(layer, name).dtype == "float32"
    # Input rounding to 16 bits is the only loss of precision before the statistics.
    x16 = np.asarray(tf.cast(tf.cast(x, layer.compute_dtype), tf.float32))
    want, want_mean, want_var = np_twin_train(x16, p)
    np.testing.assert_allclose(layer.moving_mean, want_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.moving_variance, want_var, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(tf.cast(y, tf.float32)), want, rtol=2e-2, atol=2e-2)


def mirrored_step(layer, strategy, x):
    """Runs one training forward under `strategy`, each replica on its slice of `x`."""
    per_replica = x.shape[0] // strategy.num_replicas_in_sync

    def value_fn(ctx):
        i = ctx.replica_id_in_sync_group
        return tf.constant(x[i * per_replica : (i + 1) * per_replica])

    inputs = strategy.experimental_distribute_values_from_function(value_fn)
    outputs = strategy.run(lambda t: layer(t, training=True), args=(inputs,))
    return np.concatenate([np.asarray(o) for o in strategy.experimental_local_results(outputs)])


@pytest.mark.parametrize("synchronized", [False, True])
def test_mirrored_strategy_splits_per_replica_and_keeps_statistics_equal(rng, synchronized):
    # Reduction through one device: collective ops of several strategies over the same
    # devices in one process clash (tensorflow/tensorflow#62790), and test_train's binary run
    # needs them.
    strategy = tf.distribute.MirroredStrategy(
        ["/cpu:0", "/cpu:1"], cross_device_ops=tf.distribute.ReductionToOneDevice()
    )
    p = random_params(rng)
    with strategy.scope():
        layer = make_layer(p, synchronized=synchronized)
    ref = dict(p)
    for _ in range(3):
        x = (rng.normal(size=(8, 5, 5, CHANNELS)) * 2 + 0.5).astype(np.float32)
        y = mirrored_step(layer, strategy, x)
        replicas = [x[:4], x[4:]]  # each replica: 2 frozen rows, then 2 adaptive rows
        if synchronized:
            adaptive = np.concatenate([r[2:] for r in replicas]).astype(np.float64)
            axes = (0, 1, 2)
            mean, var = adaptive.mean(axes), adaptive.var(axes)
            n = adaptive.size / CHANNELS
            want = np.concatenate(
                [
                    np.concatenate(
                        [
                            np_bn(
                                r[:2],
                                p["frozen_mean"],
                                p["frozen_variance"],
                                p["frozen_gamma"],
                                p["frozen_beta"],
                            ),
                            np_bn(r[2:], mean, var, p["gamma"], p["beta"]),
                        ]
                    )
                    for r in replicas
                ]
            )
            ref["moving_mean"] = MOMENTUM * ref["moving_mean"] + (1 - MOMENTUM) * mean
            ref["moving_variance"] = MOMENTUM * ref["moving_variance"] + (
                1 - MOMENTUM
            ) * var * n / (n - 1)
        else:
            # Each replica behaves like the plain call on its own slice; the moving
            # statistics are the mean of the replicas' EMA updates.
            results = [np_twin_train(r, ref) for r in replicas]
            want = np.concatenate([r[0] for r in results])
            ref["moving_mean"] = np.mean([r[1] for r in results], axis=0)
            ref["moving_variance"] = np.mean([r[2] for r in results], axis=0)
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    for name in ("moving_mean", "moving_variance"):
        copies = [
            np.asarray(v) for v in strategy.experimental_local_results(getattr(layer, name).value)
        ]
        np.testing.assert_array_equal(copies[0], copies[1])
        np.testing.assert_allclose(copies[0], ref[name], rtol=1e-5, atol=1e-6)
    for name in ("frozen_mean", "frozen_variance"):
        np.testing.assert_array_equal(np.asarray(getattr(layer, name)), p[name])


def test_bad_arguments():
    with pytest.raises(ValueError, match="mode must be one of"):
        TwinBatchNormalization(mode="left")
    with pytest.raises(ValueError, match="momentum"):
        TwinBatchNormalization(momentum=1.5)


def _op_types(function, *args):
    graph = function.get_concrete_function(*args).graph
    types = {op.type for op in graph.get_operations()}
    for f in graph.as_graph_def().library.function:  # gradient functions
        types |= {n.op for n in f.node_def}
    return types


def test_batch_statistics_run_tensorflows_fused_kernel_forward_and_backward(rng):
    """The Adaptive wing's batch statistics are one FusedBatchNormV3 with its fused
    gradient, not Keras's composed moments + batch_normalization graph; inference stays the
    affine map (PyTorch's eval arithmetic, a one-multiplication backward for attacks)."""
    layer = make_layer(random_params(rng))
    x = tf.constant(rng.normal(size=(4, 5, 5, CHANNELS)).astype(np.float32))

    @tf.function
    def train(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.square(layer(x, training=True)))
        return tape.gradient(loss, [x] + layer.trainable_weights)

    @tf.function
    def infer(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.square(layer(x, training=False)))
        return tape.gradient(loss, x)

    types = _op_types(train, x)
    assert {"FusedBatchNormV3", "FusedBatchNormGradV3"} <= types, sorted(types)
    assert not {"Mean", "SquaredDifference", "RsqrtGrad"} & types, sorted(types)
    # The batch split is one Split whose gradient is a concatenation, not two slices whose
    # gradients write zero-padded batch-sized tensors (benchmarks/profile_step.py: 3 %).
    assert "Split" in types and "StridedSliceGrad" not in types, sorted(types)
    types = _op_types(infer, x)
    assert not {"FusedBatchNormV3", "FusedBatchNormGradV3", "Mean"} & types, sorted(types)


@pytest.mark.parametrize("shape", [(6, CHANNELS), (4, 7, CHANNELS), (4, 2, 3, 2, CHANNELS)])
def test_other_ranks_match_numpy(rng, shape):
    """Dense (rank 2), sequence (rank 3) and volume (rank 5) inputs go through the fused
    kernel reshaped to rank 4; the numbers must not change."""
    p = random_params(rng)
    layer = make_layer(p, input_shape=(None,) + shape[1:])
    x = rng.normal(size=shape).astype(np.float32)
    y = layer(x, training=True)
    want, want_mean, want_var = np_twin_train(x, p)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.moving_mean, want_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.moving_variance, want_var, rtol=1e-5, atol=1e-6)
    want_infer = np_bn(x, want_mean, want_var, p["gamma"], p["beta"])
    np.testing.assert_allclose(layer(x, training=False), want_infer, rtol=1e-4, atol=1e-5)


def test_one_element_per_channel_feeds_a_zero_variance_to_the_ema(rng):
    """A Dense-like batch of 2 leaves the Adaptive wing one element per channel: the fused
    kernel's n/(n-1) would be infinite; the EMA gets 0, as n/max(n-1, 1) gives."""
    p = random_params(rng)
    layer = make_layer(p, input_shape=(None, CHANNELS))
    x = rng.normal(size=(2, CHANNELS)).astype(np.float32)
    layer(x, training=True)
    np.testing.assert_allclose(layer.moving_variance, MOMENTUM * p["moving_variance"], rtol=1e-6)
    np.testing.assert_allclose(
        layer.moving_mean, MOMENTUM * p["moving_mean"] + (1 - MOMENTUM) * x[1], rtol=1e-5
    )


# --- plain BatchNormalization against PyTorch's nn.BatchNorm -------------------------------
PLAIN_WEIGHTS = ("gamma", "beta", "moving_mean", "moving_variance")
TORCH_BN = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d}
TORCH_BN[5] = torch.nn.BatchNorm3d
# Float32 against a float64 reference: outputs and moving statistics are a few roundings of
# O(1) values (1e-5); the gradients' sums run over up to 200 elements per channel, each
# rounding 2^-24 of an O(1) term, so 1e-4.
RTOL, GRAD_TOL = 1e-5, 1e-4


def make_plain(params, input_shape=(None, 5, 5, CHANNELS), cls=None, **kwargs):
    from twins_tf.layers import BatchNormalization

    layer = (cls or BatchNormalization)(momentum=MOMENTUM, epsilon=EPS, **kwargs)
    layer.build(input_shape)
    for name in PLAIN_WEIGHTS:
        if getattr(layer, name) is not None:  # gamma/beta are None with scale/center=False
            getattr(layer, name).assign(params[name])
    return layer


def torch_plain(params, rank, affine=True):
    """PyTorch's own BatchNorm for inputs of `rank` (1d, 2d or 3d), PyTorch's momentum 0.1
    (Keras's 0.9), in float64, starting from `params`."""
    bn = TORCH_BN[rank](CHANNELS, eps=EPS, momentum=1 - MOMENTUM, affine=affine).double()
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor(params["moving_mean"]))
        bn.running_var.copy_(torch.tensor(params["moving_variance"]))
        if affine:
            bn.weight.copy_(torch.tensor(params["gamma"]))
            bn.bias.copy_(torch.tensor(params["beta"]))
    return bn


def torch_plain_step(bn, x, upstream, channel_axis):
    """One training forward and backward of `sum(upstream * bn(x))`: y, dx, dgamma, dbeta
    (None without affine), in `x`'s layout."""
    xt = torch.tensor(np.moveaxis(x, channel_axis, 1), dtype=torch.float64, requires_grad=True)
    bn.train()
    bn.zero_grad()
    y = bn(xt)
    (y * torch.tensor(np.moveaxis(upstream, channel_axis, 1), dtype=torch.float64)).sum().backward()

    def back(t):
        return np.moveaxis(t.detach().numpy(), 1, channel_axis)

    affine = [None, None] if bn.weight is None else [bn.weight.grad.numpy(), bn.bias.grad.numpy()]
    return [back(y), back(xt.grad)] + affine


@pytest.mark.parametrize(
    "shape, kwargs",
    [
        ((8, 5, 5, CHANNELS), {}),
        ((6, CHANNELS), {}),
        ((4, 7, CHANNELS), {}),
        ((4, 2, 3, 2, CHANNELS), {}),
        ((4, CHANNELS, 5, 5), dict(axis=1)),
        ((8, 5, 5, CHANNELS), dict(center=False, scale=False)),
        ((8, 5, 5, CHANNELS), dict(dtype="float64")),
    ],
    ids=["nhwc", "dense", "sequence", "volume", "channels_first", "no_affine", "float64"],
)
def test_plain_bn_trains_as_torch_batchnorm(rng, shape, kwargs):
    """Three training steps against nn.BatchNorm{1,2,3}d: each step's output and gradients
    (input, gamma, beta), the moving statistics after each EMA update (the unbiased batch
    variance, as PyTorch), then the inference output.  Covers the fused kernel and every
    layout that takes the composed ops."""
    p = random_params(rng)
    channel_axis = kwargs.get("axis", -1) % len(shape)
    affine = kwargs.get("scale", True)
    layer = make_plain(p, input_shape=(None,) + shape[1:], **kwargs)
    reference = torch_plain(p, len(shape), affine)
    dtype = kwargs.get("dtype", "float32")
    for _ in range(3):
        x = (rng.normal(size=shape) * 2 + 1).astype(dtype)
        upstream = rng.normal(size=shape).astype(dtype)
        xt = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            y = layer(xt, training=True)
            loss = tf.reduce_sum(tf.cast(y, dtype) * upstream)
        got = tape.gradient(loss, [xt] + layer.trainable_weights)
        want_y, *want_grads = torch_plain_step(reference, x, upstream, channel_axis)
        np.testing.assert_allclose(y, want_y, rtol=RTOL, atol=RTOL)
        for g, w in zip(got, [w for w in want_grads if w is not None]):
            np.testing.assert_allclose(g, w, rtol=GRAD_TOL, atol=GRAD_TOL)
        np.testing.assert_allclose(layer.moving_mean, reference.running_mean, rtol=RTOL, atol=1e-6)
        np.testing.assert_allclose(layer.moving_variance, reference.running_var, rtol=RTOL)
    reference.eval()
    with torch.no_grad():
        want = reference(torch.tensor(np.moveaxis(x, channel_axis, 1), dtype=torch.float64))
    np.testing.assert_allclose(
        layer(x, training=False), np.moveaxis(want.numpy(), 1, channel_axis), rtol=RTOL, atol=RTOL
    )


def test_plain_bn_with_a_mask_trains_as_torch_batchnorm_on_the_unmasked_elements(rng):
    """Masked-out time steps take no part in the statistics: the unmasked elements' output
    and the EMA are nn.BatchNorm1d's on those elements alone, n their count."""
    p = random_params(rng)
    layer = make_plain(p, input_shape=(None, 6, CHANNELS))
    reference = torch_plain(p, 2)
    x = (rng.normal(size=(4, 6, CHANNELS)) * 2 + 1).astype(np.float32)
    mask = rng.uniform(size=(4, 6)) < 0.6
    mask[0, 0] = mask[1, 1] = True
    y = layer(x, training=True, mask=tf.constant(mask))
    reference.train()
    want = reference(torch.tensor(x[mask], dtype=torch.float64)).detach().numpy()
    np.testing.assert_allclose(np.asarray(y)[mask], want, rtol=RTOL, atol=RTOL)
    np.testing.assert_allclose(layer.moving_mean, reference.running_mean, rtol=RTOL, atol=1e-6)
    np.testing.assert_allclose(layer.moving_variance, reference.running_var, rtol=RTOL)


def test_plain_bn_synchronized_under_mirrored_strategy_is_sync_batchnorm(rng):
    """nn.SyncBatchNorm's semantics: two replicas each see half of the batch, and the layer
    behaves as one nn.BatchNorm2d over the whole batch (global mean and biased variance for
    the output, the unbiased one with the global count for the EMA, gradients through the
    global statistics); both replicas' moving statistics stay equal, over three steps."""
    strategy = tf.distribute.MirroredStrategy(
        ["/cpu:0", "/cpu:1"], cross_device_ops=tf.distribute.ReductionToOneDevice()
    )
    p = random_params(rng)
    with strategy.scope():
        layer = make_plain(p, synchronized=True)
    reference = torch_plain(p, 4)

    def per_replica(a):
        def value_fn(ctx):
            i = ctx.replica_id_in_sync_group
            return tf.constant(a[i * 4 : (i + 1) * 4])

        return strategy.experimental_distribute_values_from_function(value_fn)

    @tf.function
    def step(x, upstream):
        def replica_step(x, upstream):
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss = tf.reduce_sum(layer(x, training=True) * upstream)
            return tape.gradient(loss, [x, layer.gamma, layer.beta])

        return strategy.run(replica_step, args=(x, upstream))

    def local(value):
        return [np.asarray(v) for v in strategy.experimental_local_results(value)]

    for _ in range(3):
        x = (rng.normal(size=(8, 5, 5, CHANNELS)) * 2 + 3).astype(np.float32)
        upstream = rng.normal(size=x.shape).astype(np.float32)
        dx, dgamma, dbeta = step(per_replica(x), per_replica(upstream))
        _, want_dx, want_dgamma, want_dbeta = torch_plain_step(reference, x, upstream, 3)
        # Each replica's input gradient is the global one for its rows; the replicas' gamma
        # and beta gradients add up to the global ones (what the optimizer applies).
        np.testing.assert_allclose(np.concatenate(local(dx)), want_dx, rtol=RTOL, atol=RTOL)
        np.testing.assert_allclose(sum(local(dgamma)), want_dgamma, rtol=GRAD_TOL, atol=GRAD_TOL)
        np.testing.assert_allclose(sum(local(dbeta)), want_dbeta, rtol=GRAD_TOL, atol=GRAD_TOL)
        for variable, want in (
            (layer.moving_mean, reference.running_mean),
            (layer.moving_variance, reference.running_var),
        ):
            copies = local(variable.value)
            np.testing.assert_array_equal(copies[0], copies[1])
            np.testing.assert_allclose(copies[0], want, rtol=RTOL, atol=1e-6)
    outputs = strategy.run(lambda x: layer(x, training=True), args=(per_replica(x),))
    reference.train()
    want = reference(torch.tensor(x.transpose(0, 3, 1, 2), dtype=torch.float64))
    np.testing.assert_allclose(
        np.concatenate(local(outputs)),
        want.detach().numpy().transpose(0, 2, 3, 1),
        rtol=RTOL,
        atol=RTOL,
    )


def test_plain_bn_refuses_batch_renormalisation():
    from twins_tf.layers import BatchNormalization

    with pytest.raises(ValueError, match="renormalisation"):
        BatchNormalization(renorm=True)
    BatchNormalization(renorm=False)  # a Keras config's default still loads


def test_plain_bn_runs_the_fused_kernel_in_training_and_the_affine_map_in_inference(rng):
    layer = make_plain(random_params(rng))
    x = tf.constant(rng.normal(size=(4, 5, 5, CHANNELS)).astype(np.float32))

    def gradients(training):
        @tf.function
        def f(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss = tf.reduce_sum(tf.square(layer(x, training=training)))
            return tape.gradient(loss, [x] + layer.trainable_weights)

        return f

    types = _op_types(gradients(True), x)
    assert {"FusedBatchNormV3", "FusedBatchNormGradV3"} <= types, sorted(types)
    assert not {"Mean", "SquaredDifference", "RsqrtGrad"} & types, sorted(types)
    types = _op_types(gradients(False), x)
    assert not {"FusedBatchNormV3", "FusedBatchNormGradV3", "Mean"} & types, sorted(types)
    frozen = make_plain(random_params(rng))
    frozen.trainable = False  # Keras: a frozen BN runs in inference mode, also in training
    want = np_bn(
        x.numpy(),
        *(
            np.asarray(getattr(frozen, n))
            for n in ("moving_mean", "moving_variance", "gamma", "beta")
        ),
    )
    np.testing.assert_allclose(frozen(x, training=True), want, rtol=1e-5, atol=1e-5)


def test_plain_bn_weights_files_and_keras_files_interchange_with_kerass_bn(rng, tmp_path):
    """Same class name as Keras's: a `.weights.h5` of either loads into the other (the file
    names the layer's group after its class), and a `.keras` file keeps the fused layer."""
    from twins_tf.layers import BatchNormalization

    def model(cls):
        inputs = keras.Input((5, 5, CHANNELS))
        x = keras.layers.Conv2D(CHANNELS, 3, padding="same", name="conv")(inputs)
        return keras.Model(inputs, cls(name="bn")(x))

    keras_model, ours = model(keras.layers.BatchNormalization), model(BatchNormalization)
    for layer in keras_model.layers[1:]:
        layer.set_weights([rng.normal(size=w.shape).astype(np.float32) ** 2 for w in layer.weights])
    x = rng.normal(size=(4, 5, 5, CHANNELS)).astype(np.float32)
    keras_model.save_weights(os.path.join(tmp_path, "k.weights.h5"))
    ours.load_weights(os.path.join(tmp_path, "k.weights.h5"))
    np.testing.assert_array_equal(ours(x), keras_model(x))
    ours.save_weights(os.path.join(tmp_path, "o.weights.h5"))
    back = model(keras.layers.BatchNormalization)
    back.load_weights(os.path.join(tmp_path, "o.weights.h5"))
    np.testing.assert_array_equal(back(x), keras_model(x))
    ours.save(os.path.join(tmp_path, "o.keras"))
    loaded = keras.models.load_model(os.path.join(tmp_path, "o.keras"))
    assert type(loaded.get_layer("bn")) is BatchNormalization
    np.testing.assert_array_equal(loaded(x, training=True), ours(x, training=True))
