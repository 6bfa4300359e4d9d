"""AutoAttack sharded over replicas and workers: the single-device run's result per example.

The reference is a single-device `AutoAttack.run` on the same examples, loaded here from the
dataset (not through `evaluate`), with the same (lowered) budgets.  Equality is exact: each
batch is attacked whole, by the same CPU kernels, with the random draws of its index in the
evaluation, so sharding changes where a batch is computed, not what.  Clean and PGD accuracy
are computed whole by every process, so they equal the single-process numbers exactly too.
"""

import json
import shutil
import sys

import numpy as np
import pytest
import quick_autoattack
from binaries_testlib import (
    REPO_ROOT,
    evaluate_settings,
    evaluated_examples,
    multi_worker_job,
    source_run,
)

from twins_tf import evaluation
from twins_tf.attacks import autoattack
from twins_tf.training import distribute
from twins_tf.training import model_dir as run_files
from twins_tf.training.settings import SetupError

# Batches of 3, 3, 3, 3 and 2: a short last batch and shards of 3 and 2 batches; the tiny
# model's robust points (in batches 1 and 4) show a merge that puts a batch out of its place.
EXAMPLES, BATCH = 14, 3


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return source_run(tmp_path_factory)


@pytest.fixture
def quick(monkeypatch):
    monkeypatch.setattr(autoattack, "AutoAttack", quick_autoattack.QuickAutoAttack)


@pytest.fixture(scope="module")
def reference(source):
    """The single-device AutoAttack of the same examples, batches and budgets."""
    from twins_tf.evaluation import inputs

    model = inputs.load_model(inputs.resolve({"model_dir": str(source)}))
    images, labels = evaluated_examples(source, EXAMPLES)
    attack = quick_autoattack.QuickAutoAttack(8 / 255)
    return attack.run(model, (images, labels), batch_size=BATCH, keep_adversarial=False, verbose=0)


def _args(source, *extra):
    return [
        f"--model_dir={source}",
        "--attacks=clean,pgd2,autoattack",
        f"--max_examples={EXAMPLES}",
        f"--batch_size={BATCH}",
        *extra,
    ]


def _copy_of_run(source, model_dir):
    model_dir.mkdir()
    for name in (run_files.BEST_WEIGHTS, run_files.SUMMARY_FILE, run_files.CONFIG_FILE):
        shutil.copy(source / name, model_dir / name)
    return model_dir


def test_a_shard_given_its_batch_indices_gets_the_whole_run_s_draws():
    """The property sharding rests on, where the draws matter (an adversarially trained
    network whose boundary points Square's and APGD's random draws decide)."""
    import attack_testbed as tb
    import tensorflow as tf

    bed = tb.robust_digits()
    x, y = bed.x_test[:60], bed.y_test[:60]
    attack = autoattack.AutoAttack(tb.epsilon("linf"), apgd_steps=5, fab_steps=5, square_queries=20)
    whole = attack.run(bed.keras_model, (x, y), batch_size=12, verbose=0)
    batches = tf.data.Dataset.from_tensor_slices((x, y)).batch(12)
    odd = batches.enumerate().filter(lambda i, _: i % 2 == 1).map(lambda _, b: b)
    shard = attack.run(bed.keras_model, odd, batch_indices=[1, 3], verbose=0)
    rows = np.r_[12:24, 36:48]
    np.testing.assert_array_equal(shard.x_adv, whole.x_adv[rows])
    np.testing.assert_array_equal(shard.broken_by, whole.broken_by[rows])
    # without its indices the shard draws batch 0's and 1's numbers: other adversarial images
    unindexed = attack.run(bed.keras_model, odd, verbose=0)
    assert not np.array_equal(unindexed.x_adv, whole.x_adv[rows])


def test_sharded_run_autoattack_merges_the_whole_run_s_result_where_draws_decide(quick):
    """`run_autoattack` over two mirrored replicas on the adversarially trained testbed, whose
    per-example outcome depends on each batch's draws (see the test above)."""
    import attack_testbed as tb
    import tensorflow as tf

    from twins_tf.evaluation import autoattack_run, shards

    bed = tb.robust_digits()
    x, y = bed.x_test[:60], bed.y_test[:60]
    whole = quick_autoattack.QuickAutoAttack(0.15).run(
        bed.keras_model, (x, y), batch_size=12, keep_adversarial=False, verbose=0
    )
    settings = dict(
        attack_eps=0.15,
        autoattack_version="standard",
        seed=0,
        batch_size=12,
        num_classes=10,
        split="test",
        weights_sha1="testbed",
        dataset="digits",
        image_size=x.shape[1],
        upsample=None,
        max_examples=None,
    )
    layout = shards.layout_of(distribute.get_strategy("mirrored"))
    assert layout.count == 2
    entry = autoattack_run.run_autoattack(
        bed.keras_model,
        tf.data.Dataset.from_tensor_slices((x, y)).batch(12),
        len(x),
        settings,
        layout=layout,
        progress=False,
    )
    np.testing.assert_array_equal(entry["broken_by"], whole.broken_by)
    assert entry["after_each_attack"] == {k: v for k, v in whole.accuracy.items() if k != "clean"}


