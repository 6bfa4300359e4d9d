"""twins_tf's AutoAttack against the official implementation: fra31/auto-attack (PyPI
`pyautoattack` 0.2.0, PyTorch), the code the robustness numbers in the literature come from.

Same network on both sides: the adversarially trained digits convnet of `attack_testbed`, its
Keras model for us and its PyTorch twin (the same weights) for the official code, on the same
images.

* Deterministic parts, compared run against run (up to float32 round-off between TensorFlow
  and PyTorch):
  - APGD-CE and APGD-T from a given start point (the official `attack_single_run(x, y,
    x_init=...)`): every iterate, recorded where it enters the model on both sides, so the
    step sizes, checkpoints, halvings, resets to the best point and the momentum all agree;
  - the first FAB-T run (it has no random start): the closest adversarial points it returns;
  - FAB's box-constrained projections (`fab_projections.projection_linf`/`projection_l2`) on
    random problems;
  - Square's p schedule (`p_selection`) and the square side of every iteration, read from the
    window positions the official code draws.
* Randomised parts (the random streams of TF and PyTorch differ): robust accuracy of each
  sub-attack run alone and of the standard cascade within 1 point of the official code's, and
  the per-example robust masks agreeing on >= 97 % of the examples.  The full budget (100
  iterations, 9 targets, 5000 queries) on 600 examples is marked slow; the default suite runs
  the same algorithm with a smaller budget, identical on both sides.
* Every adversarial example we return lies in the epsilon-ball and in [0, 1], and is
  misclassified by the Keras model and by the PyTorch twin.
"""

import logging
import time

import attack_testbed as tb
import numpy as np
import pytest
import tensorflow as tf
import torch
from pyautoattack import AutoAttack as OfficialAutoAttack
from pyautoattack import fab_projections
from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted
from pyautoattack.fab_pt import FABAttack_PT
from pyautoattack.square import SquareAttack

from twins_tf.attacks import APGD, FAB, AutoAttack, Square
from twins_tf.attacks.autoattack import NOT_BROKEN
from twins_tf.attacks.fab import project_onto_hyperplane_in_box
from twins_tf.attacks.square import p_schedule

ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "square")
REDUCED = dict(apgd_steps=25, fab_steps=25, square_queries=300, n_target_classes=3)
STANDARD = dict(apgd_steps=100, fab_steps=100, square_queries=5000, n_target_classes=9)
REDUCED_EXAMPLES = 200
STANDARD_TRAIN = 1197  # leaves 600 held-out digits for the full-budget comparison


# --- running both implementations ----------------------------------------------------------------
def official_attacks(module, norm, eps, budget, seed=0):
    """The official sub-attacks with AutoAttack 'standard''s settings and the given budget."""
    torch_norm = tb.TORCH_NORM[norm]
    common = dict(norm=torch_norm, eps=eps, seed=seed, device="cpu")
    return {
        "apgd-ce": APGDAttack(
            module, n_iter=budget["apgd_steps"], n_restarts=1, loss="ce", rho=0.75, **common
        ),
        "apgd-t": APGDAttack_targeted(
            module,
            n_iter=budget["apgd_steps"],
            n_restarts=1,
            n_target_classes=budget["n_target_classes"],
            rho=0.75,
            **common,
        ),
        "fab-t": FABAttack_PT(
            module,
            n_restarts=1,
            n_iter=budget["fab_steps"],
            targeted=True,
            n_target_classes=budget["n_target_classes"],
            **common,
        ),
        "square": SquareAttack(
            module,
            p_init=0.8,
            n_queries=budget["square_queries"],
            n_restarts=1,
            resc_schedule=False,
            **common,
        ),
    }


def official_cascade(module, norm, eps, budget):
    """The official AutoAttack 'standard' cascade with the given budget.

    Its attributes are the budget at construction (APGD derives its checkpoints from n_iter
    then), so the sub-attacks are rebuilt with `official_attacks` and put in their slots.
    """
    aa = OfficialAutoAttack(
        module,
        norm=tb.TORCH_NORM[norm],
        eps=eps,
        seed=0,
        version="custom",
        attacks=list(ATTACKS),
        device="cpu",
    )
    attacks = official_attacks(module, norm, eps, budget)
    aa.apgd, aa.apgd_targeted, aa.fab, aa.square = (
        attacks["apgd-ce"],
        attacks["apgd-t"],
        attacks["fab-t"],
        attacks["square"],
    )
    return aa


