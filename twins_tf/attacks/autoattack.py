"""AutoAttack (Croce & Hein 2020): the ensemble robustness claims are judged by (spec §7).

Why our own: the reference (fra31/auto-attack) needs PyTorch, and a GPU in practice, even for
Keras models; torchattacks is PyTorch only.  This orchestrator runs our TensorFlow attacks
(`apgd.py`, `fab.py`, `square.py`) in the reference's order, each only on the points every
earlier attack failed on, batch by batch so that a long evaluation can be resumed.

Versions:
  * "standard": APGD-CE (100 iterations, no restarts), APGD-T (targeted DLR, 9 target
    classes, 100 iterations each), FAB-T (9 targets, 100 iterations), Square (5000 queries),
    for L-inf and L2, as in the reference's `version='standard'`;
  * "rand" (randomized defences): APGD-CE and APGD-DLR, each averaging 20 gradients per step
    (EOT).

Fewer than 10 classes: a target is another class, so APGD-T and FAB-T use
min(9, classes - 1) targets.  APGD-T's targeted DLR loss needs the 3rd and 4th largest logits,
so with 2 or 3 classes APGD-T is skipped (FAB-T still runs, with the 1 or 2 targets there
are), and with 2 classes the rand version skips APGD-DLR.  The reference keeps 9 targets
whatever the classes and fails on such models after a warning; here the plan is part of the
result (`n_target_classes`, `skipped`) and of the warnings.

Before the first batch, the sanity checks of `twins_tf.attacks.checks` run on it (randomised
model, probabilities instead of logits, test-time dynamics, targets), as `EvaluationWarning`s
and in `AutoAttackResult.warnings`; the zero-gradient check runs, as in the official code,
inside APGD-T (APGD-DLR for "rand") at the start of every run on every batch, and `run`
reports the examples found over the whole evaluation (on the first batch only if no DLR
sub-attack is planned); after a whole run, the Square check.

What is guaranteed, and checked at the end of every batch (a violation raises): every returned
x_adv lies in the epsilon-ball around its clean image (up to float rounding, 1e-5) and in
[0, 1].  Each sub-attack's output is projected onto the ball and the box and re-classified,
on the sub-batch it attacked, before it counts, as in the reference.  Every point reported
fooled is then classified once more at its x_adv within the whole batch; a disagreement is
counted and reported (`AutoAttackResult.unconfirmed`, a warning), never an abort: a kernel's
rounding can depend on the batch (oneDNN and XLA pick blocking by batch size), so a point on
the decision boundary may flip between the two forwards, and one such point must not stop an
evaluation hours long.  Such a point stays fooled, as in the reference, which judges each
point on the batch its attack ran on.  A few are expected; many mean a model that is not
deterministic (dropout, BN in training mode), which the warning says.

Resuming: `run(..., state_path=p, save_every=n)` writes the per-example results (and, by
default, the adversarial images) to the .npz file `p` every n batches; called again with the
same data, settings and path it skips the batches already done.  The random draws of a batch
depend only on the seed and the batch's index, so a resumed run gives the same numbers as an
uninterrupted one, and a shard of an evaluation that passes its batches' indices in the whole
evaluation (`run(..., batch_indices=...)`) gives each batch the numbers the whole run gives it.
`state_problem` says why a state file cannot be resumed (a caller sets it aside rather than
failing) and `read_state` reads a finished one (to merge shards).

It is long because the cascade, its resumable state and its verification are one algorithm
(the official code keeps them together too).
"""

import dataclasses
import hashlib
import json
import os
import time
import zipfile

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from twins_tf import input_checks
from twins_tf.attacks import _lp, base, checks
from twins_tf.attacks.apgd import APGD
from twins_tf.attacks.fab import FAB
from twins_tf.attacks.square import Square

VERSIONS = ("standard", "rand")
NOT_BROKEN = -1  # `broken_by` of a point no attack fooled
CLEAN_ERROR = 0  # `broken_by` of a point misclassified without attack
_BALL_TOLERANCE = 1e-5


