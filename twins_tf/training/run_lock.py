"""One process at a time in a run directory: a lock file naming its holder, and its recovery.

Two processes training one `--model_dir` (two `compare`s on one output directory, a scheduler
that starts a job twice) would write the same weights, backup and records at once.  So a run
takes `<model_dir>/run.lock` before it writes anything and removes it when it ends, however it
ends.  The file is created with `O_CREAT | O_EXCL`, which the file system makes atomic: of any
number of processes, exactly one creates it.  It holds JSON naming the holder, `{"host",
"pid", "started", "command"}`, so whoever finds it held can say who holds it.

A process killed while holding the lock leaves the file behind.  On the host it names, that is
told apart from a live holder: the pid no longer exists (`os.kill(pid, 0)`), or it is this very
process, which does not hold it (a restarted container reuses pids).  Such a stale lock is
taken over with a one-line notice.  A lock of another host cannot be checked from here (its
pids are not ours): it counts as held, and the message names the file to delete once that
process is known to be gone.  The takeover renames the stale file to a name of this process's
own before looking at it again, so two processes that find the same stale lock cannot both
remove it and then each remove the other's new one; the one whose rename caught a live lock
puts it back.

The standard library has no cross-process lock that works on network file systems and says
who holds it (`fcntl.flock` is per host and anonymous), hence this module.
"""

import contextlib
import datetime
import json
import os
import socket
import sys
import time

from twins_tf.training.settings import SetupError

LOCK_FILE = "run.lock"
# A holder writes its record right after creating the file; a reader that finds it empty
# waits this long for the record before calling it unreadable.
_RECORD_WAIT_SECONDS = 2.0
_held_here = set()  # absolute paths of the locks this process holds


class LockHeld(SetupError):
    """The lock is held by another process (alive, or on another host); `holder` is its record."""

    def __init__(self, message, path, holder):
        super().__init__(message)
        self.path = path
        self.holder = holder


def lock_path(directory, name=LOCK_FILE):
    return os.path.join(os.path.abspath(os.fspath(directory)), name)


def describe(holder):
    """`pid 123 on host h since 2026-01-01T12:00:00Z`: who holds a lock."""
    if not holder:
        return "an unknown process (its lock file is unreadable)"
    return f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('started')}"


def read_holder(path):
    """The record of the lock file `path`; None if it is missing.  An empty or unreadable file
    is waited for briefly (its creator may be writing it) and then read as `{}`."""
    deadline = time.monotonic() + _RECORD_WAIT_SECONDS
    while True:
        try:
            with open(path) as f:
                text = f.read()
        except FileNotFoundError:
            return None
        try:
            record = json.loads(text)
            if isinstance(record, dict):
                return record
        except json.JSONDecodeError:
            pass
        if time.monotonic() >= deadline:
            return {}
        time.sleep(0.05)


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def is_stale(path, holder):
    """Whether the holder of the lock file `path` is provably gone: a process of this host that
    no longer runs, or this process, which does not hold `path`."""
    if not holder or holder.get("host") != socket.gethostname():
        return False
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return False
    if pid == os.getpid():
        return path not in _held_here
    return not _pid_alive(pid)


def held_message(directory, path, holder):
    """The one line that says who holds the lock of `directory` and what to do."""
    if holder and holder.get("host") != socket.gethostname():
        return (
            f"{directory} is locked by {describe(holder)}, another host, where twins_tf cannot "
            f"check that the process still runs: wait for it, or delete {path} once it is gone."
        )
    if not holder:
        return f"{directory} is locked by {describe(holder)}: delete {path} if no process uses it."
    return f"{directory} is in use by {describe(holder)}: wait for it to finish."


def live_holder(directory, name=LOCK_FILE):
    """The record of the process holding the lock of `directory`, or None when it is free or
    stale (what `acquire` would take over)."""
    path = lock_path(directory, name)
    holder = read_holder(path)
    if holder is None or is_stale(path, holder):
        return None
    return holder


def _record():
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": " ".join(sys.argv),
    }


def _create(path, record):
    """Creates the lock file with `record`; False if it exists."""
    try:
        descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(descriptor, "w") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return True


def remove_stale(path, stale):
    """Removes the stale lock file `path` (whose record was `stale`) unless another process has
    replaced it meanwhile: the file is first renamed to a name only this process uses, so only
    one remover gets it; a live lock caught that way is put back."""
    mine = f"{path}.stale-{socket.gethostname()}-{os.getpid()}"
    try:
        os.rename(path, mine)
    except FileNotFoundError:
        return  # another process removed it first
    if read_holder(mine) == stale:
        os.remove(mine)
        return
    try:
        os.link(mine, path)  # a new holder's lock: put it back (fails if yet another exists)
    except FileExistsError:
        pass
    os.remove(mine)


def acquire(directory, *, name=LOCK_FILE, log=print, prefix="twins_tf"):
    """Takes the lock of `directory` (created if missing) for this process; returns its path.

    A stale lock (see the module docstring) is taken over with a notice through `log`.

    Raises:
      LockHeld: another process holds it (alive on this host, or on another host).
    """
    directory = os.path.abspath(os.fspath(directory))
    os.makedirs(directory, exist_ok=True)
    path = lock_path(directory, name)
    record = _record()
    while not _create(path, record):
        holder = read_holder(path)
        if holder is None:
            continue  # released between our create and our read: try again
        if not is_stale(path, holder):
            raise LockHeld(held_message(directory, path, holder), path, holder)
        log(
            f"{prefix}: taking over the lock of {directory}: its holder, {describe(holder)}, "
            "no longer runs (killed?).",
        )
        remove_stale(path, holder)
    _held_here.add(path)
    return path


def release(path):
    """Removes the lock file `path` if it is still this process's."""
    _held_here.discard(path)
    holder = read_holder(path)
    if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        os.remove(path)


@contextlib.contextmanager
def held(directory, *, name=LOCK_FILE, log=print, prefix="twins_tf"):
    """Context manager: the lock of `directory` is this process's inside it (see `acquire`)."""
    path = acquire(directory, name=name, log=log, prefix=prefix)
    try:
        yield path
    finally:
        release(path)
