"""twins_tf.attacks.PGD against independent references.

* A linear softmax model, whose input gradient is closed-form, attacked by a numpy (float64)
  PGD written here from spec §4: L-inf and L2 steps, projection, [0, 1] clipping, random
  start, restarts; eager, graph and XLA.
* A small conv net with BatchNorm in inference mode, attacked by a PyTorch PGD written here.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
import torch
from torch_resnet import torch_pgd

from twins_tf.attacks import PGD

SHAPE, CLASSES, BATCH = (4, 4, 2), 3, 6


# --- the linear model and its numpy PGD ------------------------------------------------------
def linear_model(seed=0):
    rng = np.random.default_rng(seed)
    model = keras.Sequential(
        [keras.Input(SHAPE), keras.layers.Flatten(), keras.layers.Dense(CLASSES)]
    )
    kernel = rng.normal(size=(np.prod(SHAPE), CLASSES))
    # centred logits (x - 0.5) @ W: classes compete, so examples sit near decision boundaries
    weights = [kernel, -0.5 * kernel.sum(0) + 0.1 * rng.normal(size=CLASSES)]
    model.set_weights([w.astype("float32") for w in weights])
    return model, [w.astype(np.float64) for w in weights]


def numpy_input_gradient(weights, x, y):
    """d mean-CE / dx of softmax(flatten(x) @ W + b)."""
    w, b = weights
    flat = x.reshape(len(x), -1)
    z = flat @ w + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0
    return (p @ w.T / len(y)).reshape(x.shape)


def numpy_pgd(weights, x, y, eps, alpha, steps, norm="linf", start=None):
    x = x.astype(np.float64)
    x_adv = x.copy() if start is None else start.astype(np.float64)
    per_example = lambda v: v.reshape(-1, *([1] * (x.ndim - 1)))  # noqa: E731
    l2 = lambda v: np.sqrt((v.reshape(len(v), -1) ** 2).sum(1))  # noqa: E731
    for _ in range(steps):
        g = numpy_input_gradient(weights, x_adv, y)
        if norm == "linf":
            x_adv = np.clip(x_adv + alpha * np.sign(g), x - eps, x + eps)
        else:
            x_adv = x_adv + alpha * g / per_example(l2(g) + 1e-12)
            delta = x_adv - x
            x_adv = x + delta * per_example(np.minimum(1.0, eps / (l2(delta) + 1e-12)))
        x_adv = np.clip(x_adv, 0.0, 1.0)
    return x_adv


def numpy_predict(weights, x):
    return (x.reshape(len(x), -1) @ weights[0] + weights[1]).argmax(1)


def _data(seed=1, batch=BATCH):
    rng = np.random.default_rng(seed)
    # some pixels at the borders of [0, 1], so the clipping is exercised
    x = np.clip(rng.uniform(-0.1, 1.1, size=(batch, *SHAPE)), 0, 1).astype("float32")
    return x, rng.integers(0, CLASSES, batch)


def _run(attack, model, x, y, mode, seed=None):
    fn = lambda x, y: attack(model, x, y, seed=seed)  # noqa: E731
    if mode == "graph":
        fn = tf.function(fn)
    elif mode == "xla":
        fn = tf.function(fn, jit_compile=True)
    return fn(tf.constant(x), tf.constant(y)).numpy()


# --- tests -----------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["eager", "graph", "xla"])
@pytest.mark.parametrize("norm,eps,alpha", [("linf", 8 / 255, 2 / 255), ("l2", 0.5, 0.15)])
def test_matches_numpy_reference(norm, eps, alpha, mode):
    model, weights = linear_model()
    x, y = _data()
    got = _run(PGD(eps, alpha, 7, norm=norm), model, x, y, mode)
    expected = numpy_pgd(weights, x, y, eps, alpha, 7, norm)
    np.testing.assert_allclose(got, expected, atol=2e-6)
    moved = (got - x).reshape(len(x), -1)
    size = np.abs(moved).max(1) if norm == "linf" else np.sqrt((moved**2).sum(1))
    assert size.max() > eps / 2  # the attack did move


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_constraints_hold(norm):
    model, _ = linear_model(3)
    x, y = _data(4)
    eps = 0.1 if norm == "linf" else 0.3
    x_adv = _run(PGD(eps, eps / 2, 5, norm=norm, random_start=True, seed=7), model, x, y, "graph")
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    delta = (x_adv - x).reshape(len(x), -1)
    size = np.abs(delta).max(1) if norm == "linf" else np.sqrt((delta**2).sum(1))
    assert (size <= eps + 1e-6).all()


@pytest.mark.parametrize("mode", ["graph", "xla"])
def test_random_start_from_explicit_seed(mode):
    """The L-inf start is stateless_uniform(shape, seed, -eps, eps), clipped to [0, 1].

    XLA implements the stateless generators differently from the CPU kernels, so the
    reference noise is drawn in the same execution mode as the attack.
    """
    model, weights = linear_model()
    x, y = _data()
    eps, seed = 0.1, tf.constant([11, 5], tf.int64)
    draw = tf.function(
        lambda s: tf.random.stateless_uniform(x.shape, s, -eps, eps),
        jit_compile=mode == "xla",
        autograph=False,
    )
    noise = draw(seed).numpy()
    expected = numpy_pgd(weights, x, y, eps, 0.02, 3, start=np.clip(x + noise, 0, 1))
    got = _run(PGD(eps, 0.02, 3, random_start=True), model, x, y, mode, seed=seed)
    np.testing.assert_allclose(got, expected, atol=2e-6)


def test_seeded_random_start_is_reproducible_under_xla():
    model, _ = linear_model()
    x, y = _data()

    def two_draws(seed):
        attack = PGD(0.1, 0.02, 0, random_start=True, seed=seed)
        fn = tf.function(lambda x, y: attack(model, x, y), jit_compile=True)
        return fn(x, y).numpy(), fn(x, y).numpy()

    first, second = two_draws(3)
    again_first, again_second = two_draws(3)
    other, _ = two_draws(4)
    np.testing.assert_array_equal(first, again_first)
    np.testing.assert_array_equal(second, again_second)
    assert np.abs(first - second).max() > 0.01  # the generator advances between calls
    assert np.abs(first - other).max() > 0.01  # another seed, another start
    assert np.abs(first - x).max() <= 0.1 + 1e-6


def test_l2_random_start_is_uniform_in_the_ball():
    model, _ = linear_model()
    x = np.full((400, *SHAPE), 0.5, "float32")  # far from the box: no clipping
    y = np.zeros(400, "int64")
    eps, dims = 0.2, np.prod(SHAPE)
    start = _run(PGD(eps, 0.0, 0, norm="l2", random_start=True, seed=1), model, x, y, "graph")
    radius = np.sqrt(((start - x).reshape(400, -1) ** 2).sum(1)) / eps
    assert radius.max() <= 1 + 1e-5
    # uniform in a d-ball: P(r <= t) = t^d, so r^d is uniform on [0, 1]
    u = radius.astype(np.float64) ** dims
    assert abs(u.mean() - 0.5) < 0.05 and abs((u < 0.25).mean() - 0.25) < 0.06


def test_restarts_keep_the_first_fooling_restart():
    model, weights = linear_model(5)
    x, _ = _data(6, batch=32)
    y = numpy_predict(weights, x.astype(np.float64))  # all clean-correct
    eps, alpha, steps, restarts = 0.1, 0.03, 1, 4
    seed = tf.constant([2, 9], tf.int64)
    got = _run(
        PGD(eps, alpha, steps, random_start=True, restarts=restarts),
        model,
        x,
        y,
        "graph",
        seed=seed,
    )

    runs = []
    for restart_seed in tf.random.split(seed, restarts):
        noise = tf.random.stateless_uniform(x.shape, restart_seed, -eps, eps).numpy()
        runs.append(numpy_pgd(weights, x, y, eps, alpha, steps, start=np.clip(x + noise, 0, 1)))
    expected, chosen = runs[0].copy(), np.zeros(len(x), int)
    for i in range(len(x)):
        for r, run in enumerate(runs):
            if numpy_predict(weights, run[i : i + 1])[0] != y[i]:
                expected[i], chosen[i] = run[i], r
                break
    assert (chosen > 0).any(), "the case must exercise a later restart"
    np.testing.assert_allclose(got, expected, atol=2e-6)


def test_float32_attack_under_mixed_precision():
    """The default attack of a mixed_bfloat16 model equals the float64 reference; the
    model's own policy (compute_dtype=None) also runs."""
    _, weights = linear_model()
    x, y = _data()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model, _ = linear_model()
        assert model.layers[-1].compute_dtype == "bfloat16"
        fn = tf.function(lambda x, y: (PGD(8 / 255, 2 / 255, 7)(model, x, y), model(x)))
        got, logits = fn(tf.constant(x), tf.constant(y))
        low = _run(PGD(8 / 255, 2 / 255, 7, compute_dtype=None), model, x, y, "graph")
    finally:
        keras.mixed_precision.set_global_policy("float32")
    np.testing.assert_allclose(
        got.numpy(), numpy_pgd(weights, x, y, 8 / 255, 2 / 255, 7), atol=2e-6
    )
    assert logits.dtype == tf.bfloat16  # the policy is restored after the attack's trace
    assert np.abs(low - x).max() <= 8 / 255 + 1e-6


