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

NORMS = ("linf", "l2")
_TINY = 1e-12  # guards divisions by a zero gradient or perturbation norm


class PGD:
    """Projected gradient descent against a Keras classifier taking [0, 1] images.

    Args:
      epsilon: radius of the threat model, in [0, 1] pixel units (8/255 in spec §4).
      step_size: step length alpha (2/255 in spec §4); for L2, the L2 length of each step.
      steps: number of gradient steps k (10 in spec §4); 0 returns the (random) start.
      norm: "linf" or "l2".
      random_start: start from a uniform random point of the ball (training) instead of the
        clean input (evaluation, spec §7).
      restarts: independent runs; per example the first successful one is kept (evaluation).
      seed: integer seed of the random start; None draws one at construction, so two PGD
        objects differ but one object's run is reproducible from its construction.
      compute_dtype: "float32" (default) runs the model in float32 during the attack even under
        a mixed-precision policy; None keeps the model's own policy.

    Example:
      >>> pgd = PGD(8 / 255, 2 / 255, steps=10)
      >>> x_adv = pgd(model, images, labels)  # same shape as images, within 8/255, in [0, 1]
    """

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
        if norm not in NORMS:
            raise ValueError(f"PGD norm must be one of {NORMS}, got {norm!r}.")
        if not epsilon >= 0:
            raise ValueError(f"PGD epsilon must be >= 0 (in [0, 1] pixel units), got {epsilon}.")
        if not step_size >= 0:
            raise ValueError(f"PGD step_size must be >= 0, got {step_size}.")
        if int(steps) != steps or steps < 0:
            raise ValueError(f"PGD steps must be a non-negative integer, got {steps!r}.")
        if int(restarts) != restarts or restarts < 1:
            raise ValueError(f"PGD restarts must be a positive integer, got {restarts!r}.")
        if compute_dtype not in ("float32", None):
            raise ValueError(f"PGD compute_dtype must be 'float32' or None, got {compute_dtype!r}.")
        self.epsilon = float(epsilon)
        self.step_size = float(step_size)
        self.steps = int(steps)
        self.norm = norm
        self.random_start = bool(random_start)
        self.restarts = int(restarts)
        self.seed = random.randint(1, 2**30) if seed is None else int(seed)
        self.compute_dtype = compute_dtype
        self._seed_generator = None  # created on the first seedless random start

    def __repr__(self):
        return (
            f"PGD(epsilon={self.epsilon:.6g}, step_size={self.step_size:.6g}, steps={self.steps}, "
            f"norm={self.norm!r}, random_start={self.random_start}, restarts={self.restarts})"
        )

    def get_config(self):
        """The constructor arguments (JSON-serialisable)."""
        return dict(
            epsilon=self.epsilon, step_size=self.step_size, steps=self.steps, norm=self.norm,
            random_start=self.random_start, restarts=self.restarts, seed=self.seed,
            compute_dtype=self.compute_dtype,
        )

    def __call__(self, model, x, y, *, seed=None):
        return self.attack(model, x, y, seed=seed)

    def attack(self, model, x, y, *, seed=None):
        """Adversarial examples for `model` at the clean images `x` with integer labels `y`.

        Args:
          model: a Keras model mapping [0, 1] images to logits; called with `training=False`.
          x: clean images in [0, 1], any layout with the batch first.
          y: integer labels, shape (batch,) (or (batch, 1)).
          seed: optional int tensor of shape (2,) for the random start (the trainer passes
            one derived from the optimizer step and replica id, so runs are reproducible and
            replicas draw different noise); None uses this object's seed generator.

        Returns:
          x_adv, float32, same shape as `x`, with `||x_adv - x|| <= epsilon` and values in
          [0, 1]; no gradient flows through it.
        """
        x = tf.stop_gradient(tf.cast(x, tf.float32))
        y = tf.reshape(tf.cast(y, tf.int32), [-1])
        if self.random_start and seed is None:
            seed = self._next_seed()
        seeds = [seed] * self.restarts
        if self.random_start and self.restarts > 1:
            seeds = tf.unstack(tf.random.split(tf.cast(seed, tf.int64), self.restarts))
        with _float32_model(model) if self.compute_dtype == "float32" else contextlib.nullcontext():
            best = None
            for restart in range(self.restarts):
                x_adv = self._run(model, x, y, seeds[restart])
                if best is None:
                    best = x_adv
                    if self.restarts > 1:
                        fooled = self._misclassified(model, x_adv, y)
                    continue
                newly = tf.logical_and(tf.logical_not(fooled), self._misclassified(model, x_adv, y))
                best = tf.where(_per_example(newly, x), x_adv, best)
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
        grad = tape.gradient(loss, x_adv)
        if self.norm == "linf":
            x_adv = x_adv + self.step_size * tf.sign(grad)
        else:
            x_adv = x_adv + self.step_size * grad / _per_example(_l2_norm(grad) + _TINY, x)
        return tf.clip_by_value(self._project(x_adv, x), 0.0, 1.0)

    def _project(self, x_adv, x):
        if self.norm == "linf":
            return tf.clip_by_value(x_adv, x - self.epsilon, x + self.epsilon)
        delta = x_adv - x
        scale = tf.minimum(1.0, self.epsilon / (_l2_norm(delta) + _TINY))
        return x + delta * _per_example(scale, x)

    def _random_start(self, x, seed):
        seed = tf.cast(seed, tf.int64)
        if self.norm == "linf":
            noise = tf.random.stateless_uniform(
                tf.shape(x), seed, minval=-self.epsilon, maxval=self.epsilon
            )
        else:
            direction_seed, radius_seed = tf.unstack(tf.random.split(seed, 2))
            direction = tf.random.stateless_normal(tf.shape(x), direction_seed)
            direction = direction / _per_example(_l2_norm(direction) + _TINY, x)
            dims = tf.cast(tf.reduce_prod(tf.shape(x)[1:]), tf.float32)
            u = tf.random.stateless_uniform(tf.shape(x)[:1], radius_seed)
            noise = direction * _per_example(self.epsilon * u ** (1.0 / dims), x)
        return tf.clip_by_value(x + noise, 0.0, 1.0)

    def _next_seed(self):
        if self._seed_generator is None:
            self._seed_generator = keras.random.SeedGenerator(self.seed)
        return self._seed_generator.next()

    @staticmethod
    def _misclassified(model, x_adv, y):
        logits = model(x_adv, training=False)
        return tf.not_equal(tf.argmax(logits, axis=-1, output_type=tf.int32), y)


def _l2_norm(t):
    """Per-example L2 norm over every axis but the first."""
    return tf.sqrt(tf.reduce_sum(tf.square(t), axis=list(range(1, t.shape.rank))))


def _per_example(values, like):
    """Reshape a (batch,) tensor to broadcast against `like` (batch, ...)."""
    return tf.reshape(values, [-1] + [1] * (like.shape.rank - 1))


@contextlib.contextmanager
def _float32_model(model):
    """Trace `model` with every layer computing in float32 (variables unchanged).

    Keras reads a layer's compute dtype when the layer is called, i.e. when a function is
    traced, so switching the policies for the duration of the attack's trace gives a float32
    attack graph; the training forward traced afterwards uses the restored policies.
    """
    layers = [model, *model._flatten_layers(include_self=False)]
    saved = [(layer, layer._dtype_policy) for layer in layers]
    try:
        for layer, policy in saved:
            if policy.compute_dtype != "float32" and policy.quantization_mode is None:
                layer._dtype_policy = keras.DTypePolicy("float32")
        yield
    finally:
        for layer, policy in saved:
            layer._dtype_policy = policy
