"""TensorFlow's logs: INFO off by default, back with absl's `--verbosity` (or the variable).

TensorFlow's runtime writes INFO lines to stderr that a twins_tf user cannot act on: at import
a oneDNN notice and cpu_feature_guard's note about the CPU instructions the build does not use
(each printed twice: two of TensorFlow's libraries carry the code), and while a mirrored run
trains "Local rendezvous is aborting ... CANCELLED" whenever a distributed iterator is dropped
at the end of an epoch.  They bury a binary's own progress and results, even its `--help`.

TensorFlow reads TF_CPP_MIN_LOG_LEVEL once, as its library loads, so `import twins_tf` sets it
here, beside cpu_kernels' TF_ENABLE_ONEDNN_OPTS, before anything imports TensorFlow:

  * unset, it becomes 1: INFO lines off; WARNING, ERROR and FATAL lines still print, so no
    error is ever hidden.  TensorFlow's Python logger likewise drops INFO records (such as
    "Using MirroredStrategy with devices ..."), keeping WARNING and above;
  * a value the user set is left alone (TF_CPP_MIN_LOG_LEVEL=0 shows everything);
  * a command line asking absl for more than INFO (`--verbosity=1`, `-v 1`, `--v=2`: absl's
    DEBUG and vlog levels) leaves it unset, so `python -m twins_tf.train --verbosity=1 ...`
    shows TensorFlow's logs.  The flag must be on the command line itself: a `--flagfile` is
    read after TensorFlow has started.

TensorFlow 2.21 logs its oneDNN notice through absl's C++ logging while its library loads,
before the variable is applied, so the variable does not reach it.  When this module set the
variable, TensorFlow is therefore imported with stderr passing through a filter that drops
that notice and absl's line announcing logging before `absl::InitializeLog()`, and forwards
every other line as it comes.  Nothing else is filtered, and nothing after the import.

TensorFlow's Python-side warnings (retracing, deprecations) are log records that a binary
prints with its own through absl; they stay, only no longer printed twice.
"""

import contextlib
import logging
import os
import sys
import threading

ENV = "TF_CPP_MIN_LOG_LEVEL"
QUIET = "1"  # TensorFlow's levels: 0 everything, 1 no INFO, 2 no WARNING, 3 no ERROR
# The lines TensorFlow's import prints whatever TF_CPP_MIN_LOG_LEVEL says (see above).
IMPORT_BANNER = (
    b"oneDNN custom operations are on",
    b"All log messages before absl::InitializeLog() is called are written to STDERR",
)
_VERBOSITY_FLAGS = ("-v", "--v", "-verbosity", "--verbosity")
_PIPE_BYTES = 1 << 20  # what the import may write while it holds the GIL (Linux pipes)


def requested_verbosity(argv):
    """absl's verbosity on the command line `argv` (the last one given, as absl takes it), or
    None.  Recognises `-v N`, `-v=N`, `--v=N`, `--verbosity N`, `--verbosity=N`."""
    level = None
    for index, arg in enumerate(argv):
        for name in _VERBOSITY_FLAGS:
            if arg == name and index + 1 < len(argv):
                value = argv[index + 1]
            elif arg.startswith(name + "="):
                value = arg[len(name) + 1 :]
            else:
                continue
            try:
                level = int(value)
            except ValueError:
                pass
    return level


def quiet(environ=None, argv=None):
    """Whether TensorFlow's INFO logs go: TF_CPP_MIN_LOG_LEVEL unset in `environ` and no absl
    verbosity above 0 in `argv` (defaults: os.environ, sys.argv)."""
    environ = os.environ if environ is None else environ
    argv = getattr(sys, "argv", [])[1:] if argv is None else argv
    level = requested_verbosity(argv)
    return ENV not in environ and (level is None or level <= 0)


def import_tensorflow():
    """Imports TensorFlow, its INFO logs off unless the user asked for them (module docstring),
    and its Python warnings printed once in absl binaries (`_print_once_under_absl`).

    Sets nothing when TensorFlow is imported already: the variable would come too late.
    """
    if "tensorflow" not in sys.modules:
        if quiet():
            os.environ[ENV] = QUIET
            with _stderr_without(IMPORT_BANNER):
                import tensorflow  # noqa: F401
            # its Python side alike ("Using MirroredStrategy with devices ...")
            logging.getLogger("tensorflow").setLevel(logging.WARNING)
        else:
            import tensorflow  # noqa: F401
    _print_once_under_absl()


def _print_once_under_absl():
    """TensorFlow's Python logger gets a handler of its own when it starts while the root
    logger has none, and in a binary it does (`import twins_tf` runs before absl's `app.run`
    puts absl's handler on the root logger); its records then reach both, and every
    TensorFlow warning prints twice.  TensorFlow's handler now stands aside while absl's is
    installed, and prints as before where absl's is not (a notebook, a script)."""
    for handler in logging.getLogger("tensorflow").handlers:
        handler.addFilter(_unless_absl_prints_it)


def _unless_absl_prints_it(record):
    from absl import logging as absl_logging

    return not any(
        isinstance(handler, absl_logging.ABSLHandler) for handler in logging.getLogger().handlers
    )


@contextlib.contextmanager
def _stderr_without(markers):
    """While open, lines written to file descriptor 2 holding one of `markers` are dropped;
    every other line is forwarded to the real stderr at once (a thread reads a pipe)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (AttributeError, OSError, ValueError):  # no usable stderr: nothing to filter
        yield
        return
    read_end, write_end = os.pipe()
    with contextlib.suppress(ImportError, OSError, AttributeError):
        import fcntl

        fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, _PIPE_BYTES)
    os.dup2(write_end, 2)
    os.close(write_end)

    def forward():
        pending = b""
        while chunk := os.read(read_end, 65536):
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                if not any(marker in line for marker in markers):
                    _write_all(saved, line + b"\n")
        if pending and not any(marker in pending for marker in markers):
            _write_all(saved, pending)

    thread = threading.Thread(target=forward, name="stderr-filter", daemon=True)
    thread.start()
    try:
        yield
    finally:
        with contextlib.suppress(AttributeError, OSError, ValueError):
            sys.stderr.flush()
        os.dup2(saved, 2)  # the pipe's last write end closes: the thread reads to the end
        thread.join()
        os.close(read_end)
        os.close(saved)


def _write_all(fd, data):
    while data:
        data = data[os.write(fd, data) :]
