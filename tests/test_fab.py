"""FAB / FAB-T against independent references.

* the box-constrained hyperplane projections against linear/quadratic programs solved by
  SciPy (optimality) and against torchattacks' projection functions (same outputs);
* FAB-T and untargeted FAB robust accuracy against torchattacks on the same adversarially
  trained network (`attack_testbed`), with every returned point checked by the PyTorch copy.
"""
import numpy as np
import pytest
import tensorflow as tf
import torch
import torchattacks
from scipy import optimize
from torchattacks.attacks.fab import projection_l2 as torch_projection_l2
from torchattacks.attacks.fab import projection_linf as torch_projection_linf

import attack_testbed as tb
from twins_tf.attacks import FAB
from twins_tf.attacks.fab import project_onto_hyperplane_in_box


def hyperplane_problems(n, d, seed):
    """Points in the box, normals with some zero entries, offsets near and far (some
    unreachable inside the box)."""
    rng = np.random.default_rng(seed)
    t = rng.uniform(size=(n, d))
    w = rng.normal(size=(n, d))
    w[:, :3] = 0.0
    b = np.sum(w * t, 1) + rng.normal(size=n) * rng.choice([0.1, 1.0, 30.0], size=n)
    return t.astype(np.float32), w.astype(np.float32), b.astype(np.float32)


def linf_program(t, w, b):
    """min s s.t. <w, t + d> = b, |d_i| <= s, 0 <= t + d <= 1 (variables d, s)."""
    d = len(t)
    cost = np.r_[np.zeros(d), 1.0]
    eye = np.eye(d)
    inequalities = np.block([[eye, -np.ones((d, 1))], [-eye, -np.ones((d, 1))]])
    bounds = [(-ti, 1 - ti) for ti in t] + [(0, None)]
    solution = optimize.linprog(cost, A_ub=inequalities, b_ub=np.zeros(2 * d),
                                A_eq=np.r_[w, 0.0][None], b_eq=[b - w @ t], bounds=bounds)
    return solution


def l2_program(t, w, b):
    d = len(t)
    solution = optimize.minimize(
        lambda z: 0.5 * np.sum(z ** 2), np.zeros(d), jac=lambda z: z,
        constraints=[{"type": "eq", "fun": lambda z: w @ (t + z) - b, "jac": lambda z: w}],
        bounds=[(-ti, 1 - ti) for ti in t], method="SLSQP", options={"ftol": 1e-12})
    return solution


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_projection_solves_the_program(norm):
    t, w, b = hyperplane_problems(12, 20, seed=0)
    steps = project_onto_hyperplane_in_box(t, w, b, norm).numpy().astype(np.float64)
    t, w, b = t.astype(np.float64), w.astype(np.float64), b.astype(np.float64)
    feasible_count = 0
    for i in range(len(t)):
        solution = (linf_program if norm == "linf" else l2_program)(t[i], w[i], b[i])
        low = np.sum(np.minimum(w[i], 0.0))  # the range of <w, z> over the box
        high = np.sum(np.maximum(w[i], 0.0))
        reachable = low <= b[i] <= high
        toward = np.where(w[i] > 0, 1.0, 0.0) if b[i] > high else np.where(w[i] < 0, 1.0, 0.0)
        corner = np.where(w[i] == 0, t[i], toward)
        if not reachable:  # the paper's answer: the box corner that gets closest
            np.testing.assert_allclose(t[i] + steps[i], corner, atol=1e-6)
            continue
        feasible_count += 1
        assert solution.success
        np.testing.assert_allclose(w[i] @ (t[i] + steps[i]), b[i], atol=1e-4)
        assert np.all(t[i] + steps[i] >= -1e-6) and np.all(t[i] + steps[i] <= 1 + 1e-6)
        ours = np.abs(steps[i]).max() if norm == "linf" else np.linalg.norm(steps[i])
        best = solution.fun if norm == "linf" else np.linalg.norm(solution.x)
        assert ours <= best + 1e-4
    assert 3 <= feasible_count < len(t)  # both cases exercised


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_projection_matches_torchattacks(norm):
    t, w, b = hyperplane_problems(256, 300, seed=1)
    ours = project_onto_hyperplane_in_box(t, w, b, norm).numpy()
    reference = torch_projection_linf if norm == "linf" else torch_projection_l2
    theirs = reference(torch.tensor(t), torch.tensor(w), torch.tensor(b)).numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


N_EXAMPLES = 200


