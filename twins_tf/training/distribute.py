"""tf.distribute strategies by name, for the `--strategy` flag of the binaries.

A trimmed version of TF Model Garden's `distribute_utils.get_distribution_strategy`: a string
in, a strategy out, and a one-line error that says what to fix when the environment does not
fit the choice (no TF_CONFIG for multi-worker, no TPU address).  tf.distribute itself has no
such string-to-strategy helper.

* "default": the current (by default: no-op, one device) strategy.
* "mirrored": `MirroredStrategy` over every local GPU, or, without GPUs, every logical CPU
  device (one, unless the process configured more; the tests configure two).
* "multi_worker": `MultiWorkerMirroredStrategy`; every process reads its role from the
  `TF_CONFIG` environment variable or, without one, from SLURM's (`srun` sets SLURM_PROCID
  and the step's node list; `SlurmClusterResolver` turns them into the cluster, worker k of
  a node listening on port 8888 + k).  Create it at program start, before other TensorFlow
  work: collective ops must be configured before the runtime initialises.
* "tpu": `TPUStrategy` on the TPU named by `tpu_address` (or `$TPU_NAME`).

One strategy per process: `get_strategy` builds a strategy the first time it is asked for it
and hands the same object to every later call with the same arguments, so every run a process
makes (compare's grid, the `--init` probe's sub-run, interpolation's evaluations) runs under
the strategy the process started with.  A second MultiWorkerMirroredStrategy would configure
the collectives again (they are configured once, at program start), and a second TPUStrategy
would re-run `initialize_tpu_system`, which drops everything already on the TPU; asking for
another multi-worker or TPU strategy than the process has is refused.

Example:
  >>> strategy = get_strategy("mirrored")
  >>> with strategy.scope():
  ...     model = build_model()
"""

import json
import os
import shutil

import tensorflow as tf

STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")
# The strategies this process built, by (name, tpu_address, devices): see the docstring.
_BUILT = {}

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
    if name not in STRATEGIES:
        raise ValueError(f"Unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}.")
    if name == "tpu":
        tpu_address = tpu_address or os.environ.get("TPU_NAME")
    key = (name, tpu_address if name == "tpu" else None, tuple(devices or ()))
    if key not in _BUILT:
        _check_one_cluster(name)
        _BUILT[key] = _build(name, tpu_address, devices)
    return _BUILT[key]


def _check_one_cluster(name):
    """Refuses a second multi-worker or TPU strategy in one process (see the docstring)."""
    if name not in ("multi_worker", "tpu"):
        return
    for built in _BUILT:
        if built[0] in ("multi_worker", "tpu"):
            raise ValueError(
                f"this process already runs under --strategy={built[0]}; a second "
                f"cluster strategy ({name}) would re-initialise the collectives or the TPU: "
                "use one --strategy per process."
            )


def _build(name, tpu_address, devices):
    if name == "mirrored":
        if devices is None:
            gpus = tf.config.list_logical_devices("GPU")
            devices = [d.name for d in gpus or tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices=list(devices))
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=cluster_resolver())
    return _tpu_strategy(tpu_address)


SLURM_PORT_BASE = 8888  # SlurmClusterResolver's default: worker k of a node listens on 8888 + k
_SLURM_VARIABLES = ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_STEP_NODELIST")


def cluster_resolver(*, port_base=SLURM_PORT_BASE):
    """The multi-worker cluster this process belongs to: TF_CONFIG's, else SLURM's.

    Raises:
      ValueError: neither describes a cluster, or TF_CONFIG is malformed.
    """
    resolvers = tf.distribute.cluster_resolver
    if os.environ.get("TF_CONFIG") or not all(v in os.environ for v in _SLURM_VARIABLES):
        check_tf_config(os.environ.get("TF_CONFIG"))
        return resolvers.TFConfigClusterResolver()
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None or shutil.which("nvidia-smi"):
        return resolvers.SlurmClusterResolver(port_base=port_base)  # it assigns the GPUs
    # No GPU: SlurmClusterResolver lays tasks out by GPU, so it is given one per task
    # (and told not to set CUDA_VISIBLE_DEVICES) to place every task of a node.
    tasks = os.environ.get("SLURM_STEP_TASKS_PER_NODE", os.environ["SLURM_STEP_NUM_TASKS"])
    most = max(int(part.split("(")[0]) for part in tasks.split(","))
    return resolvers.SlurmClusterResolver(
        port_base=port_base, gpus_per_node=most, gpus_per_task=1, auto_set_gpu=False
    )


def check_tf_config(tf_config):
    """Raises ValueError unless `tf_config` (a TF_CONFIG string) describes a worker cluster.

    Returns:
      The parsed TF_CONFIG dictionary.
    """
    if not tf_config:
        raise ValueError(
            "--strategy=multi_worker needs the TF_CONFIG environment variable on every worker, "
            f"e.g. {_TF_CONFIG_EXAMPLE} (index = this worker's position in the list), or a "
            "SLURM job step (srun sets SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_STEP_NODELIST)."
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
    addresses = [a for job in cluster.values() for a in (job if isinstance(job, list) else [])]
    repeated = sorted({a for a in addresses if addresses.count(a) > 1})
    if repeated:
        raise ValueError(
            f"TF_CONFIG's cluster names {', '.join(repeated)} more than once; give every "
            "task its own host:port."
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
