"""Test set-up shared by the whole suite.

Two logical CPU devices are configured before TensorFlow initialises, so MirroredStrategy
tests can run on one physical CPU (XLA still works outside a strategy with this set-up).
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

_cpus = tf.config.list_physical_devices("CPU")
try:
    tf.config.set_logical_device_configuration(
        _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2
    )
except RuntimeError:  # already initialised by an earlier import: keep what is there
    pass
