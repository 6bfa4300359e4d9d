"""How an evaluation's batches are shared out over a strategy's replicas and worker processes.

AutoAttack's random draws depend only on its seed and a batch's index in the evaluation, so a
batch attacked anywhere gives the numbers it gives in a single-device run.  The evaluation is
therefore split by whole batches: batch i of the fixed evaluation order goes to shard
i mod N, N = workers x local replicas (round robin, so a short last batch and uneven batch
counts only make one shard a batch shorter).  Shard k of a process runs on its k-th local
replica device; the shards of one process run one after the other, since on CPUs every kernel
already uses all cores, and the order keeps each shard's time its own.

The workers of a multi-worker job share the model directory (as multi-worker training
assumes): each keeps its shards' files in its own directory (the chief in the evaluation's,
worker i in `<directory>/worker_<i>`) and a collective sum over the workers (`sum_over_workers`)
is the barrier after which every shard's file is complete.
"""

import dataclasses
import os

from twins_tf.training import multi_worker


@dataclasses.dataclass(frozen=True)
class ShardLayout:
    """The shards of one evaluation as this process sees them.

    Attributes:
      count: N, the number of shards (replicas over every worker).
      local: [(shard index, device name or None)] this process runs.
      rank: this worker's position among the workers (the chief is 0).
      task_names: the "<task type>_<index>" of each worker, by rank.
      is_chief: whether this process writes the reports.
      strategy: the tf.distribute strategy, or None.
    """

    count: int
    local: tuple
    rank: int = 0
    task_names: tuple = ("worker_0",)
    is_chief: bool = True
    strategy: object = None

    @property
    def multi_worker(self):
        return len(self.task_names) > 1

    def batches_of(self, shard, total_batches):
        """The indices, in the whole evaluation, of the batches shard `shard` attacks."""
        return list(range(shard, total_batches, self.count))

    def rank_of(self, shard):
        """The worker whose process runs `shard`."""
        return shard // (self.count // len(self.task_names))

    def directory_of(self, rank, directory):
        """Where worker `rank` keeps its files: `directory` for the chief, else
        `directory/<task type>_<index>` (the convention of multi-worker training)."""
        return directory if rank == 0 else os.path.join(directory, self.task_names[rank])


def layout_of(strategy):
    """The `ShardLayout` of `strategy` (None or the default strategy: one shard here)."""
    try:
        devices = tuple(strategy.extended.worker_devices)
    except (AttributeError, RuntimeError, NotImplementedError):  # None, the default strategy
        return ShardLayout(count=1, local=((0, None),), strategy=strategy)
    count = int(strategy.num_replicas_in_sync)
    if not multi_worker.in_multi_worker_mode(strategy):
        return ShardLayout(count=count, local=tuple(enumerate(devices)), strategy=strategy)
    cluster = strategy.cluster_resolver.cluster_spec().as_dict()
    tasks = [("chief", 0)] if "chief" in cluster else []
    tasks += [("worker", index) for index in range(len(cluster.get("worker", [])))]
    rank = tasks.index(multi_worker.task(strategy))
    first = rank * len(devices)
    return ShardLayout(
        count=count,
        local=tuple((first + k, device) for k, device in enumerate(devices)),
        rank=rank,
        task_names=tuple(f"{kind}_{index}" for kind, index in tasks),
        is_chief=multi_worker.is_chief(strategy),
        strategy=strategy,
    )


def sum_over_workers(layout, value):
    """`value` (an int) summed over the workers of a multi-worker job; `value` otherwise.

    A collective every worker must reach, so it is also the barrier after which every worker
    has finished what it did before calling it.
    """
    if not layout.multi_worker:
        return int(value)
    import tensorflow as tf

    strategy = layout.strategy
    per_replica = strategy.experimental_distribute_values_from_function(
        lambda context: tf.constant(
            value if context.replica_id_in_sync_group % len(layout.local) == 0 else 0, tf.int64
        )
    )
    return int(strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None))
