"""Keras callbacks that keep a run's files in its model_dir: metrics CSV, best and last weights.

Keras's `CSVLogger` and `ModelCheckpoint` cannot be used as they are, for three reasons that
all come from resuming with `BackupAndRestore`:
  * the classifier is the `AdversarialTrainer`'s inner model, and `best.weights.h5` must hold
    *its* weights (what `train --pretrained`, `evaluate` and `export` load), not the trainer's;
  * a run killed after an epoch's metrics were written but before its backup was saved
    repeats that epoch when restarted: `CSVLogger(append=True)` would then log it twice,
    while `MetricsCsv` drops the rows of epochs the restarted run is about to redo;
  * `ModelCheckpoint(save_best_only=True)` forgets the best value on restart and would
    overwrite a better `best.weights.h5` with the first epoch after it; `BestWeights` keeps
    the best value in `best.json` beside the weights.
Files are written to a temporary name and renamed, so a kill never leaves half a file.
`StopOnDivergence`, first in the callback list, stops the run at the first non-finite loss or
weight, before any of them saves it: the weights files keep the last finite epoch.

Epochs in these files count from 1 (the epoch just finished), unlike Keras's 0-based indices.
"""

import csv
import json
import math
import os

import keras
import numpy as np

from twins_tf.training import model_dir as run_files

# A Frozen wing whose logits exceed this on clean training images normalises with statistics
# that do not fit the data (a converged robust source stays far below: tens at most).
FROZEN_LOGIT_ALARM = 1e3


class DivergenceError(RuntimeError):
    """The training loss or the weights became NaN or infinite; the message is one line."""


def non_finite_variable(variables):
    """The path of the first variable holding a NaN or infinity, or None."""
    for variable in variables:
        value = keras.ops.convert_to_numpy(variable)
        if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
            return variable.path
    return None


def check_finite_weights(model, weights_path):
    """Raises ValueError (one line) when the weights loaded from `weights_path` into `model`
    hold a NaN or infinity: a diverged model would be evaluated at chance or shipped."""
    variable = non_finite_variable(model.weights)
    if variable is not None:
        raise ValueError(
            f"{weights_path} holds non-finite weights (first: {variable}): the "
            "training that wrote it diverged; use weights of a run that trained "
            "to finite values."
        )


def frozen_logit_max(classifier, images):
    """max |logit| of a twin classifier's Frozen wing (population statistics) on `images`."""
    from twins_tf.layers import set_twin_mode

    set_twin_mode(classifier, "frozen")
    try:
        logits = classifier(images, training=False)
    finally:
        set_twin_mode(classifier, "twin")
    return float(np.max(np.abs(keras.ops.convert_to_numpy(logits))))


class StopOnDivergence(keras.callbacks.Callback):
    """Raises `DivergenceError` at the first non-finite training loss (checked every step)
    or weight or epoch metric (checked at every epoch's end, before the weights are saved).

    Keras's `TerminateOnNaN` only stops quietly: the binary would exit 0 and the callbacks
    after it would still save the NaN weights of that epoch.  The message names the step and
    epoch and the likely cause; for a twin model that is the source's BatchNorm statistics,
    judged by the Frozen wing's max |logit| on a batch of the task's images (`probe`) at the
    start.

    Args:
      classifier: the trainer's inner model (whose weights the run saves).
      steps_per_epoch: to number steps across epochs.
      probe: a batch of training images, for a twin model; None for a plain one.
      lr: the run's learning rate, named in the message of a plain model.
    """

    def __init__(self, classifier, steps_per_epoch, probe=None, lr=None):
        super().__init__()
        self.classifier = classifier
        self.steps_per_epoch = int(steps_per_epoch)
        self.probe = probe
        self.lr = lr
        self.frozen_max = None
        self._epoch = 0

    def on_train_begin(self, logs=None):
        if self.probe is not None:
            self.frozen_max = frozen_logit_max(self.classifier, self.probe)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(np.asarray(loss))):
            step = self._epoch * self.steps_per_epoch + batch + 1
            self._fail(
                f"the training loss became {float(np.asarray(loss))} at step {step} "
                f"(epoch {self._epoch + 1}, batch {batch + 1} of "
                f"{self.steps_per_epoch})"
            )

    def on_epoch_end(self, epoch, logs=None):
        where = f"at the end of epoch {epoch + 1} (step {(epoch + 1) * self.steps_per_epoch})"
        variable = non_finite_variable(self.classifier.weights)
        if variable is not None:
            self._fail(f"the weight {variable} became non-finite {where}")
        bad = sorted(
            k
            for k, v in (logs or {}).items()
            if isinstance(v, (int, float, np.number)) and not math.isfinite(float(v))
        )
        if bad:
            self._fail(f"the metrics {', '.join(bad)} became non-finite {where}")

    def _fail(self, what):
        if self.probe is not None:
            cause = (
                f"the Frozen wing's max |logit| on a batch of the task's images was "
                f"{self.frozen_max:.3g} at the start"
            )
            if not self.frozen_max <= FROZEN_LOGIT_ALARM:  # NaN and inf included
                cause += (
                    ": the source's BatchNorm statistics (--pretrained) are far from "
                    "converged; fine-tune a source trained to convergence"
                )
            else:
                cause += (
                    "; likely the source's BatchNorm statistics (--pretrained) or a "
                    f"learning rate too high (--lr={self.lr})"
                )
        else:
            cause = f"likely a learning rate too high (--lr={self.lr}) for this model"
        kept = (
            f"last.weights.h5 keeps epoch {self._epoch}, the last finite one"
            if self._epoch
            else "no epoch had finished, so no weights were saved"
        )
        raise DivergenceError(f"training diverged: {what}; {cause}; {kept}.")


