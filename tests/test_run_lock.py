"""`training.run_lock`: one holder at a time, its record, stale locks, and `loop.run` under it.

The holders here are real processes (this one, children started and ended by the test), so
"alive" and "gone" are what the operating system says, not what the code under test decides.
"""

import json
import multiprocessing
import os
import socket
import subprocess
import sys

import pytest
from binaries_testlib import TINY, file_snapshot, settings

from twins_tf.training import loop, run_lock
from twins_tf.training.settings import SetupError


def _lock_file(directory, pid, host=None):
    path = directory / run_lock.LOCK_FILE
    record = {"host": host or socket.gethostname(), "pid": pid, "started": "2026-01-01T00:00:00Z"}
    path.write_text(json.dumps(record))
    return path


def _dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture
def live_process():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield child
    child.kill()
    child.wait()


def test_the_lock_names_its_holder_and_goes_when_released(tmp_path):
    with run_lock.held(tmp_path / "run") as path:
        record = json.loads(open(path).read())
        assert (record["host"], record["pid"]) == (socket.gethostname(), os.getpid())
        assert record["started"].endswith("Z")
    assert not os.path.exists(path)


def test_a_lock_of_a_live_process_is_refused_naming_it(tmp_path, live_process):
    path = _lock_file(tmp_path, live_process.pid)
    with pytest.raises(run_lock.LockHeld, match=f"in use by pid {live_process.pid} on host"):
        run_lock.acquire(tmp_path)
    assert json.loads(path.read_text())["pid"] == live_process.pid  # left as it was


def test_a_lock_of_a_dead_process_is_taken_over_with_a_notice(tmp_path):
    pid = _dead_pid()
    _lock_file(tmp_path, pid)
    notices = []
    path = run_lock.acquire(tmp_path, log=notices.append, prefix="train")
    assert json.loads(open(path).read())["pid"] == os.getpid()
    assert len(notices) == 1 and f"pid {pid} on host" in notices[0]
    assert notices[0].startswith("train: taking over the lock of ")
    run_lock.release(path)


def test_a_lock_left_under_this_process_own_pid_is_stale(tmp_path):
    """A restarted container reuses pids: a lock naming this process, which it does not hold."""
    _lock_file(tmp_path, os.getpid())
    path = run_lock.acquire(tmp_path, log=lambda _: None)
    with pytest.raises(run_lock.LockHeld):  # now it does hold it
        run_lock.acquire(tmp_path)
    run_lock.release(path)


def test_a_lock_of_another_host_is_held_and_says_how_to_break_it(tmp_path):
    path = _lock_file(tmp_path, _dead_pid(), host="elsewhere.example")
    with pytest.raises(run_lock.LockHeld) as raised:
        run_lock.acquire(tmp_path)
    message = str(raised.value)
    assert "another host" in message and f"delete {path}" in message
    assert "\n" not in message


def _contend(directory, barrier, results):
    barrier.wait()
    try:
        run_lock.acquire(directory, log=lambda _: None)
        results.put("won")
    except run_lock.LockHeld:
        results.put("held")


@pytest.mark.parametrize("stale", [False, True])
def test_of_processes_racing_for_a_lock_exactly_one_wins(tmp_path, stale):
    """Six processes released at once by a barrier, on a free lock or on a stale one (whose
    takeover must not let two through): one "won", five "held"."""
    if stale:
        _lock_file(tmp_path, _dead_pid())
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(6), context.Queue()
    processes = [
        context.Process(target=_contend, args=(tmp_path, barrier, results)) for _ in range(6)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(30)
    outcomes = sorted(results.get(timeout=5) for _ in processes)
    assert outcomes == ["held"] * 5 + ["won"]


def test_run_refuses_a_model_dir_in_use_before_writing_anything(tmp_path, live_process):
    model_dir = tmp_path / "run"
    model_dir.mkdir()
    _lock_file(model_dir, live_process.pid)
    before = file_snapshot(model_dir)
    args = ["--dataset=digits_5_9", *TINY, "--epochs=1", "--method=at", f"--model_dir={model_dir}"]
    with pytest.raises(SetupError, match=f"in use by pid {live_process.pid}"):
        loop.run(settings("pretrain", args), verbose=0)
    assert file_snapshot(model_dir) == before


def test_a_late_takeover_leaves_the_new_holders_lock(tmp_path, live_process):
    """Two processes found one stale lock; the first took it over and a live process now holds
    it; the second's takeover, coming late with the stale record it read, must not remove it."""
    dead = _dead_pid()
    stale = json.loads(_lock_file(tmp_path, dead).read_text())
    path = _lock_file(tmp_path, live_process.pid)  # the first one's takeover, done
    run_lock.remove_stale(str(path), stale)
    assert json.loads(path.read_text())["pid"] == live_process.pid
    assert sorted(p.name for p in tmp_path.iterdir()) == [run_lock.LOCK_FILE]
    run_lock.remove_stale(str(path), json.loads(path.read_text()))  # the record it holds
    assert not path.exists()


def test_an_unreadable_lock_is_held_and_says_how_to_break_it(tmp_path):
    """An empty lock file (its creator killed between creating and writing it) names no
    holder to check: held, and the message names the file to delete."""
    path = tmp_path / run_lock.LOCK_FILE
    path.write_text("")
    with pytest.raises(run_lock.LockHeld) as raised:
        run_lock.acquire(tmp_path)
    assert str(raised.value) == (
        f"{tmp_path} is locked by an unknown process (its lock file is unreadable): "
        f"delete {path} if no process uses it."
    )
