"""The embedded demo (`make demo`): its pipeline on tiny settings, and (slow) the real thing.

The quick run checks the mechanics end to end: pre-training, two fine-tunings from its
weights, evaluations, the SavedModel export and the table, and that every number in the table
and results.json is the one the evaluation reports hold.  The full demo, timed against its
10-minute budget, is marked slow.
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
from twins_tf import demo, run_config


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("demo")
    lines = []
    results = demo.run_demo(str(output_dir), methods=("at", "twins_at"), autoattack="off",
                            quick=True, log=lines.append)
    return output_dir, results, "\n".join(lines)


def test_runs_every_step_and_prints_the_table(quick_demo):
    output_dir, results, log = quick_demo
    for step in ("== 1. robust pre-training", "== 2.1 AT fine-tuning", "== 2.2 TWINS-AT",
                 "== 3.2 evaluation", "== 4. SavedModel export", "== 5. results"):
        assert step in log
    assert "$ python -m twins_tf.pretrain --dataset=digits_0_4" in log
    assert "--pretrained=" + str(output_dir / "source_at" / "best.weights.h5") in log
    table = log[log.index("== 5. results"):]
    for method in ("AT", "TWINS-AT"):
        row = next(line for line in table.splitlines() if line.startswith(f"{method} "))
        cells = [float(c) / 100 for c in re.findall(r"([0-9.]+)%", row)]
        report = json.loads((output_dir / f"target_{method.lower().replace('-', '_')}"
                             / "evaluation_test.json").read_text())
        expected = [report["results"][a]["accuracy"] for a in ("clean", "pgd2")]
        np.testing.assert_allclose(cells, expected, atol=5e-5)
    assert "AutoAttack: not run (--autoattack=on adds it" in log


def test_results_json_agrees_with_the_evaluation_reports(quick_demo):
    output_dir, results, _ = quick_demo
    assert json.loads((output_dir / "results.json").read_text()) == json.loads(
        json.dumps(results))
    for method, accuracies in results["accuracy"].items():
        report = json.loads(open(results["reports"][method]).read())
        assert accuracies == {a: r["accuracy"] for a, r in report["results"].items()}
        config = run_config.read_config(output_dir / f"target_{method}")
        assert (config["dataset"], config["method"]) == ("digits_5_9", method)
        assert config["pretrained"] == str(output_dir / "source_at" / "best.weights.h5")
    source = run_config.read_config(output_dir / "source_at")
    assert (source["dataset"], source["method"], source["twin"]) == ("digits_0_4", "at", False)


def test_exported_model_serves_the_twins_model(quick_demo):
    output_dir, results, _ = quick_demo
    served = tf.saved_model.load(results["exported"]).signatures["serving_default"]
    spec = data_lib.get_dataset_spec("digits_5_9", image_size=16)
    images, labels = zip(*[(x.numpy(), y.numpy())
                           for x, y in data_lib.load_splits(spec).test.take(32)])
    logits = served(images=tf.constant(np.stack(images)))["logits"].numpy()
    accuracy = np.mean(np.argmax(logits, -1) == np.array(labels))
    assert accuracy == pytest.approx(results["accuracy"]["twins_at"]["clean"], abs=1e-9)
    assert results["saved_model_clean_accuracy"] == pytest.approx(accuracy, abs=1e-9)


def test_a_second_run_reuses_the_finished_steps(quick_demo, capsys):
    output_dir, first, _ = quick_demo
    capsys.readouterr()
    started = time.time()
    again = demo.run_demo(str(output_dir), methods=("at", "twins_at"), autoattack="off",
                          quick=True, log=lambda _: None)
    # the source and both fine-tunings are found finished, not trained again
    assert capsys.readouterr().out.count("already holds this finished run") == 3
    assert again["accuracy"] == first["accuracy"]
    assert time.time() - started < first["total_seconds"]


def test_rejects_unknown_methods(tmp_path):
    with pytest.raises(run_config.SetupError, match="--methods must name some of"):
        demo.run_demo(str(tmp_path), methods=("at", "mart"), quick=True)
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_full_demo_within_ten_minutes_and_better_than_chance(tmp_path):
    started = time.time()
    result = subprocess.run([sys.executable, "-m", "twins_tf.demo",
                             f"--output_dir={tmp_path / 'demo_out'}"], cwd=REPO_ROOT,
                            env=subprocess_env(), capture_output=True, text=True, timeout=900)
    elapsed = time.time() - started
    assert result.returncode == 0, result.stderr[-3000:]
    assert elapsed < 600, f"the demo took {elapsed:.0f} s"
    results = json.loads((tmp_path / "demo_out" / "results.json").read_text())
    for method, accuracies in results["accuracy"].items():
        assert accuracies["clean"] > 0.6, (method, accuracies)  # chance is 0.2
        assert accuracies["pgd10"] > 0.2, (method, accuracies)
    assert "== 5. results" in result.stdout
