"""Running `fit` under MultiWorkerMirroredStrategy: per-worker output dirs and two Keras fixes.

Every worker of a multi-worker job runs the same program and the same collectives (gradient
all-reduce, validation metrics), so every worker must run the same callbacks; only the chief's
files are the run's.  Following the tf.distribute convention, the chief writes into
`--model_dir` and every other worker into its own `model_dir/worker_<index>` (its backup there
lets it resume with the chief; its weights equal the chief's).

Keras 3.15's TensorFlow trainer breaks under MultiWorkerMirroredStrategy in two places, both
fixed while `fit` runs under a multi-worker strategy (`with keras_fixes_for(strategy):`):
  * `fit` first calls `_maybe_symbolic_build`, which passes a *tuple* of per-replica batches to
    `strategy.reduce`; the collective reduce then tries to turn the tuple into a tensor
    ("Attempt to convert a value (PerReplica ...) to a Tensor").  Building only needs the
    shapes of one batch, so the fix takes the local replica's batch instead.
  * every step's metrics go through `strategy.reduce("MEAN", value, axis=0)`, which fails for
    the scalar metrics a train step returns ("Invalid reduction dimension 0 for input with 0
    dimensions").  The fix reduces scalars with `axis=None` (the mean over replicas).
The fixes replace Keras internals (`keras_private.multi_worker_trainer_fixes`) only
inside the `with` block and put Keras's own back on leaving it, so other models trained in
the process never run with them.
No other library fixes this: it is Keras's own multi-worker path.
"""

import contextlib
import os

from twins_tf.platform import keras_private

in_multi_worker_mode = keras_private.in_multi_worker_mode


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


def keras_fixes_for(strategy):
    """Context manager: Keras's trainer fixed for `strategy` inside it (the two fixes of the
    module docstring if `strategy` spans several workers, nothing otherwise)."""
    if in_multi_worker_mode(strategy):
        return keras_private.multi_worker_trainer_fixes()
    return contextlib.nullcontext()