def test_no_gradient_flows_through_x_adv():
    model, _ = linear_model()
    x, y = _data()
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        total = tf.reduce_sum(PGD(0.1, 0.02, 2)(model, x, y))
    assert tape.gradient(total, x) is None


# --- PyTorch reference on a conv net with BatchNorm (inference mode) --------------------------
def _conv_nets(seed=0):
    rng = np.random.default_rng(seed)
    inputs = keras.Input((6, 6, 3))
    h = keras.layers.Conv2D(4, 3, padding="same", use_bias=False)(inputs)
    h = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5)(h)
    h = keras.layers.ReLU()(keras.layers.GlobalAveragePooling2D()(h))
    model = keras.Model(inputs, keras.layers.Dense(CLASSES)(h))
    kernel = rng.normal(size=(3, 3, 3, 4)).astype("float32")
    gamma, beta, mean = (rng.normal(size=4).astype("float32") for _ in range(3))
    var = rng.uniform(0.5, 2, size=4).astype("float32")
    dense_w, dense_b = rng.normal(size=(4, CLASSES)).astype("float32"), np.zeros(CLASSES, "float32")
    model.set_weights([kernel, gamma, beta, mean, var, dense_w, dense_b])

    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1, bias=False),
        torch.nn.BatchNorm2d(4),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.ReLU(),
        torch.nn.Linear(4, CLASSES),
    )
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor(kernel.transpose(3, 2, 0, 1)))
        for t, v in zip(
            (net[1].weight, net[1].bias, net[1].running_mean, net[1].running_var),
            (gamma, beta, mean, var),
        ):
            t.copy_(torch.tensor(v))
        net[5].weight.copy_(torch.tensor(dense_w.T))
        net[5].bias.zero_()
    net.train()  # PGD must put it in eval mode itself, as twins_tf calls training=False
    return model, net