def _save_weights(model, path):
    temporary = os.path.join(os.path.dirname(path), ".partial-" + os.path.basename(path))
    model.save_weights(temporary)
    os.replace(temporary, path)


def _number(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def current_learning_rate(optimizer):
    """The optimizer's learning rate at its current iteration, as a float."""
    return float(keras.ops.convert_to_numpy(optimizer.learning_rate))


class MetricsCsv(keras.callbacks.Callback):
    """One CSV row per epoch: `epoch`, its `lr` and every training and validation metric.

    Args:
      path: the CSV file.
    """

    def __init__(self, path):
        super().__init__()
        self.path = path
        self._rows = None

    def on_epoch_begin(self, epoch, logs=None):
        if self._rows is None:  # first epoch of this process: keep only epochs already done
            self._rows = [row for row in self._read() if int(row["epoch"]) <= epoch]
        # the schedule changes at epoch boundaries, so the epoch's first lr is its lr
        self._learning_rate = current_learning_rate(self.model.optimizer)

    def on_epoch_end(self, epoch, logs=None):
        row = {"epoch": epoch + 1, "lr": self._learning_rate}
        row.update({k: _number(v) for k, v in (logs or {}).items()})
        self._rows.append(row)
        columns = []
        for r in self._rows:
            columns += [k for k in r if k not in columns]
        temporary = self.path + ".partial"
        with open(temporary, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, restval="")
            writer.writeheader()
            writer.writerows(self._rows)
        os.replace(temporary, self.path)

    def _read(self):
        if not os.path.isfile(self.path):
            return []
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))


def read_metrics(path):
    """The rows of a `metrics.csv`, numbers as floats (epoch as int)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [{k: (int(v) if k == "epoch" else _number(v)) for k, v in r.items()} for r in rows]


class BestWeights(keras.callbacks.Callback):
    """Saves `classifier`'s weights whenever the monitored validation metric improves.

    Args:
      classifier: the model whose weights are saved (the trainer's inner model).
      model_dir: where `best.weights.h5` and `best.json` go.
      monitor: the metric to maximise (the validation PGD accuracy, `val_adv_acc`); None
        (a run without validation, `--validation=none`): every epoch is saved, so best is
        the final epoch, and best.json says so.
    """

    def __init__(self, classifier, model_dir, monitor="val_adv_acc"):
        super().__init__()
        self.classifier = classifier
        self.weights_path = os.path.join(model_dir, run_files.BEST_WEIGHTS)
        self.record_path = os.path.join(model_dir, run_files.BEST_RECORD)
        self.monitor = monitor
        self.best = self._read_record()

    def _read_record(self):
        if os.path.isfile(self.record_path) and os.path.isfile(self.weights_path):
            with open(self.record_path) as f:
                return json.load(f)
        return None

    def on_epoch_end(self, epoch, logs=None):
        if self.monitor is None:
            _save_weights(self.classifier, self.weights_path)
            self.best = {
                "epoch": epoch + 1,
                "monitor": None,
                "value": None,
                "selection": run_files.FINAL_EPOCH_SELECTION,
            }
            run_files.write_json(self.record_path, self.best)
            return
        value = (logs or {}).get(self.monitor)
        if value is None:
            raise ValueError(
                f"BestWeights monitors {self.monitor!r} but the epoch's logs only "
                f"have {sorted(logs or {})}."
            )
        value = float(value)
        if self.best is not None and not value > self.best["value"]:
            return
        if math.isnan(value):
            return
        _save_weights(self.classifier, self.weights_path)
        self.best = {"epoch": epoch + 1, "monitor": self.monitor, "value": value}
        run_files.write_json(self.record_path, self.best)


class LastWeights(keras.callbacks.Callback):
    """Saves `classifier`'s weights to `last.weights.h5` after every epoch."""

    def __init__(self, classifier, model_dir):
        super().__init__()
        self.classifier = classifier
        self.path = os.path.join(model_dir, run_files.LAST_WEIGHTS)

    def on_epoch_end(self, epoch, logs=None):
        _save_weights(self.classifier, self.path)
