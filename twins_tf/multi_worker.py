"""Running `fit` under MultiWorkerMirroredStrategy: per-worker output dirs and two Keras fixes.

Every worker of a multi-worker job runs the same program and the same collectives (gradient
all-reduce, validation metrics), so every worker must run the same callbacks; only the chief's
files are the run's.  Following the tf.distribute convention, the chief writes into
`--model_dir` and every other worker into its own `model_dir/worker_<index>` (its backup there
lets it resume with the chief; its weights equal the chief's).

Keras 3.15's TensorFlow trainer breaks under MultiWorkerMirroredStrategy in two places, both
fixed here while a multi-worker strategy is in use (`fix_keras_for(strategy)`):
  * `fit` first calls `_maybe_symbolic_build`, which passes a *tuple* of per-replica batches to
    `strategy.reduce`; the collective reduce then tries to turn the tuple into a tensor
    ("Attempt to convert a value (PerReplica ...) to a Tensor").  Building only needs the
    shapes of one batch, so the fix takes the local replica's batch instead.
  * every step's metrics go through `strategy.reduce("MEAN", value, axis=0)`, which fails for
    the scalar metrics a train step returns ("Invalid reduction dimension 0 for input with 0
    dimensions").  The fix reduces scalars with `axis=None` (the mean over replicas).
No other library fixes this: it is Keras's own multi-worker path.
"""
import os

import tensorflow as tf
from keras.src.backend.tensorflow import trainer as keras_tf_trainer

_ORIGINAL_REDUCE = keras_tf_trainer.reduce_per_replica
_ORIGINAL_SYMBOLIC_BUILD = keras_tf_trainer.TensorFlowTrainer._maybe_symbolic_build


def in_multi_worker_mode(strategy):
    """Whether `strategy` is a MultiWorkerMirroredStrategy spanning more than one worker."""
    return (isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
            and strategy.extended._in_multi_worker_mode())


def task(strategy):
    """(task type, task index) of this process, ("worker", 0) outside multi-worker mode."""
    if not in_multi_worker_mode(strategy):
        return "worker", 0
    resolver = strategy.cluster_resolver
    return resolver.task_type, int(resolver.task_id or 0)


def is_chief(strategy):
    """Whether this process writes the run's files: the "chief" task, else worker 0."""
    if not in_multi_worker_mode(strategy):
        return True
    task_type, index = task(strategy)
    if task_type == "chief":
        return True
    has_chief = "chief" in strategy.cluster_resolver.cluster_spec().as_dict()
    return task_type == "worker" and index == 0 and not has_chief


def output_dir(model_dir, strategy):
    """`model_dir` for the chief, `model_dir/<task type>_<index>` for any other worker."""
    if is_chief(strategy):
        return model_dir
    task_type, index = task(strategy)
    return os.path.join(model_dir, f"{task_type}_{index}")


def fix_keras_for(strategy):
    """Installs the two fixes of the module docstring if `strategy` spans several workers."""
    if in_multi_worker_mode(strategy):
        keras_tf_trainer.reduce_per_replica = _reduce_per_replica
        keras_tf_trainer.TensorFlowTrainer._maybe_symbolic_build = _maybe_symbolic_build


def _reduce_per_replica(values, strategy, reduction):
    if reduction in ("auto", "mean") and keras_tf_trainer._collective_all_reduce_multi_worker(
            strategy):
        def reduce(value):
            if not isinstance(value, (tf.Tensor, tf.distribute.DistributedValues)):
                return value
            rank = value.shape.rank if isinstance(value, tf.Tensor) else (
                strategy.experimental_local_results(value)[0].shape.rank)
            return strategy.reduce("MEAN", value, axis=None if rank == 0 else 0)

        return tf.nest.map_structure(reduce, values)
    return _ORIGINAL_REDUCE(values, strategy, reduction)


def _maybe_symbolic_build(self, iterator=None, data_batch=None):
    if iterator is not None and self._distribute_strategy is not None:
        for _, _, batches in iterator:
            batch = next(batches)
            data_batch = tf.nest.map_structure(
                lambda v: (self.distribute_strategy.experimental_local_results(v)[0]
                           if isinstance(v, tf.distribute.DistributedValues) else v),
                batch)
            break
        iterator = None
    return _ORIGINAL_SYMBOLIC_BUILD(self, iterator=iterator, data_batch=data_batch)
