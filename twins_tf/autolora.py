"""AutoLoRa's automation around the step: its loss weights and its learning-rate windows.

AutoLoRa (Xu et al., ICLR 2024; docs/autolora.md) trains the LoRA branch of `twins_tf.lora`
beside the main path (`AdversarialTrainer`'s AutoLoRa step).  Two parts of the method act
between steps, and live here beside `lora.py`:

  * the loss weights: lambda1 = 1 - a, lambda2 = beta * a, a the natural path's clean accuracy
    in inference mode over the training data (`methods.autolora_lambdas`), set before a fresh
    run's first step and after every epoch;
  * the learning rate: windows of epochs (`AUTOLORA_WINDOWS`) after each of which the rate is
    halved, and the best weights so far restored, unless the validation robust accuracy rose
    often enough (`autolora_schedule`, a pure function of the authors' loop); training stops
    when the rate falls below `AUTOLORA_MIN_LR`.  The rate it starts from, the weight decay and
    the absence of step decay are the paper's too (`methods.AUTOLORA_SCHEDULE`, which runs take
    unless the user chose otherwise: `training.settings`), and the windows need a validation
    robust accuracy every epoch: `fit` without validation data is refused.

Their state is the trainer's own (non-trainable) weights, so `BackupAndRestore` and
`trainer.save` keep it (`add_state`); two callbacks run them around `fit` (`fit_callbacks`).
"""

import keras
import numpy as np
import tensorflow as tf

from twins_tf import lora as lora_lib
from twins_tf import methods as methods_lib
from twins_tf.accuracy import accuracy_counter, count_correct
from twins_tf.models.heads import head_layer

# The learning-rate windows: checks after epochs W_j + 1 (j >= 1), rho of each window's
# epoch-to-epoch steps must raise the validation robust accuracy (the authors' code).
AUTOLORA_WINDOWS = tuple(range(0, 57, 4))
AUTOLORA_RHO = 0.75
AUTOLORA_MIN_LR = 1e-5
# The rule in one line, for summary.json and compare's table.
SCHEDULE_RULE = (
    f"lr halved and the best weights restored after each {AUTOLORA_WINDOWS[1]}-epoch window "
    f"in which val_adv_acc rose in fewer than {AUTOLORA_RHO:.0%} of its epoch-to-epoch steps "
    f"(or stalled); training stops when the lr falls below {AUTOLORA_MIN_LR:g}"
)
# The validation metric the windows read (AdversarialTrainer.test_step's adv_acc).
MONITOR = "val_adv_acc"


def autolora_schedule(state, epoch, val_adv_acc):
    """One epoch of AutoLoRa's automated learning rate, as a pure function.

    Args:
      state: dict of numpy/float values: `history` (val robust accuracy of epoch e at index
        e - 1), `window` (index j of the next check, from 1), `max_acc` (best so far, -1 at
        the start), `best` (the best at each window's check), `etas` (the lr multiplier at
        each window's check, etas[0] = 1), `eta` (the current lr multiplier).
      epoch: the finished epoch, 1-based.
      val_adv_acc: its validation robust accuracy.

    Returns:
      (new state, actions): actions["new_best"] (keep these weights as the best),
      actions["halve"] (the lr was halved: restore the best weights).
    """
    state = {
        k: (np.array(v, dtype=np.float64) if isinstance(v, np.ndarray) else v)
        for k, v in state.items()
    }
    history, best, etas = state["history"], state["best"], state["etas"]
    window = int(state["window"])
    if epoch - 1 < len(history):
        history[epoch - 1] = val_adv_acc
    actions = {"new_best": False, "halve": False}
    if val_adv_acc > state["max_acc"]:
        best[window] = val_adv_acc
        state["max_acc"] = val_adv_acc
        actions["new_best"] = True
    if epoch - 1 == AUTOLORA_WINDOWS[window]:
        start, end = AUTOLORA_WINDOWS[window - 1], AUTOLORA_WINDOWS[window]
        rises = sum(history[j + 1] > history[j] for j in range(start, end))
        stalled = etas[window] == etas[window - 1] and best[window] == best[window - 1]
        if rises < AUTOLORA_RHO * (end - start) or stalled:
            state["eta"] = state["eta"] / 2
            etas[window] = state["eta"]
            actions["halve"] = True
        if window < len(AUTOLORA_WINDOWS) - 1:
            window += 1
            best[window] = best[window - 1]
            etas[window] = etas[window - 1]
    state.update(history=history, best=best, etas=etas, window=window)
    return state, actions