def torch_robust(module, x_adv_nchw, y):
    with torch.no_grad():
        return module(x_adv_nchw).argmax(1).numpy() == y


def check_adversarial(bed, x, y, x_adv, eps, norm):
    """Ours: in the ball, in [0, 1]; every changed point misclassified by Keras and PyTorch.

    Returns the robust mask judged by the Keras model.
    """
    delta = (x_adv - x).reshape(len(x), -1)
    size = np.abs(delta).max(1) if norm == "linf" else np.sqrt((delta**2).sum(1))
    assert size.max() <= eps + 1e-5, f"perturbation {size.max()} > epsilon {eps}"
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    keras_robust = tb.keras_predict(bed.keras_model, x_adv) == y
    torch_ok = tb.torch_predict(bed.torch_model, x_adv) == y
    changed = np.any(delta != 0, axis=1)
    assert not np.any(keras_robust[changed]), "a returned point is classified correctly (Keras)"
    assert not np.any(torch_ok[changed]), "a returned point is classified correctly (PyTorch)"
    return keras_robust


def compare(bed, x, y, norm, budget):
    """Every sub-attack alone and the cascade, ours and official, on the same examples.

    Returns {name: dict(ours=robust mask, official=robust mask, ours_s=..., official_s=...)}.
    """
    eps = tb.epsilon(norm)
    model, module = bed.keras_model, bed.torch_model
    x_t, y_t = tb.torch_nchw(x), torch.from_numpy(y)
    clean = tb.keras_predict(model, x) == y
    ours_aa = AutoAttack(eps, norm=norm, seed=0, **budget)
    ours_attacks = dict(zip(ours_aa.attack_names, ours_aa.sub_attacks(model)))
    theirs = official_attacks(module, norm, eps, budget)
    results = {}
    for name in ATTACKS:
        start = time.perf_counter()
        x_adv = ours_attacks[name](model, x, y, seed=0).numpy()
        ours_s = time.perf_counter() - start
        ours = check_adversarial(bed, x, y, x_adv, eps, norm) & clean
        with tb.torch_threads(1):
            start = time.perf_counter()
            official = torch_robust(module, theirs[name].perturb(x_t, y_t), y)
            official_s = time.perf_counter() - start
        results[name] = dict(ours=ours, official=official, ours_s=ours_s, official_s=official_s)
        if name == "square":  # the official search again from another seed: its luck alone
            reseeded = official_attacks(module, norm, eps, budget, seed=1)["square"]
            with tb.torch_threads(1):
                results[name]["official_reseeded"] = torch_robust(
                    module, reseeded.perturb(x_t, y_t), y
                )
        print(report({name: results[name]}), flush=True)  # long runs: one line per attack
    start = time.perf_counter()
    x_adv, broken_by = ours_aa._attack_batch(model, x, y)
    ours_s = time.perf_counter() - start
    ours = check_adversarial(bed, x, y, x_adv, eps, norm)
    np.testing.assert_array_equal(ours, broken_by == NOT_BROKEN)
    with tb.torch_threads(1):
        aa = official_cascade(module, norm, eps, budget)
        start = time.perf_counter()
        x_adv_official, _ = aa.run_standard_evaluation(x_t, y_t, batch_size=len(x))
        official_s = time.perf_counter() - start
        official = torch_robust(module, x_adv_official, y)
    results["cascade"] = dict(ours=ours, official=official, ours_s=ours_s, official_s=official_s)
    print(report({"cascade": results["cascade"]}), flush=True)
    return results


def report(results):
    """attack: robust accuracy ours / official, mask agreement, seconds ours / official."""
    lines = []
    for name, r in results.items():
        lines.append(
            f"  {name}: {r['ours'].mean():.2%} / {r['official'].mean():.2%}, "
            f"{np.mean(r['ours'] == r['official']):.2%}, "
            f"{r['ours_s']:.1f} / {r['official_s']:.1f}"
            + (
                " (official vs itself from another seed: "
                f"{np.mean(r['official_reseeded'] == r['official']):.2%})"
                if "official_reseeded" in r
                else ""
            )
        )
    return "\n".join(lines)