@dataclasses.dataclass
class AutoAttackResult:
    """Per-example outcome of an AutoAttack evaluation.

    Attributes:
      attacks: the sub-attack names, in the order they ran.
      labels: (n,) int labels.
      broken_by: (n,) int: -1 robust, 0 misclassified clean, k >= 1 first fooled by
        attacks[k - 1].
      x_adv: (n, h, w, c) float32 adversarial images (the clean image for robust and clean-
        misclassified points), or None when not kept.
      n_target_classes: the targets APGD-T and FAB-T used.
      skipped: {sub-attack: why} for those the model's classes rule out.
      seconds: {sub-attack: seconds spent in it}, over every batch (resumed ones included).
      warnings: the messages of the sanity checks (`twins_tf.attacks.checks`).
      unconfirmed: points reported non-robust that the whole batch's forward classified
        correctly at the same x_adv (batch-dependent rounding at the decision boundary);
        they count as fooled.
    """

    attacks: tuple
    labels: np.ndarray
    broken_by: np.ndarray
    x_adv: np.ndarray = None
    n_target_classes: int = None
    skipped: dict = dataclasses.field(default_factory=dict)
    seconds: dict = dataclasses.field(default_factory=dict)
    warnings: tuple = ()
    unconfirmed: int = 0

    @property
    def robust(self):
        """(n,) bool: correctly classified and not fooled by any sub-attack."""
        return self.broken_by == NOT_BROKEN

    @property
    def accuracy(self):
        """{"clean": ..., "<attack>": robust accuracy after it and all earlier ones, ...}."""
        n = max(len(self.broken_by), 1)
        result = {"clean": float(np.sum(self.broken_by != CLEAN_ERROR)) / n}
        for k, name in enumerate(self.attacks, start=1):
            survived = (self.broken_by == NOT_BROKEN) | (self.broken_by > k)
            result[name] = float(np.sum(survived)) / n
        return result

    @property
    def robust_accuracy(self):
        return float(np.mean(self.robust)) if len(self.broken_by) else 0.0

    def summary(self):
        """One line per stage: the accuracy after it in percent (and its time); then skips."""
        lines = []
        for name, accuracy in self.accuracy.items():
            seconds = f"  {self.seconds[name]:8.1f} s" if name in self.seconds else ""
            lines.append(f"{name:>9}: {100 * accuracy:6.2f}%{seconds}")
        lines += [f"{name:>9}: skipped ({why})" for name, why in self.skipped.items()]
        return "\n".join(lines)


def unconfirmed_message(unconfirmed, reported):
    """The warning for `unconfirmed` of `reported` non-robust points the whole batch did not
    confirm, or None."""
    if not unconfirmed:
        return None
    return (
        f"{unconfirmed} of {reported} points reported non-robust are classified correctly "
        "when their x_adv is classified again within the whole batch; they count as fooled "
        "(as in the official code, which judges a point on the batch its attack ran on).  "
        "A few are boundary points whose logits depend on the batch through kernel rounding; "
        "many mean a model that is not deterministic (dropout or BN in training mode?): "
        "evaluate it in inference mode, or use version='rand'."
    )