def test_mirrored_shards_equal_the_single_device_run_per_example(source, reference, quick):
    """Two replicas (conftest's two logical CPUs), each attacking every other batch."""
    mirrored = evaluation.evaluate(
        evaluate_settings(_args(source)),
        log=lambda _: None,
        progress=False,
        strategy=distribute.get_strategy("mirrored"),
    )
    aa = mirrored["results"]["autoattack"]
    assert aa["shards"] == 2
    np.testing.assert_array_equal(aa["broken_by"], reference.broken_by)
    assert aa["accuracy"] == reference.robust_accuracy
    assert aa["after_each_attack"] == {k: v for k, v in reference.accuracy.items() if k != "clean"}
    assert mirrored["results"]["clean"]["accuracy"] == reference.accuracy["clean"]
    single = evaluation.evaluate(
        evaluate_settings(
            [f"--model_dir={source}", "--attacks=pgd2", f"--max_examples={EXAMPLES}"]
            + [f"--batch_size={BATCH}"]
        ),
        log=lambda _: None,
    )
    assert mirrored["results"]["pgd2"]["correct"] == single["results"]["pgd2"]["correct"]


@pytest.mark.slow  # two worker processes on loopback: ~30 s on top of the mirrored test
def test_two_workers_on_loopback_equal_the_single_process_run_per_example(
    source, reference, tmp_path
):
    """Two processes of one MultiWorkerMirroredStrategy job (TF_CONFIG on 127.0.0.1), each
    attacking every other batch; only the chief writes the report."""
    model_dir = _copy_of_run(source, tmp_path / "run")
    job = multi_worker_job(
        [sys.executable, "tests/quick_autoattack.py", *_args(model_dir, "--strategy=multi_worker")],
        PYTHONPATH=str(REPO_ROOT),
    )
    for returncode, _, err in job:
        assert returncode == 0, err[-3000:]
    outputs = [(out, err) for _, out, err in job]
    (path,) = model_dir.glob("evaluation_test_linf_eps8-255_*.json")
    assert f"report: {path}" in outputs[0][0] and "report:" not in outputs[1][0]
    aa = json.loads(path.read_text())["results"]["autoattack"]
    assert aa["shards"] == 2
    np.testing.assert_array_equal(aa["broken_by"], reference.broken_by)
    assert aa["accuracy"] == reference.robust_accuracy
    assert not list(model_dir.rglob("autoattack_*"))  # merged, then removed
    assert not (model_dir / "worker_1").exists()  # its state directory, left empty, removed

    single = evaluation.evaluate(
        evaluate_settings([*_args(source)[:1], "--attacks=clean,pgd2", *_args(source)[2:]]),
        log=lambda _: None,
    )
    report = json.loads(path.read_text())
    for name in ("clean", "pgd2"):
        assert report["results"][name]["correct"] == single["results"][name]["correct"]