def test_conv_net_with_batchnorm_matches_pytorch():
    model, net = _conv_nets()
    rng = np.random.default_rng(2)
    x = rng.uniform(size=(8, 6, 6, 3)).astype("float32")
    y = rng.integers(0, CLASSES, 8)
    got = _run(PGD(8 / 255, 2 / 255, 5), model, x, y, "graph")
    expected = torch_pgd(
        net, torch.tensor(x.transpose(0, 3, 1, 2)), torch.tensor(y), 8 / 255, 2 / 255, 5
    )
    np.testing.assert_allclose(got, expected.numpy().transpose(0, 2, 3, 1), atol=1e-6)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(norm="l1"), "norm must be one of"),
        (dict(epsilon=-0.1), "epsilon must be >= 0"),
        (dict(steps=2.5), "steps must be a non-negative integer"),
        (dict(restarts=0), "restarts must be a positive integer"),
        (dict(compute_dtype="bfloat16"), "compute_dtype"),
        # without a random start every restart would repeat the first run exactly
        (dict(restarts=2), "restarts=2 without random_start would repeat one identical run"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = dict(epsilon=0.1, step_size=0.01, steps=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        PGD(**args)


# --- input checks: each mistake a one-line error that says what to do ---------------------------
def _one_line_error(call, match):
    with pytest.raises(ValueError, match=match) as caught:
        call()
    assert "\n" not in str(caught.value)


def test_budgets_in_0_255_units_fail_at_construction():
    _one_line_error(
        lambda: PGD(8, 2, 1),
        "epsilon=8 is more than the whole \\[0, 1\\] pixel "
        "range: give it in \\[0, 1\\] units, e.g. 8/255",
    )
    _one_line_error(lambda: PGD(8 / 255, 2, 1), "step_size=2 is more than the whole")
    PGD(1.0, 1.0, 1)  # the whole box is a legal (if useless) L-inf radius
    model, _ = linear_model()
    x, y = _data()
    # L2 radii above 1 are ordinary; one beyond the box's diagonal (sqrt(32) here) is not
    PGD(3.0, 0.5, 1, norm="l2")(model, x, y)
    _one_line_error(
        lambda: PGD(2 * 255, 0.5, 1, norm="l2")(model, x, y),
        "L2 epsilon=510 is longer than the diagonal",
    )


def test_bad_images_and_labels_fail_clearly():
    model, _ = linear_model()
    x, y = _data()
    pgd = PGD(0.1, 0.02, 2)
    _one_line_error(lambda: pgd(model, x * 255, y), "images in \\[0, 1\\]")
    _one_line_error(lambda: pgd(model, x[0], y[:1]), "one image, not a batch: add a batch axis")
    _one_line_error(lambda: pgd(model, x, y[:3]), "got 6 images but 3 labels")
    _one_line_error(
        lambda: pgd(model, x, y + CLASSES), "class ids in \\[3, 5\\], but the model has 3 classes"
    )
    _one_line_error(
        lambda: pgd(model, x, np.eye(4)[y % 4]),
        "labels of shape \\(6, 4\\), but the model has 3 classes",
    )
    soft = np.full((BATCH, CLASSES), 1 / CLASSES, np.float32)
    _one_line_error(lambda: pgd(model, x, soft), "not one-hot")
    # one-hot rows of the model's width are the class ids they encode (eager and traced)
    for one_hot in (np.eye(CLASSES, dtype=np.float32)[y], np.eye(CLASSES, dtype=np.int64)[y]):
        np.testing.assert_array_equal(pgd(model, x, one_hot).numpy(), pgd(model, x, y).numpy())
    np.testing.assert_array_equal(
        _run(pgd, model, x, np.eye(CLASSES, dtype=np.float32)[y], "graph"),
        _run(pgd, model, x, y, "graph"),
    )


# --- Keras serialisation: the trainer's attack saves with the trainer ----------------------------
def test_serialised_pgd_attacks_identically():
    model, _ = linear_model()
    x, y = _data()
    for pgd in (
        PGD(0.1, 0.02, 3, random_start=True, restarts=2),  # drawn seed
        PGD(1.0, 0.5, 2, norm="l2", random_start=True, seed=5, compute_dtype=None),
    ):
        config = keras.saving.serialize_keras_object(pgd)
        assert config["registered_name"] == "twins_tf>PGD"
        again = keras.saving.deserialize_keras_object(config)
        assert type(again) is PGD and again.get_config() == pgd.get_config()
        seed = tf.constant([3, 4])
        np.testing.assert_array_equal(
            again(model, x, y, seed=seed).numpy(), pgd(model, x, y, seed=seed).numpy()
        )
        # without a seed each object's generator starts from the recorded seed
        np.testing.assert_array_equal(again(model, x, y).numpy(), pgd(model, x, y).numpy())
        # an int seed is the stateless seed (seed, 0)
        np.testing.assert_array_equal(
            pgd(model, x, y, seed=3).numpy(), pgd(model, x, y, seed=tf.constant([3, 0])).numpy()
        )