@keras.saving.register_keras_serializable(package="twins_tf")
class AutoAttack(base.Attack):
    """AutoAttack against a Keras classifier taking [0, 1] NHWC images and returning logits.

    Args:
      epsilon: radius of the threat model in [0, 1] pixel units (8/255 in spec §7).
      norm: "linf" or "l2".
      version: "standard" (APGD-CE, APGD-T, FAB-T, Square) or "rand" (APGD-CE, APGD-DLR with
        EOT 20), as in the reference.
      seed: seed of every random draw (per batch and sub-attack).
      apgd_steps, fab_steps, square_queries, eot_iter: the budgets (100, 100, 5000, 20 in the
        reference); lower them only for quick checks, and say so when reporting numbers.
      n_target_classes: targets of APGD-T and FAB-T; None (default): the reference's 9, or
        classes - 1 for a model with fewer than 10 classes.

    Called as `aa(model, x, y, seed=None)` (`twins_tf.attacks.base`) on one in-memory batch
    it returns x_adv; `run(model, data)` evaluates a whole test set, resumably, and gives an
    `AutoAttackResult` (who broke which example, accuracy and seconds per sub-attack).

    Example:
      >>> aa = AutoAttack(8 / 255)
      >>> result = aa.run(model, (x_test, y_test), batch_size=250,
      ...                 state_path="runs/dogs/autoattack.npz", save_every=5)
      >>> result.accuracy  # {"clean": ..., "apgd-ce": ..., "apgd-t": ..., "fab-t": ..., ...}
    """

    who = "AutoAttack"
    config_keys = (
        "epsilon",
        "norm",
        "version",
        "seed",
        "apgd_steps",
        "fab_steps",
        "square_queries",
        "n_target_classes",
        "eot_iter",
    )

    def __init__(
        self,
        epsilon,
        *,
        norm="linf",
        version="standard",
        seed=0,
        apgd_steps=100,
        fab_steps=100,
        square_queries=5000,
        n_target_classes=None,
        eot_iter=20,
    ):
        who = self.who
        self.norm = _lp.check_norm(norm, who)
        self.epsilon = _lp.check_epsilon(epsilon, who, self.norm)
        if version not in VERSIONS:
            raise ValueError(f"AutoAttack version must be one of {VERSIONS}, got {version!r}.")
        self.version = version
        self.seed = int(seed)
        self.apgd_steps = _lp.check_positive_int(apgd_steps, "apgd_steps", who)
        self.fab_steps = _lp.check_positive_int(fab_steps, "fab_steps", who)
        self.square_queries = _lp.check_positive_int(square_queries, "square_queries", who)
        self.n_target_classes = (
            None
            if n_target_classes is None
            else _lp.check_positive_int(n_target_classes, "n_target_classes", who)
        )
        self.eot_iter = _lp.check_positive_int(eot_iter, "eot_iter", who)
        self._model = None
        self._attacks = None
        self._checked = None  # (model, messages of the sanity checks)
        self._classes = None  # (model, its number of outputs)
        self._seconds = {}
        self._zero = [0, 0]  # examples with a zero DLR gradient, examples the DLR attack ran on
        self._unconfirmed = [0, 0]  # non-robust points the whole batch did not confirm, of all

    def __repr__(self):
        return (
            f"AutoAttack(epsilon={self.epsilon:.6g}, norm={self.norm!r}, "
            f"version={self.version!r}, seed={self.seed})"
        )

    @property
    def attack_names(self):
        """The version's sub-attacks (a model with few classes may skip some: `plan`)."""
        if self.version == "standard":
            return ("apgd-ce", "apgd-t", "fab-t", "square")
        return ("apgd-ce", "apgd-dlr")

    def plan(self, num_classes):
        """(sub-attacks to run, targets of APGD-T and FAB-T, {skipped sub-attack: why}).

        Raises:
          ValueError: fewer than 2 classes, or more targets asked for than other classes.
        """
        if num_classes < 2:
            raise ValueError(
                f"AutoAttack needs a classifier with at least 2 classes; the model "
                f"has {num_classes} output(s)."
            )
        targets = min(9, num_classes - 1)
        if self.n_target_classes is not None:
            if self.n_target_classes > num_classes - 1:
                raise ValueError(
                    f"AutoAttack n_target_classes={self.n_target_classes} but the model has "
                    f"{num_classes} classes, so at most {num_classes - 1} targets: lower "
                    "n_target_classes or leave it unset (min(9, classes - 1))."
                )
            targets = self.n_target_classes
        skipped = {}
        if self.version == "standard" and num_classes < checks.TARGETED_DLR_MIN_CLASSES:
            skipped["apgd-t"] = (
                f"its targeted DLR loss needs at least "
                f"{checks.TARGETED_DLR_MIN_CLASSES} classes, the model has "
                f"{num_classes}"
            )
        if self.version == "rand" and num_classes < checks.DLR_MIN_CLASSES:
            skipped["apgd-dlr"] = (
                f"the DLR loss needs at least {checks.DLR_MIN_CLASSES} "
                f"classes, the model has {num_classes}"
            )
        names = tuple(name for name in self.attack_names if name not in skipped)
        return names, targets, skipped

    def sub_attacks(self, model):
        """The sub-attacks `plan` runs on `model`, in order (built once per model)."""
        if self._model is not model:
            eps, norm, seed = self.epsilon, self.norm, self.seed
            names, targets, _ = self.plan(self._num_classes(model))
            build = {
                "apgd-ce": lambda: APGD(
                    eps, norm=norm, loss="ce", steps=self.apgd_steps, eot_iter=self._eot, seed=seed
                ),
                "apgd-t": lambda: APGD(
                    eps,
                    norm=norm,
                    loss="dlr",
                    targeted=True,
                    steps=self.apgd_steps,
                    n_target_classes=targets,
                    seed=seed,
                ),
                "fab-t": lambda: FAB(
                    eps,
                    norm=norm,
                    targeted=True,
                    steps=self.fab_steps,
                    n_target_classes=targets,
                    seed=seed,
                ),
                "square": lambda: Square(eps, norm=norm, n_queries=self.square_queries, seed=seed),
                "apgd-dlr": lambda: APGD(
                    eps, norm=norm, loss="dlr", steps=self.apgd_steps, eot_iter=self._eot, seed=seed
                ),
            }
            self._model, self._attacks = model, [build[name]() for name in names]
        return self._attacks

    @property
    def _eot(self):
        return self.eot_iter if self.version == "rand" else 1

    # --- one batch ----------------------------------------------------------------------------
    def _attack(self, model, x, y, seed):
        """The protocol's call: `seed` (an int) salts the batch's draws as `run`'s batch
        index does."""
        batch_index = 0 if seed is None else base.base_seed(self, seed)[0]
        zero, unconfirmed = list(self._zero), list(self._unconfirmed)
        x_adv = self._attack_batch(model, x, y, batch_index=batch_index)[0]
        # outside `run` (which reports the whole evaluation), warn for this batch, as the
        # official APGD does for each batch it attacks
        messages = [
            checks.zero_gradient_message(
                self._zero[0] - zero[0], self._zero[1] - zero[1], "examples the DLR attack ran on"
            ),
            unconfirmed_message(
                self._unconfirmed[0] - unconfirmed[0], self._unconfirmed[1] - unconfirmed[1]
            ),
        ]
        checks.warn([m for m in messages if m])
        return tf.constant(x_adv)

    def _attack_batch(self, model, x, y, *, batch_index=0):
        """Run the sub-attacks in sequence on one in-memory batch.

        Args:
          model: Keras classifier on [0, 1] NHWC images, called with `training=False`.
          x: clean images (batch, h, w, c) in [0, 1].
          y: class ids (batch,) or one-hot rows.
          batch_index: index of the batch in a larger evaluation (seeds the random draws).

        Returns:
          (x_adv, broken_by): float32 numpy images and the int8 `broken_by` codes of
          `AutoAttackResult`.
        """
        x, y = input_checks.check_images_and_labels(x, y, self.who, model=model)
        input_checks.check_radius_fits(self.epsilon, self.norm, x, self.who, "epsilon")
        self._check_model(model, x)
        attacks = self.sub_attacks(model)
        x_adv = x.numpy().copy()
        broken_by = np.full(len(x_adv), NOT_BROKEN, np.int8)
        if not len(x_adv):
            return x_adv, broken_by
        self.check(model, x, y)
        broken_by[_lp.predict(model, x).numpy() != y.numpy()] = CLEAN_ERROR
        names = self.plan(self._num_classes(model))[0]
        for k, (name, attack) in enumerate(zip(names, attacks), start=1):
            todo = np.flatnonzero(broken_by == NOT_BROKEN)
            if todo.size == 0:
                break
            started = time.perf_counter()
            x_todo, y_todo = tf.gather(x, todo), tf.gather(y, todo)
            seed = int(_lp.run_seed(self.seed, batch_index, k).numpy()[0])
            adv = attack(model, x_todo, y_todo, seed=seed)
            adv = _lp.project(adv, x_todo, self.epsilon, self.norm)
            fooled = (_lp.predict(model, adv) != y_todo).numpy()
            x_adv[todo[fooled]] = adv.numpy()[fooled]
            broken_by[todo[fooled]] = k
            self._seconds[name] = self._seconds.get(name, 0.0) + time.perf_counter() - started
            if name == self._dlr_attack(names):
                self._zero[0] += attack.zero_gradients
                self._zero[1] += attack.attacked
        unconfirmed = self._verify(model, x, y, x_adv, broken_by)
        self._unconfirmed[0] += unconfirmed
        self._unconfirmed[1] += int(np.sum(broken_by != NOT_BROKEN))
        return x_adv, broken_by

    def check(self, model, x, y):
        """The sanity checks of `twins_tf.attacks.checks` on one batch, once per model.

        Warns (`checks.EvaluationWarning`) with each problem found and returns the messages;
        later calls for the same model return them without running the checks again.
        """
        if self._checked is None or self._checked[0] is not model:
            self._check_model(model, x)
            num_classes = self._num_classes(model)
            _, targets, skipped = self.plan(num_classes)
            messages = checks.before_evaluation(
                model,
                x,
                y,
                version=self.version,
                eot_iter=self.eot_iter,
                num_classes=num_classes,
                n_target_classes=targets,
                skipped=skipped,
                dlr_attack=self._dlr_attack(self.plan(num_classes)[0]),
            )
            checks.warn(messages)
            self._checked = (model, messages)
        return list(self._checked[1])

    @staticmethod
    def _dlr_attack(names):
        """The planned sub-attack that runs the zero-gradient check (DLR loss), or None."""
        return next((name for name in names if name in ("apgd-t", "apgd-dlr")), None)

    def zero_gradient_warning(self):
        """The zero-gradient message over every batch attacked so far, or None."""
        return checks.zero_gradient_message(
            self._zero[0], self._zero[1], "examples the DLR attack ran on (all batches)"
        )

    def _check_model(self, model, x):
        logits = _lp.logits_of(model, x[:2])
        if logits.shape.rank != 2:
            raise ValueError(
                f"AutoAttack needs a model returning logits (batch, classes), got "
                f"output shape {logits.shape}."
            )
        self._classes = (model, int(logits.shape[-1]))

    def _num_classes(self, model):
        """The model's outputs: from its last forward here, else its static output shape."""
        if self._classes is not None and self._classes[0] is model:
            return self._classes[1]
        try:
            return int(model.output_shape[-1])
        except (AttributeError, TypeError, ValueError):
            raise ValueError(
                "AutoAttack cannot tell how many classes the model has: build it "
                "as a functional keras.Model or call the attack on a batch first."
            ) from None

    def _verify(self, model, x, y, x_adv, broken_by):
        """The guarantees of the module docstring, on one batch: raises if x_adv leaves the
        ball or the box; returns how many points reported fooled the whole batch's forward
        classifies correctly."""
        x_adv_t = tf.constant(x_adv)
        distance = _lp.lp_norm(x_adv_t - x, self.norm).numpy()
        if np.any(distance > self.epsilon + _BALL_TOLERANCE):
            raise RuntimeError(
                f"AutoAttack produced a perturbation of {self.norm} norm "
                f"{distance.max():.6g} > epsilon {self.epsilon:.6g}; please "
                "report this bug."
            )
        if np.min(x_adv) < 0.0 or np.max(x_adv) > 1.0:
            raise RuntimeError("AutoAttack produced images outside [0, 1]; please report this bug.")
        predicted = _lp.predict(model, x_adv_t).numpy()
        claimed = broken_by != NOT_BROKEN
        return int(np.sum(predicted[claimed] == y.numpy()[claimed]))

    # --- a whole evaluation -------------------------------------------------------------------
    def run(
        self,
        model,
        data,
        *,
        batch_size=250,
        state_path=None,
        save_every=10,
        keep_adversarial=True,
        verbose=1,
        batch_indices=None,
    ):
        """Evaluate `model` on a whole test set, resumably, with a progress bar.

        Args:
          model: Keras classifier on [0, 1] NHWC images, called with `training=False`.
          data: (images, labels) arrays, or a `tf.data.Dataset` of (image, label) pairs or
            batches of them, in a fixed order (no shuffling: resuming skips batches by index).
          batch_size: examples per batch for arrays and unbatched datasets (a batched dataset
            keeps its own batches).
          state_path: .npz file for progress; resumed from when it exists and matches.
          save_every: batches between saves of the state.
          keep_adversarial: keep (and save) the adversarial images; False keeps only the
            per-example results (for large images: 8,580 x 224 x 224 x 3 floats are 5 GB).
          verbose: 1 shows a progress bar, 0 is silent.
          batch_indices: the index of each batch of `data` in a larger evaluation (default
            0, 1, 2, ...); a shard of an evaluation passes its batches' indices, so their
            random draws are the ones the whole evaluation gives them.

        Returns:
          An `AutoAttackResult`.
        """
        batches, total = self._batches(data, batch_size)
        if batch_indices is not None:
            batch_indices = [int(i) for i in batch_indices]
        fingerprint = self._fingerprint(batch_size, batch_indices)
        labels, broken, adversarial, done, self._seconds = [], [], [], 0, {}
        self._zero, self._unconfirmed = [0, 0], [0, 0]
        if state_path and os.path.exists(state_path):
            labels, broken, adversarial, done, self._seconds, counts = self._load(
                state_path, fingerprint, keep_adversarial
            )
            self._zero, self._unconfirmed = counts[:2], counts[2:]
            if verbose:
                logging.info("AutoAttack: resuming from %s after %d batches.", state_path, done)
        first = next(iter(batches), None)
        if first is not None:  # the checks run before any attack, on the first batch
            x, y = input_checks.check_images_and_labels(*first, self.who, model=model)
            self._check_model(model, x)
            self.check(model, x, y)
        progress = keras.utils.Progbar(total, stateful_metrics=["robust"]) if verbose else None
        if progress is not None and done:
            progress.update(done, [("robust", self._robust_so_far(broken))])

        def save(index):  # the state after `index` batches, for a restart to resume from
            counts = self._zero + self._unconfirmed
            self._save(
                state_path, fingerprint, labels, broken, adversarial, index, self._seconds, counts
            )

        index = done
        remaining = batches.skip(done) if isinstance(batches, tf.data.Dataset) else batches[done:]
        for x, y in remaining:
            x, y = input_checks.check_images_and_labels(x, y, self.who, model=model)  # one-hot: ids
            if batch_indices is not None and index >= len(batch_indices):
                raise ValueError(
                    f"AutoAttack.run got more batches than the {len(batch_indices)} "
                    "batch_indices given."
                )
            batch_index = index if batch_indices is None else batch_indices[index]
            x_adv, broken_by = self._attack_batch(model, x, y, batch_index=batch_index)
            labels.append(y.numpy().astype(np.int64))
            broken.append(broken_by)
            if keep_adversarial:
                adversarial.append(x_adv)
            index += 1
            if state_path and (index - done) % save_every == 0:
                save(index)
            if progress is not None:
                progress.update(index, [("robust", self._robust_so_far(broken))])
        if state_path and index > done:
            save(index)
        names, targets, skipped = self.plan(self._num_classes(model))
        result = AutoAttackResult(
            attacks=names,
            labels=np.concatenate(labels) if labels else np.zeros([0], np.int64),
            broken_by=np.concatenate(broken) if broken else np.zeros([0], np.int8),
            x_adv=np.concatenate(adversarial) if keep_adversarial and adversarial else None,
            n_target_classes=targets,
            skipped=dict(skipped),
            seconds={name: self._seconds.get(name, 0.0) for name in names},
            unconfirmed=self._unconfirmed[0],
        )
        after = [
            m
            for m in (
                self.zero_gradient_warning(),
                unconfirmed_message(*self._unconfirmed),
                checks.check_square(result.accuracy),
            )
            if m
        ]
        checks.warn(after)
        result.warnings = tuple(self._checked[1] if self._checked else ()) + tuple(after)
        if verbose:
            logging.info(
                "AutoAttack %s (%s, eps=%.6g) on %d examples:\n%s",
                self.version,
                self.norm,
                self.epsilon,
                len(result.labels),
                result.summary(),
            )
        return result

    @staticmethod
    def _robust_so_far(broken):
        return float(np.mean(np.concatenate(broken) == NOT_BROKEN)) if broken else 0.0

    @staticmethod
    def _batches(data, batch_size):
        """A list of (x, y) numpy batches, or a batched dataset; and the batch count or None."""
        batch_size = _lp.check_positive_int(batch_size, "batch_size", "AutoAttack.run")
        if isinstance(data, tf.data.Dataset):
            image_spec = data.element_spec[0]
            if image_spec.shape.rank == 3:
                data = data.batch(batch_size)
            elif image_spec.shape.rank != 4:
                raise ValueError(
                    "AutoAttack.run expects a dataset of (image, label) pairs or "
                    f"batches, got image shape {image_spec.shape}."
                )
            cardinality = int(data.cardinality())
            return data, (cardinality if cardinality >= 0 else None)
        if not isinstance(data, (tuple, list)) or len(data) != 2:
            raise ValueError(
                "AutoAttack.run expects (images, labels) arrays or a "
                "tf.data.Dataset of (image, label) pairs."
            )
        images, labels = np.asarray(data[0]), np.asarray(data[1])
        if len(images) != len(labels):
            raise ValueError(f"AutoAttack.run got {len(images)} images but {len(labels)} labels.")
        batches = [
            (images[i : i + batch_size], labels[i : i + batch_size])
            for i in range(0, len(images), batch_size)
        ]
        return batches, len(batches)

    def _fingerprint(self, batch_size, batch_indices=None):
        """The settings a saved state must match to be resumed (a shard's batches too)."""
        settings = dict(self.get_config(), batch_size=batch_size)
        if batch_indices is not None:
            settings["batch_indices"] = hashlib.sha1(json.dumps(batch_indices).encode()).hexdigest()
        return json.dumps(settings, sort_keys=True)

    def state_problem(self, path, batch_size, *, keep_adversarial=True, batch_indices=None):
        """Why the state file `path` cannot be resumed by `run` with these arguments, in a
        few words, or None when it can (or does not exist)."""
        if not os.path.exists(path):
            return None
        if batch_indices is not None:
            batch_indices = [int(i) for i in batch_indices]
        try:
            with np.load(path) as state:
                saved = str(state["fingerprint"])
                done = int(state["batches_done"])
                has_images = "x_adv" in state.files
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
            return f"unreadable: {error}"
        if saved != self._fingerprint(batch_size, batch_indices):
            return f"written with other settings: {saved}"
        if keep_adversarial and done and not has_images:
            return "it holds no adversarial images"
        return None

    @staticmethod
    def read_state(path):
        """The per-example results a state file holds, as a dict: `labels`, `broken_by`
        (concatenated over its batches), `batch_sizes`, `batches_done`, `seconds` ({sub-attack:
        seconds}) and `counts` (zero-gradient examples, DLR-attacked examples, unconfirmed
        points, points reported fooled)."""
        with np.load(path) as state:
            return {
                "labels": state["labels"],
                "broken_by": state["broken_by"],
                "batch_sizes": state["batch_sizes"],
                "batches_done": int(state["batches_done"]),
                "seconds": json.loads(str(state["seconds"])) if "seconds" in state.files else {},
                "counts": [int(v) for v in state["counts"]],
            }

    @staticmethod
    def _save(path, fingerprint, labels, broken, adversarial, batches_done, seconds, counts):
        """`counts`: zero-gradient examples, DLR-attacked examples, unconfirmed points, fooled
        points (what the end-of-run warnings report)."""
        arrays = dict(
            fingerprint=np.array(fingerprint),
            batches_done=np.array(batches_done),
            seconds=np.array(json.dumps(seconds)),
            counts=np.array(counts, np.int64),
            labels=np.concatenate(labels) if labels else np.zeros([0], np.int64),
            broken_by=np.concatenate(broken) if broken else np.zeros([0], np.int8),
            batch_sizes=np.array([len(b) for b in broken], np.int64),
        )
        if adversarial:
            arrays["x_adv"] = np.concatenate(adversarial)
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        temporary = f"{path}.{hashlib.md5(path.encode()).hexdigest()[:8]}.tmp"
        with open(temporary, "wb") as f:
            np.savez(f, **arrays)
        os.replace(temporary, path)  # atomic: a kill mid-write leaves the previous state

    @staticmethod
    def _load(path, fingerprint, keep_adversarial):
        with np.load(path) as state:
            saved = str(state["fingerprint"])
            if saved != fingerprint:
                raise ValueError(
                    f"AutoAttack state {path} was written with other settings "
                    f"({saved}); now {fingerprint}. Delete the file or pass another "
                    "state_path."
                )
            if keep_adversarial and "x_adv" not in state.files and int(state["batches_done"]):
                raise ValueError(
                    f"AutoAttack state {path} holds no adversarial images; resume "
                    "with keep_adversarial=False or delete the file."
                )
            splits = np.cumsum(state["batch_sizes"])[:-1]
            labels = list(np.split(state["labels"], splits))
            broken = list(np.split(state["broken_by"], splits))
            adversarial = (
                list(np.split(state["x_adv"], splits))
                if keep_adversarial and "x_adv" in state.files
                else []
            )
            done = int(state["batches_done"])
            seconds = json.loads(str(state["seconds"])) if "seconds" in state.files else {}
            counts = [int(v) for v in state["counts"]]
        if done == 0:
            return [], [], [], 0, {}, [0, 0, 0, 0]
        return labels, broken, adversarial, done, seconds, counts
