"""The embedded demo (`make demo`): its pipeline on tiny settings, and (slow) the real thing.

The quick run checks the mechanics end to end: pre-training, two methods x two seeds of
fine-tuning from its weights, evaluations, the report, the SavedModel export and the table,
and that the numbers in the table are the ones the evaluation reports hold.  The full demo,
timed against its 10-minute budget, is marked slow.
"""

import json
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
from binaries_testlib import REPO_ROOT, subprocess_env

from twins_tf import data as data_lib
from twins_tf.comparison import demo_pipeline
from twins_tf.training import model_dir as run_files
from twins_tf.training.settings import SetupError

SEEDS = (0, 1)


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("demo")
    lines = []
    results = demo_pipeline.run_demo(
        str(output_dir),
        methods=("at", "twins_at"),
        seeds=SEEDS,
        autoattack="off",
        quick=True,
        log=lines.append,
    )
    return output_dir, results, "\n".join(lines)


def _evaluation(output_dir, method, seed):
    return json.loads(
        (output_dir / "runs" / f"{method}_seed{seed}" / "compare_evaluation.json").read_text()
    )


def test_runs_every_step_and_prints_the_seeded_table(quick_demo):
    output_dir, results, log = quick_demo
    for step in (
        "== 1. robust pre-training",
        "== 2-3. fine-tuning on the target task",
        "== 4. SavedModel export",
        "== 5. results",
    ):
        assert step in log
    assert "$ python -m twins_tf.pretrain --dataset=digits_0_4" in log
    assert "$ python -m twins_tf.compare --dataset=digits_5_9" in log
    assert "--pretrained=" + str(output_dir / "source_at" / "best.weights.h5") in log
    table = log[log.index("== 5. results") :]
    for method in ("at", "twins_at"):
        row = next(line for line in table.splitlines() if line.startswith(f"{method} "))
        means = [float(c) / 100 for c in re.findall(r"([0-9.]+) \+-", row)]
        expected = [
            np.mean([_evaluation(output_dir, method, s)["results"][a]["accuracy"] for s in SEEDS])
            for a in ("clean", "pgd2")
        ]
        np.testing.assert_allclose(means, expected, atol=5e-5)
    assert re.search(r"twins_at - at\s+[+-][0-9.]+ \[", table)
    assert "AutoAttack: not run" in log


def test_report_html_and_results_json(quick_demo):
    output_dir, results, _ = quick_demo
    assert json.loads((output_dir / "results.json").read_text()) == json.loads(json.dumps(results))
    page = (output_dir / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3
    for method in ("at", "twins_at"):
        for seed in SEEDS:
            config = run_files.read_config(output_dir / "runs" / f"{method}_seed{seed}")
            assert (config["dataset"], config["method"], config["seed"]) == (
                "digits_5_9",
                method,
                seed,
            )
            assert config["pretrained"] == str(output_dir / "source_at" / "best.weights.h5")
            assert config["deterministic"] and config["validation"] == "none"
            card = json.loads(
                (
                    output_dir / "model_cards" / "digits_5_9" / "Linf" / f"{method}_seed{seed}.json"
                ).read_text()
            )
            clean = _evaluation(output_dir, method, seed)["results"]["clean"]["accuracy"]
            assert card["clean_acc"] == str(round(100 * clean, 2))
    source = run_files.read_config(output_dir / "source_at")
    assert (source["dataset"], source["method"], source["twin"]) == ("digits_0_4", "at", False)


def test_exported_model_serves_the_twins_model(quick_demo):
    from twins_tf import weights
    from twins_tf.models.resnet import build_resnet

    output_dir, results, _ = quick_demo
    served = tf.saved_model.load(results["exported"]).signatures["serving_default"]
    spec = data_lib.get_dataset_spec("digits_5_9", image_size=16)
    images = np.stack([x.numpy() for x, _ in data_lib.load_splits(spec).test.take(32)])
    run = output_dir / "runs" / "twins_at_seed0"
    keras_model = build_resnet("resnet18", 5, twin=True, input_shape=(16, 16, 3))
    weights.load_pretrained(keras_model, str(run / run_files.BEST_WEIGHTS), head=True)
    np.testing.assert_allclose(
        served(images=tf.constant(images))["logits"].numpy(),
        keras_model(images, training=False).numpy(),
        atol=1e-4,
    )
    assert results["saved_model_clean_accuracy"] == pytest.approx(
        _evaluation(output_dir, "twins_at", 0)["results"]["clean"]["accuracy"], abs=1e-9
    )


def test_a_second_run_reuses_the_finished_steps(quick_demo, capsys):
    output_dir, first, _ = quick_demo
    capsys.readouterr()
    started = time.time()
    again = demo_pipeline.run_demo(
        str(output_dir),
        methods=("at", "twins_at"),
        seeds=SEEDS,
        autoattack="off",
        quick=True,
        log=lambda _: None,
    )
    # the source and all four fine-tunings are found finished, not trained again
    assert capsys.readouterr().out.count("already holds this finished run") == 5
    assert again["summary"] == first["summary"]
    assert time.time() - started < first["total_seconds"]


@pytest.mark.parametrize(
    "methods, seeds, message",
    [
        (("at", "mart"), SEEDS, "--methods must name some of"),
        (("at",), (0, 0), "--seeds must list distinct integers"),
    ],
)
def test_rejects_bad_choices(tmp_path, methods, seeds, message):
    with pytest.raises(SetupError, match=message):
        demo_pipeline.run_demo(str(tmp_path), methods=methods, seeds=seeds, quick=True)
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_full_demo_within_ten_minutes_and_better_than_chance(tmp_path):
    started = time.time()
    result = subprocess.run(
        [sys.executable, "-m", "twins_tf.demo", f"--output_dir={tmp_path / 'demo_out'}"],
        cwd=REPO_ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    elapsed = time.time() - started
    assert result.returncode == 0, result.stderr[-3000:]
    assert elapsed < 600, f"the demo took {elapsed:.0f} s"
    results = json.loads((tmp_path / "demo_out" / "results.json").read_text())
    for method, row in results["summary"]["methods"].items():
        assert row["clean"]["mean"] > 0.6, (method, row)  # chance is 0.2
        assert row["pgd10"]["mean"] > 0.2, (method, row)
    assert "== 5. results" in result.stdout and "twins_at - at" in result.stdout


def test_make_demo_installs_the_package_alone_and_make_test_the_test_extras(tmp_path):
    """`make demo` on a fresh machine: `pip install -e .` only (no torch); `make test`: [test]."""

    def dry_run(target):
        result = subprocess.run(
            ["make", "-n", target, f"VENV={tmp_path / 'venv'}"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        return [line for line in result.stdout.splitlines() if " install " in line]

    assert [line.split(" install ", 1)[1].strip() for line in dry_run("demo")] == ["-e ."]
    assert any("'.[test]'" in line for line in dry_run("test"))
