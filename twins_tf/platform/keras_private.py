"""Every use of a Keras or TensorFlow private API in twins_tf, in one place.

Keras 3 and TensorFlow 2.21 leave a few things twins_tf needs without a public name. Each
function here wraps one such use, names the Keras / TensorFlow version it was checked against,
and has a test in tests/test_keras_private*.py that pins the behaviour it relies on, so an
upgrade that changes it fails there first instead of deep inside a training run. No other
module imports `keras.src` or `tensorflow.python`.

It is long by design: one home for every private use, so an upgrade breaks one module.
"""

# --- training and runs: multi-worker trainer fix, BackupAndRestore's files, op determinism ---
# The backup: keras.callbacks.BackupAndRestore keeps its state in files whose names and
# format Keras does not document; twins_tf's model_dir contract repairs a backup a kill cut
# short (twins_tf.training.backup), so it needs them.
BACKUP_WEIGHTS = "latest.weights.h5"
BACKUP_METADATA = "training_metadata.json"
BACKUP_PREVIOUS_SUFFIX = ".bkp"


def backup_file_names():
    """(weights, metadata, suffix of the previous pair) of a BackupAndRestore directory.

    Why: a run killed while Keras writes its backup can leave a weights file cut short or a
    half-written metadata file, which Keras cannot restore from; twins_tf.training.backup puts
    the previous pair back, and must know which files those are.

    Relies on (checked against keras 3.15.1 / TF 2.21.0): `BackupAndRestore(backup_dir,
    double_checkpoint=True)` saves the weights to `backup_dir/latest.weights.h5`
    (`model.save_weights`) and then `backup_dir/training_metadata.json`, after first copying
    each existing one to the same name + ".bkp" (`BackupAndRestore._save_model`).
    """
    return BACKUP_WEIGHTS, BACKUP_METADATA, BACKUP_PREVIOUS_SUFFIX


