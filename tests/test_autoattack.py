"""The AutoAttack orchestrator's bookkeeping (its accuracies against the official code are in
test_autoattack_official.py).

* accuracy after each sub-attack never rises and ends below PGD-10's, on the adversarially
  trained network of `attack_testbed`, with every returned point checked by the PyTorch copy
  of the network;
* resuming from a saved state gives the uninterrupted run's results; datasets and arrays give
  the same results; mismatched states and bad input fail with clear errors.
"""

import attack_testbed as tb
import keras
import numpy as np
import pytest
import tensorflow as tf

from twins_tf.attacks import PGD, AutoAttack
from twins_tf.attacks.autoattack import AutoAttackResult
from twins_tf.attacks.checks import EvaluationWarning

QUICK = dict(apgd_steps=50, fab_steps=30, square_queries=300, n_target_classes=3)


def check_result(bed, x, y, result, eps, norm):
    """Ball, box, and: robust <=> the PyTorch copy classifies x_adv correctly."""
    delta = (result.x_adv - x).reshape(len(x), -1)
    size = np.abs(delta).max(1) if norm == "linf" else np.sqrt((delta**2).sum(1))
    assert size.max() <= eps + 1e-5
    assert result.x_adv.min() >= 0.0 and result.x_adv.max() <= 1.0
    predicted = tb.torch_predict(bed.torch_model, result.x_adv)
    np.testing.assert_array_equal(predicted == y, result.robust)
    np.testing.assert_array_equal(result.labels, y)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_cascade_is_monotone_and_beats_pgd(norm):
    """Bookkeeping of the cascade; its accuracies against the official code are in
    test_autoattack_official.py."""
    bed = tb.robust_digits()
    x, y = bed.x_test[:160], bed.y_test[:160]
    eps = tb.epsilon(norm)
    result = AutoAttack(eps, norm=norm, **QUICK).run(
        bed.keras_model, (x, y), batch_size=80, verbose=0
    )
    check_result(bed, x, y, result, eps, norm)
    ours = list(result.accuracy.values())
    assert list(result.accuracy) == ["clean", "apgd-ce", "apgd-t", "fab-t", "square"]
    assert ours[0] == pytest.approx(float(np.mean(tb.torch_predict(bed.torch_model, x) == y)))
    assert all(a >= b for a, b in zip(ours, ours[1:]))  # each stage only removes points
    pgd = PGD(eps, eps / 4, 10, norm=norm)(bed.keras_model, x, y).numpy()
    pgd_accuracy = float(np.mean(tb.torch_predict(bed.torch_model, pgd) == y))
    assert result.robust_accuracy <= pgd_accuracy
    assert result.robust_accuracy < ours[0] - 0.1


TINY = dict(apgd_steps=5, fab_steps=5, square_queries=20, n_target_classes=2)


