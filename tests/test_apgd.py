"""APGD-CE / APGD-T against independent references.

* the checkpoint schedule against the reference code's integer rule (typed here from
  fra31/auto-attack's counters) at every budget, and against the paper's recursion (exact
  fractions) at 100 iterations, where the two coincide;
* the DLR losses against NumPy;
* a whole APGD run, step by step, against a NumPy re-implementation of Algorithm 1 with the
  reference code's checkpoints on a small tanh network (analytic gradients, float64).
Robust accuracy and whole runs against the official implementation itself, on the same
adversarially trained network, are in `test_autoattack_official.py`.
"""

import fractions
import math

import attack_testbed as tb
import keras
import numpy as np
import pytest
import tensorflow as tf

from twins_tf.attacks import APGD
from twins_tf.attacks.apgd import checkpoint_schedule, dlr_loss, targeted_dlr_loss


# --- schedule and losses ------------------------------------------------------------------------
def paper_checkpoints(steps):
    """w_j = ceil(p_j N), p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)."""
    p = [fractions.Fraction(0), fractions.Fraction(22, 100)]
    while p[-1] <= 1:
        p.append(
            p[-1] + max(p[-1] - p[-2] - fractions.Fraction(3, 100), fractions.Fraction(6, 100))
        )
    ws = sorted({math.ceil(q * steps) for q in p[1:] if q <= 1} - {0})
    return [w for w in ws if w <= steps]


def reference_code_checkpoints(steps):
    """fra31/auto-attack's counters: k = 0.22 N, shrinking by 0.03 N down to 0.06 N."""
    k, k_min, decrease = (
        max(int(0.22 * steps), 1),
        max(int(0.06 * steps), 1),
        max(int(0.03 * steps), 1),
    )
    checks, counter = [], 0
    for i in range(steps):
        counter += 1
        if counter == k:
            checks.append(i + 1)
            counter, k = 0, max(k - decrease, k_min)
    return checks


@pytest.mark.parametrize("steps", [100, 1, 3, 10, 25, 37, 250])
def test_checkpoints_follow_the_reference_code(steps):
    schedule = checkpoint_schedule(steps)
    assert [w for w, _ in schedule] == reference_code_checkpoints(steps)
    windows = np.diff([0] + reference_code_checkpoints(steps))
    assert [k for _, k in schedule] == list(windows)


def test_checkpoints_are_the_papers_at_100_steps():
    assert [w for w, _ in checkpoint_schedule(100)] == paper_checkpoints(100)
    assert paper_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]


def test_dlr_losses_match_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(64, 10)).astype(np.float32)
    y = rng.integers(0, 10, 64)
    target = (y + rng.integers(1, 10, 64)) % 10
    top = -np.sort(-logits, axis=1)
    z_y = logits[np.arange(64), y]
    others = np.where(np.arange(10)[None] == y[:, None], -np.inf, logits).max(1)
    want = -(z_y - others) / (top[:, 0] - top[:, 2])
    np.testing.assert_allclose(dlr_loss(logits, y).numpy(), want, rtol=1e-5)
    want_t = -(z_y - logits[np.arange(64), target]) / (top[:, 0] - (top[:, 2] + top[:, 3]) / 2)
    np.testing.assert_allclose(targeted_dlr_loss(logits, y, target).numpy(), want_t, rtol=1e-5)