def fab_robust_accuracy(bed, x, y, x_adv, eps, norm):
    """Accuracy judged by the PyTorch copy, after checking ball, box and misclassification."""
    delta = (x_adv - x).reshape(len(x), -1)
    size = np.abs(delta).max(1) if norm == "linf" else np.sqrt((delta ** 2).sum(1))
    assert size.max() <= eps + 1e-5
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    predicted = tb.torch_predict(bed.torch_model, x_adv)
    changed = np.any(delta != 0, axis=1)
    assert np.all(predicted[changed] != y[changed])
    return float(np.mean(predicted == y))


def torchattacks_accuracy(bed, x, y, **kwargs):
    with tb.torch_threads(1):
        attack = torchattacks.FAB(bed.torch_model, seed=0, **kwargs)
        x_adv = attack(tb.torch_nchw(x), torch.from_numpy(y))
        with torch.no_grad():
            return float((bed.torch_model(x_adv).argmax(1).numpy() == y).mean())


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fab_t_matches_torchattacks(norm):
    bed = tb.robust_digits()
    x, y = bed.x_test[:N_EXAMPLES], bed.y_test[:N_EXAMPLES]
    eps = tb.epsilon(norm)
    ours = FAB(bed.keras_model, eps, norm=norm, targeted=True, steps=50,
               n_target_classes=3).perturb(x, y).numpy()
    ours_acc = fab_robust_accuracy(bed, x, y, ours, eps, norm)
    # torchattacks' multi-targeted FAB runs n_classes - 1 targets (top-2 ... top-4 here)
    theirs_acc = torchattacks_accuracy(bed, x, y, norm=tb.TORCH_NORM[norm], eps=eps, steps=50,
                                       multi_targeted=True, n_classes=4)
    assert ours_acc < tb.keras_accuracy(bed.keras_model, x, y) - 0.1
    assert abs(ours_acc - theirs_acc) <= 0.03


def test_untargeted_fab_matches_torchattacks():
    bed = tb.robust_digits()
    x, y = bed.x_test[:100], bed.y_test[:100]
    eps = tb.epsilon("linf")
    ours = FAB(bed.keras_model, eps, targeted=False, steps=30).perturb(x, y).numpy()
    ours_acc = fab_robust_accuracy(bed, x, y, ours, eps, "linf")
    theirs_acc = torchattacks_accuracy(bed, x, y, norm="Linf", eps=eps, steps=30)
    assert abs(ours_acc - theirs_acc) <= 0.03


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fab_t_nine_targets_matches_torchattacks(norm):
    bed = tb.robust_digits()
    x, y = bed.x_test, bed.y_test
    eps = tb.epsilon(norm)
    ours = FAB(bed.keras_model, eps, norm=norm, targeted=True).perturb(x, y).numpy()
    ours_acc = fab_robust_accuracy(bed, x, y, ours, eps, norm)
    theirs_acc = torchattacks_accuracy(bed, x, y, norm=tb.TORCH_NORM[norm], eps=eps, steps=100,
                                       multi_targeted=True, n_classes=10)
    assert abs(ours_acc - theirs_acc) <= 0.02


def test_random_restart_stays_in_the_ball():
    bed = tb.robust_digits()
    x, y = bed.x_test[:32], bed.y_test[:32]
    eps = tb.epsilon("linf")
    ours = FAB(bed.keras_model, eps, targeted=True, steps=10, restarts=2,
               n_target_classes=2).perturb(x, y, seed=3).numpy()
    again = FAB(bed.keras_model, eps, targeted=True, steps=10, restarts=2,
                n_target_classes=2).perturb(x, y, seed=3).numpy()
    np.testing.assert_array_equal(ours, again)
    fab_robust_accuracy(bed, x, y, ours, eps, "linf")


def test_bad_arguments_fail_clearly():
    model = tb.keras_convnet(num_classes=5)
    with pytest.raises(ValueError, match="eta \\(overshoot\\) must be >= 1"):
        FAB(model, 0.1, eta=0.5)
    with pytest.raises(ValueError, match="needs at least 10 classes"):
        FAB(model, 0.1, steps=1).perturb(np.zeros((2, 16, 16, 3), np.float32), [0, 1])
    with pytest.raises(ValueError, match="integer class labels"):
        FAB(model, 0.1, steps=1).perturb(np.zeros((2, 16, 16, 3), np.float32),
                                         tf.constant([0.0, 1.0]))