def add_state(trainer, model):
    """Gives `trainer` AutoLoRa's state: the LoRA and head variables its natural forward
    trains, and as trainer weights the automated scalars (`autolora_lambda1`,
    `autolora_lambda2`, `autolora_lr_scale`), the windows' history and the best weights.

    The order of creation is the order of the trainer's weights in a saved file: keep it.
    """
    trainer._lora_variables = lora_lib.lora_variables(model)
    if not trainer._lora_variables:
        raise ValueError(
            f"method {trainer.method.name!r} trains a LoRA branch but {model.name!r} has "
            "none: wrap it with twins_tf.lora.add_lora(model, rank) (--lora_rank=8)."
        )
    trainer._head_variables = list(head_layer(model).trainable_weights)

    def scalar(name, value, shape=()):
        initializer = keras.initializers.Constant(value)
        return trainer.add_weight(
            shape=shape, dtype="float32", trainable=False, name=name, initializer=initializer
        )

    lambda1, lambda2 = methods_lib.autolora_lambdas(0.0, beta=trainer.beta)
    trainer.autolora_lambda1 = scalar("autolora_lambda1", lambda1)
    trainer.autolora_lambda2 = scalar("autolora_lambda2", lambda2)
    trainer.autolora_lr_scale = scalar("autolora_lr_scale", 1.0)
    windows = len(AUTOLORA_WINDOWS)
    trainer._autolora_history = scalar("autolora_val_adv_acc", 0.0, (AUTOLORA_WINDOWS[-1] + 2,))
    trainer._autolora_best = scalar("autolora_best_per_window", 0.0, (windows,))
    trainer._autolora_etas = scalar("autolora_lr_per_window", 0.0, (windows,))
    trainer._autolora_counters = scalar("autolora_window_and_max", 0.0, (2,))
    trainer._autolora_shadow = [
        trainer.add_weight(
            shape=v.shape,
            dtype=v.dtype,
            trainable=False,
            initializer="zeros",
            name=f"autolora_best_{i}",
        )
        for i, v in enumerate(model.weights)
    ]
    trainer._autolora_etas.assign(np.eye(1, windows, dtype="float32")[0])  # eta_0 = 1 x lr
    trainer._autolora_counters.assign([1.0, -1.0])  # window index 1, best val so far -1


def routed_gradients(variables, natural_variables, natural, adversarial):
    """The AutoLoRa step's gradient of each of `variables` (None where the loss does not reach
    it): through the adversarial forward for every variable, plus through the natural forward
    for `natural_variables` (the LoRA branch and the head).

    Args:
      natural, adversarial: (tape, logits, gradient of the loss w.r.t. the logits) of each
        forward.
    """
    tape, logits, upstream = natural
    from_nat = dict(
        zip(
            map(id, natural_variables),
            tape.gradient(logits, natural_variables, output_gradients=upstream),
        )
    )
    tape, logits, upstream = adversarial
    from_adv = tape.gradient(logits, variables, output_gradients=upstream)
    gradients = []
    for g, v in zip(from_adv, variables):
        extra = from_nat.get(id(v))
        gradients.append(extra if g is None else (g if extra is None else g + extra))
    return gradients


def natural_branch_accuracy(trainer, dataset, steps=None):
    """Clean accuracy of the LoRA (natural) path in inference mode over `dataset`'s
    (images, labels) batches (at most `steps`): AutoLoRa's lambda input."""
    if not hasattr(trainer, "_natural_counts"):

        def natural_forward(images, training=False):
            with lora_lib.natural_branch():
                return trainer.model(images, training=training)

        trainer._natural_counts = accuracy_counter(natural_forward)  # traced once
    correct, total = count_correct(trainer._natural_counts, dataset, steps)
    return correct / max(total, 1)


def update_lambdas(trainer, dataset, steps=None):
    """Sets lambda1, lambda2 from the natural path's accuracy on `dataset`; returns it."""
    accuracy = natural_branch_accuracy(trainer, dataset, steps)
    lambda1, lambda2 = methods_lib.autolora_lambdas(accuracy, beta=trainer.beta)
    trainer.autolora_lambda1.assign(lambda1)
    trainer.autolora_lambda2.assign(lambda2)
    return accuracy


