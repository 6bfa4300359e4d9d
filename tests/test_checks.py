"""The sanity checks before an evaluation (`twins_tf.attacks.checks`), each on a model built to
trip it and on one that does not.

The models are a small random conv net (`attack_testbed.keras_convnet`) and wrappers that
add exactly one defect: Gaussian noise at inference (randomised), a softmax (probabilities),
rounding of the input (zero gradients), a variable written in the forward or a gradient
computed inside it (dynamic).  Whether each defect is there is a fact of the construction,
not of the code under test.
"""

import warnings

import attack_testbed as tb
import keras
import numpy as np
import pytest
import tensorflow as tf

from twins_tf.attacks import AutoAttack, checks


class Noisy(keras.Model):
    """Randomised: Gaussian noise on the input at every call, also in inference."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def call(self, x, training=False):
        return self.inner(x + tf.random.normal(tf.shape(x), stddev=0.05), training=training)


class Rounded(keras.Model):
    """Zero input gradient everywhere: the input is quantised to 4 levels first."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def call(self, x, training=False):
        return self.inner(tf.round(x * 3) / 3, training=training)


class Saturated(keras.Model):
    """Logits scaled by 1e4: the float32 softmax saturates, so the cross-entropy's input
    gradient is exactly zero on every correctly classified example; the scale-free DLR loss's
    is not (the official check uses DLR, and so must we)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def call(self, x, training=False):
        return 1e4 * self.inner(x, training=training)


class Counting(keras.Model):
    """Dynamic: writes a variable (a call counter) in every forward."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = self.add_weight(shape=(), initializer="zeros", trainable=False)

    def call(self, x, training=False):
        self.calls.assign_add(1.0)
        return self.inner(x, training=training)