def test_an_interrupted_evaluation_resumes_its_shards_and_sets_aside_a_state_that_does_not_fit(
    source, reference, quick, monkeypatch, tmp_path
):
    model_dir = _copy_of_run(source, tmp_path / "run")
    Quick = quick_autoattack.QuickAutoAttack
    original = Quick._attack_batch
    calls = []

    def counting(self, model, images, labels, *, batch_index=0):
        calls.append(batch_index)
        return original(self, model, images, labels, batch_index=batch_index)

    def killed_at_batch_3(self, model, images, labels, *, batch_index=0):
        if batch_index == 3:
            raise KeyboardInterrupt  # the job is killed
        return counting(self, model, images, labels, batch_index=batch_index)

    def evaluate(log=lambda _: None):
        return evaluation.evaluate(
            evaluate_settings([*_args(model_dir), "--attacks=autoattack"]),
            log=log,
            progress=False,
            strategy=distribute.get_strategy("mirrored"),
        )

    monkeypatch.setattr(Quick, "_attack_batch", killed_at_batch_3)
    with pytest.raises(KeyboardInterrupt):
        evaluate()
    assert calls == [0, 2, 4, 1]  # shard 0: batches 0, 2, 4; shard 1: batch 1, then killed
    states = sorted(model_dir.glob("autoattack_test_*_shard*of2.npz"))
    assert [p.name[-13:] for p in states] == ["shard0of2.npz", "shard1of2.npz"]

    states[0].write_bytes(b"cut short by a full disk")  # shard 0's state no longer fits
    calls.clear()
    logged = []
    monkeypatch.setattr(Quick, "_attack_batch", counting)
    resumed = evaluate(log=logged.append)
    assert calls == [0, 2, 4, 3]  # shard 0 afresh; shard 1 only its missing batch
    aa = resumed["results"]["autoattack"]
    np.testing.assert_array_equal(aa["broken_by"], reference.broken_by)
    assert aa["accuracy"] == reference.robust_accuracy
    notices = [line for line in logged if "does not fit" in line]
    assert len(notices) == 1 and notices[0].startswith(
        f"AutoAttack state {states[0]} does not fit this evaluation (unreadable: "
    )
    assert notices[0].endswith(f"moved to {states[0].name}.stale; starting afresh.")
    assert (model_dir / f"{states[0].name}.stale").read_bytes() == b"cut short by a full disk"
    assert not list(model_dir.glob("autoattack_*.npz"))  # finished: removed


def test_several_radii_give_a_report_each_and_a_plot_and_a_later_evaluation_adds_its_own(
    source, tmp_path
):
    model_dir = _copy_of_run(source, tmp_path / "run")
    common = [f"--model_dir={model_dir}", "--max_examples=12", "--batch_size=5"]
    result = evaluation.evaluate_radii(
        evaluate_settings([*common, "--attacks=clean,pgd2", "--attack_eps=2/255,8/255"]),
        log=lambda _: None,
    )
    assert [r["epsilon"] for r in result.reports] == [2 / 255, 8 / 255]
    names = [p.rsplit("/", 1)[1] for p in result.paths]
    key = names[0][-len("12345678.json") : -len(".json")]
    assert names == [f"evaluation_test_linf_eps{r}-255_{key}.json" for r in (2, 8)]
    assert result.plot == str(model_dir / f"evaluation_test_linf_radii_{key}.png")
    with open(result.plot, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    for path, radius, report in zip(result.paths, ("2/255", "8/255"), result.reports):
        alone = evaluation.evaluate(
            evaluate_settings(
                [*common, "--attacks=pgd2", f"--attack_eps={radius}"]
                + [f"--output={tmp_path / 'alone.json'}"]
            ),
            log=lambda _: None,
        )
        assert report["results"]["pgd2"] == {
            **alone["results"]["pgd2"],
            "seconds": report["results"]["pgd2"]["seconds"],
        }
        assert json.loads(open(path).read()) == json.loads(json.dumps(report))

    before = {p.name: p.read_bytes() for p in model_dir.glob("evaluation_*")}
    later = evaluation.evaluate_radii(
        evaluate_settings([*common, "--attacks=clean,pgd1", "--attack_eps=8/255"]),
        log=lambda _: None,
    )
    assert later.plot is None and later.paths[0].rsplit("/", 1)[1] not in before
    assert {p.name: p.read_bytes() for p in model_dir.glob("evaluation_*") if p.name in before} == (
        before
    )

    output = tmp_path / "mine.json"  # --output with several radii: one file each beside it
    chosen = evaluation.evaluate_radii(
        evaluate_settings(
            [*common, "--attacks=clean", "--attack_eps=2/255,8/255", f"--output={output}"]
        ),
        log=lambda _: None,
    )
    assert chosen.paths == [
        str(tmp_path / "mine_eps2-255.json"),
        str(tmp_path / "mine_eps8-255.json"),
    ]
    assert (
        chosen.plot == str(tmp_path / "mine_radii.png") and (tmp_path / "mine_radii.png").exists()
    )


def test_a_strategy_the_environment_cannot_give_is_one_line_and_nothing_is_written(
    source, tmp_path, monkeypatch
):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(SetupError, match="--strategy=multi_worker needs the TF_CONFIG") as error:
        evaluation.evaluate(
            evaluate_settings(
                [f"--model_dir={source}", "--strategy=multi_worker", f"--output={tmp_path}/r.json"]
            )
        )
    assert "\n" not in str(error.value) and not list(tmp_path.iterdir())
