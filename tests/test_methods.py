"""twins_tf.methods against PyTorch autograd: loss values and gradients w.r.t. both logits.

The reference losses are written here from spec §5 in PyTorch (`F.cross_entropy`, `F.kl_div`
with reduction="sum", the reductions spelled out), so a wrong reduction, a swapped half or a
stop-gradient in twins_tf shows up as a different value or gradient.
"""

import zlib

import numpy as np
import pytest
import tensorflow as tf
import torch
import torch.nn.functional as F

from twins_tf import methods

BATCH, CLASSES = 8, 5
LAMBDA, BETA = 0.4, 6.0


def _torch_ce(z, y):
    return F.cross_entropy(z, y)  # mean over the rows given


def _torch_kl_sum(z_nat, z_adv):
    return F.kl_div(F.log_softmax(z_adv, 1), F.softmax(z_nat, 1), reduction="sum")


def torch_loss(name, z_nat, z_adv, y):
    """Spec §5, term by term."""
    b, h = y.shape[0], y.shape[0] // 2
    if name == "clean":
        return _torch_ce(z_nat, y)
    if name == "at":
        return _torch_ce(z_adv, y)
    if name == "trades":
        return _torch_ce(z_nat, y) + BETA * _torch_kl_sum(z_nat, z_adv) / b
    if name == "twins_at":
        return LAMBDA * _torch_ce(z_adv[:h], y[:h]) + _torch_ce(z_adv[h:], y[h:])
    if name == "twins_trades":
        natural = LAMBDA * _torch_ce(z_nat[:h], y[:h]) + _torch_ce(z_nat[h:], y[h:])
        robust = (
            LAMBDA * _torch_kl_sum(z_nat[:h], z_adv[:h]) / b
            + _torch_kl_sum(z_nat[h:], z_adv[h:]) / b
        )
        return natural + BETA * robust
    raise ValueError(name)


def _random_logits(seed):
    rng = np.random.default_rng(seed)
    z_nat = rng.normal(size=(BATCH, CLASSES)).astype("float32") * 2
    z_adv = z_nat + rng.normal(size=(BATCH, CLASSES)).astype("float32")
    y = rng.integers(0, CLASSES, BATCH)
    return z_nat, z_adv, y


@pytest.mark.parametrize("name", ["clean", "at", "trades", "twins_at", "twins_trades"])
def test_loss_and_gradients_match_pytorch(name):
    z_nat, z_adv, y = _random_logits(zlib.crc32(name.encode()) % 1000)
    tn = torch.tensor(z_nat, requires_grad=True)
    ta = torch.tensor(z_adv, requires_grad=True)
    expected = torch_loss(name, tn, ta, torch.tensor(y))
    expected.backward()

    kn, ka = tf.Variable(z_nat), tf.Variable(z_adv)
    with tf.GradientTape() as tape:
        loss = methods.get(name).loss(kn, ka, tf.constant(y), lambda_twins=LAMBDA, beta=BETA)
    grad_nat, grad_adv = tape.gradient(loss, [kn, ka])

    np.testing.assert_allclose(loss.numpy(), expected.item(), rtol=1e-6)
    for grad, reference in ((grad_nat, tn.grad), (grad_adv, ta.grad)):
        if reference is None or not reference.abs().sum():
            assert grad is None or not np.abs(grad.numpy()).sum()
        else:  # every logit that enters the loss gets its gradient: no stop_gradient
            np.testing.assert_allclose(grad.numpy(), reference.numpy(), rtol=1e-5, atol=1e-7)


def test_trades_divides_kl_by_full_batch_not_half():
    """A hand-checkable case: one Adaptive row with a known KL, lambda 0."""
    z_nat = np.zeros((4, 2), "float32")
    z_adv = np.zeros((4, 2), "float32")
    z_adv[3] = [np.log(3.0), 0.0]  # q = (3/4, 1/4), p = (1/2, 1/2)
    kl_row = 0.5 * np.log(0.5 / 0.75) + 0.5 * np.log(0.5 / 0.25)
    y = np.array([0, 0, 0, 0])
    loss = methods.twins_trades(z_nat, z_adv, y, lambda_twins=0.0, beta=1.0)
    assert abs(float(loss) - (np.log(2.0) + kl_row / 4)) < 1e-6


