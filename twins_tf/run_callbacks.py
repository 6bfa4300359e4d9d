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

Epochs in these files count from 1 (the epoch just finished), unlike Keras's 0-based indices.
"""
import csv
import json
import math
import os

import keras

from twins_tf import run_config


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
      monitor: the metric to maximise (the validation PGD accuracy, `val_adv_acc`).
    """

    def __init__(self, classifier, model_dir, monitor="val_adv_acc"):
        super().__init__()
        self.classifier = classifier
        self.weights_path = os.path.join(model_dir, run_config.BEST_WEIGHTS)
        self.record_path = os.path.join(model_dir, run_config.BEST_RECORD)
        self.monitor = monitor
        self.best = self._read_record()

    def _read_record(self):
        if os.path.isfile(self.record_path) and os.path.isfile(self.weights_path):
            with open(self.record_path) as f:
                return json.load(f)
        return None

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None:
            raise ValueError(f"BestWeights monitors {self.monitor!r} but the epoch's logs only "
                             f"have {sorted(logs or {})}.")
        value = float(value)
        if self.best is not None and not value > self.best["value"]:
            return
        if math.isnan(value):
            return
        _save_weights(self.classifier, self.weights_path)
        self.best = {"epoch": epoch + 1, "monitor": self.monitor, "value": value}
        run_config.write_json(self.record_path, self.best)


class LastWeights(keras.callbacks.Callback):
    """Saves `classifier`'s weights to `last.weights.h5` after every epoch."""

    def __init__(self, classifier, model_dir):
        super().__init__()
        self.classifier = classifier
        self.path = os.path.join(model_dir, run_config.LAST_WEIGHTS)

    def on_epoch_end(self, epoch, logs=None):
        _save_weights(self.classifier, self.path)
