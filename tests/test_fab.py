"""FAB / FAB-T against independent references.

* the box-constrained hyperplane projections against linear/quadratic programs solved by
  SciPy (optimality);
* untargeted FAB's robust accuracy against the official implementation (fra31/auto-attack,
  `pyautoattack`) on the same adversarially trained network (`attack_testbed`), with every
  returned point checked by the PyTorch copy.
The projections against the official ones, and FAB-T against the official FAB-T, are in
`test_autoattack_official.py`.
"""

import attack_testbed as tb
import numpy as np
import pytest
import tensorflow as tf
import torch
from pyautoattack.fab_pt import FABAttack_PT
from scipy import optimize

from twins_tf.attacks import FAB
from twins_tf.attacks.fab import project_onto_hyperplane_in_box


def linf_program(t, w, b):
    """min s s.t. <w, t + d> = b, |d_i| <= s, 0 <= t + d <= 1 (variables d, s)."""
    d = len(t)
    cost = np.r_[np.zeros(d), 1.0]
    eye = np.eye(d)
    inequalities = np.block([[eye, -np.ones((d, 1))], [-eye, -np.ones((d, 1))]])
    bounds = [(-ti, 1 - ti) for ti in t] + [(0, None)]
    solution = optimize.linprog(
        cost,
        A_ub=inequalities,
        b_ub=np.zeros(2 * d),
        A_eq=np.r_[w, 0.0][None],
        b_eq=[b - w @ t],
        bounds=bounds,
    )
    return solution


def l2_program(t, w, b):
    d = len(t)
    solution = optimize.minimize(
        lambda z: 0.5 * np.sum(z**2),
        np.zeros(d),
        jac=lambda z: z,
        constraints=[{"type": "eq", "fun": lambda z: w @ (t + z) - b, "jac": lambda z: w}],
        bounds=[(-ti, 1 - ti) for ti in t],
        method="SLSQP",
        options={"ftol": 1e-12},
    )
    return solution


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_projection_solves_the_program(norm):
    t, w, b = tb.hyperplane_problems(12, 20, seed=0)
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


def fab_robust_accuracy(bed, x, y, x_adv, eps, norm):
    """Accuracy judged by the PyTorch copy, after checking ball, box and misclassification."""
    delta = (x_adv - x).reshape(len(x), -1)
    size = np.abs(delta).max(1) if norm == "linf" else np.sqrt((delta**2).sum(1))
    assert size.max() <= eps + 1e-5
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    predicted = tb.torch_predict(bed.torch_model, x_adv)
    changed = np.any(delta != 0, axis=1)
    assert np.all(predicted[changed] != y[changed])
    return float(np.mean(predicted == y))


def test_untargeted_fab_matches_official():
    bed = tb.robust_digits()
    x, y = bed.x_test[:100], bed.y_test[:100]
    eps = tb.epsilon("linf")
    ours = FAB(eps, targeted=False, steps=30)(bed.keras_model, x, y).numpy()
    ours_acc = fab_robust_accuracy(bed, x, y, ours, eps, "linf")
    official = FABAttack_PT(
        bed.torch_model,
        norm="Linf",
        n_restarts=1,
        n_iter=30,
        eps=eps,
        seed=0,
        targeted=False,
        device="cpu",
    )
    with tb.torch_threads(1):
        x_adv = official.perturb(tb.torch_nchw(x), torch.from_numpy(y))
        with torch.no_grad():
            theirs_acc = float((bed.torch_model(x_adv).argmax(1).numpy() == y).mean())
    assert ours_acc < tb.keras_accuracy(bed.keras_model, x, y) - 0.1
    # the first run has no random start on either side: deterministic up to round-off
    assert abs(ours_acc - theirs_acc) <= 0.01


def test_random_restart_stays_in_the_ball():
    bed = tb.robust_digits()
    x, y = bed.x_test[:32], bed.y_test[:32]
    eps = tb.epsilon("linf")
    ours = FAB(eps, targeted=True, steps=10, restarts=2, n_target_classes=2)(
        bed.keras_model, x, y, seed=3
    ).numpy()
    again = FAB(eps, targeted=True, steps=10, restarts=2, n_target_classes=2)(
        bed.keras_model, x, y, seed=3
    ).numpy()
    np.testing.assert_array_equal(ours, again)
    fab_robust_accuracy(bed, x, y, ours, eps, "linf")


def test_bad_arguments_fail_clearly():
    model = tb.keras_convnet(num_classes=5)
    with pytest.raises(ValueError, match="eta \\(overshoot\\) must be >= 1"):
        FAB(0.1, eta=0.5)
    with pytest.raises(ValueError, match="needs at least 10 classes"):
        FAB(0.1, steps=1)(model, np.zeros((2, 16, 16, 3), np.float32), [0, 1])
    with pytest.raises(ValueError, match="integer class labels"):
        FAB(0.1, steps=1)(model, np.zeros((2, 16, 16, 3), np.float32), tf.constant([0.0, 1.0]))
