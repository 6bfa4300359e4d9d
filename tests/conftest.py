"""Test set-up shared by the whole suite.

Two logical CPU devices are configured before TensorFlow initialises, so MirroredStrategy
tests can run on one physical CPU (XLA still works outside a strategy with this set-up).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# isort: off
# First, before TensorFlow: `import twins_tf` turns oneDNN's CPU kernels on (cpu_kernels), as
# for every binary, so the suite runs the kernels its tolerances were set with on any x86 CPU.
import twins_tf  # noqa: E402,F401
import tensorflow as tf  # noqa: E402

# isort: on

_cpus = tf.config.list_physical_devices("CPU")
try:
    tf.config.set_logical_device_configuration(
        _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2
    )
except RuntimeError:  # already initialised by an earlier import: keep what is there
    pass
