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
    the best epoch and value inside `best.weights.h5` (and a copy in `best.json`).
Each file is replaced in one step, metadata inside the weights it describes
(`model_dir.save_weights`, `model_dir.write_json`): a kill leaves every file as it was before
its write or after it, never half a file nor weights under another epoch's record.
`StopOnDivergence`, first in the callback list, stops the run at the first non-finite loss or
weight, before any of them saves it: the weights files keep the last finite epoch.

Epochs in these files count from 1 (the epoch just finished), unlike Keras's 0-based indices.
"""

import csv
import dataclasses
import io
import json
import math
import os

import keras
import numpy as np

from twins_tf.platform import atomic_files
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


# Below this many values per channel, the batch statistics a BatchNorm layer normalises with
# in training are noise rather than statistics.  For m values: the sample variance's relative
# standard error is sqrt(2 / (m - 1)) (Gaussian activations), 50 % at m = 9 and more below;
# and, whatever the data, no normalised output can exceed sqrt(m - 1) in magnitude
# (Samuelson's inequality), 2.83 at m = 9 where a unit normal exceeds it 0.5 % of the time,
# so training sees activations inference never will.  At m = 2 every output is +-1 whatever
# the images, and the backward pass divides by the two values' difference.
BN_MIN_VALUES = 9


@dataclasses.dataclass(frozen=True)
class BatchNormBatch:
    """How many values a training BatchNorm layer's batch statistics come from, per channel:
    the layer with the fewest (the smallest spatial map) of a model at a batch size."""

    values: int  # images x map pixels
    images: int  # per replica, per wing of a twin layer (all replicas' if synchronized)
    map_size: str  # "HxW"
    layer: str
    twin: bool

    @property
    def too_few(self):
        return self.values < BN_MIN_VALUES

    def describe(self):
        per = "wing per replica" if self.twin else "replica"
        return (
            f"{self.values} value(s) per channel at {self.layer} ({self.images} image(s) per "
            f"{per} x its {self.map_size} map)"
        )

    def warning(self):
        return (
            f"BatchNorm batch statistics from {self.describe()}, fewer than {BN_MIN_VALUES}: "
            f"statistics of so few values are noise (at {BN_MIN_VALUES} the variance's "
            "standard error is already 50 %) and training may diverge; raise --batch_size "
            "(or --image_size)."
        )


def batch_norm_batch(model, batch_size, num_replicas):
    """The `BatchNormBatch` of the trainable BatchNorm layer of `model` whose batch statistics
    come from the fewest values when it trains on global batches of `batch_size` over
    `num_replicas` replicas; None without such a layer (LayerNorm models, a frozen backbone).

    A twin layer's Adaptive wing sees half of each replica's batch (its Frozen wing uses
    population statistics); a plain layer sees the replica's batch; either sees every
    replica's when synchronized.
    """
    from twins_tf import bn_wings

    fewest = None
    for layer in bn_wings.nested_layers(model):
        twin = bn_wings.is_twin_bn(layer)
        if not (twin or isinstance(layer, keras.layers.BatchNormalization)):
            continue
        if not layer.trainable:  # inference mode: moving statistics
            continue
        try:
            shape = tuple(layer.input.shape)
        except (AttributeError, ValueError):  # never called in a graph: no known map
            continue
        axis = layer.axis[0] if isinstance(layer.axis, (list, tuple)) else layer.axis
        spatial = [d for i, d in enumerate(shape) if i not in (0, axis % len(shape))]
        if any(d is None for d in spatial):
            continue
        images = batch_size if getattr(layer, "synchronized", False) else batch_size // num_replicas
        images //= 2 if twin else 1
        values = images * int(np.prod(spatial, dtype=np.int64))
        if fewest is None or values < fewest.values:
            map_size = "x".join(str(d) for d in spatial) or "1x1"
            fewest = BatchNormBatch(values, images, map_size, layer.name, twin)
    return fewest


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
    epoch and the likely cause, from what was measured at the start: for a twin model the
    source's BatchNorm statistics, judged by the Frozen wing's max |logit| on a batch of the
    task's images (`probe`); BatchNorm batch statistics of too few values (`bn_batch`); else
    the learning rate.

    Args:
      classifier: the trainer's inner model (whose weights the run saves).
      steps_per_epoch: to number steps across epochs.
      probe: a batch of training images, for a twin model; None for a plain one.
      lr: the run's learning rate, named in the message of a plain model.
      bn_batch: the run's `BatchNormBatch` (`batch_norm_batch`), or None.
    """

    def __init__(self, classifier, steps_per_epoch, probe=None, lr=None, bn_batch=None):
        super().__init__()
        self.classifier = classifier
        self.steps_per_epoch = int(steps_per_epoch)
        self.probe = probe
        self.lr = lr
        self.bn_batch = bn_batch
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
        few = None
        if self.bn_batch is not None and self.bn_batch.too_few:
            few = (
                f"BatchNorm batch statistics from {self.bn_batch.describe()}, fewer than "
                f"{BN_MIN_VALUES}: statistics of so few values are noise; raise --batch_size "
                "(or --image_size)"
            )
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
                if few:
                    cause += f"; also {few}"
            elif few:
                cause += f", a normal value; likely the {few}"
            else:
                cause += (
                    "; likely the source's BatchNorm statistics (--pretrained) or a "
                    f"learning rate too high (--lr={self.lr})"
                )
        elif few:
            cause = f"likely the {few}"
        else:
            cause = f"likely a learning rate too high (--lr={self.lr}) for this model"
        kept = (
            f"last.weights.h5 keeps epoch {self._epoch}, the last finite one"
            if self._epoch
            else "no epoch had finished, so no weights were saved"
        )
        raise DivergenceError(f"training diverged: {what}; {cause}; {kept}.")


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
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(self._rows)
        atomic_files.write_text(self.path, text.getvalue())  # the whole file, in one step

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

    The record of the best epoch ({"epoch", "monitor", "value"}) is written inside
    `best.weights.h5` with the weights, in one step: a restart compares later epochs with the
    value of the weights that are there, whatever moment a kill chose.  `best.json` is a copy
    written after; a start rewrites it from the weights file when a kill came in between.

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
        """The record of the weights in best.weights.h5, or None when there are none.

        A run written before the record went inside its weights has it in best.json only."""
        if not os.path.isfile(self.weights_path):
            return None
        record = run_files.read_weights_record(self.weights_path)
        if record is None and os.path.isfile(self.record_path):
            with open(self.record_path) as f:
                record = json.load(f)
        return record

    def on_train_begin(self, logs=None):
        if self.best is not None and _json_or_none(self.record_path) != self.best:
            run_files.write_json(self.record_path, self.best)  # killed before the copy

    def on_epoch_end(self, epoch, logs=None):
        if self.monitor is None:
            self._save(
                {
                    "epoch": epoch + 1,
                    "monitor": None,
                    "value": None,
                    "selection": run_files.FINAL_EPOCH_SELECTION,
                }
            )
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
        self._save({"epoch": epoch + 1, "monitor": self.monitor, "value": value})

    def _save(self, record):
        run_files.save_weights(self.classifier, self.weights_path, record)
        self.best = record
        run_files.write_json(self.record_path, record)


def _json_or_none(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


class LastWeights(keras.callbacks.Callback):
    """Saves `classifier`'s weights to `last.weights.h5` after every epoch, with the epoch's
    number inside the file ({"epoch": n}, `model_dir.read_weights_record`)."""

    def __init__(self, classifier, model_dir):
        super().__init__()
        self.classifier = classifier
        self.path = os.path.join(model_dir, run_files.LAST_WEIGHTS)

    def on_epoch_end(self, epoch, logs=None):
        run_files.save_weights(self.classifier, self.path, {"epoch": epoch + 1})
