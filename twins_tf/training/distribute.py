"""tf.distribute strategies by name, for the `--strategy` flag of the binaries.

A trimmed version of TF Model Garden's `distribute_utils.get_distribution_strategy`: a string
in, a strategy out, and a one-line error that says what to fix when the environment does not
fit the choice (no TF_CONFIG for multi-worker, no TPU address).  tf.distribute itself has no
such string-to-strategy helper.

* "default": the current (by default: no-op, one device) strategy.
* "mirrored": `MirroredStrategy` over every local GPU, or, without GPUs, every logical CPU
  device (one, unless the process configured more; the tests configure two).
* "multi_worker": `MultiWorkerMirroredStrategy`; every process reads its role from the
  `TF_CONFIG` environment variable.  Create it at program start, before other TensorFlow
  work: collective ops must be configured before the runtime initialises.
* "tpu": `TPUStrategy` on the TPU named by `tpu_address` (or `$TPU_NAME`).

Example:
  >>> strategy = get_strategy("mirrored")
  >>> with strategy.scope():
  ...     model = build_model()
"""

import json
import os

import tensorflow as tf

STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")

_TF_CONFIG_EXAMPLE = (
    'TF_CONFIG=\'{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
    '"task": {"type": "worker", "index": 0}}\''
)


def get_strategy(name, *, tpu_address=None, devices=None):
    """Returns the `tf.distribute.Strategy` called `name`.

    Args:
      name: one of "default", "mirrored", "multi_worker", "tpu".
      tpu_address: the TPU for "tpu": a TPU name, "grpc://host:port", or "local" on a TPU VM;
        defaults to `$TPU_NAME`.
      devices: for "mirrored", the devices to mirror over (default: all GPUs, else all
        logical CPUs).

    Returns:
      A `tf.distribute.Strategy`.

    Raises:
      ValueError: unknown name, or the environment lacks what the strategy needs.
      RuntimeError: the TPU could not be reached.
    """
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        if devices is None:
            gpus = tf.config.list_logical_devices("GPU")
            devices = [d.name for d in gpus or tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices=list(devices))
    if name == "multi_worker":
        check_tf_config(os.environ.get("TF_CONFIG"))
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        return _tpu_strategy(tpu_address or os.environ.get("TPU_NAME"))
    raise ValueError(f"Unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}.")


def check_tf_config(tf_config):
    """Raises ValueError unless `tf_config` (a TF_CONFIG string) describes a worker cluster.

    Returns:
      The parsed TF_CONFIG dictionary.
    """
    if not tf_config:
        raise ValueError(
            "--strategy=multi_worker needs the TF_CONFIG environment variable on every worker, "
            f"e.g. {_TF_CONFIG_EXAMPLE} (index = this worker's position in the list)."
        )
    try:
        config = json.loads(tf_config)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"TF_CONFIG is not valid JSON ({error}); expected e.g. {_TF_CONFIG_EXAMPLE}."
        ) from None
    cluster = config.get("cluster") if isinstance(config, dict) else None
    task = config.get("task") if isinstance(config, dict) else None
    if not isinstance(cluster, dict) or not (cluster.get("worker") or cluster.get("chief")):
        raise ValueError(
            f"TF_CONFIG has no cluster.worker list of host:port addresses; "
            f"expected e.g. {_TF_CONFIG_EXAMPLE}."
        )
    if not isinstance(task, dict) or task.get("type") not in cluster:
        raise ValueError(
            f"TF_CONFIG's task.type must name a job of the cluster "
            f"({', '.join(cluster)}), got {task!r}."
        )
    index = task.get("index", 0)
    if not isinstance(index, int) or not 0 <= index < len(cluster[task["type"]]):
        raise ValueError(
            f"TF_CONFIG's task.index {index!r} is outside the "
            f"{len(cluster[task['type']])} {task['type']} address(es)."
        )
    return config


def _tpu_strategy(address):
    if not address:
        raise ValueError(
            "--strategy=tpu needs --tpu_address (a TPU name, grpc://host:port, "
            "or 'local' on a TPU VM) or the TPU_NAME environment variable."
        )
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=address)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, RuntimeError, tf.errors.OpError) as error:
        raise RuntimeError(
            f"--strategy=tpu could not reach the TPU {address!r}: "
            f"{str(error).splitlines()[0] if str(error) else error!r}"
        ) from error
    return tf.distribute.TPUStrategy(resolver)