def test_l2sp_penalty_matches_numpy():
    """Li et al.'s Omega = alpha/2 ||w_S - w_S^0||^2 + beta/2 ||w_new||^2, in float64 numpy."""
    rng = np.random.default_rng(0)
    current = [rng.normal(size=s).astype("float32") for s in ((3, 3, 2, 4), (4,), (7,))]
    anchors = [c + rng.normal(size=c.shape).astype("float32") for c in current]
    head = [rng.normal(size=s).astype("float32") for s in ((7, 3), (3,))]
    alpha, beta = 0.03, 0.2
    pull = sum(((c.astype(np.float64) - a) ** 2).sum() for c, a in zip(current, anchors))
    decay = sum((h.astype(np.float64) ** 2).sum() for h in head)
    got = methods.l2sp_penalty(
        [tf.constant(c) for c in current], anchors, head, alpha=alpha, beta=beta
    )
    np.testing.assert_allclose(float(got), alpha / 2 * pull + beta / 2 * decay, rtol=1e-5)
    with pytest.raises(ValueError, match="anchors"):
        methods.l2sp_penalty(current, anchors[:2], head, alpha=alpha, beta=beta)


def test_l2sp_gradient_is_alpha_times_the_distance_and_beta_times_the_head():
    """The paper's gradient: alpha * (w - w0) on the pre-trained part, beta * w on the head."""
    w = tf.Variable([1.0, -2.0])
    head = tf.Variable([3.0])
    w0 = tf.constant([0.5, 0.5])
    with tf.GradientTape() as tape:
        penalty = methods.l2sp_penalty([w], [w0], [head], alpha=0.1, beta=0.01)
    grad_w, grad_head = tape.gradient(penalty, [w, head])
    np.testing.assert_allclose(grad_w.numpy(), 0.1 * np.array([0.5, -2.5]), rtol=1e-6)
    np.testing.assert_allclose(grad_head.numpy(), [0.03], rtol=1e-6)


def test_method_table():
    assert {n for n, m in methods.METHODS.items() if m.twin} == {"twins_at", "twins_trades"}
    assert not methods.get("clean").adversarial
    assert methods.get("twins_trades").natural and methods.get("twins_trades").adversarial
    assert methods.get("l2sp").l2sp
    with pytest.raises(ValueError, match="unknown method 'madry'"):
        methods.get("madry")


# === the registry ===========================================================================
def test_a_method_carries_its_own_loss_whatever_its_name():
    """Method.loss calls the method's objective: a name the old string dispatch did not know
    used to fall through to TWINS-TRADES silently."""
    calls = []

    def objective(logits_natural, logits_adversarial, labels, *, lambda_twins, beta):
        calls.append((lambda_twins, beta))
        return methods.cross_entropy(logits_natural, labels) * 0.0 + 7.0

    custom = methods.Method(name="my_clean_variant", objective=objective, natural=True)
    z_nat, z_adv, y = _random_logits(3)
    assert float(custom.loss(z_nat, None, y, lambda_twins=0.5, beta=2.0)) == 7.0
    assert calls == [(0.5, 2.0)]
    assert not custom.twin and not custom.adversarial and not custom.l2sp


def test_method_fields_are_keywords_and_validated():
    with pytest.raises(TypeError):
        methods.Method("clean", methods.clean, False, False, True, False, "positional")
    with pytest.raises(TypeError, match="objective must be a callable"):
        methods.Method(name="x", objective="clean", natural=True)
    with pytest.raises(ValueError, match="runs no training forward"):
        methods.Method(name="x", objective=lambda *a, **k: 0.0)


def test_register_adds_a_method_once():
    custom = methods.Method(
        name="test_registry_at", objective=methods.get("at").objective, adversarial=True
    )
    try:
        assert methods.register(custom) is custom
        assert methods.get("test_registry_at") is custom
        assert methods.register(custom) is custom  # the same object again: a no-op
        twin = methods.Method(name="test_registry_at", objective=custom.objective, natural=True)
        with pytest.raises(ValueError, match="already registered"):
            methods.register(twin)
        with pytest.raises(TypeError, match="takes a twins_tf.methods.Method"):
            methods.register("at")
    finally:
        methods.METHODS.pop("test_registry_at", None)
    assert set(methods.METHODS) == {
        "clean",
        "at",
        "trades",
        "l2sp",
        "twins_at",
        "twins_trades",
        "autolora",
    }
