"""`compare` over many processes: `--shard`, `--plan`, run locks, rows that are one run.

What counts as "trained" is read from what each run printed (`starting` when `fit` begins a
run) and from the run's own files, not from compare's account of itself; a held run is held by
a real process of the test.
"""

import json
import shlex
import socket
import subprocess
import sys

import numpy as np
import pytest
from binaries_testlib import (
    REPO_ROOT,
    TINY,
    binary_command,
    file_snapshot,
    multi_worker_job,
    read_weights,
    run_binary,
    settings,
    source_run,
    subprocess_env,
)

from twins_tf import comparison
from twins_tf.training import loop, run_lock
from twins_tf.training import model_dir as run_files
from twins_tf.training.settings import SetupError


def _flagfile(tmp_path, pretrained):
    """A task flagfile (with a --method, as the shipped ones have) for tiny one-epoch runs."""
    path = tmp_path / "tiny.flags"
    lines = ["--dataset=digits_5_9", *TINY, "--epochs=1", "--lr=0.01", "--method=twins_at"]
    path.write_text("\n".join([*lines, f"--pretrained={pretrained}"]) + "\n")
    return path


def _grid(output_dir, methods, seeds):
    return dict(
        methods=methods,
        seeds=seeds,
        baseline=methods[0],
        output_dir=output_dir,
        attacks=["clean", "pgd1"],
        max_examples=16,
        batch_size=16,
    )


@pytest.mark.parametrize("spelling", ["0/2", "3/2", "2", "a/b", "1/0", "1/2/3", "-1/2"])
def test_a_shard_is_k_of_n(spelling):
    with pytest.raises(SetupError, match=f"--shard={spelling} is not K/N with 1 <= K <= N"):
        comparison.parse_shard(spelling)
    assert comparison.parse_shard("2/3") == (2, 3)


def test_the_binary_refuses_a_bad_shard_in_one_line_writing_nothing(tmp_path):
    result = run_binary(
        "compare", ["--dataset=digits_5_9", f"--output_dir={tmp_path / 'out'}", "--shard=4/3"]
    )
    assert result.returncode != 0
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith("compare: error: --shard=4/3 is not K/N with 1 <= K <= N")
    )
    assert not (tmp_path / "out").exists()


def test_the_shards_split_the_grid_into_slices():
    runs = list(range(7))
    slices = [comparison.shard_runs(runs, (k, 3)) for k in (1, 2, 3)]
    assert slices == [[0, 3, 6], [1, 4], [2, 5]]  # run index mod 3 == K - 1
    assert comparison.shard_runs(runs, None) == runs


@pytest.mark.parametrize(
    "methods, same",
    [
        (["at", "at+init=random"], ("at", "at+init=random")),
        (
            ["twins_at+lambda_twins=1.0", "at", "twins_at"],
            ("twins_at+lambda_twins=1.0", "twins_at"),
        ),
        (["at+strategy=mirrored", "at"], ("at+strategy=mirrored", "at")),  # executes elsewhere
    ],
)
def test_rows_that_are_one_run_are_refused_in_one_line(tmp_path, methods, same):
    base = settings("train", ["--dataset=digits_5_9", *TINY, f"--pretrained={tmp_path / 'w.h5'}"])
    with pytest.raises(SetupError) as raised:
        comparison.plan_rows(base, methods, [0], tmp_path)
    message = str(raised.value)
    assert f"{same[0]!r} and {same[1]!r} are the same run" in message and "\n" not in message
    comparison.plan_rows(base, ["at", "at+epochs=2", "at+init=linear_probe"], [0], tmp_path)


