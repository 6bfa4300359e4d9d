"""The one attack protocol of `twins_tf.attacks`: `x_adv = attack(model, x, y, *, seed=None)`.

Why this shape.  A Keras object that transforms data is configured once and then called
(losses, metrics, layers), and it serialises through `get_config` / `from_config`; an attack
that held its model could do neither (a trainer's attack would drag the model into its
config, and one attack object could not serve two models).  The official AutoAttack
(fra31/auto-attack) binds the model at construction and calls `perturb(x, y)`; the mapping
is one to one: `APGDAttack(model, eps=e).perturb(x, y)` is `APGD(e)(model, x, y)`.  So every
attack here (PGD, APGD, FAB, Square, AutoAttack):
  * is built from its hyperparameters alone (epsilon first), and is a Keras serialisable
    registered as "twins_tf>Name": `keras.saving.serialize_keras_object(attack)` and back;
  * is called as `attack(model, x, y, seed=None)` on a batch of [0, 1] NHWC images and integer
    class ids (or one-hot rows of the model's width), returning float32 x_adv like `x`, within
    epsilon of `x` and in [0, 1];
  * checks its input first, each problem a one-line ValueError that says how to fix it
    (`_lp.check_epsilon`, `input_checks.check_images_and_labels`).
`seed`: an int, or a shape-(2,) int tensor (a stateless-RNG seed, which is what a compiled
train step has); the random draws of the call then derive from it alone (without one, see
`base_seed`).
"""

import numpy as np
import tensorflow as tf

from twins_tf import input_checks
from twins_tf.attacks import _lp


class Attack:
    """Shared protocol: subclasses set `who`, `config_keys` and implement `_attack`."""

    who = "attack"
    config_keys = ()
    model = None  # the model the compiled pieces were made for (`_use`)

    # --- the protocol -----------------------------------------------------------------------
    def __call__(self, model, x, y, *, seed=None):
        """Adversarial examples for `model` at the clean images `x` with labels `y`.

        Args:
          model: Keras classifier on [0, 1] images returning logits; called with
            `training=False`.
          x: clean images (batch, height, width, channels), float in [0, 1].
          y: class ids (batch,) or (batch, 1), or one-hot rows (batch, classes).
          seed: None, an int, or a shape-(2,) int tensor: the random draws of this call.

        Returns:
          float32 x_adv like `x`, within epsilon of `x`, in [0, 1].
        """
        x, y = input_checks.check_images_and_labels(x, y, self.who, model=model)
        input_checks.check_radius_fits(self.epsilon, self.norm, x, self.who, "epsilon")
        return self._attack(model, x, y, seed)

    def _attack(self, model, x, y, seed):
        raise NotImplementedError

    # --- compiled pieces per model (APGD, FAB, Square) --------------------------------------
    def _use(self, model):
        """Attack `model` from now on: its compiled pieces (`_compile`) are made anew, to be
        traced for it on first use."""
        if model is not self.model:
            self.model = model
            self._compile()

    def _compile(self):
        """Sets the `tf.function`s of one run; they read `self.model`."""

    def _start_call(self, model, x, seed):
        """The common start of a call: bind `model`; (seed salts, clean logits, classes)."""
        self._use(model)
        logits = _lp.logits_of(model, x)
        return base_seed(self, seed), logits, int(logits.shape[-1])

    # --- Keras serialisation ----------------------------------------------------------------
    def get_config(self):
        """The constructor arguments (JSON-serialisable): `from_config` rebuilds the attack."""
        return {key: getattr(self, key) for key in self.config_keys}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def base_seed(attack, seed):
    """(seed, counter) salts for `_lp.run_seed`: from `seed` alone, or the attack's own.

    Without a seed every call draws anew (the attack's seed and a call counter), so two
    calls differ but a fresh attack object repeats a run.  AutoAttack does not use this for a
    seedless call: like the official code (and its `run`, batch by batch), it draws from its
    own seed and the batch index, which is 0 for a single call, so repeated calls repeat.
    """
    if seed is None:
        attack._calls = getattr(attack, "_calls", 0) + 1
        return (attack.seed, attack._calls)
    values = [int(v) for v in np.ravel(np.asarray(seed))]
    if len(values) not in (1, 2):
        raise ValueError(
            f"{attack.who} seed must be an int or a shape-(2,) int tensor, got "
            f"{len(values)} values."
        )
    return tuple(values) if len(values) == 2 else (values[0], 0)


def ranked_targets(logits, n_target_classes):
    """The targets of APGD-T and FAB-T: per example the 2nd ... (n+1)th most likely class."""
    order = tf.argsort(logits, axis=-1, direction="DESCENDING").numpy()
    return [order[:, rank - 1] for rank in range(2, n_target_classes + 2)]


def run_on_survivors(x, y, robust, targets, restarts, base, run):
    """The reference's outer loop of APGD and FAB: per target and restart, one run on the
    examples no earlier run broke.

    Args:
      x, y: the batch (tensors).
      robust: (batch,) bool numpy, updated in place: still unbroken.
      targets: [None] (untargeted) or per-target (batch,) class arrays (`ranked_targets`);
        None: no targets at all (Square), and the run seeds are salted by the restart alone.
      restarts: runs per target.
      base: seed salts (`base_seed`).
      run: fn(x_todo, y_todo, target_todo, key, restart) -> (x_adv_todo, broken_todo numpy).

    Returns:
      x_adv numpy: the broken examples' adversarial points, elsewhere `x`.
    """
    x_adv = x.numpy().copy()
    salts = [] if targets is None else None
    for target_index, target in enumerate([None] if targets is None else targets):
        for restart in range(restarts):
            todo = np.flatnonzero(robust)
            if todo.size == 0:
                return x_adv
            y_todo = tf.gather(y, todo)
            t_todo = y_todo if target is None else tf.constant(target[todo], tf.int32)
            key = _lp.run_seed(*base, *([target_index] if salts is None else []), restart)
            adv, broken = run(tf.gather(x, todo), y_todo, t_todo, key, restart)
            x_adv[todo[broken]] = adv.numpy()[broken]
            robust[todo[broken]] = False
    return x_adv