def epoch_end(trainer, epoch, val_adv_acc):
    """`autolora_schedule` after (0-based) `epoch` applied to `trainer`: keeps the best
    weights, restores them when the rate is halved.  Returns the schedule's actions."""
    window, best = (float(c) for c in trainer._autolora_counters.numpy())
    state = dict(
        history=trainer._autolora_history.numpy(),
        window=int(window),
        max_acc=best,
        best=trainer._autolora_best.numpy(),
        etas=trainer._autolora_etas.numpy(),
        eta=float(trainer.autolora_lr_scale.numpy()),
    )
    state, actions = autolora_schedule(state, epoch + 1, float(val_adv_acc))
    weights = trainer.model.weights
    if actions["new_best"]:
        for shadow, variable in zip(trainer._autolora_shadow, weights):
            shadow.assign(variable)
    if actions["halve"]:
        for shadow, variable in zip(trainer._autolora_shadow, weights):
            variable.assign(shadow)
    trainer._autolora_history.assign(state["history"])
    trainer._autolora_best.assign(state["best"])
    trainer._autolora_etas.assign(state["etas"])
    trainer._autolora_counters.assign([state["window"], state["max_acc"]])
    trainer.autolora_lr_scale.assign(state["eta"])
    return actions


def check_fit_arguments(trainer, fit_kwargs):
    """Refuses a `fit` whose epochs would end without `val_adv_acc`: the learning-rate
    windows read it after every epoch, and without it the rate would silently never change.

    Raises:
      ValueError: no validation data, no validation attack, or validation_freq != 1.
    """
    if fit_kwargs.get("validation_data") is None and not fit_kwargs.get("validation_split"):
        raise ValueError(
            f"method {trainer.method.name!r} halves its learning rate on the validation "
            f"robust accuracy ({MONITOR}) after every epoch: pass validation_data= (the "
            "authors hold out 5 % of the training data)."
        )
    if trainer.eval_attack is None:
        raise ValueError(
            f"method {trainer.method.name!r} halves its learning rate on {MONITOR}, which "
            "eval_attack=None does not measure: leave eval_attack='auto' or pass an attack."
        )
    if fit_kwargs.get("validation_freq", 1) != 1:
        raise ValueError(
            f"method {trainer.method.name!r} reads {MONITOR} after every epoch: drop "
            "validation_freq."
        )


def fit_callbacks(trainer, x, y, batch_size, steps, callbacks):
    """`fit`'s callbacks with AutoLoRa's around them: the epoch-end update first (so a
    backup saves it), the start of a fresh run last (after a restore)."""
    data = (
        x
        if isinstance(x, tf.data.Dataset)
        else tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size or 32)
    )
    return [_EpochEnd(trainer, data, steps), *(callbacks or []), _Start(trainer, data, steps)]


class _Start(keras.callbacks.Callback):
    """Sets AutoLoRa's scalars from the untrained natural path before a fresh run's first
    step (after BackupAndRestore, which restores a resumed run's)."""

    def __init__(self, trainer, data, steps):
        super().__init__()
        self.trainer, self.data, self.steps = trainer, data, steps

    def on_train_begin(self, logs=None):
        if int(self.trainer.optimizer.iterations.numpy()) == 0:
            update_lambdas(self.trainer, self.data, self.steps)


class _EpochEnd(keras.callbacks.Callback):
    """After each epoch: lambda1/lambda2 from the natural path's training accuracy, then the
    learning-rate windows on `val_adv_acc` (`check_fit_arguments` made sure it is there)."""

    def __init__(self, trainer, data, steps):
        super().__init__()
        self.trainer, self.data, self.steps = trainer, data, steps

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        trainer = self.trainer
        logs["natural_branch_acc"] = update_lambdas(trainer, self.data, self.steps)
        if MONITOR not in logs:
            raise ValueError(
                f"AutoLoRa's learning-rate windows read {MONITOR} after every epoch, but "
                f"epoch {epoch + 1}'s logs only have {sorted(logs)}."
            )
        self._windows(epoch, logs[MONITOR])
        logs["autolora_lambda1"] = float(trainer.autolora_lambda1.numpy())
        logs["autolora_lr_scale"] = float(trainer.autolora_lr_scale.numpy())

    def _windows(self, epoch, val_adv_acc):
        trainer = self.trainer
        if epoch_end(trainer, epoch, val_adv_acc)["halve"]:
            print(
                f"AutoLoRa: epoch {epoch + 1}: lr halved to "
                f"{float(trainer.autolora_lr_scale.numpy()):g} x --lr, best weights restored.",
                flush=True,
            )
        lr = trainer.optimizer.learning_rate
        lr = float(lr.numpy() if hasattr(lr, "numpy") else lr)
        if lr * float(trainer.autolora_lr_scale.numpy()) < AUTOLORA_MIN_LR:
            print(
                f"AutoLoRa: epoch {epoch + 1}: lr below {AUTOLORA_MIN_LR:g}, training "
                "stops (the paper's rule).",
                flush=True,
            )
            trainer.stop_training = True
