"""Tests of twins_tf.training.distribute: strategies by name, one per process, the cluster
from TF_CONFIG or SLURM, and the errors for a wrong environment.

The multi-worker strategy itself is exercised with two worker processes by the train tests;
here only the cluster resolution runs (creating the strategy must happen at program start).
"""

import json
import os

import pytest
import tensorflow as tf

from twins_tf.training import distribute


def test_default_strategy_is_the_current_one():
    strategy = distribute.get_strategy("default")
    assert strategy is tf.distribute.get_strategy()
    assert strategy.num_replicas_in_sync == 1


def test_mirrored_uses_every_logical_cpu_and_reduces():
    cpus = tf.config.list_logical_devices("CPU")
    assert len(cpus) == 2, "tests/conftest.py configures two logical CPU devices"
    strategy = distribute.get_strategy("mirrored")
    assert isinstance(strategy, tf.distribute.MirroredStrategy)
    assert strategy.num_replicas_in_sync == 2

    def replica_value():
        context = tf.distribute.get_replica_context()
        return tf.cast(context.replica_id_in_sync_group, tf.float32) + 1.0

    per_replica = strategy.run(replica_value)
    assert float(strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)) == 3.0
    one = distribute.get_strategy("mirrored", devices=[cpus[0].name])
    assert one.num_replicas_in_sync == 1


def test_a_process_builds_each_strategy_once(monkeypatch):
    """Every run of a process (compare's grid, the --init probe) gets the strategy the process
    started with: a second request returns the same object; a second cluster strategy is
    refused rather than re-initialising the collectives or the TPU."""
    assert distribute.get_strategy("mirrored") is distribute.get_strategy("mirrored")
    built = []
    monkeypatch.setattr(distribute, "_BUILT", {})
    monkeypatch.setattr(distribute, "_build", lambda name, *args: built.append(name) or object())
    first = distribute.get_strategy("tpu", tpu_address="local")
    assert distribute.get_strategy("tpu", tpu_address="local") is first
    assert built == ["tpu"]  # initialize_tpu_system ran once
    with pytest.raises(ValueError, match="already runs under --strategy=tpu.*one --strategy"):
        distribute.get_strategy("multi_worker")
    assert distribute.get_strategy("mirrored") is not first  # a local strategy may be added


def test_unknown_strategy():
    with pytest.raises(ValueError, match="Unknown strategy 'horovod'.*multi_worker"):
        distribute.get_strategy("horovod")


def test_multi_worker_needs_tf_config(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="needs the TF_CONFIG environment variable"):
        distribute.get_strategy("multi_worker")


@pytest.mark.parametrize(
    "tf_config, message",
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"task": {"type": "worker", "index": 0}}), "no cluster.worker list"),
        (
            json.dumps(
                {"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "ps", "index": 0}}
            ),
            "task.type must name a job",
        ),
        (
            json.dumps(
                {
                    "cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]},
                    "task": {"type": "worker", "index": 2},
                }
            ),
            "index 2 is outside the 2 worker",
        ),
        (
            json.dumps(
                {
                    "cluster": {"chief": ["h:1"], "worker": ["h:2", "h:1"]},
                    "task": {"type": "worker", "index": 0},
                }
            ),
            "names h:1 more than once",
        ),
    ],
)
def test_bad_tf_config(tf_config, message):
    with pytest.raises(ValueError, match=message):
        distribute.check_tf_config(tf_config)


def test_good_tf_config():
    config = {
        "cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]},
        "task": {"type": "worker", "index": 1},
    }
    assert distribute.check_tf_config(json.dumps(config)) == config


def test_tpu_needs_an_address(monkeypatch):
    monkeypatch.delenv("TPU_NAME", raising=False)
    with pytest.raises(ValueError, match="needs --tpu_address"):
        distribute.get_strategy("tpu")


def _slurm_step(monkeypatch, procid, nodelist, tasks_per_node, num_tasks):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")  # no nvidia-smi: the CPU layout
    monkeypatch.setenv("SLURM_PROCID", str(procid))
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", str(num_tasks))
    monkeypatch.setenv("SLURM_STEP_NODELIST", nodelist)
    monkeypatch.setenv("SLURM_STEP_TASKS_PER_NODE", tasks_per_node)


@pytest.mark.parametrize("procid", [0, 1, 2])
def test_the_cluster_of_a_slurm_step_is_the_tf_config_one(monkeypatch, procid):
    """srun's variables for 3 tasks on node[1-2] (2 on node1, 1 on node2) give the cluster a
    hand-written TF_CONFIG gives: tasks packed node by node, ports 8888 + k on a node."""
    _slurm_step(monkeypatch, procid, "node[1-2]", "2,1", 3)
    slurm = distribute.cluster_resolver()
    assert isinstance(slurm, tf.distribute.cluster_resolver.SlurmClusterResolver)
    workers = ["node1:8888", "node1:8889", "node2:8888"]
    monkeypatch.setenv(
        "TF_CONFIG",
        json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": procid}}),
    )
    reference = distribute.cluster_resolver()
    assert isinstance(reference, tf.distribute.cluster_resolver.TFConfigClusterResolver)
    assert slurm.cluster_spec().as_dict() == reference.cluster_spec().as_dict()
    assert (slurm.task_type, slurm.task_id) == (reference.task_type, reference.task_id)
    assert "CUDA_VISIBLE_DEVICES" not in os.environ  # no GPU: nothing hidden from the task


def test_tf_config_wins_over_slurm_and_neither_is_one_line(monkeypatch):
    _slurm_step(monkeypatch, 0, "node1", "1", 1)
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        distribute.cluster_resolver()
    monkeypatch.delenv("TF_CONFIG")
    monkeypatch.delenv("SLURM_PROCID")
    with pytest.raises(ValueError, match="TF_CONFIG environment variable.*or a SLURM job step"):
        distribute.cluster_resolver()
