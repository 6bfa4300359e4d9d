"""What `import twins_tf` sets before TensorFlow starts (twins_tf.platform): oneDNN's kernels on
(cpu_kernels, and keras_private.onednn_enabled reads TensorFlow's choice), and TensorFlow's C++
INFO logs off unless asked for (tensorflow_logs).

Each case is a fresh interpreter: TensorFlow reads TF_ENABLE_ONEDNN_OPTS and
TF_CPP_MIN_LOG_LEVEL once, at import, and this test process imported it long ago.  The
expected values come from TensorFlow's own contract for the variable (0: its own kernels, 1:
oneDNN's), not from twins_tf.
"""

import os
import re
import subprocess
import sys

import pytest

from twins_tf.platform import cpu_kernels, tensorflow_logs

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


# --- TensorFlow's logs: quiet by default, back with --verbosity --------------------------------
# A line of TensorFlow's C++ logging (absl / glog format: severity, date, time, thread,
# file:line]), or absl's notice that such lines come before its initialisation.
TENSORFLOW_LOG_LINE = re.compile(r"^[IWEF]\d{4} [\d:.]+\s+\d+ \S+:\d+\] |absl::InitializeLog")


def _binary_output(*args):
    """stdout + stderr of `python -m twins_tf.train <args>`, TF_CPP_MIN_LOG_LEVEL unset."""
    env = {k: v for k, v in os.environ.items() if k != tensorflow_logs.ENV}
    done = subprocess.run(
        [sys.executable, "-m", "twins_tf.train", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1, done.stderr  # absl's --help exits 1
    return done.stdout + done.stderr


def test_a_binary_prints_no_tensorflow_banner_unless_asked_for_more_verbosity():
    quiet = _binary_output("--help")
    assert "--model_dir" in quiet  # the binary's own output is all there
    assert not [line for line in quiet.splitlines() if TENSORFLOW_LOG_LINE.search(line)], quiet
    verbose = _binary_output("--help", "--verbosity=1")
    assert "--model_dir" in verbose
    # twins_tf turns oneDNN on (cpu_kernels), and TensorFlow announces it at INFO level
    assert "oneDNN custom operations are on" in verbose, verbose
    assert [line for line in verbose.splitlines() if TENSORFLOW_LOG_LINE.search(line)]


@pytest.mark.parametrize(
    "environ, argv, expected",
    [
        ({}, [], True),
        ({}, ["--model_dir=runs/x"], True),
        ({"TF_CPP_MIN_LOG_LEVEL": "0"}, [], False),  # the user's value stays
        ({"TF_CPP_MIN_LOG_LEVEL": "2"}, [], False),
        ({}, ["--verbosity=1"], False),
        ({}, ["--verbosity", "2"], False),
        ({}, ["-v", "1"], False),
        ({}, ["--v=1"], False),
        ({}, ["--verbosity=0"], True),  # absl's INFO, the default
        ({}, ["--verbosity=-1"], True),
        ({}, ["--verbosity=1", "--verbosity=0"], True),  # absl takes the last
        ({}, ["-v", "tests/test_pgd.py"], True),  # pytest's -v takes no number
    ],
)
def test_quiet_unless_the_user_set_the_level_or_asked_absl_for_debug(environ, argv, expected):
    assert tensorflow_logs.quiet(environ, argv) is expected


def test_the_import_filter_forwards_every_other_line_at_once(capfd):
    with tensorflow_logs._stderr_without((b"banner",)):
        os.write(2, b"E0000 00:00:1.0 1 x.cc:1] an error\nthe banner line\n")
        os.write(2, b"W0000 a warning\nno newline at the end")
    assert capfd.readouterr().err == (
        "E0000 00:00:1.0 1 x.cc:1] an error\nW0000 a warning\nno newline at the end"
    )


def test_a_tensorflow_warning_prints_once_in_a_binary():
    """`import twins_tf` comes before absl's `app.run` installs its handler: TensorFlow's
    logger, given a handler of its own at import, printed every warning twice."""
    code = (
        "import twins_tf, tensorflow as tf; from absl import app; "
        "app.run(lambda argv: tf.get_logger().warning('retracing, say'))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    assert done.stderr.count("retracing, say") == 1, done.stderr
