"""oneDNN's CPU kernels on every x86-64 CPU, not only on those TensorFlow picks them for.

TensorFlow's x86 builds ship oneDNN but turn its kernels on by themselves only on CPUs with
AVX512_VNNI, AVX512_BF16 or AMX; on others (this project's AMD EPYC AVX2 machines, for one)
they run TensorFlow's own Eigen kernels unless TF_ENABLE_ONEDNN_OPTS=1 is set before
TensorFlow is imported.  On such a machine the Eigen kernels made a ResNet-18 PGD-3 training
step 3.8x slower (docs/benchmarks.md, `benchmarks/vs_pytorch.py --tf_variants
fused,onednn1`), and the suite's PyTorch parity tolerances were set with oneDNN's kernels.

So `import twins_tf` sets TF_ENABLE_ONEDNN_OPTS=1 when it is unset and TensorFlow is not
imported yet (every `python -m twins_tf.<binary>`, and code that imports twins_tf first).
A value the user set is left alone (TF_ENABLE_ONEDNN_OPTS=0 keeps the Eigen kernels).  When
TensorFlow was imported first, the variable would come too late: if oneDNN is then off, one
warning says so and how to fix it.  An environment variable is the only switch TensorFlow has
for this; there is no API to call after import.
"""

import os
import sys
import warnings

ENV = "TF_ENABLE_ONEDNN_OPTS"


def prefer_onednn():
    """Sets TF_ENABLE_ONEDNN_OPTS=1 if unset and TensorFlow is not imported yet; else, when
    unset and TensorFlow already runs without oneDNN, warns once with the fix."""
    if ENV in os.environ:
        return
    if "tensorflow" not in sys.modules:
        os.environ[ENV] = "1"
        return
    from twins_tf.platform import keras_private

    if not keras_private.onednn_enabled():
        warnings.warn(
            "TensorFlow was imported before twins_tf with TF_ENABLE_ONEDNN_OPTS unset, and on "
            "this CPU it then runs its own kernels instead of oneDNN's (3.8x slower training "
            "steps on an AMD EPYC AVX2 machine; docs/benchmarks.md): set "
            "TF_ENABLE_ONEDNN_OPTS=1 in the environment, or import twins_tf before "
            "tensorflow.  (TF_ENABLE_ONEDNN_OPTS=0 silences this and keeps TensorFlow's "
            "kernels.)",
            RuntimeWarning,
            stacklevel=2,
        )