def backup_epoch(metadata_path):
    """The number of finished epochs a BackupAndRestore metadata file records; None if the
    file is missing, unreadable or half written.

    Relies on (checked against keras 3.15.1 / TF 2.21.0): the metadata file is the JSON
    object {"epoch": <epochs finished>, "batch": <batch>} (`BackupAndRestore._save_model`),
    and `fit` resumes at that epoch (`model._initial_epoch = epoch` in `_load_model`).
    """
    import json

    try:
        with open(metadata_path) as f:
            return int(json.loads(f.read())["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def backup_metadata(epoch):
    """The text of the metadata file BackupAndRestore writes after finishing `epoch` epochs.

    Why: a kill between Keras writing the backup's weights and its metadata leaves the
    metadata an epoch behind the weights; twins_tf.training.backup rewrites it to match them.

    Relies on (checked against keras 3.15.1 / TF 2.21.0): at an epoch's end
    `BackupAndRestore._save_model` writes `json.dumps({"epoch": <epochs finished>, "batch":
    0})` (`on_epoch_end` resets the batch to 0 before saving).
    """
    import json

    return json.dumps({"epoch": int(epoch), "batch": 0})


def saved_optimizer_iterations(weights_path):
    """The optimizer's iteration count (steps applied) in a `model.save_weights` file of a
    compiled model; None if the file does not open or holds no optimizer.

    Why: the backup's weights carry the optimizer, so its step count says how far they were
    trained whatever the metadata file beside them says (twins_tf.training.backup).

    Relies on (checked against keras 3.15.1 / TF 2.21.0): `save_weights` writes the optimizer
    under the HDF5 group `optimizer`, its variables as `vars/0`, `vars/1`, ... in the order of
    `optimizer.variables`, the first being `iterations`; a `LossScaleOptimizer` (mixed_float16)
    keeps its own, never incremented, there and the counting one under `inner_optimizer`.
    """
    import h5py

    try:
        with h5py.File(weights_path, "r") as f:
            group = f["optimizer"]
            if "inner_optimizer" in group:
                group = group["inner_optimizer"]
            return int(group["vars"]["0"][()])
    except (OSError, KeyError, ValueError, TypeError):
        return None


# Op determinism: TF 2.21 makes `tf.config.experimental.enable_op_determinism` public, but
# not the getter nor the way back, which a run needs to leave the process as it found it.
def op_determinism_enabled():
    """Whether TensorFlow's op determinism is on.

    Relies on (checked against keras 3.15.1 / TF 2.21.0):
    `tensorflow.python.framework.config.is_op_determinism_enabled`, which
    `tf.config.experimental.enable_op_determinism` turns True.
    """
    from tensorflow.python.framework import config as tf_config

    return tf_config.is_op_determinism_enabled()


def disable_op_determinism():
    """Turns TensorFlow's op determinism off again.

    Relies on (checked against keras 3.15.1 / TF 2.21.0):
    `tensorflow.python.framework.config.disable_op_determinism`.
    """
    from tensorflow.python.framework import config as tf_config

    tf_config.disable_op_determinism()


# Retracing warnings: TensorFlow counts the traces of every tf.function of one Python function
# together; a process running several runs (compare) traces each run's new model anew.
def forget_tracing_history():
    """Starts TensorFlow's record of recent tf.function traces afresh.

    Why: TensorFlow warns ("N out of the last M calls to <function> triggered tf.function
    retracing") when most recent calls of a function traced, and it counts every tf.function
    made from the same Python code together.  A process that runs several runs in turn
    (`compare`) builds a new model for each, so new tf.functions of the same code (Keras's
    train and test steps, the accuracy counters, the attacks' compiled pieces), each traced
    once for its model's variables: the traces are inherent (a graph holds the variables of
    the model it was traced for), but from the third run on their count reaches the warning.
    Forgetting the record when a run starts counts each run's traces alone, so a function
    retraced within a run (shapes or Python arguments changing between calls: real waste)
    still warns.

    Relies on (checked against keras 3.15.1 / TF 2.21.0):
    `tensorflow.python.eager.polymorphic_function.polymorphic_function.
    _frequent_tracing_detector_manager`, whose `_detectors` (a WeakKeyDictionary from a
    function's code object to its `_FrequentTracingDetector`, guarded by `_lock`) hold the
    counts the warning is decided from.
    """
    from tensorflow.python.eager.polymorphic_function import polymorphic_function

    manager = polymorphic_function._frequent_tracing_detector_manager
    with manager._lock:
        manager._detectors.clear()


# oneDNN: TensorFlow says at import whether its oneDNN kernels are on, but has no public
# getter; twins_tf.platform.cpu_kernels warns when they are off because TensorFlow came first.
def onednn_enabled():
    """Whether this process's TensorFlow runs oneDNN's CPU kernels (imports TensorFlow).

    Relies on (checked against TF 2.21.0, tensorflow-cpu, x86-64):
    `tensorflow.python.util._pywrap_util_port.IsMklEnabled`, which reads the choice
    TensorFlow made once at import from TF_ENABLE_ONEDNN_OPTS and the CPU's features.
    """
    from tensorflow.python.util import _pywrap_util_port

    return bool(_pywrap_util_port.IsMklEnabled())


# Multi-worker: Keras 3.15's TensorFlow trainer breaks under MultiWorkerMirroredStrategy in
# two places (see twins_tf.training.multi_worker); the fix replaces two of its internals while `fit`
# runs and puts Keras's own back afterwards.
def in_multi_worker_mode(strategy):
    """Whether `strategy` is a MultiWorkerMirroredStrategy spanning more than one worker.

    Relies on (checked against keras 3.15.1 / TF 2.21.0): the strategy's private
    `extended._in_multi_worker_mode()` (TensorFlow has no public equivalent; a one-worker
    MultiWorkerMirroredStrategy returns False).
    """
    import tensorflow as tf

    return (
        isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
        and strategy.extended._in_multi_worker_mode()
    )


def _multi_worker_reduce_per_replica(original):
    """Keras's `reduce_per_replica`, reducing scalars with axis=None under multi-worker."""
    import tensorflow as tf
    from keras.src.backend.tensorflow import trainer as keras_tf_trainer

    def reduce_per_replica(values, strategy, reduction):
        if reduction in ("auto", "mean") and (
            keras_tf_trainer._collective_all_reduce_multi_worker(strategy)
        ):

            def reduce(value):
                if not isinstance(value, (tf.Tensor, tf.distribute.DistributedValues)):
                    return value
                rank = (
                    value.shape.rank
                    if isinstance(value, tf.Tensor)
                    else (strategy.experimental_local_results(value)[0].shape.rank)
                )
                return strategy.reduce("MEAN", value, axis=None if rank == 0 else 0)

            return tf.nest.map_structure(reduce, values)
        return original(values, strategy, reduction)

    return reduce_per_replica


def _multi_worker_symbolic_build(original):
    """Keras's `_maybe_symbolic_build`, building from the local replica's batch."""
    import tensorflow as tf

    def maybe_symbolic_build(self, iterator=None, data_batch=None):
        if iterator is not None and self._distribute_strategy is not None:
            for _, _, batches in iterator:
                batch = next(batches)
                data_batch = tf.nest.map_structure(
                    lambda v: (
                        self.distribute_strategy.experimental_local_results(v)[0]
                        if isinstance(v, tf.distribute.DistributedValues)
                        else v
                    ),
                    batch,
                )
                break
            iterator = None
        return original(self, iterator=iterator, data_batch=data_batch)

    return maybe_symbolic_build


def keras_trainer_functions():
    """(module-level `reduce_per_replica`, `TensorFlowTrainer._maybe_symbolic_build`) as
    Keras has them now: what `multi_worker_trainer_fixes` replaces and restores."""
    from keras.src.backend.tensorflow import trainer as keras_tf_trainer

    return (
        keras_tf_trainer.reduce_per_replica,
        keras_tf_trainer.TensorFlowTrainer.__dict__["_maybe_symbolic_build"],
    )


class multi_worker_trainer_fixes:  # noqa: N801 (used as a context manager, like a function)
    """Context manager: Keras's TF trainer fixed for MultiWorkerMirroredStrategy inside it.

    Inside, `fit` (1) builds the model from the local replica's batch instead of handing
    `strategy.reduce` a tuple of per-replica batches ("Attempt to convert a value (PerReplica
    ...) to a Tensor"), and (2) reduces scalar step metrics over replicas with axis=None
    instead of axis=0 ("Invalid reduction dimension 0 for input with 0 dimensions").  On
    exit, also after an exception, Keras's own functions are put back, so nothing else in
    the process runs with them.  Not re-entrant across threads (it patches module globals).

    Relies on (checked against keras 3.15.1 / TF 2.21.0):
    `keras.src.backend.tensorflow.trainer.reduce_per_replica(values, strategy, reduction)`,
    called by the train/test steps through the module global; its helper
    `_collective_all_reduce_multi_worker(strategy)`; and
    `TensorFlowTrainer._maybe_symbolic_build(self, iterator=None, data_batch=None)`, called
    by `fit` / `evaluate` before the first step, where `iterator` yields
    (step, _, batches) and `self._distribute_strategy` is the model's strategy.
    """

    def __init__(self, *, reduce_per_replica=None, maybe_symbolic_build=None):
        # Factories original -> replacement; the fixes by default (tests pass spies that
        # record Keras calling them).
        self._reduce, self._build = reduce_per_replica, maybe_symbolic_build
        self._saved = None

    def __enter__(self):
        from keras.src.backend.tensorflow import trainer as keras_tf_trainer

        if self._saved is not None:
            raise RuntimeError("multi_worker_trainer_fixes is already active.")
        reduce, build = self._saved = keras_trainer_functions()
        keras_tf_trainer.reduce_per_replica = (self._reduce or _multi_worker_reduce_per_replica)(
            reduce
        )
        keras_tf_trainer.TensorFlowTrainer._maybe_symbolic_build = (
            self._build or _multi_worker_symbolic_build
        )(build)
        return self

    def __exit__(self, *exc_info):
        from keras.src.backend.tensorflow import trainer as keras_tf_trainer

        keras_tf_trainer.reduce_per_replica, build = self._saved
        keras_tf_trainer.TensorFlowTrainer._maybe_symbolic_build = build
        self._saved = None
        return False


# --- attacks: per-layer dtype policy while tracing an attack ---
import contextlib  # noqa: E402  (the attacks section's own import)


@contextlib.contextmanager
def float32_compute(model):
    """While open, every layer of `model` computes in float32 (its variables unchanged).

    Why: PGD follows the sign of an input gradient, which bfloat16/float16 round to zero or
    flip for many small entries; under a mixed-precision policy the attack's trace must run
    the model in float32, and the training forward traced afterwards in the model's own
    policy.  Keras reads a layer's compute dtype when the layer is called, i.e. while a
    function is traced, so switching the policies for the attack's trace and restoring them
    right after gives both graphs.  The public `layer.dtype_policy` setter cannot do this:
    with a `DTypePolicyMap` it edits the shared map (for every layer at that path) and it
    re-runs the quantization hooks, so it is not undone by setting the old value back.

    Relies on (checked against keras 3.15.1 / TF 2.21.0): `flatten_layers` below (pinned in
    tests/test_keras_private_trainer.py); `Layer._dtype_policy` is the attribute
    `Layer.compute_dtype` (and so `Layer.__call__`'s
    input casting and `Layer.add_weight`'s autocast) reads; assigning it changes nothing
    else.  Quantized layers keep their policy (their kernels need it).
    """
    import keras

    layers = [model, *flatten_layers(model)]
    saved = [(layer, layer._dtype_policy) for layer in layers]
    try:
        for layer, policy in saved:
            if policy.compute_dtype != "float32" and policy.quantization_mode is None:
                layer._dtype_policy = keras.DTypePolicy("float32")
        yield
    finally:
        for layer, policy in saved:
            layer._dtype_policy = policy


# --- models and weights: Keras's Functional class, Keras's HDF5 group names ---
# twinify tells a graph model by the public `keras.Function` (twins_tf.bn_wings.is_graph_model),
# so Keras's Functional class needs no private import.  What stays private is the layout of
# the `.weights.h5` files `model.save_weights` writes, which twins_tf.weights reads to tell a
# file's architecture, head size and kind (twin or plain) before loading it.


def saved_layer_shapes(h5file, layer_class):
    """The variable shapes of every layer of `layer_class` saved in a `.weights.h5` file.

    Why: `load_pretrained` must know a file's number of convolutions, its head size and
    whether it holds twin layers before it can build the model to load it into, and Keras has
    no public reader of a weights file.

    Relies on (checked against keras 3.15.1 / TF 2.21.0): `model.save_weights` of a functional
    model writes layer k of a class under the HDF5 group `layers/<name>` with `<name>` the
    class name in snake case (`keras.src.utils.naming.to_snake_case`: Conv2D -> conv2d,
    TwinBatchNormalization -> twin_batch_normalization) for the first such layer and
    `<name>_<k>` for the k-th after it (`saving_lib._get_unique_name`), and the layer's
    variables as datasets `vars/0`, `vars/1`, ... in the order of `layer.weights`.

    Args:
      h5file: an open `h5py.File`.
      layer_class: a Keras layer class.

    Returns:
      [[shape of each variable] for each such layer holding variables], in save order.
    """
    from keras.src.utils.naming import to_snake_case

    base = to_snake_case(layer_class.__name__)
    layers = h5file["layers"]
    found = []
    for name in layers:
        suffix = name[len(base) :]
        if not name.startswith(base) or not (
            suffix == "" or suffix[:1] == "_" and suffix[1:].isdigit()
        ):
            continue
        variables = layers[name].get("vars")
        if variables is not None and len(variables):
            shapes = [tuple(variables[str(i)].shape) for i in range(len(variables))]
            found.append((int(suffix[1:] or 0), shapes))
    return [shapes for _, shapes in sorted(found)]


def load_weights_collecting_skips(model, path):
    """`model.load_weights(path)`, returning Keras's warnings that it skipped part of the file.

    Why: Keras loads a weights file whose nested containers are missing with only a warning,
    leaving those layers freshly initialised; a pre-trained load must refuse that instead.

    Relies on (checked against keras 3.15.1 / TF 2.21.0): such warnings are UserWarnings
    whose text holds "Skipping" (`saving_lib._load_container_state`); a layer that finds
    no variables in the file raises ValueError; extra layers in the file are ignored silently
    (so callers compare layer counts first).

    Returns:
      The first line of each "Skipping" warning (an empty list when all was loaded).

    Raises:
      ValueError, OSError, KeyError: as `model.load_weights`.
    """
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.load_weights(path)
    return [str(w.message).splitlines()[0] for w in caught if "Skipping" in str(w.message)]


# --- serialisation and the trainer: tf.data's batch structure, a model's nested layers ---
# The trainer checks the batch sizes of a tf.data pipeline before training (an odd last batch
# of a twin method would otherwise fail an epoch later), and L2-SP's `l2sp_exclude` names
# layers at any depth of the model.

# Datasets that yield their input's elements (batches) unchanged in size.
_SIZE_PRESERVING_DATASETS = frozenset(
    {
        "_MapDataset",
        "_ParallelMapDataset",
        "_PrefetchDataset",
        "_OptionsDataset",
        "_RepeatDataset",
        "_ShuffleDataset",
        "CacheDataset",
    }
)


def dataset_batch_sizes(dataset):
    """The set of batch sizes `dataset` yields, when its structure tells them; else None.

    Why: tf.data's public API gives a batched dataset's batch size as None (the last batch may
    be smaller) and its cardinality, but not the size of that last batch, which is what a twin
    method needs even.  Walks from `dataset` through the size-preserving transformations above
    down to a `batch()`/`padded_batch()`; there, from the constant batch size b, drop_remainder
    and the input's known cardinality N, the sizes are {b} and, if N % b, {N % b}.

    Relies on tf.data's private dataset classes (their names, as listed above, and
    `_BatchDataset`/`_ParallelBatchDataset`/`_PaddedBatchDataset`) and their private
    attributes `_input_dataset`, `_batch_size` and `_drop_remainder`.
    Checked against keras 3.15.1 / TF 2.21.0.
    """
    import tensorflow as tf

    node = dataset
    while type(node).__name__ in _SIZE_PRESERVING_DATASETS:
        node = getattr(node, "_input_dataset", None)
    if node is None or not hasattr(node, "_batch_size") or not hasattr(node, "_drop_remainder"):
        return None
    batch = tf.get_static_value(node._batch_size)
    drop_remainder = tf.get_static_value(node._drop_remainder)
    source = getattr(node, "_input_dataset", None)
    if batch is None or drop_remainder is None or source is None:
        return None
    batch = int(batch)
    if drop_remainder:
        return {batch}
    count = int(source.cardinality())
    if count == tf.data.INFINITE_CARDINALITY:
        return {batch}
    if count < 0:  # unknown
        return None
    sizes = {batch} if count >= batch else set()
    if count % batch:
        sizes.add(count % batch)
    return sizes


def flatten_layers(model):
    """Every layer nested in `model` at any depth (not `model` itself), each once.

    Why: `model.layers` lists only the top level; layers held inside custom layers or nested
    models are reached only by Keras's private `Layer._flatten_layers(include_self=False)`.
    Checked against keras 3.15.1 / TF 2.21.0.
    """
    return list(model._flatten_layers(include_self=False))