def test_planned_commands_train_the_runs_compare_then_only_evaluates(
    tmp_path_factory, tmp_path, capfd
):
    """`--plan` writes nothing and prints standalone train commands (the flagfile's flags
    spelt out); after running them, a compare with the same flags finds every run finished
    (its settings check would refuse a run of other settings) and evaluates and reports."""
    pretrained = source_run(tmp_path_factory) / run_files.BEST_WEIGHTS
    flagfile = _flagfile(tmp_path, pretrained)
    output_dir = tmp_path / "out"
    methods = ["at", "twins_at+lambda_twins=0.5"]
    args = [f"--flagfile={flagfile}", f"--methods={','.join(methods)}", "--seeds=3"]
    result = run_binary("compare", [*args, f"--output_dir={output_dir}", "--plan"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert not output_dir.exists()
    commands = [shlex.split(line) for line in result.stdout.strip().splitlines()]
    assert [c[:3] for c in commands] == [["python", "-m", "twins_tf.train"]] * 2
    for command, row in zip(commands, ["at_seed3", "twins_at+lambda_twins-0.5_seed3"]):
        assert not any(word.startswith("--flagfile") for word in command)
        assert f"--model_dir={output_dir / 'runs' / row}" in command
        loop.run(settings("train", command[3:]), verbose=0)
    trained = {p: p.stat().st_mtime for p in output_dir.rglob("*.weights.h5")}
    capfd.readouterr()

    base = settings("train", [f"--flagfile={flagfile}", "--deterministic"])
    summary, _ = comparison.compare(base, **_grid(output_dir, methods, [3]), log=lambda _: None)
    printed = capfd.readouterr().out
    assert printed.count("already holds this finished run") == 2 and "starting" not in printed
    assert {p: p.stat().st_mtime for p in trained} == trained
    assert sorted(summary["methods"]) == sorted(methods)
    assert (output_dir / "report" / "report.html").is_file()


def test_compare_skips_a_held_run_and_reports_once_every_run_is_done(
    tmp_path_factory, tmp_path, capfd
):
    """A shard trains its slice only; a run held by a live process is skipped with a notice
    naming it and nothing is reported; once that process is gone its lock is stale, and the
    next compare takes the run over, trains it and writes the report."""
    pretrained = source_run(tmp_path_factory) / run_files.BEST_WEIGHTS
    base = settings("train", [f"--flagfile={_flagfile(tmp_path, pretrained)}"])
    grid = _grid(tmp_path, ["at"], [0, 1])
    runs = tmp_path / "runs"

    assert comparison.compare(base, **grid, shard=(1, 2), log=lambda _: None) is None
    assert (runs / "at_seed0" / run_files.SUMMARY_FILE).is_file()
    assert not (runs / "at_seed1").exists() and not (tmp_path / "report").exists()

    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (runs / "at_seed1").mkdir()
        lock = runs / "at_seed1" / run_lock.LOCK_FILE
        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid}))
        logged = []
        with pytest.raises(comparison.GridUnfinished, match=f"at, seed 1 \\(pid {holder.pid} on"):
            comparison.compare(base, **grid, log=logged.append)
        assert any(
            "at, seed 1: skipped: " in line and f"pid {holder.pid}" in line for line in logged
        )
        assert sorted(p.name for p in (runs / "at_seed1").iterdir()) == [run_lock.LOCK_FILE]
        assert not (tmp_path / "report").exists()
    finally:
        holder.kill()
        holder.wait()
    capfd.readouterr()
    summary, _ = comparison.compare(base, **grid, log=lambda _: None)
    printed = capfd.readouterr().out
    assert f"taking over the lock of {runs / 'at_seed1'}" in printed
    assert printed.count("starting") == 1  # seed 1 only; seed 0 was finished
    assert summary["methods"]["at"]["clean"]["seeds"] == [0, 1]
    assert not lock.exists()


