"""FAB, the Fast Adaptive Boundary attack (Croce & Hein 2020, "Minimally distorted adversarial
examples with a fast adaptive boundary attack"), L-inf and L2, untargeted and targeted (FAB-T).

Why our own: the reference implementations (fra31/auto-attack, torchattacks) are PyTorch; the
reference's TensorFlow port runs eagerly and takes a TF1-style model wrapper.  Here one run is a
`tf.function` with a `tf.while_loop` over the iterations, and the box-constrained projections
are written in TensorFlow from their optimality conditions (below), batched over examples.

FAB looks for the smallest perturbation that changes the class.  At the iterate x1 it
linearises the decision boundary between the true class y and a class k
    f(z) = z_k(x) - z_y(x) ~ f(x1) + <g, z - x1>,  g = grad f(x1)
(FAB-T: k is a fixed target; untargeted FAB: the k whose linearised boundary is closest in the
dual norm), projects both x1 and the clean x0 onto that hyperplane inside the box [0, 1]^d,
and moves to a convex combination of the two projections, extrapolated by eta:
    x1 <- clip01((1 - a) (x1 + eta d1) + a (x0 + eta d2)),  a = min(|d1| / (|d1| + |d2|), a_max).
Whenever x1 is misclassified it is kept if it is the closest adversarial point so far and then
pulled back towards x0: x1 <- x0 + beta (x1 - x0).  Defaults: a_max = 0.1, eta = 1.05,
beta = 0.9, 100 iterations.  For AutoAttack, an example counts as broken only if the closest
adversarial point lies within epsilon; epsilon also sets the radius of random restarts.

The projection: minimise ||d||_p subject to <w, t + d> = b and t + d in [0, 1]^d.  Flip the
sign of (w, b) so that c = <w, t> - b >= 0; each coordinate i can then lower <w, t + d> by
moving against sign(w_i), at most p_i (its distance to the box face).  With a Lagrange
parameter lambda, |d_i| = min(lambda, p_i) (L-inf) or |d_i| = min(lambda |w_i|, p_i) (L2), and
the reduction achieved, sum_i a_i min(lambda, q_i), is piecewise linear and increasing in
lambda (L-inf: a_i = |w_i|, q_i = p_i; L2: a_i = w_i^2, q_i = p_i / |w_i|).  Sorting the q_i
gives its breakpoints, and lambda solves it = c exactly; if even the box corner (lambda = inf)
does not reach the hyperplane, the corner is returned, as in the paper.
"""

import keras
import numpy as np
import tensorflow as tf

from twins_tf.attacks import _lp, base

_FAR = 1e10  # "no adversarial point yet" distance, and the excluded class's logit gap
_ZERO = tf.UnconnectedGradients.ZERO  # a model that cuts the gradient (tf.round): zero, not None


def project_onto_hyperplane_in_box(points, w, b, norm):
    """The minimal L-inf or L2 step from `points` to {<w, z> = b} within [0, 1]^d.

    Args:
      points: (n, d) points inside [0, 1]^d.
      w: (n, d) hyperplane normals.
      b: (n,) offsets.
      norm: "linf" or "l2".

    Returns:
      (n, d) steps d with <w, points + d> = b and points + d in the box when feasible; when
      the hyperplane cannot be reached inside the box, the step to the box corner that gets
      closest to it.
    """
    c = tf.reduce_sum(w * points, axis=1) - b
    sign = tf.where(c >= 0, 1.0, -1.0)
    w = w * sign[:, None]
    c = c * sign  # >= 0: the amount <w, .> must drop
    toward_upper = w < 0  # coordinates that lower <w, .> by increasing
    room = tf.where(toward_upper, 1.0 - points, points)  # p_i >= 0
    abs_w = tf.abs(w)
    if norm == "linf":
        active = abs_w > 0
        weight, breakpoint = abs_w, room
    else:
        active = abs_w > 1e-8
        safe_w = tf.where(active, abs_w, 1.0)
        weight = tf.where(active, tf.square(w), 0.0)
        breakpoint = tf.where(active, room / safe_w, 0.0)
    weight = tf.where(active, weight, 0.0)
    order = tf.argsort(breakpoint, axis=1)
    q = tf.gather(breakpoint, order, batch_dims=1)
    a = tf.gather(weight, order, batch_dims=1)
    # reduction achieved at lambda = q_k: sum_{j<=k} a_j q_j + q_k * sum_{j>k} a_j
    cum_aq = tf.cumsum(a * q, axis=1)
    cum_a = tf.cumsum(a, axis=1)
    total_a = cum_a[:, -1:]
    at_breakpoints = cum_aq + q * (total_a - cum_a)
    below = tf.reduce_sum(tf.cast(at_breakpoints < c[:, None], tf.int32), axis=1)
    feasible = below < tf.shape(q)[1]
    # lambda lies between q_{below-1} and q_below: c = A + lambda * B on that piece
    prev = tf.maximum(below - 1, 0)
    sum_aq_before = tf.where(below > 0, tf.gather(cum_aq, prev, batch_dims=1), 0.0)
    rest_a = total_a[:, 0] - tf.where(below > 0, tf.gather(cum_a, prev, batch_dims=1), 0.0)
    lam = (c - sum_aq_before) / tf.maximum(rest_a, 1e-30)
    lam = tf.where(feasible, tf.maximum(lam, 0.0), np.inf)[:, None]
    if norm == "linf":
        size = tf.minimum(lam, room)
    else:
        size = tf.minimum(lam * abs_w, room)
    size = tf.where(active, size, 0.0)
    return tf.where(toward_upper, size, -size)


