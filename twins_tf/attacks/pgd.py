"""Projected gradient descent (Madry et al. 2018) in [0, 1] pixel space, L-inf and L2 (spec §4).

PGD is both the training attack of every adversarial method and the PGD-10 evaluation, so it
must run inside a compiled train step: the step loop is a `tf.while_loop` (one traced body,
whatever the number of steps, so XLA compiles a small graph), the gradient is taken with a
`tf.GradientTape` inside the loop body, and the random start draws stateless random numbers
from an explicit seed (XLA ignores the op seeds of `tf.random.uniform`, so a seeded run would
not be reproducible with it).  Existing attack libraries (cleverhans, ART, foolbox) are either
PyTorch/JAX-first or build Python-unrolled loops and call the model in training mode; none lets
us choose the forward mode, the numerics and the seed source the way a TWINS step needs.

Choices, each stated where a user could trip over it:
  * The model is called with `training=False` (TWINS attacks the Adaptive wing with its moving
    statistics, spec §4) and the loss is the cross-entropy averaged over the batch.
  * After every step the iterate is projected onto the epsilon-ball around the clean input and
    clipped to [0, 1]; the random start is clipped to [0, 1] as well.
  * L2: the step is `step_size * g / ||g||_2` per example, the projection rescales a
    perturbation longer than epsilon back onto the sphere, and the random start is uniform in
    the L2 ball (a Gaussian direction, radius `epsilon * U^(1/d)`, d = pixels * channels).  In
    high dimension that radius is almost always close to epsilon: this is what "uniform in
    the ball" means, not a bug.
  * Random start: `stateless_uniform(shape, seed, -eps, eps)` (L-inf); with `restarts > 1`
    restart r uses `tf.random.split(seed, restarts)[r]`.  The same seed gives the same start
    every time *in the same execution mode*: TensorFlow's CPU kernels and XLA implement the
    stateless generators differently, so a jit-compiled run draws other (equally uniform)
    numbers than a graph-mode run with the same seed.
  * Float32 by default, even under a mixed-precision policy: the attack follows the *sign* (L-inf)
    or the direction (L2) of a gradient; in bfloat16 (8 bits of mantissa) or float16 many small
    input-gradient entries are rounded to zero or flip sign, so a low-precision attack is a
    weaker, noisier one.  While the attack is traced every layer of the model computes in
    float32 from its float32 variables (the dtype policies are switched for the trace and
    restored right after); `compute_dtype=None` attacks with the model's own policy instead.
  * The result is `stop_gradient`-ed: a trainer differentiating through the model at x_adv must
    never differentiate through the attack.
  * `restarts > 1` (evaluation): each example keeps the first restart whose x_adv the model
    misclassifies; an example no restart fools keeps the first restart's x_adv.
"""

import contextlib
import random

import keras
import tensorflow as tf

from twins_tf import input_checks
from twins_tf.attacks import _lp, base
from twins_tf.platform import keras_private

NORMS = _lp.NORMS


