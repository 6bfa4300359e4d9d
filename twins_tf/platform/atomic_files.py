"""Files replaced in one step: a reader finds the old file or the new one, whole, never a mix.

Every record twins_tf keeps (a run's config.json, summary.json, metrics.csv, best.json, the
weights files with the metadata they carry, `convert`'s output, the evaluation reports, the
repairs of Keras's backup) is written here: to a temporary file in the same directory, flushed
to disk, then renamed over the target with `os.replace`, which POSIX makes atomic within one
file system.  A process killed at any point leaves the target as it was before the write or as
it is after it; only the temporary file (`.partial-<name>`, reused by the next write) may stay.
One process writes a given file at a time (a run's files are its own); the temporary's name is
fixed, so kills leave at most one per file.  The directory is flushed after the rename too, so
the record also survives the machine going down, not only the process.

Metadata that must agree with a file goes inside it, written before the rename (`save_weights`'s
`attributes`), so that no kill can separate the two.
"""

import contextlib
import os

PARTIAL_PREFIX = ".partial-"


def partial_path(path):
    """The temporary file a write of `path` goes through: beside it, hidden, same suffix (Keras
    insists on `.weights.h5`)."""
    directory, name = os.path.split(os.fspath(path))
    return os.path.join(directory, PARTIAL_PREFIX + name)


@contextlib.contextmanager
def replacing(path):
    """Yields the temporary path to write the new `path` to; on a clean exit it replaces `path`.

    An exception in the block removes the temporary file and leaves `path` untouched.  A kill
    (or a `BaseException` that is not an `Exception`, such as KeyboardInterrupt) leaves the
    temporary file, as a kill would; the next write of `path` starts it afresh.

    Example:
        with replacing("runs/a/notes.txt") as temporary:
            with open(temporary, "w") as f:
                f.write("...")
    """
    path = os.fspath(path)
    temporary = partial_path(path)  # one left by a killed write is overwritten
    try:
        yield temporary
        _flush_file(temporary)
    except Exception:
        if os.path.lexists(temporary):
            os.remove(temporary)
        raise
    os.replace(temporary, path)
    _flush_directory(os.path.dirname(os.path.abspath(path)))


def write_text(path, text):
    """Writes `text` to `path` in one step (see `replacing`)."""
    with replacing(path) as temporary:
        with open(temporary, "w", newline="") as f:
            f.write(text)


def copy(source, path):
    """Copies `source` to `path` in one step (see `replacing`)."""
    import shutil

    with replacing(path) as temporary:
        shutil.copyfile(source, temporary)


def save_weights(model, path, attributes=None):
    """`model.save_weights(path)` in one step, with `attributes` (name -> value) written as
    HDF5 attributes of the file's root before it gets its name, so that the weights and what
    they are recorded as can only appear together."""
    with replacing(path) as temporary:
        model.save_weights(temporary)
        if attributes:
            import h5py

            with h5py.File(temporary, "r+") as f:
                for name, value in attributes.items():
                    f.attrs[name] = value


def _flush_file(path):
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _flush_directory(directory):
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:  # a platform that cannot open directories (Windows): the rename stands
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