def square_disagreement_bound(luck):
    """The most examples on which our Square's mask may differ from the official one's.

    Square is a random search: ours draws from TensorFlow's generator, the official code from
    PyTorch's, so which borderline examples each breaks is luck, not a defect.  `luck` is the
    number on which the official code disagrees with itself from another seed.  If ours is the
    same attack, its disagreement with the official run is another draw of the same count:
    a sum of independent per-example Bernoullis (a Poisson binomial), whose variance is at most
    its mean.  The difference of two such counts has variance at most 2 x mean, so ours may
    exceed `luck` by 4 standard deviations (mean estimated by max(luck, 1)): a false alarm
    below 1e-4 under the normal approximation.  A broken attack (wrong schedule, wrong square
    placement) differs on a large share of the robust examples and exceeds it.
    """
    return luck + 4.0 * np.sqrt(2.0 * max(luck, 1))


def assert_agree(results, accuracy_points, agreement):
    """Robust accuracies within `accuracy_points`, masks agreeing on `agreement` of the
    examples; Square's masks within the bound its own randomness allows (above)."""
    for name, r in results.items():
        gap = abs(r["ours"].mean() - r["official"].mean())
        assert gap <= accuracy_points / 100 + 1e-9, f"{name}: robust accuracy differs by {gap:.2%}"
        if "official_reseeded" in r:
            luck = int(np.sum(r["official_reseeded"] != r["official"]))
            differ = int(np.sum(r["ours"] != r["official"]))
            bound = square_disagreement_bound(luck)
            assert differ <= bound, (
                f"{name}: masks differ on {differ} examples, more than the {bound:.0f} its "
                f"randomness allows (the official code differs from itself on {luck})"
            )
            continue
        same = np.mean(r["ours"] == r["official"])
        assert same >= agreement, f"{name}: robust masks agree on only {same:.2%}"
    # the attacks do something on this model, and the cascade is at least as strong as each
    clean = max(r["official"].mean() for r in results.values())
    assert results["cascade"]["ours"].mean() < clean - 0.05
    for name in ATTACKS:
        assert results["cascade"]["ours"].mean() <= results[name]["ours"].mean()


@pytest.fixture(autouse=True)
def quiet_official_logger():
    logging.getLogger("auto-attack").setLevel(logging.WARNING)


@pytest.mark.parametrize("norm", ["linf", pytest.param("l2", marks=pytest.mark.slow)])
def test_reduced_budget_matches_official(norm):
    """About a minute for L-inf (both sides); L2 takes as long again, so it is slow."""
    bed = tb.robust_digits()
    x, y = bed.x_test[:REDUCED_EXAMPLES], bed.y_test[:REDUCED_EXAMPLES]
    print(
        f"\n{norm}, {len(x)} examples, {REDUCED}: attack, robust accuracy ours / official, "
        "mask agreement, seconds ours / official"
    )
    results = compare(bed, x, y, norm, REDUCED)
    # 200 examples: one point is two examples; the masks must still agree on 97 % (Square's
    # within its own randomness, see square_disagreement_bound), and Square's robust accuracy
    # stays within the 2 points
    assert_agree(results, accuracy_points=2.0, agreement=0.97)


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_standard_budget_matches_official(norm):
    bed = tb.robust_digits(num_train=STANDARD_TRAIN)
    x, y = bed.x_test, bed.y_test
    assert len(x) >= 500
    print(
        f"\n{norm}, {len(x)} examples, {STANDARD}: attack, robust accuracy ours / official, "
        "mask agreement, seconds ours / official"
    )
    results = compare(bed, x, y, norm, STANDARD)
    assert_agree(results, accuracy_points=1.0, agreement=0.97)


# --- APGD from a given start, iterate by iterate -------------------------------------------------
class KerasRecorder:
    """Calls the Keras model and keeps every input batch (our attacks run eagerly here)."""

    def __init__(self, model):
        self.model, self.inputs = model, []

    def __call__(self, x, training=False):
        self.inputs.append(np.asarray(x))
        return self.model(x, training=training)