@keras.saving.register_keras_serializable(package="twins_tf")
class PGD(base.Attack):
    """Projected gradient descent against a Keras classifier taking [0, 1] images.

    Args:
      epsilon: radius of the threat model, in [0, 1] pixel units (8/255 in spec §4).
      step_size: step length alpha (2/255 in spec §4); for L2, the L2 length of each step.
      steps: number of gradient steps k (10 in spec §4); 0 returns the (random) start.
      norm: "linf" or "l2".
      random_start: start from a uniform random point of the ball (training) instead of the
        clean input (evaluation, spec §7).
      restarts: independent runs, each from its own random start (so `random_start=True` is
        required when restarts > 1); per example the first successful one is kept (evaluation).
      seed: integer seed of the random start; None draws one at construction, so two PGD
        objects differ but one object's run is reproducible from its construction (and
        `get_config` records the drawn seed, so a deserialised PGD repeats it).
      compute_dtype: "float32" (default) runs the model in float32 during the attack even under
        a mixed-precision policy; None keeps the model's own policy.

    Called as `pgd(model, x, y, seed=None)` (`twins_tf.attacks.base`), also inside a traced
    or XLA-compiled train step.

    Example:
      >>> pgd = PGD(8 / 255, 2 / 255, steps=10)
      >>> x_adv = pgd(model, images, labels)  # same shape as images, within 8/255, in [0, 1]
    """

    who = "PGD"
    config_keys = (
        "epsilon",
        "step_size",
        "steps",
        "norm",
        "random_start",
        "restarts",
        "seed",
        "compute_dtype",
    )

    def __init__(
        self,
        epsilon,
        step_size,
        steps,
        *,
        norm="linf",
        random_start=False,
        restarts=1,
        seed=None,
        compute_dtype="float32",
    ):
        who = self.who
        self.norm = _lp.check_norm(norm, who)
        self.epsilon = _lp.check_epsilon(epsilon, who, self.norm, allow_zero=True)
        self.step_size = _lp.check_epsilon(
            step_size, who, self.norm, name="step_size", allow_zero=True
        )
        if int(steps) != steps or steps < 0:
            raise ValueError(f"PGD steps must be a non-negative integer, got {steps!r}.")
        self.steps = int(steps)
        self.restarts = _lp.check_positive_int(restarts, "restarts", who)
        if self.restarts > 1 and not random_start:
            # without a random start every restart is the same deterministic run
            raise ValueError(
                f"PGD restarts={self.restarts} without random_start would repeat one identical "
                "run: pass random_start=True for independent restarts, or restarts=1."
            )
        if compute_dtype not in ("float32", None):
            raise ValueError(f"PGD compute_dtype must be 'float32' or None, got {compute_dtype!r}.")
        self.random_start = bool(random_start)
        self.seed = random.randint(1, 2**30) if seed is None else int(seed)
        self.compute_dtype = compute_dtype
        self._seed_generator = None  # created on the first seedless random start

    def __repr__(self):
        return (
            f"PGD(epsilon={self.epsilon:.6g}, step_size={self.step_size:.6g}, steps={self.steps}, "
            f"norm={self.norm!r}, random_start={self.random_start}, restarts={self.restarts})"
        )

    def __call__(self, model, x, y, *, seed=None):
        """Adversarial examples for `model` at the clean images `x` with labels `y`.

        Args:
          model: a Keras model mapping [0, 1] images to logits; called with `training=False`.
          x: clean images in [0, 1], any layout with the batch first (the model's input rank).
          y: class ids, shape (batch,) (or (batch, 1)), or one-hot rows of the model's width.
          seed: optional int, or int tensor of shape (2,), for the random start (the trainer
            passes one derived from the optimizer step and replica id, so runs are
            reproducible and replicas draw different noise); None uses this object's seed
            generator.

        Returns:
          x_adv, float32, same shape as `x`, with `||x_adv - x|| <= epsilon` and values in
          [0, 1]; no gradient flows through it.
        """
        x, y = input_checks.check_images_and_labels(x, y, self.who, model=model, image_rank=None)
        for name in ("epsilon", "step_size"):
            input_checks.check_radius_fits(getattr(self, name), self.norm, x, self.who, name)
        return self._attack(model, x, y, seed)

    def _attack(self, model, x, y, seed):
        x = tf.stop_gradient(x)
        if self.random_start and seed is None:
            seed = self._next_seed()
        if seed is not None:
            seed = tf.cast(seed, tf.int64)
            if seed.shape.rank == 0:
                seed = tf.stack([seed, tf.zeros([], tf.int64)])
        seeds = [seed] * self.restarts
        if self.random_start and self.restarts > 1:
            seeds = tf.unstack(tf.random.split(seed, self.restarts))
        float32 = self.compute_dtype == "float32"
        with keras_private.float32_compute(model) if float32 else contextlib.nullcontext():
            best = None
            for restart in range(self.restarts):
                x_adv = self._run(model, x, y, seeds[restart])
                if best is None:
                    best = x_adv
                    if self.restarts > 1:
                        fooled = self._misclassified(model, x_adv, y)
                    continue
                newly = tf.logical_and(tf.logical_not(fooled), self._misclassified(model, x_adv, y))
                best = tf.where(_lp.per_example(newly, x), x_adv, best)
                fooled = tf.logical_or(fooled, newly)
        return tf.stop_gradient(best)

    # --- one run ---------------------------------------------------------------------------
    def _run(self, model, x, y, seed):
        x_start = self._random_start(x, seed) if self.random_start else x
        if self.steps == 0:
            return x_start

        def body(step, x_adv):
            return step + 1, self._step(model, x, y, x_adv)

        _, x_adv = tf.while_loop(
            lambda step, _: step < self.steps,
            body,
            (tf.constant(0), x_start),
            maximum_iterations=self.steps,
        )
        return x_adv

    def _step(self, model, x, y, x_adv):
        with tf.GradientTape() as tape:
            tape.watch(x_adv)
            logits = tf.cast(model(x_adv, training=False), tf.float32)
            loss = tf.reduce_mean(
                tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)
            )
        grad = tape.gradient(loss, x_adv, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        if self.norm == "linf":
            x_adv = x_adv + self.step_size * tf.sign(grad)
        else:
            x_adv = x_adv + self.step_size * _lp.normalize(grad, "l2")
        return _lp.project(x_adv, x, self.epsilon, self.norm)

    def _random_start(self, x, seed):
        if self.norm == "linf":
            noise = tf.random.stateless_uniform(
                tf.shape(x), seed, minval=-self.epsilon, maxval=self.epsilon
            )
        else:
            direction_seed, radius_seed = tf.unstack(tf.random.split(seed, 2))
            direction = _lp.normalize(tf.random.stateless_normal(tf.shape(x), direction_seed), "l2")
            dims = tf.cast(tf.reduce_prod(tf.shape(x)[1:]), tf.float32)
            u = tf.random.stateless_uniform(tf.shape(x)[:1], radius_seed)
            noise = direction * _lp.per_example(self.epsilon * u ** (1.0 / dims), x)
        return tf.clip_by_value(x + noise, 0.0, 1.0)

    def _next_seed(self):
        if self._seed_generator is None:
            self._seed_generator = keras.random.SeedGenerator(self.seed)
        return self._seed_generator.next()

    @staticmethod
    def _misclassified(model, x_adv, y):
        return tf.not_equal(_lp.predict(model, x_adv), y)