def test_resume_gives_the_uninterrupted_result(tmp_path, monkeypatch):
    bed = tb.robust_digits()
    x, y = bed.x_test[:60], bed.y_test[:60]
    attack = AutoAttack(tb.epsilon("linf"), **TINY)
    straight = attack.run(bed.keras_model, (x, y), batch_size=20, verbose=0)
    state = tmp_path / "aa.npz"

    original = AutoAttack._attack_batch
    calls = []

    def counting(self, model, images, labels, *, batch_index=0):
        calls.append(batch_index)
        return original(self, model, images, labels, batch_index=batch_index)

    def dies_on_third_batch(self, model, images, labels, *, batch_index=0):
        if batch_index == 2:
            raise KeyboardInterrupt  # the job is killed
        return counting(self, model, images, labels, batch_index=batch_index)

    monkeypatch.setattr(AutoAttack, "_attack_batch", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        AutoAttack(tb.epsilon("linf"), **TINY).run(
            bed.keras_model, (x, y), batch_size=20, state_path=str(state), save_every=1, verbose=0
        )
    with np.load(state) as saved:
        assert int(saved["batches_done"]) == 2 and len(saved["broken_by"]) == 40
    calls.clear()
    monkeypatch.setattr(AutoAttack, "_attack_batch", counting)
    resumed = AutoAttack(tb.epsilon("linf"), **TINY).run(
        bed.keras_model, (x, y), batch_size=20, state_path=str(state), verbose=0
    )
    assert calls == [2]  # only the missing batch ran
    np.testing.assert_array_equal(resumed.broken_by, straight.broken_by)
    np.testing.assert_array_equal(resumed.x_adv, straight.x_adv)


def test_dataset_input_matches_arrays():
    bed = tb.robust_digits()
    x, y = bed.x_test[:40], bed.y_test[:40]
    attack = AutoAttack(tb.epsilon("l2"), norm="l2", **TINY)
    from_arrays = attack.run(bed.keras_model, (x, y), batch_size=16, verbose=0)
    dataset = tf.data.Dataset.from_tensor_slices((x, y))
    from_pairs = attack.run(bed.keras_model, dataset, batch_size=16, verbose=0)
    from_batches = attack.run(bed.keras_model, dataset.batch(16), verbose=0, keep_adversarial=False)
    np.testing.assert_array_equal(from_pairs.broken_by, from_arrays.broken_by)
    np.testing.assert_array_equal(from_pairs.x_adv, from_arrays.x_adv)
    np.testing.assert_array_equal(from_batches.broken_by, from_arrays.broken_by)
    assert from_batches.x_adv is None


def test_accuracy_bookkeeping_by_hand():
    result = AutoAttackResult(
        attacks=("a", "b"),
        labels=np.zeros(5, np.int64),
        broken_by=np.array([-1, 0, 1, 2, -1], np.int8),
    )
    assert result.accuracy == {"clean": 0.8, "a": 0.6, "b": 0.4}
    np.testing.assert_array_equal(result.robust, [True, False, False, False, True])


def test_mismatched_state_and_bad_input_fail_clearly(tmp_path):
    bed = tb.robust_digits()
    x, y = bed.x_test[:8], bed.y_test[:8]
    state = str(tmp_path / "aa.npz")
    AutoAttack(0.1, **TINY).run(bed.keras_model, (x, y), batch_size=4, state_path=state, verbose=0)
    with pytest.raises(ValueError, match="written with other settings"):
        AutoAttack(0.2, **TINY).run(
            bed.keras_model, (x, y), batch_size=4, state_path=state, verbose=0
        )
    with pytest.raises(ValueError, match="version must be one of"):
        AutoAttack(0.1, version="plus")
    with pytest.raises(ValueError, match="images in \\[0, 1\\]"):
        AutoAttack(0.1, **TINY).run(bed.keras_model, (x * 255, y), verbose=0)
    with pytest.raises(ValueError, match="n_target_classes=9 but the model has 5 classes"):
        AutoAttack(0.1, n_target_classes=9)(tb.keras_convnet(num_classes=5), x, y % 5)
    with pytest.raises(ValueError, match="at least 2 classes"):
        AutoAttack(0.1)(tb.keras_convnet(num_classes=1), x, y * 0)


def test_verification_counts_unconfirmed_claims_and_raises_outside_the_ball():
    bed = tb.robust_digits()
    x, y = bed.x_test[:4], bed.y_test[:4]
    attack = AutoAttack(tb.epsilon("linf"), **TINY)
    correct = tb.torch_predict(bed.torch_model, x) == y
    claims = np.where(correct, 1, 0).astype(np.int8)  # "fooled" but x_adv = x: unconfirmed
    unconfirmed = attack._verify(
        bed.keras_model, tf.constant(x), tf.constant(y, tf.int32), x.copy(), claims
    )
    assert unconfirmed == int(np.sum(correct)) > 0
    far = np.clip(x + 2 * tb.epsilon("linf"), 0, 1)
    with pytest.raises(RuntimeError, match="> epsilon"):
        attack._verify(
            bed.keras_model, tf.constant(x), tf.constant(y, tf.int32), far, np.full(4, -1, np.int8)
        )


def _batch_size_dependent_model(shift_per_example):
    """Two classes, logits (z, -z) with z = mean pixel - 1/2 + shift * (batch size - 10): on a
    batch of 12 every logit is higher than on a smaller one, as a kernel whose rounding
    depends on the batch would make it (exaggerated here so that it decides)."""
    inputs = keras.Input((8, 8, 3))

    def logits(x):
        size = keras.ops.cast(keras.ops.shape(x)[0], "float32")
        z = keras.ops.mean(x, axis=(1, 2, 3)) - 0.5 + shift_per_example * (size - 10.0)
        return keras.ops.stack([z, -z], axis=-1)

    return keras.Model(inputs, keras.layers.Lambda(logits, output_shape=(2,))(inputs))


def test_a_point_the_whole_batch_classifies_otherwise_is_counted_not_fatal():
    """12 images: 4 misclassified clean, 7 far from the boundary, 1 at it.  APGD-CE attacks
    the 8 correctly classified ones as a batch of 8, where the boundary point is misclassified
    whatever the perturbation; within the whole batch of 12 it is classified correctly
    whatever the perturbation.  So its claim is unconfirmed: counted, warned, kept as fooled."""
    eps, shift = 0.01, 0.01  # |shift * (12 - 10)| = |shift * (8 - 10)| = 0.02 > eps
    model = _batch_size_dependent_model(shift)
    budget = dict(TINY, n_target_classes=1)  # two classes: one target
    means = np.array([0.9] * 4 + [0.9] * 7 + [0.5], np.float32)
    x = np.broadcast_to(means[:, None, None, None], (12, 8, 8, 3)).copy()
    y = np.array([1] * 4 + [0] * 7 + [0])  # the first 4: class 1 at mean 0.9, a clean error
    with pytest.warns(EvaluationWarning, match="1 of 5 points reported non-robust"):
        result = AutoAttack(eps, **budget).run(model, (x, y), batch_size=12, verbose=0)
    assert list(result.broken_by) == [0] * 4 + [-1] * 7 + [1]  # fooled by apgd-ce
    assert result.unconfirmed == 1
    assert any("1 of 5 points reported non-robust" in m for m in result.warnings)
    with pytest.warns(EvaluationWarning, match="1 of 5 points reported non-robust"):
        x_adv = AutoAttack(eps, **budget)(model, x, y).numpy()  # one call warns for its batch
    assert np.abs(x_adv - x).max() <= eps + 1e-6


def _small_model_run(num_classes, version="standard"):
    """A tiny AutoAttack run on an untrained net with `num_classes` outputs, checked by numpy."""
    eps = 0.002
    keras.utils.set_random_seed(num_classes)
    model = tb.keras_convnet(num_classes=num_classes)
    rng = np.random.default_rng(num_classes)
    x = rng.uniform(size=(12, 16, 16, 3)).astype("float32")
    y = rng.integers(0, num_classes, 12)
    budget = dict(apgd_steps=5, fab_steps=5, square_queries=20, eot_iter=2)
    with pytest.warns(EvaluationWarning) as caught:
        result = AutoAttack(eps, version=version, **budget).run(
            model, (x, y), batch_size=6, verbose=0
        )
    delta = np.abs(result.x_adv - x).reshape(len(x), -1).max(1)
    assert delta.max() <= eps + 1e-5 and 0 <= result.x_adv.min() <= result.x_adv.max() <= 1
    logits = model.predict(result.x_adv, verbose=0)
    np.testing.assert_array_equal(logits.argmax(1) == y, result.robust)
    # a radius this small leaves points for every sub-attack, so each of them really runs
    assert result.robust_accuracy > 0
    return result, [str(w.message) for w in caught]


@pytest.mark.parametrize("num_classes,targets", [(2, 1), (3, 2), (4, 3)])
def test_fewer_than_ten_classes_use_the_classes_there_are(num_classes, targets):
    """min(9, classes - 1) targets; APGD-T (targeted DLR: 4 logits) skipped below 4 classes."""
    result, messages = _small_model_run(num_classes)
    assert result.n_target_classes == targets
    if num_classes < 4:
        assert result.attacks == ("apgd-ce", "fab-t", "square")
        assert "apgd-t" in result.skipped and f"has {num_classes}" in result.skipped["apgd-t"]
        assert "apgd-t: skipped" in result.summary()
    else:
        assert result.attacks == ("apgd-ce", "apgd-t", "fab-t", "square") and not result.skipped
    assert list(result.accuracy) == ["clean", *result.attacks]
    assert set(result.seconds) == set(result.attacks)
    target_note = [m for m in messages if f"use {targets} target class(es)" in m]
    assert target_note and target_note[0] in "".join(f"AutoAttack: {w}" for w in result.warnings)


def test_rand_version_with_two_classes_skips_apgd_dlr():
    result, messages = _small_model_run(2, version="rand")
    assert result.attacks == ("apgd-ce",) and "apgd-dlr" in result.skipped
    assert any("deterministic model" in m for m in messages)  # checks.check_rand_version


# --- the one protocol, input checks and serialisation, every attack ------------------------------
def _every_attack(epsilon=0.1, **kwargs):
    """One small-budget instance of each attack, built with the new spelling."""
    from twins_tf.attacks import APGD, FAB, Square

    return {
        "PGD": lambda: PGD(epsilon, epsilon / 4, 3, random_start=True, seed=2, **kwargs),
        "APGD": lambda: APGD(
            epsilon, loss="dlr", targeted=True, steps=3, n_target_classes=2, **kwargs
        ),
        "FAB": lambda: FAB(epsilon, steps=3, restarts=2, n_target_classes=2, **kwargs),
        "Square": lambda: Square(epsilon, n_queries=100, **kwargs),
        "AutoAttack": lambda: AutoAttack(epsilon, **TINY, **kwargs),
    }


ATTACK_NAMES = ("PGD", "APGD", "FAB", "Square", "AutoAttack")


@pytest.mark.parametrize("name", ATTACK_NAMES)
def test_every_attack_checks_its_input_in_one_line(name):
    bed = tb.robust_digits()
    x, y = bed.x_test[:6], bed.y_test[:6]
    attack = _every_attack()[name]()
    cases = [
        (lambda: attack(bed.keras_model, x * 255, y), "images in \\[0, 1\\]"),
        (lambda: attack(bed.keras_model, x[0], y[:1]), "one image, not a batch"),
        (lambda: attack(bed.keras_model, x, np.eye(4)[y % 4]), "the model has 10 classes"),
        (lambda: attack(bed.keras_model, x, np.full((6, 10), 0.1)), "not one-hot"),
        (lambda: attack(bed.keras_model, x, y + 10), "class ids in"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match) as caught:
            call()
        assert "\n" not in str(caught.value)
    with pytest.raises(ValueError, match="give it in \\[0, 1\\] units, e.g. 8/255") as caught:
        _every_attack(epsilon=8)[name]()
    assert "\n" not in str(caught.value)
    with pytest.raises(ValueError, match="longer than the diagonal"):
        _every_attack(epsilon=255.0, norm="l2")[name]()(bed.keras_model, x, y)
    # one-hot rows of the model's width: the class ids they encode
    one_hot = np.eye(10, dtype=np.float32)[y]
    np.testing.assert_array_equal(
        attack(bed.keras_model, x, one_hot, seed=4).numpy(),
        attack(bed.keras_model, x, y, seed=4).numpy(),
    )


@pytest.mark.parametrize("name", ATTACK_NAMES)
def test_every_attack_round_trips_through_keras_serialisation(name):
    import keras

    bed = tb.robust_digits()
    x, y = bed.x_test[:12], bed.y_test[:12]
    attack = _every_attack(epsilon=0.3)[name]()  # Square breaks some in 100 queries at 0.3
    config = keras.saving.serialize_keras_object(attack)
    assert config["registered_name"] == f"twins_tf>{name}"
    again = keras.saving.deserialize_keras_object(config)
    assert type(again) is type(attack) and again.get_config() == attack.get_config()
    x_adv = attack(bed.keras_model, x, y, seed=7).numpy()
    np.testing.assert_array_equal(again(bed.keras_model, x, y, seed=7).numpy(), x_adv)
    assert np.any(x_adv != x)  # the attacks moved something: the comparison is not vacuous