class AdaptsAtTestTime(keras.Model):
    """Dynamic: one gradient step on its own entropy-like loss inside the forward."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def call(self, x, training=False):
        with tf.GradientTape() as tape:
            tape.watch(x)
            energy = tf.reduce_sum(tf.reduce_logsumexp(self.inner(x), axis=-1))
        x = tf.clip_by_value(x - 0.01 * tf.sign(tape.gradient(energy, x)), 0.0, 1.0)
        return self.inner(x, training=training)


@pytest.fixture(scope="module")
def net():
    keras.utils.set_random_seed(0)
    model = tb.keras_convnet(num_classes=4)
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(8, 16, 16, 3)).astype("float32")
    return model, x, rng.integers(0, 4, 8)


def _built(wrapper, x):
    wrapper(x[:1])
    return wrapper


def test_a_plain_deterministic_model_passes_every_check(net):
    model, x, y = net
    assert checks.model_checks(model, x, y) == []
    assert checks.check_n_classes(10, "standard", 9, {}) is None


def test_randomised_model(net):
    model, x, y = net
    noisy = _built(Noisy(model), x)
    assert "randomised defence" in checks.check_randomized(noisy, x, y)
    assert checks.check_randomized(model, x, y) is None
    # the rand version: the converse warnings
    assert "deterministic model" in checks.check_rand_version(False, 20)
    assert "eot_iter=5" in checks.check_rand_version(True, 5)
    assert checks.check_rand_version(True, 20) is None
    assert checks.model_checks(noisy, x, y, randomized_defence=True, eot_iter=20) == []


def test_probabilities_instead_of_logits(net):
    model, x, _ = net
    softmax = keras.Sequential([model, keras.layers.Softmax()])
    assert "probabilities, not logits" in checks.check_logits(softmax, x)
    assert checks.check_logits(model, x) is None
    # non-negative rows that do not sum to 1 are not probabilities
    assert checks.check_logits(keras.Sequential([model, keras.layers.ReLU()]), x) is None


def test_zero_gradients(net):
    model, x, y = net
    message = checks.check_zero_gradients(_built(Rounded(model), x), x, y)
    assert message.startswith(f"{len(x)} of {len(x)} examples have a zero input gradient")
    assert checks.check_zero_gradients(model, x, y) is None
    # a saturated softmax zeroes the cross-entropy's gradient, not the DLR loss's
    saturated = _built(Saturated(model), x)
    predicted = np.argmax(saturated(x).numpy(), 1)
    with tf.GradientTape() as tape:
        xt = tf.constant(x)
        tape.watch(xt)
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=predicted, logits=saturated(xt))
    assert np.all(tape.gradient(ce, xt).numpy() == 0)  # the premise: CE's gradient vanishes
    assert checks.check_zero_gradients(saturated, x, predicted) is None


def test_autoattack_checks_zero_gradients_on_every_batch_inside_apgd_t(net):
    """As the official code: at each APGD-T run's start, on every batch, not on the first
    batch only; the result counts the examples over the whole run."""
    model, _, _ = net
    rng = np.random.default_rng(1)
    # images on the rounding grid (k / 3): a 0.01 perturbation never changes the rounding, so
    # no attack fools anything and APGD-T runs on every example of both batches
    x = (np.round(rng.uniform(size=(8, 16, 16, 3)) * 3) / 3).astype("float32")
    rounded = _built(Rounded(model), x)
    y = np.argmax(rounded(x).numpy(), 1)
    attack = AutoAttack(0.01, apgd_steps=2, fab_steps=2, square_queries=2)
    with pytest.warns(checks.EvaluationWarning) as caught:
        result = attack.run(rounded, (x, y), batch_size=4, verbose=0)
    assert result.robust.all()
    want = checks.zero_gradient_message(8, 8, "examples the DLR attack ran on (all batches)")
    assert want in result.warnings and want.startswith("8 of 8 examples")
    assert f"AutoAttack: {want}" in [str(w.message) for w in caught]
    # not also the once-on-the-first-batch form
    assert not any(m.startswith("4 of 4") for m in result.warnings)
    # one batch through the attack protocol: that batch's count
    with pytest.warns(
        checks.EvaluationWarning,
        match="AutoAttack: 8 of 8 examples the DLR attack ran on have a zero input gradient",
    ):
        attack(rounded, x, y)


def test_dynamic_models(net):
    model, x, _ = net
    assert "variable writes" in checks.check_dynamic(_built(Counting(model), x), x)
    assert "gradient computation" in checks.check_dynamic(_built(AdaptsAtTestTime(model), x), x)
    assert checks.check_dynamic(model, x) is None
    with_bn = keras.Sequential(
        [
            keras.Input((16, 16, 3)),
            keras.layers.Conv2D(4, 3),
            keras.layers.BatchNormalization(),
            keras.layers.Flatten(),
        ]
    )
    assert checks.check_dynamic(with_bn, x) is None  # inference BN updates nothing


def test_targets_and_skips_are_named():
    message = checks.check_n_classes(3, "standard", 2, {"apgd-t": "needs 4 classes"})
    assert "use 2 target class(es), not the reference's 9" in message
    assert "apgd-t is skipped: needs 4 classes" in message
    assert checks.check_n_classes(3, "rand", 2, {}) is None  # rand has no targeted attack


def test_square_breaking_what_gradient_attacks_missed():
    accuracy = {"clean": 0.9, "apgd-ce": 0.6, "apgd-t": 0.55, "fab-t": 0.55, "square": 0.5}
    assert "5.00 points" in checks.check_square(accuracy)
    assert checks.check_square(dict(accuracy, square=0.549)) is None  # within 0.2 points
    assert checks.check_square({"clean": 0.9, "square": 0.1}) is None  # Square alone


def test_autoattack_runs_the_checks_once_and_keeps_them_in_its_result(net):
    model, x, y = net
    noisy = _built(Noisy(model), x)
    attack = AutoAttack(0.01, apgd_steps=2, fab_steps=2, square_queries=2)
    with pytest.warns(checks.EvaluationWarning) as caught:
        found = attack.check(noisy, x, y)
    assert any("randomised defence" in m for m in found)
    assert any("3 target class(es)" in m for m in found)  # 4 classes: 3 targets
    assert [str(w.message) for w in caught] == [f"AutoAttack: {m}" for m in found]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second call for the same model does not warn again
        assert attack.check(noisy, x, y) == found

    with pytest.warns(checks.EvaluationWarning):
        result = AutoAttack(0.01, apgd_steps=2, fab_steps=2, square_queries=2).run(
            model, (x, y), batch_size=4, verbose=0
        )
    assert result.warnings == (checks.check_n_classes(4, "standard", 3, {}),)