class TorchRecorder(torch.nn.Module):
    """Calls the PyTorch twin and keeps every input batch, as NHWC numpy."""

    def __init__(self, module):
        super().__init__()
        self.module, self.inputs = module, []

    def forward(self, x):
        self.inputs.append(x.detach().numpy().transpose(0, 2, 3, 1).copy())
        return self.module(x)


def start_points(x, eps, norm, seed=0):
    rng = np.random.default_rng(seed)
    if norm == "linf":
        delta = eps * rng.choice([-1.0, 1.0], size=x.shape)
    else:
        delta = rng.normal(size=x.shape)
        delta *= eps / np.sqrt((delta**2).sum((1, 2, 3), keepdims=True))
    return np.clip(x + delta, 0.0, 1.0).astype(np.float32)


APGD_STEPS = 30  # the official checkpoints (6, 11, 15, 18, 20, 21, ...) differ from the paper's
# Share of the examples whose iterates agree.  Where a cross-entropy gradient entry is tiny
# (a confidently classified digit), float32 round-off can flip its sign in an L-inf step
# between TF and PyTorch, and that example's path moves; a wrong step-size, checkpoint,
# reset or momentum rule moves most paths.
PATH_AGREEMENT = {
    ("linf", "ce"): 0.75,
    ("l2", "ce"): 0.75,
    ("linf", "dlr"): 0.9,
    ("l2", "dlr"): 0.9,
}


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_apgd_iterates_match_official(norm, loss):
    bed = tb.robust_digits()
    x, y = bed.x_test[:48], bed.y_test[:48]
    eps = tb.epsilon(norm)
    start = start_points(x, eps, norm)
    target = np.argsort(-tb.keras_logits(bed.keras_model, x), axis=1)[:, 1]
    keras_recorder = KerasRecorder(bed.keras_model)
    ours = APGD(eps, norm=norm, loss=loss, targeted=loss == "dlr", steps=APGD_STEPS)
    ours._use(keras_recorder)  # the model a call would bind, for the run used directly
    _, ours_fooled, ours_best, ours_loss, _ = ours._iterate(
        tf.constant(x), tf.constant(y, tf.int32), tf.constant(target, tf.int32), tf.constant(start)
    )
    torch_recorder = TorchRecorder(bed.torch_model)
    common = dict(n_iter=APGD_STEPS, norm=tb.TORCH_NORM[norm], eps=eps, device="cpu")
    if loss == "ce":
        official = APGDAttack(torch_recorder, loss="ce", **common)
    else:
        official = APGDAttack_targeted(torch_recorder, **common)
        official.y_target = torch.from_numpy(target.astype(np.int64))
    x_t = tb.torch_nchw(x)
    official.init_hyperparam(x_t)
    with tb.torch_threads(1):
        best, robust, loss_best, _ = official.attack_single_run(
            x_t, torch.from_numpy(y), x_init=tb.torch_nchw(start)
        )
    ours_path, official_path = np.stack(keras_recorder.inputs), np.stack(torch_recorder.inputs)
    assert ours_path.shape == official_path.shape == (APGD_STEPS + 1,) + x.shape
    gap = np.abs(ours_path - official_path).reshape(APGD_STEPS + 1, len(x), -1).max(-1)
    same_path = gap.max(0) <= 1e-4
    assert same_path.mean() >= PATH_AGREEMENT[norm, loss], (
        f"iterates agree on {same_path.mean():.0%} of the examples"
    )
    # on those examples the run's outputs agree too
    best = best.numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(ours_best.numpy()[same_path], best[same_path], atol=1e-4)
    np.testing.assert_allclose(
        ours_loss.numpy()[same_path], loss_best.numpy()[same_path], rtol=1e-4, atol=1e-4
    )
    np.testing.assert_array_equal(ours_fooled.numpy()[same_path], ~robust.numpy()[same_path])


