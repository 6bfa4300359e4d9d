"""Auto-PGD (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an ensemble
of diverse parameter-free attacks"): APGD-CE, APGD-DLR and the targeted APGD-T of AutoAttack.

Why our own: the reference implementation (fra31/auto-attack) is PyTorch and needs PyTorch even
for Keras models; torchattacks is PyTorch only; the Adversarial Robustness Toolbox runs APGD
on TensorFlow but eagerly, one Python step at a time, and not the AutoAttack orchestration.
Here one attack run is a single `tf.function` whose iteration loop is a `tf.while_loop`, so a
100-step run costs 100 forward/backward passes and no Python overhead.

The algorithm (paper section 3, Algorithm 1), per example:
  * start at a random point on the epsilon-sphere (L-inf: uniform direction scaled to max-norm
    epsilon; L2: Gaussian direction scaled to norm epsilon), clipped to [0, 1];
  * step size eta = 2 * epsilon; the first step is a projected gradient step
    (L-inf: sign of the gradient, L2: normalised gradient), every later step mixes it with
    momentum 0.75: x <- P(x + 0.75 (z - x) + 0.25 (x - x_prev)), z = P(x + eta * step);
  * at checkpoints the step size is halved and the iterate reset to the best point so far when
      condition 1: the loss increased in at most rho * (w_j - w_{j-1}) of the steps since the
        last checkpoint (rho = 0.75; "at most" as in the reference code, the paper writes "<"),
      condition 2: the step size was not halved at the last checkpoint and the best loss has
        not improved since;
    the checkpoints are the reference code's (fra31/auto-attack): windows of int(0.22 N)
    steps, each next one int(0.03 N) shorter, down to int(0.06 N) (all at least 1).  For
    N = 100 they are the paper's w_j = ceil(p_j N), p_1 = 0.22,
    p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06) (22, 41, 57, 70, 80, 87, 93, 99); for
    other N the two differ, and AutoAttack numbers at reduced budgets are quoted against the
    reference code, so its rule is the one kept.  As in the reference code, the first step of
    the first window counts as an increase if its loss is above 0 (its loss history starts
    zero-filled);
  * the attack succeeds on an example as soon as one iterate is misclassified; that iterate is
    returned.

Losses: cross-entropy ("ce"), the difference of logits ratio
    DLR(z, y) = -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3)
and its targeted version (APGD-T)
    DLR_t(z, y, t) = -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2),
with z_pi1 >= z_pi2 >= ... the sorted logits.  APGD-T runs once per target class, the targets
being the 2nd, 3rd, ... 10th most likely classes at the clean input, each run only on the
examples no earlier run fooled.
"""

import keras
import numpy as np
import tensorflow as tf

from twins_tf.attacks import _lp, base

LOSSES = ("ce", "dlr")


def checkpoint_schedule(steps):
    """The iterations after which APGD checks its step size, and the window lengths.

    The reference code's rule (module docstring): the first window is int(0.22 N) steps,
    each next one int(0.03 N) shorter but at least int(0.06 N), every count at least 1.

    Args:
      steps: total number of iterations N.

    Returns:
      A list of (iteration, window) pairs: the check happens after `iteration` steps
      (1-based count) and looks back over the `window` steps since the previous check.
    """
    window = max(int(0.22 * steps), 1)
    shortest = max(int(0.06 * steps), 1)
    shrink = max(int(0.03 * steps), 1)
    schedule, after = [], window
    while after <= steps:
        schedule.append((after, window))
        window = max(window - shrink, shortest)
        after += window
    return schedule


def cross_entropy_loss(logits, y):
    """Per-example cross-entropy."""
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)


