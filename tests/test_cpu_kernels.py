"""`import twins_tf` turns TensorFlow's oneDNN kernels on (twins_tf.platform.cpu_kernels), and
keras_private.onednn_enabled reads TensorFlow's choice.

Each case is a fresh interpreter: TensorFlow reads TF_ENABLE_ONEDNN_OPTS once, at import,
and this test process imported it long ago.  The expected values come from TensorFlow's own
contract for the variable (0: its own kernels, 1: oneDNN's), not from twins_tf.
"""

import os
import subprocess
import sys

import pytest

from twins_tf.platform import cpu_kernels

REPORT = (
    "import os, warnings; warnings.simplefilter('always'); {first}; "
    "from twins_tf.platform import keras_private; "
    "print(os.environ.get('TF_ENABLE_ONEDNN_OPTS'), keras_private.onednn_enabled())"
)


def _python(code, env_value):
    env = {k: v for k, v in os.environ.items() if k != cpu_kernels.ENV}
    if env_value is not None:
        env[cpu_kernels.ENV] = env_value
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return done.stdout.split()[-2:], done.stderr


@pytest.mark.parametrize(
    "value, expected", [(None, ["1", "True"]), ("1", ["1", "True"]), ("0", ["0", "False"])]
)
def test_import_twins_tf_first_turns_onednn_on_unless_the_user_said_otherwise(value, expected):
    out, err = _python(REPORT.format(first="import twins_tf"), value)
    assert out == expected
    assert cpu_kernels.ENV + "=1 in the environment" not in err


def test_tensorflow_imported_first_warns_only_when_onednn_is_off():
    """On a CPU where TensorFlow turns oneDNN on by itself (AVX512_VNNI / BF16 / AMX) there is
    nothing to say; on the others (this project's AVX2 machines) the warning gives the fix."""
    bare, _ = _python(
        "import tensorflow; from twins_tf.platform import keras_private; "
        "print('-', keras_private.onednn_enabled())",
        None,
    )
    out, err = _python(REPORT.format(first="import tensorflow, twins_tf"), None)
    assert out == ["None", bare[1]]
    warned = cpu_kernels.ENV + "=1 in the environment" in err
    assert warned == (bare[1] == "False"), err
