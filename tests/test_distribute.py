"""Tests of twins_tf.training.distribute: strategies by name and the errors for a wrong environment.

The multi-worker strategy itself is exercised with two worker processes by the train tests;
here only TF_CONFIG validation runs (creating the strategy must happen at program start).
"""

import json

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