def dlr_loss(logits, y):
    """Per-example difference-of-logits-ratio loss (untargeted), higher = closer to fooled."""
    top = tf.sort(logits, axis=-1, direction="DESCENDING")
    true_logit = tf.gather(logits, y, axis=-1, batch_dims=1)
    is_true = tf.one_hot(y, tf.shape(logits)[-1], on_value=True, off_value=False)
    best_other = tf.reduce_max(tf.where(is_true, -np.inf, logits), axis=-1)
    return -(true_logit - best_other) / (top[:, 0] - top[:, 2] + _lp.TINY)


def targeted_dlr_loss(logits, y, target):
    """Per-example targeted DLR loss of APGD-T, higher = closer to classifying as `target`."""
    top = tf.sort(logits, axis=-1, direction="DESCENDING")
    true_logit = tf.gather(logits, y, axis=-1, batch_dims=1)
    target_logit = tf.gather(logits, target, axis=-1, batch_dims=1)
    scale = top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + _lp.TINY
    return -(true_logit - target_logit) / scale


@keras.saving.register_keras_serializable(package="twins_tf")
class APGD(base.Attack):
    """Auto-PGD against a Keras classifier taking [0, 1] NHWC images and returning logits.

    Args:
      epsilon: radius of the threat model in [0, 1] pixel units.
      norm: "linf" or "l2".
      loss: "ce" (APGD-CE) or "dlr" (APGD-DLR, or APGD-T with `targeted=True`).
      targeted: run the targeted DLR loss once per target class (APGD-T).
      steps: iterations per run (100 in AutoAttack).
      restarts: random restarts per run (AutoAttack "standard": 1).
      n_target_classes: targets of APGD-T: the 2nd ... (n+1)th most likely classes (9).
      rho: the condition-1 fraction of checkpoints (0.75).
      eot_iter: gradients averaged per step (Expectation over Transformation, for randomized
        models; AutoAttack "rand" uses 20).
      seed: seed of the random starting points.

    Called as `apgd(model, x, y, seed=None)` (`twins_tf.attacks.base`): for every example
    some run fooled, the misclassified iterate (within epsilon of `x`, in [0, 1]); for the
    others, `x` itself.  With the DLR loss (APGD-DLR, APGD-T) every run also checks, as the
    official code's `check_zero_gradients` does, whether an example's gradient at the run's
    start point is exactly zero; afterwards `zero_gradients` is the number of such examples
    (any run) of the last call and `attacked` the number it attacked.  Only DLR, as there:
    the cross-entropy's gradient legitimately rounds to zero in float32 on a confidently
    classified example (saturated softmax), the scale-free DLR loss's does not, so a zero
    DLR gradient means the model hides its gradient (gradient masking).

    Example:
      >>> apgd = APGD(8 / 255, loss="ce", steps=100)
      >>> x_adv = apgd(model, images, labels)  # misclassified where the attack succeeded
    """

    who = "APGD"
    config_keys = (
        "epsilon",
        "norm",
        "loss",
        "targeted",
        "steps",
        "restarts",
        "n_target_classes",
        "rho",
        "eot_iter",
        "seed",
    )

    def __init__(
        self,
        epsilon,
        *,
        norm="linf",
        loss="ce",
        targeted=False,
        steps=100,
        restarts=1,
        n_target_classes=9,
        rho=0.75,
        eot_iter=1,
        seed=0,
    ):
        who = self.who
        self.norm = _lp.check_norm(norm, who)
        self.epsilon = _lp.check_epsilon(epsilon, who, self.norm)
        if loss not in LOSSES:
            raise ValueError(f"APGD loss must be one of {LOSSES}, got {loss!r}.")
        if targeted and loss != "dlr":
            raise ValueError(
                "APGD targeted=True runs the targeted DLR loss (APGD-T): "
                f"pass loss='dlr', got loss={loss!r}."
            )
        self.loss = loss
        self.targeted = bool(targeted)
        self.steps = _lp.check_positive_int(steps, "steps", who)
        self.restarts = _lp.check_positive_int(restarts, "restarts", who)
        self.n_target_classes = _lp.check_positive_int(n_target_classes, "n_target_classes", who)
        if not 0.0 < rho <= 1.0:
            raise ValueError(f"APGD rho must be in (0, 1], got {rho}.")
        self.rho = float(rho)
        self.eot_iter = _lp.check_positive_int(eot_iter, "eot_iter", who)
        self.seed = int(seed)
        schedule = checkpoint_schedule(self.steps)
        # per 0-based iteration: is it a checkpoint, and over how many steps does it look back
        self._is_check = np.zeros(self.steps, bool)
        self._window = np.ones(self.steps, np.float32)
        for after, window in schedule:
            self._is_check[after - 1] = True
            self._window[after - 1] = window
        self.zero_gradients = 0
        self.attacked = 0

    def _compile(self):
        self._run_once = tf.function(self._run_once_impl, reduce_retracing=True, autograph=False)

    @property
    def name(self):
        if self.targeted:
            return "apgd-t"
        return f"apgd-{self.loss}"

    def __repr__(self):
        return (
            f"APGD(epsilon={self.epsilon:.6g}, norm={self.norm!r}, loss={self.loss!r}, "
            f"targeted={self.targeted}, steps={self.steps}, restarts={self.restarts})"
        )

    def _attack(self, model, x, y, seed):
        base_seed, logits, num_classes = self._start_call(model, x, seed)
        if self.targeted:
            _lp.check_num_classes(
                num_classes,
                max(4, self.n_target_classes + 1),
                "APGD-T",
                f"the targeted DLR loss with {self.n_target_classes} targets",
            )
        elif self.loss == "dlr":
            _lp.check_num_classes(num_classes, 3, "APGD", "the DLR loss")
        robust = tf.equal(tf.argmax(logits, -1, output_type=tf.int32), y).numpy()
        self.attacked = int(robust.sum())
        zero = np.zeros(len(robust), bool)
        targets = base.ranked_targets(logits, self.n_target_classes) if self.targeted else [None]

        def run(x_todo, y_todo, t_todo, key, restart):
            adv, fooled, _, _, zero_start = self._run_once(x_todo, y_todo, t_todo, key)
            zero[np.flatnonzero(robust)] |= zero_start.numpy()
            return adv, fooled.numpy()

        x_adv = base.run_on_survivors(x, y, robust, targets, self.restarts, base_seed, run)
        self.zero_gradients = int(zero.sum()) if self.loss == "dlr" else 0
        return tf.constant(x_adv)

    # --- one run on a batch -------------------------------------------------------------------
    def _loss_and_grad(self, x_adv, y, target):
        grad = tf.zeros_like(x_adv)
        for _ in range(self.eot_iter):
            with tf.GradientTape() as tape:
                tape.watch(x_adv)
                logits = _lp.logits_of(self.model, x_adv)
                if self.loss == "ce":
                    loss = cross_entropy_loss(logits, y)
                elif self.targeted:
                    loss = targeted_dlr_loss(logits, y, target)
                else:
                    loss = dlr_loss(logits, y)
                total = tf.reduce_sum(loss)
            # ZERO: a model that cuts the gradient (tf.round) gets a zero one, which the
            # zero-gradient check reports, instead of a None that fails the sum
            grad += tape.gradient(total, x_adv, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return logits, loss, grad / float(self.eot_iter)

    def _step_direction(self, grad):
        if self.norm == "linf":
            return tf.sign(grad)
        return _lp.normalize(grad, "l2")

    def _random_start(self, x, seed):
        if self.norm == "linf":
            t = tf.random.stateless_uniform(tf.shape(x), seed, minval=-1.0, maxval=1.0)
        else:
            t = tf.random.stateless_normal(tf.shape(x), seed)
        return tf.clip_by_value(x + self.epsilon * _lp.normalize(t, self.norm), 0.0, 1.0)

    def _run_once_impl(self, x, y, target, seed):
        """One APGD run from a random start (see `_iterate`)."""
        return self._iterate(x, y, target, self._random_start(x, seed))

    def _iterate(self, x, y, target, x_adv):
        """The iterations of one APGD run from the start point `x_adv`.

        Deterministic given the start, so the tests can compare it step by step with the
        reference code's `attack_single_run(x, y, x_init=...)`.

        Returns:
          (x_fooled, fooled, x_best, loss_best, zero_start): per example the last
          misclassified iterate (else the start), whether there is one, the highest-loss
          point and its loss, and whether the gradient at the start was exactly zero.
        """
        eps, norm = self.epsilon, self.norm
        logits, loss, grad = self._loss_and_grad(x_adv, y, target)
        zero_start = tf.equal(_lp.lp_norm(grad, "linf"), 0.0)
        correct = tf.equal(tf.argmax(logits, -1, output_type=tf.int32), y)
        batch = tf.shape(x)[0]
        state = dict(
            i=tf.constant(0),
            x_adv=x_adv,
            x_prev=x_adv,
            grad=grad,
            x_best=x_adv,
            grad_best=grad,
            loss_best=loss,
            x_fooled=x_adv,
            correct=correct,
            step=tf.fill([batch], 2.0 * eps),
            loss_prev=tf.zeros([batch]),
            increases=tf.zeros([batch]),
            loss_best_at_check=loss,
            halved_at_check=tf.ones([batch], tf.bool),
        )
        is_check = tf.constant(self._is_check)
        window = tf.constant(self._window)

        def body(s):
            s = dict(s)
            momentum = tf.where(s["i"] > 0, 0.75, 1.0)
            step = _lp.per_example(s["step"], x)
            x_cur = s["x_adv"]
            z = _lp.project(x_cur + step * self._step_direction(s["grad"]), x, eps, norm)
            x_new = x_cur + momentum * (z - x_cur) + (1.0 - momentum) * (x_cur - s["x_prev"])
            x_new = _lp.project(x_new, x, eps, norm)
            logits, loss, grad = self._loss_and_grad(x_new, y, target)
            now_correct = tf.equal(tf.argmax(logits, -1, output_type=tf.int32), y)
            s["x_fooled"] = tf.where(_lp.per_example(~now_correct, x), x_new, s["x_fooled"])
            s["correct"] = s["correct"] & now_correct
            s["increases"] += tf.cast(loss > s["loss_prev"], tf.float32)
            s["loss_prev"] = loss
            better = loss > s["loss_best"]
            s["x_best"] = tf.where(_lp.per_example(better, x), x_new, s["x_best"])
            s["grad_best"] = tf.where(_lp.per_example(better, x), grad, s["grad_best"])
            s["loss_best"] = tf.where(better, loss, s["loss_best"])
            # checkpoint: halve the step and restart from the best point where it stalls
            check = tf.gather(is_check, s["i"])
            oscillating = s["increases"] <= self.rho * tf.gather(window, s["i"])
            stalled = ~s["halved_at_check"] & (s["loss_best_at_check"] >= s["loss_best"])
            halve = check & (oscillating | stalled)
            s["halved_at_check"] = tf.where(check, halve, s["halved_at_check"])
            s["loss_best_at_check"] = tf.where(check, s["loss_best"], s["loss_best_at_check"])
            s["increases"] = tf.where(check, 0.0, s["increases"])
            s["step"] = tf.where(halve, s["step"] / 2.0, s["step"])
            s["x_prev"] = x_cur
            s["x_adv"] = tf.where(_lp.per_example(halve, x), s["x_best"], x_new)
            s["grad"] = tf.where(_lp.per_example(halve, x), s["grad_best"], grad)
            s["i"] = s["i"] + 1
            return (s,)

        (state,) = tf.while_loop(
            lambda s: s["i"] < self.steps, body, (state,), maximum_iterations=self.steps
        )
        return (
            state["x_fooled"],
            ~state["correct"],
            state["x_best"],
            state["loss_best"],
            zero_start,
        )