# --- FAB ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fab_projection_matches_official(norm):
    t, w, b = tb.hyperplane_problems(256, 300, seed=1)
    ours = project_onto_hyperplane_in_box(t, w, b, norm).numpy()
    official = {"linf": fab_projections.projection_linf, "l2": fab_projections.projection_l2}
    theirs = official[norm](torch.tensor(t), torch.tensor(w), torch.tensor(b)).numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_first_fab_t_run_matches_official(norm):
    """The first FAB-T run starts at the clean point: deterministic on both sides."""
    bed = tb.robust_digits()
    x, y = bed.x_test[:100], bed.y_test[:100]
    eps, steps = tb.epsilon(norm), 20
    correct = tb.keras_predict(bed.keras_model, x) == y
    x, y = x[correct], y[correct]
    target = np.argsort(-tb.keras_logits(bed.keras_model, x), axis=1)[:, 1]
    ours = FAB(eps, norm=norm, steps=steps)
    ours._use(bed.keras_model)
    best, distance = ours._run_once(
        tf.constant(x),
        tf.constant(y, tf.int32),
        tf.constant(target, tf.int32),
        tf.constant([0, 0]),
        tf.constant(False),
    )
    official = FABAttack_PT(
        bed.torch_model,
        norm=tb.TORCH_NORM[norm],
        n_iter=steps,
        eps=eps,
        targeted=True,
        device="cpu",
    )
    official.target_class = 2  # the second most likely class
    with tb.torch_threads(1):
        theirs = official.attack_single_run(
            tb.torch_nchw(x), torch.from_numpy(y), use_rand_start=False, is_targeted=True
        )
    theirs = theirs.numpy().transpose(0, 2, 3, 1)
    ours_found = distance.numpy() < 1e10
    theirs_found = np.any(theirs != x, axis=(1, 2, 3))
    assert ours_found.mean() > 0.5  # the runs find adversarial points at all
    same = np.abs(best.numpy() - theirs).reshape(len(x), -1).max(1) <= 1e-4
    assert same.mean() >= 0.9, f"closest points agree on {same.mean():.0%} of the examples"
    assert np.mean(ours_found == theirs_found) >= 0.95


# --- Square ------------------------------------------------------------------------------------
@pytest.mark.parametrize("rescale", [False, True])
def test_square_p_schedule_is_officials(rescale):
    official = SquareAttack(None, n_queries=5000, eps=0.1, p_init=0.8, resc_schedule=rescale)
    ours = Square(0.1, n_queries=5000, rescale_schedule=rescale)
    for iteration in range(10001):
        assert p_schedule(iteration, ours.p_init, ours.n_queries, rescale) == pytest.approx(
            official.p_selection(iteration)
        ), iteration


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_square_window_sizes_are_officials(norm):
    """Every iteration's square side, read off the official code's window draws
    (`random_int(0, h - s)`) on a run that never succeeds (a tiny epsilon)."""
    bed = tb.robust_digits()
    x, y = bed.x_test[:4], bed.y_test[:4]
    correct = tb.keras_predict(bed.keras_model, x) == y
    x, y = x[correct], y[correct]
    n_queries, size = 600, x.shape[1]
    official = SquareAttack(
        bed.torch_model,
        norm=tb.TORCH_NORM[norm],
        n_queries=n_queries,
        eps=1e-4,
        p_init=0.8,
        resc_schedule=True,
        device="cpu",
    )
    highs = []
    draw = official.random_int

    def recording_random_int(low=0, high=1, shape=(1,)):
        highs.append(high)
        return draw(low, high, shape)

    official.random_int = recording_random_int
    x_t = tb.torch_nchw(x)
    official.init_hyperparam(x_t)
    with tb.torch_threads(1):
        official.attack_single_run(x_t, torch.from_numpy(y))
    draws_per_iteration = 2 if norm == "linf" else 4  # (top, left), L2 for two windows
    theirs = [size - high for high in highs[::draws_per_iteration]]
    assert len(theirs) == n_queries
    ours = Square(1e-4, norm=norm, n_queries=n_queries, rescale_schedule=True)
    sides = [side for _, count, side in ours.phases(size, size) for _ in range(count)]
    assert len(set(sides)) >= 5  # the schedule shrinks the square several times
    # the same number of iterations after the start point: n_queries on both sides
    assert sides == theirs