@pytest.mark.slow  # ~65 s: two compare processes sharing 2 x 2 tiny runs and their evaluation
def test_two_compares_on_one_output_dir_train_each_run_once(tmp_path_factory, tmp_path):
    """Two `compare` processes started together on one --output_dir, 2 methods x 2 seeds:
    every run is started once over both (each run prints `starting` when it trains), and one
    process writes the report; the other, if runs were still held elsewhere when it ended,
    says so and exits 75."""
    pretrained = source_run(tmp_path_factory) / run_files.BEST_WEIGHTS
    output_dir = tmp_path / "out"
    args = [
        f"--flagfile={_flagfile(tmp_path, pretrained)}",
        "--methods=at,twins_at",
        "--seeds=0,1",
        f"--output_dir={output_dir}",
        "--attacks=clean,pgd1",
        "--eval_max_examples=16",
        "--eval_batch_size=16",
    ]
    processes = [
        subprocess.Popen(
            binary_command("compare", args),
            cwd=REPO_ROOT,
            env=subprocess_env(),
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    try:
        outputs = [process.communicate(timeout=900) for process in processes]
    finally:
        for process in processes:
            process.kill()
    codes = sorted(process.returncode for process in processes)
    assert codes in ([0, 0], [0, 75]), [err[-2000:] for _, err in outputs]
    printed = "".join(out for out, _ in outputs)
    for row in ("at_seed0", "at_seed1", "twins_at_seed0", "twins_at_seed1"):
        run = output_dir / "runs" / row
        assert printed.count(f"starting; {run}\n") == 1, printed[-3000:]
        assert (run / run_files.SUMMARY_FILE).is_file() and not (run / run_lock.LOCK_FILE).exists()
    assert "resuming" not in printed
    assert printed.count("report: ") == 1
    assert (output_dir / "report" / "report.html").is_file()
    if codes == [0, 75]:
        err = next(e for p, (_, e) in zip(processes, outputs) if p.returncode == 75)
        assert "still being trained by other processes" in err or "writing the report" in err
    assert file_snapshot(output_dir / "report")  # written, whole


@pytest.mark.slow  # ~70 s: two TensorFlow processes joining one job, then a run and evaluation
def test_under_multi_worker_every_worker_trains_and_only_the_chief_reports(
    tmp_path_factory, tmp_path
):
    """Two workers of one MultiWorkerMirroredStrategy job (TF_CONFIG on 127.0.0.1) run one
    compare of two runs: both workers train every run (the chief in its model_dir, the other
    in worker_1) in one strategy, and only the chief evaluates and writes the report and the
    model cards.  The same compare on a 2-replica MirroredStrategy (one process) splits every
    batch alike, so it learns the same weights and the same accuracies."""
    pretrained = source_run(tmp_path_factory) / run_files.BEST_WEIGHTS
    output_dir = tmp_path / "out"
    args = [
        f"--flagfile={_flagfile(tmp_path, pretrained)}",
        "--methods=at,twins_at",
        "--seeds=0",
        f"--output_dir={output_dir}",
        "--attacks=clean,pgd1",
        "--eval_max_examples=16",
        "--eval_batch_size=16",
        "--strategy=multi_worker",
    ]
    (chief_rc, chief_out, chief_err), (worker_rc, worker_out, worker_err) = multi_worker_job(
        binary_command("compare", args), timeout=900
    )
    assert [chief_rc, worker_rc] == [0, 0], (chief_err[-2000:], worker_err[-2000:])
    runs = [output_dir / "runs" / name for name in ("at_seed0", "twins_at_seed0")]
    for run in runs:
        assert chief_out.count(f"starting; {run}\n") == 1
        assert worker_out.count(f"starting; {run / 'worker_1'}\n") == 1
        assert (run / "worker_1" / run_files.SUMMARY_FILE).is_file()
        assert (run / comparison.EVALUATION_FILE).is_file()
        assert not (run / "worker_1" / comparison.EVALUATION_FILE).exists()
    assert "report: " in chief_out and "report: " not in worker_out
    assert "the chief evaluates them and writes the report" in worker_out + worker_err
    assert len(list((output_dir / "report" / "model_cards").rglob("*.json"))) == 2

    mirrored_dir = tmp_path / "mirrored"
    base = settings("train", [a for a in args if a.startswith("--flagfile")])
    comparison.compare(
        {**base, "strategy": "mirrored", "deterministic": True},  # compare's default
        **_grid(mirrored_dir, ["at", "twins_at"], [0]),
        log=lambda *_: None,
    )
    for run in runs:
        mirrored = mirrored_dir / "runs" / run.name
        # The same replicas' batches and reductions in another runtime: float rounding (the
        # bound of train's two-worker test) ...
        a, b = (
            read_weights(run / run_files.BEST_WEIGHTS),
            read_weights(mirrored / run_files.BEST_WEIGHTS),
        )
        for key in a:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-5, err_msg=key)
        # ... so the same 16 examples are classified alike, but for one that rounding moves
        # across a decision boundary.
        for attack in ("clean", "pgd1"):
            accuracies = [
                json.loads((d / comparison.EVALUATION_FILE).read_text())["results"][attack][
                    "accuracy"
                ]
                for d in (run, mirrored)
            ]
            assert abs(accuracies[0] - accuracies[1]) <= 1 / 16 + 1e-9, (run.name, attack)