# --- Algorithm 1 in NumPy on a small tanh network ----------------------------------------------
def numpy_apgd(weights, x, y, start, eps, norm, steps, loss, target=None, rho=0.75):
    """APGD from the paper's description; returns the best loss and best point per example.

    The model is logits = tanh(Z W1 + b1) W2 + b2, differentiated by hand in float64.
    """
    W1, b1, W2, b2 = [w.astype(np.float64) for w in weights]
    n = len(x)
    X = x.reshape(n, -1).astype(np.float64)
    Z0 = start.reshape(n, -1).astype(np.float64)

    def loss_and_grad(Z):
        hidden = np.tanh(Z @ W1 + b1)
        logits = hidden @ W2 + b2
        rows = np.arange(n)
        if loss == "ce":
            p = np.exp(logits - logits.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            value = -np.log(p[rows, y])
            dlogits = p.copy()
            dlogits[rows, y] -= 1
        else:  # targeted DLR: -(z_y - z_t) / (z_1 - (z_3 + z_4) / 2)
            order = np.argsort(-logits, axis=1)
            top = logits[rows[:, None], order]
            num = logits[rows, y] - logits[rows, target]
            den = top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12
            value = -num / den
            dlogits = np.zeros_like(logits)
            dlogits[rows, y] -= 1 / den
            dlogits[rows, target] += 1 / den
            for col, weight in ((0, 1.0), (2, -0.5), (3, -0.5)):
                dlogits[rows, order[:, col]] += num / den**2 * weight
        return value, ((dlogits @ W2.T) * (1 - hidden**2)) @ W1.T

    def project(Z):
        if norm == "linf":
            Z = np.clip(Z, X - eps, X + eps)
        else:
            d = Z - X
            length = np.sqrt((d**2).sum(1, keepdims=True))
            Z = X + d * np.minimum(1, eps / (length + 1e-12))
        return np.clip(Z, 0, 1)

    def direction(g):
        if norm == "linf":
            return np.sign(g)
        return g / (np.sqrt((g**2).sum(1, keepdims=True)) + 1e-12)

    checks = dict(checkpoint_windows(steps))
    Z, Z_prev = Z0.copy(), Z0.copy()
    f, g = loss_and_grad(Z)
    f_best, Z_best, g_best = f.copy(), Z.copy(), g.copy()
    eta = np.full(n, 2 * eps)
    f_prev, increases = np.zeros(n), np.zeros(n)  # the reference code's zero-filled history
    f_best_at_check, halved_at_check = f.copy(), np.ones(n, bool)
    for k in range(steps):
        a = 1.0 if k == 0 else 0.75
        z = project(Z + eta[:, None] * direction(g))
        Z_new = project(Z + a * (z - Z) + (1 - a) * (Z - Z_prev))
        Z_prev = Z
        f, g = loss_and_grad(Z_new)
        increases += f > f_prev
        f_prev = f
        better = f > f_best
        Z_best[better], g_best[better], f_best[better] = Z_new[better], g[better], f[better]
        Z = Z_new
        if k + 1 in checks:
            cond1 = increases <= rho * checks[k + 1]
            cond2 = ~halved_at_check & (f_best_at_check >= f_best)
            halve = cond1 | cond2
            eta[halve] /= 2
            Z[halve], g[halve] = Z_best[halve], g_best[halve]
            halved_at_check, f_best_at_check, increases = halve, f_best.copy(), np.zeros(n)
    return f_best, Z_best.reshape(x.shape)


def checkpoint_windows(steps):
    ws = reference_code_checkpoints(steps)
    return list(zip(ws, np.diff([0] + ws)))


@pytest.mark.parametrize(
    "norm,eps,loss", [("linf", 0.05, "ce"), ("l2", 0.5, "ce"), ("linf", 0.05, "dlr-t")]
)
def test_single_run_matches_numpy_algorithm(norm, eps, loss):
    rng = np.random.default_rng(1)
    n, classes, hidden = 32, 6, 12
    x = rng.uniform(size=(n, 4, 4, 2)).astype(np.float32)
    weights = [
        rng.normal(size=(32, hidden)),
        rng.normal(size=hidden),
        rng.normal(size=(hidden, classes)),
        rng.normal(size=classes),
    ]
    weights = [w.astype(np.float32) for w in weights]
    model = keras.Sequential(
        [
            keras.Input((4, 4, 2)),
            keras.layers.Flatten(),
            keras.layers.Dense(hidden, activation="tanh"),
            keras.layers.Dense(classes),
        ]
    )
    model.set_weights(weights)
    logits = model(x).numpy()
    y = logits.argmax(1).astype(np.int32)
    target = np.argsort(-logits, axis=1)[:, 1].astype(np.int32)
    attack = APGD(
        eps, norm=norm, loss="ce" if loss == "ce" else "dlr", targeted=loss != "ce", steps=30
    )
    attack._use(model)  # the model a call would bind, for the compiled run used directly
    seed = tf.constant([3, 4])
    start = attack._random_start(tf.constant(x), seed).numpy()
    _, _, x_best, loss_best, _ = attack._run_once(
        tf.constant(x), tf.constant(y), tf.constant(target), seed
    )
    want_loss, want_best = numpy_apgd(weights, x, y, start, eps, norm, 30, loss, target)
    # float32 against float64: the best losses agree everywhere; a gradient entry near zero
    # can take the other sign in an L-inf step and move one pixel of a few examples' paths,
    # so the points must agree on most examples.  A wrong momentum, step-size rule or reset
    # changes the losses of most examples by far more than the tolerance.
    np.testing.assert_allclose(loss_best.numpy(), want_loss, rtol=1e-3, atol=1e-4)
    same_point = np.abs(x_best.numpy() - want_best).reshape(len(x), -1).max(1) <= 1e-4
    assert same_point.mean() >= 0.75


# --- validity on the robust digits model --------------------------------------------------------
def check_valid(bed, x, y, x_adv, eps, norm):
    """In the ball, in [0, 1]; a changed point is misclassified (judged by the PyTorch copy)."""
    delta = (x_adv - x).reshape(len(x), -1)
    size = np.abs(delta).max(1) if norm == "linf" else np.sqrt((delta**2).sum(1))
    assert size.max() <= eps + 1e-5
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    changed = np.any(delta != 0, axis=1)
    predicted = tb.torch_predict(bed.torch_model, x_adv)
    assert np.all(predicted[changed] != y[changed])
    return float(np.mean(predicted == y))


def test_restarts_and_seed_are_reproducible():
    bed = tb.robust_digits()
    x, y = bed.x_test[:64], bed.y_test[:64]
    attack = APGD(tb.epsilon("linf"), steps=10, restarts=2)
    first = attack(bed.keras_model, x, y, seed=7).numpy()
    again = attack(bed.keras_model, x, y, seed=7).numpy()
    np.testing.assert_array_equal(first, again)
    check_valid(bed, x, y, first, tb.epsilon("linf"), "linf")


def test_bad_arguments_fail_clearly():
    model = tb.keras_convnet()
    with pytest.raises(ValueError, match="norm must be one of"):
        APGD(0.1, norm="l1")
    with pytest.raises(ValueError, match="epsilon must be > 0"):
        APGD(0.0)
    with pytest.raises(ValueError, match="pass loss='dlr'"):
        APGD(0.1, loss="ce", targeted=True)
    with pytest.raises(ValueError, match="images in \\[0, 1\\]"):
        APGD(0.1, steps=1)(model, np.full((2, 16, 16, 3), 255.0, np.float32), [0, 1])
    with pytest.raises(ValueError, match="needs at least 10 classes"):
        APGD(0.1, loss="dlr", targeted=True, steps=1)(
            tb.keras_convnet(num_classes=5), np.zeros((2, 16, 16, 3), np.float32), [0, 1]
        )