@keras.saving.register_keras_serializable(package="twins_tf")
class FAB(base.Attack):
    """FAB / FAB-T against a Keras classifier taking [0, 1] NHWC images and returning logits.

    Args:
      epsilon: the threat-model radius: a point is broken if FAB finds an adversarial example
        within it; also the radius of random restarts.
      norm: "linf" or "l2".
      targeted: FAB-T (AutoAttack "standard"): one run per target class, the 2nd ... (n+1)th
        most likely at the clean input.  False: untargeted FAB (one Jacobian per step).
      steps: iterations per run (100).
      restarts: runs per target (AutoAttack "standard": 1); restarts after the first start
        from a random point at distance epsilon / 2.
      n_target_classes: targets of FAB-T (9).
      alpha_max, eta, beta: the step parameters of the paper (0.1, 1.05, 0.9).
      seed: seed of the random restarts.

    Called as `fab(model, x, y, seed=None)` (`twins_tf.attacks.base`): where FAB found a
    misclassified point within epsilon, the closest one found; elsewhere `x` itself.

    Example:
      >>> fab = FAB(8 / 255, targeted=True)
      >>> x_adv = fab(model, images, labels)
    """

    who = "FAB"
    config_keys = (
        "epsilon",
        "norm",
        "targeted",
        "steps",
        "restarts",
        "n_target_classes",
        "alpha_max",
        "eta",
        "beta",
        "seed",
    )

    def __init__(
        self,
        epsilon,
        *,
        norm="linf",
        targeted=True,
        steps=100,
        restarts=1,
        n_target_classes=9,
        alpha_max=0.1,
        eta=1.05,
        beta=0.9,
        seed=0,
    ):
        who = self.who
        self.norm = _lp.check_norm(norm, who)
        self.epsilon = _lp.check_epsilon(epsilon, who, self.norm)
        self.targeted = bool(targeted)
        self.steps = _lp.check_positive_int(steps, "steps", who)
        self.restarts = _lp.check_positive_int(restarts, "restarts", who)
        self.n_target_classes = _lp.check_positive_int(n_target_classes, "n_target_classes", who)
        if not 0.0 <= alpha_max <= 1.0:
            raise ValueError(f"FAB alpha_max must be in [0, 1], got {alpha_max}.")
        if not eta >= 1.0:
            raise ValueError(f"FAB eta (overshoot) must be >= 1, got {eta}.")
        if not 0.0 < beta <= 1.0:
            raise ValueError(f"FAB beta (backward step) must be in (0, 1], got {beta}.")
        self.alpha_max, self.eta, self.beta = float(alpha_max), float(eta), float(beta)
        self.seed = int(seed)

    def _compile(self):
        self._run_once = tf.function(self._run_once_impl, reduce_retracing=True, autograph=False)

    @property
    def name(self):
        return "fab-t" if self.targeted else "fab"

    def __repr__(self):
        return (
            f"FAB(epsilon={self.epsilon:.6g}, norm={self.norm!r}, targeted={self.targeted}, "
            f"steps={self.steps}, restarts={self.restarts})"
        )

    def _attack(self, model, x, y, seed):
        base_seed, logits, num_classes = self._start_call(model, x, seed)
        if self.targeted:
            _lp.check_num_classes(
                num_classes,
                self.n_target_classes + 1,
                "FAB-T",
                f"{self.n_target_classes} target classes",
            )
        robust = tf.equal(tf.argmax(logits, -1, output_type=tf.int32), y).numpy()
        targets = base.ranked_targets(logits, self.n_target_classes) if self.targeted else [None]

        def run(x_todo, y_todo, t_todo, key, restart):
            adv, distance = self._run_once(x_todo, y_todo, t_todo, key, tf.constant(restart > 0))
            # broken: misclassified and within epsilon (the closest point found may not be)
            fooled = tf.not_equal(_lp.predict(model, adv), y_todo)
            within = _lp.lp_norm(adv - x_todo, self.norm) <= self.epsilon
            return adv, (fooled & within & (distance < _FAR)).numpy()

        return tf.constant(
            base.run_on_survivors(x, y, robust, targets, self.restarts, base_seed, run)
        )

    # --- one run ------------------------------------------------------------------------------
    def _boundary(self, x1, y, target):
        """Logit gap f = z_k - z_y and its input gradient for the class k to cross."""
        if self.targeted:
            with tf.GradientTape() as tape:
                tape.watch(x1)
                logits = _lp.logits_of(self.model, x1)
                gap = tf.gather(logits, target, axis=-1, batch_dims=1) - tf.gather(
                    logits, y, axis=-1, batch_dims=1
                )
                total = tf.reduce_sum(gap)
            return gap, tape.gradient(total, x1, unconnected_gradients=_ZERO)
        with tf.GradientTape() as tape:
            tape.watch(x1)
            logits = _lp.logits_of(self.model, x1)
        jacobian = tape.batch_jacobian(logits, x1, unconnected_gradients=_ZERO)  # (n, k, h, w, c)
        gaps = logits - tf.gather(logits, y, axis=-1, batch_dims=1)[:, None]
        grads = jacobian - tf.gather(jacobian, y, axis=1, batch_dims=1)[:, None]
        is_true = tf.one_hot(y, tf.shape(logits)[-1], on_value=True, off_value=False)
        gaps = tf.where(is_true, _FAR, gaps)
        flat = tf.reshape(grads, [tf.shape(grads)[0], tf.shape(grads)[1], -1])
        dual = "l1" if self.norm == "linf" else "l2"
        grad_norm = (
            tf.reduce_sum(tf.abs(flat), -1)
            if dual == "l1"
            else tf.sqrt(tf.reduce_sum(tf.square(flat), -1))
        )
        closest = tf.argmin(tf.abs(gaps) / (grad_norm + _lp.TINY), axis=-1, output_type=tf.int32)
        return (
            tf.gather(gaps, closest, axis=1, batch_dims=1),
            tf.gather(grads, closest, axis=1, batch_dims=1),
        )

    def _run_once_impl(self, x0, y, target, seed, random_start):
        eps, norm = self.epsilon, self.norm
        n = tf.shape(x0)[0]
        if norm == "linf":
            t = tf.random.stateless_uniform(tf.shape(x0), seed, minval=-1.0, maxval=1.0)
        else:
            t = tf.random.stateless_normal(tf.shape(x0), seed)
        start = tf.clip_by_value(x0 + 0.5 * eps * _lp.normalize(t, norm), 0.0, 1.0)
        x1 = tf.where(random_start, start, x0)
        x0_flat = tf.reshape(x0, [n, -1])

        def body(i, x1, best, distance):
            gap, grad = self._boundary(x1, y, target)
            w = tf.reshape(grad, [n, -1])
            b = tf.reduce_sum(w * tf.reshape(x1, [n, -1]), axis=1) - gap
            steps = project_onto_hyperplane_in_box(
                tf.concat([tf.reshape(x1, [n, -1]), x0_flat], 0),
                tf.concat([w, w], 0),
                tf.concat([b, b], 0),
                norm,
            )
            d1 = tf.reshape(steps[:n], tf.shape(x0))
            d2 = tf.reshape(steps[n:], tf.shape(x0))
            a1 = tf.maximum(_lp.lp_norm(d1, norm), 1e-8)
            a2 = tf.maximum(_lp.lp_norm(d2, norm), 1e-8)
            alpha = _lp.per_example(tf.clip_by_value(a1 / (a1 + a2), 0.0, self.alpha_max), x0)
            x1 = tf.clip_by_value(
                (x1 + self.eta * d1) * (1.0 - alpha) + (x0 + self.eta * d2) * alpha, 0.0, 1.0
            )
            fooled = tf.not_equal(_lp.predict(self.model, x1), y)
            dist = _lp.lp_norm(x1 - x0, norm)
            closer = fooled & (dist < distance)
            best = tf.where(_lp.per_example(closer, x0), x1, best)
            distance = tf.where(closer, dist, distance)
            x1 = tf.where(_lp.per_example(fooled, x0), x0 + (x1 - x0) * self.beta, x1)
            return i + 1, x1, best, distance

        _, _, best, distance = tf.while_loop(
            lambda i, *_: i < self.steps,
            body,
            (tf.constant(0), x1, x0, tf.fill([n], _FAR)),
            maximum_iterations=self.steps,
        )
        return best, distance
