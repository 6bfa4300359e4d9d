"""`python -m twins_tf.evaluate`: accuracies against an independent reference, report, errors.

The reference evaluation is written here from the formulas (spec §4, §7): the model's argmax
on clean images, and L-inf PGD by hand (sign steps, projection, clipping) in eager
TensorFlow, with no twins_tf attack code.
"""

import json
import os

import numpy as np
import pytest
import tensorflow as tf
from binaries_testlib import evaluate_settings, finetune_run, model_of_run, source_run

from twins_tf import data as data_lib
from twins_tf import evaluation
from twins_tf.training import model_dir as run_files
from twins_tf.training.settings import SetupError

EXAMPLES = 48


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return source_run(tmp_path_factory)


def _test_examples(config, count):
    spec = data_lib.get_dataset_spec(config["dataset"], image_size=config["image_size"])
    test = data_lib.load_splits(spec).test
    images, labels = zip(*[(x.numpy(), y.numpy()) for x, y in test])
    # --max_examples takes a class-stratified subset (tested in test_data.py), in split order
    rows = data_lib.stratified_indices(np.array(labels), count)
    return np.stack(images)[rows], np.array(labels)[rows]


def _reference_accuracies(model, images, labels, eps, step, steps):
    """Clean and PGD-`steps` accuracy computed from the formulas (no random start)."""
    x = tf.constant(images)
    y = tf.constant(labels)
    clean = np.mean(np.argmax(model(x, training=False).numpy(), -1) == labels)
    x_adv = x
    for _ in range(steps):
        with tf.GradientTape() as tape:
            tape.watch(x_adv)
            loss = tf.reduce_mean(
                tf.keras.losses.sparse_categorical_crossentropy(
                    y, model(x_adv, training=False), from_logits=True
                )
            )
        x_adv = x_adv + step * tf.sign(tape.gradient(loss, x_adv))
        x_adv = tf.clip_by_value(tf.clip_by_value(x_adv, x - eps, x + eps), 0.0, 1.0)
    robust = np.mean(np.argmax(model(x_adv, training=False).numpy(), -1) == labels)
    return clean, robust


def test_matches_a_reference_evaluation_and_writes_the_report(source, capsys):
    report = evaluation.evaluate(
        evaluate_settings(
            [
                f"--model_dir={source}",
                "--attacks=clean,pgd3",
                f"--max_examples={EXAMPLES}",
                "--batch_size=20",
                "--attack_step=2/255",
            ]
        )
    )
    config, model = model_of_run(source, twin=False)
    images, labels = _test_examples(config, EXAMPLES)
    clean, robust = _reference_accuracies(model, images, labels, 8 / 255, 2 / 255, 3)
    results = report["results"]
    assert results["clean"]["accuracy"] == pytest.approx(clean, abs=1e-9)
    # one example may sit on a decision boundary where float32 rounding differs
    assert results["pgd3"]["accuracy"] == pytest.approx(robust, abs=1 / EXAMPLES + 1e-9)
    assert results["pgd3"]["correct"] == round(results["pgd3"]["accuracy"] * EXAMPLES)
    assert results["pgd3"]["examples"] == EXAMPLES
    assert (results["pgd3"]["steps"], results["pgd3"]["restarts"]) == (3, 1)
    assert results["pgd3"]["random_start"] is False
    assert report["epsilon"] == pytest.approx(8 / 255)  # the run's, from config.json

    # The one radius's report, among the other tests' reports of this shared run (each
    # configuration has its own file): the newest.
    written_path = max(source.glob("evaluation_test_linf_eps8-255_*.json"), key=os.path.getmtime)
    written = json.loads(written_path.read_text())
    assert written == json.loads(json.dumps(report))
    assert (written["split"], written["examples"], written["arch"]) == (
        "test",
        EXAMPLES,
        "resnet18",
    )
    table = evaluation.format_table(report)
    assert f"{100 * clean:.2f}%" in table and "pgd3" in table
    assert "clean: " in capsys.readouterr().out


def test_twin_runs_are_evaluated_through_the_adaptive_wing(tmp_path_factory, tmp_path):
    finetuned = finetune_run(tmp_path_factory)
    report = evaluation.evaluate(
        evaluate_settings(
            [
                f"--model_dir={finetuned}",
                "--split=validation",
                "--attacks=clean",
                f"--output={tmp_path / 'r.json'}",
            ]
        ),
        log=lambda _: None,
    )
    config, twin_model = model_of_run(finetuned, twin=True)
    spec = data_lib.get_dataset_spec(config["dataset"], image_size=config["image_size"])
    validation = data_lib.load_splits(spec).validation
    images, labels = zip(*[(x.numpy(), y.numpy()) for x, y in validation])
    predictions = np.argmax(twin_model(np.stack(images), training=False).numpy(), -1)
    assert report["results"]["clean"]["accuracy"] == pytest.approx(
        np.mean(predictions == np.array(labels)), abs=1e-9
    )
    assert report["examples"] == len(labels)


def test_explicit_weights_without_a_model_dir(source, tmp_path):
    by_dir = evaluation.evaluate(
        evaluate_settings(
            [
                f"--model_dir={source}",
                "--attacks=clean",
                "--max_examples=32",
                f"--output={tmp_path / 'a.json'}",
            ]
        ),
        log=lambda _: None,
    )
    by_file = evaluation.evaluate(
        evaluate_settings(
            [
                f"--weights={source / 'best.weights.h5'}",
                "--arch=resnet18",
                "--dataset=digits_0_4",
                "--image_size=16",
                "--attacks=clean",
                "--max_examples=32",
            ]
        ),
        log=lambda _: None,
    )
    assert by_file["results"]["clean"]["accuracy"] == by_dir["results"]["clean"]["accuracy"]
    assert by_file["model_dir"] is None


def test_parses_attack_lists():
    assert evaluation.parse_attacks(["clean", "pgd10", "PGD50", "autoattack"]) == [
        ("clean", None),
        ("pgd10", 10),
        ("pgd50", 50),
        ("autoattack", None),
    ]


@pytest.mark.parametrize(
    "args, match",
    [
        (["--attacks=clean,fgsm"], "unknown attack 'fgsm'"),
        (["--attacks=pgd0"], "unknown attack 'pgd0'"),
        (["--attacks=clean,clean"], "names an attack twice"),
        (["--attack_eps=8"], r"--attack_eps=8: the radius 8 is outside \(0, 1\]"),
        (["--attack_eps=2/255,0"], r"--attack_eps=2/255,0: the radius 0 is outside \(0, 1\]"),
        (["--attack_eps=2/255,4/2x5"], r"--attack_eps: '4/2x5' is neither a number nor a frac"),
        (["--attack_eps=2/255,,4/255"], r"--attack_eps=2/255,,4/255 has an empty entry"),
        (["--attack_eps=8/255,8/255"], r"names the radius 8-255 twice"),
        (["--weights=/nonexistent/x.weights.h5"], "weights file not found"),
        (["--arch=resnet19"], "Unknown arch 'resnet19'"),
        (["--dataset=nope"], "Unknown dataset 'nope'"),
    ],
)
def test_bad_input(source, args, match):
    before = sorted(p.name for p in source.iterdir())
    with pytest.raises(SetupError, match=match) as error:
        evaluation.evaluate(evaluate_settings([f"--model_dir={source}", *args]))
    assert "\n" not in str(error.value)
    assert sorted(p.name for p in source.iterdir()) == before


def test_needs_a_model_dir_or_weights_arch_and_dataset(tmp_path):
    with pytest.raises(SetupError, match="without --model_dir, --weights is required"):
        evaluation.evaluate(evaluate_settings(["--attacks=clean"]))
    with pytest.raises(SetupError, match="holds no config.json"):
        evaluation.evaluate(evaluate_settings([f"--model_dir={tmp_path}"]))


@pytest.mark.slow  # AutoAttack at the standard budget: ~75 s
def test_the_binary_prints_each_sub_attack_at_the_full_budget(source, tmp_path):
    """`python -m twins_tf.evaluate --attacks=autoattack`, standard budget, 10 examples."""
    from binaries_testlib import run_binary

    output = tmp_path / "aa.json"
    result = run_binary(
        "evaluate",
        [
            f"--weights={source / 'best.weights.h5'}",
            "--arch=resnet18",
            "--dataset=digits_0_4",
            "--image_size=16",
            "--attacks=autoattack",
            "--max_examples=10",
            "--batch_size=10",
            f"--output={output}",
        ],
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    aa = json.loads(output.read_text())["results"]["autoattack"]
    assert aa["budget"] == dict(apgd_steps=100, fab_steps=100, square_queries=5000, eot_iter=20)
    assert (aa["examples"], aa["n_target_classes"], aa["version"]) == (10, 4, "standard")
    for name, accuracy in aa["after_each_attack"].items():
        seconds = aa["seconds_each_attack"][name]
        assert f"  after {name:<16}{100 * accuracy:>9.2f}%{seconds:>10.1f} s" in result.stdout
    assert "standard version, 4 target classes, seed 0" in result.stdout


def test_pgd_only_evaluations_run_the_model_checks_and_report_them(source, tmp_path, monkeypatch):
    import keras

    from twins_tf.evaluation import inputs

    args = [
        f"--model_dir={source}",
        "--attacks=clean",
        "--max_examples=8",
        f"--output={tmp_path / 'r.json'}",
    ]
    report = evaluation.evaluate(evaluate_settings(args), log=lambda _: None)
    assert report["checks"] == [] and report["seed"] == 0  # a plain deterministic ResNet

    load_model = evaluation.load_model
    monkeypatch.setattr(
        inputs,
        "load_model",
        lambda settings: keras.Sequential([load_model(settings), keras.layers.Softmax()]),
    )  # outputs probabilities
    logged = []
    report = evaluation.evaluate(evaluate_settings(args), log=logged.append)
    assert len(report["checks"]) == 1 and "probabilities, not logits" in report["checks"][0]
    assert f"warning: {report['checks'][0]}" in logged
    assert json.loads((tmp_path / "r.json").read_text())["checks"] == report["checks"]


def test_a_weights_file_of_another_arch(source):
    with pytest.raises(SetupError, match="--weights: .*does not hold resnet34 weights"):
        evaluation.evaluate(
            evaluate_settings(
                [
                    f"--weights={source / 'best.weights.h5'}",
                    "--arch=resnet34",
                    "--dataset=digits_0_4",
                    "--attacks=clean",
                ]
            )
        )


def test_autoattack_reports_each_sub_attack(source, tmp_path, monkeypatch):
    """The real orchestrator and sub-attacks, with lowered budgets to keep the test short."""
    from twins_tf.attacks import autoattack

    class QuickAutoAttack(autoattack.AutoAttack):
        def __init__(self, epsilon, **kwargs):
            super().__init__(epsilon, apgd_steps=5, fab_steps=5, square_queries=20, **kwargs)

    monkeypatch.setattr(autoattack, "AutoAttack", QuickAutoAttack)
    args = [
        f"--weights={source / 'best.weights.h5'}",
        "--arch=resnet18",
        "--dataset=digits_0_4",
        "--image_size=16",
        "--attacks=clean,autoattack",
        "--max_examples=24",
        "--batch_size=8",
        f"--output={tmp_path / 'aa.json'}",
    ]
    report = evaluation.evaluate(evaluate_settings(args), log=lambda _: None, progress=False)
    results = report["results"]
    aa = results["autoattack"]
    assert list(aa["after_each_attack"]) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    values = list(aa["after_each_attack"].values())
    assert all(a >= b for a, b in zip(values, values[1:]))  # attacks only remove points
    assert aa["accuracy"] == pytest.approx(values[-1])
    assert aa["clean_accuracy"] == pytest.approx(results["clean"]["accuracy"])
    assert aa["n_target_classes"] == 4 and aa["examples"] == 24  # 5 classes: 4 targets
    # what a rerun needs: versions, radius, norm, examples, targets, budgets, seed
    assert (aa["version"], aa["norm"], aa["seed"], aa["skipped"]) == ("standard", "linf", 0, {})
    assert aa["epsilon"] == pytest.approx(8 / 255) and aa["twins_tf_version"]
    assert aa["budget"] == dict(apgd_steps=5, fab_steps=5, square_queries=20, eot_iter=20)
    assert set(aa["seconds_each_attack"]) == set(aa["after_each_attack"])
    assert isinstance(aa["unconfirmed"], int)  # non-robust points the whole batch did not confirm
    assert all(
        0 <= t <= results["autoattack"]["seconds"] for t in aa["seconds_each_attack"].values()
    )
    assert any("4 target class(es)" in m for m in aa["checks"])  # checks.check_n_classes
    assert report["checks"] is None  # AutoAttack ran the checks, they are in its result
    assert json.loads((tmp_path / "aa.json").read_text())["results"]["autoattack"] == aa
    table = evaluation.format_table(report)
    for name, accuracy in aa["after_each_attack"].items():
        seconds = aa["seconds_each_attack"][name]
        assert f"  after {name:<16}{100 * accuracy:>9.2f}%{seconds:>10.1f} s" in table
    assert "standard version, 4 target classes, seed 0" in table
    assert "warning: APGD-T and FAB-T use 4 target class(es)" in table
    assert aa["shards"] == 1 and len(aa["broken_by"]) == 24
    assert aa["accuracy"] == pytest.approx(np.mean(np.array(aa["broken_by"]) == -1))
    assert not list(tmp_path.glob("autoattack_*"))  # finished: its state files are removed


def _copy_of_run(source, model_dir, **config_changes):
    import shutil

    model_dir.mkdir()
    shutil.copy(source / run_files.BEST_WEIGHTS, model_dir / run_files.BEST_WEIGHTS)
    shutil.copy(source / run_files.SUMMARY_FILE, model_dir / run_files.SUMMARY_FILE)
    config = json.loads((source / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, **config_changes}))
    return model_dir


def test_weights_holding_a_nan_are_refused(source, tmp_path):
    import h5py

    model_dir = _copy_of_run(source, tmp_path / "diverged")
    with h5py.File(model_dir / run_files.BEST_WEIGHTS, "r+") as f:
        kernels = []
        f.visititems(
            lambda name, obj: (
                kernels.append(obj) if isinstance(obj, h5py.Dataset) and obj.ndim == 4 else None
            )
        )
        poisoned = kernels[3][()]
        poisoned.flat[0] = np.nan
        kernels[3][...] = poisoned
    with pytest.raises(
        SetupError,
        match=r"--weights: .*diverged/best.weights.h5 holds "
        r"non-finite weights \(first: \S+/kernel\): the training that wrote it "
        "diverged",
    ) as error:
        evaluation.evaluate(evaluate_settings([f"--model_dir={model_dir}", "--attacks=clean"]))
    assert "\n" not in str(error.value)
    assert not list(model_dir.glob("evaluation_*"))


def test_a_data_path_of_the_run_that_is_gone_names_config_json_and_the_flag(source, tmp_path):
    gone = tmp_path / "moved_away"
    model_dir = _copy_of_run(source, tmp_path / "run", tfds_data_dir=str(gone))
    with pytest.raises(
        SetupError,
        match=(
            rf"tfds_data_dir={gone} \(from the run's {model_dir}/config.json\) does not exist: "
            r"pass --tfds_data_dir= to say where the data is now"
        ),
    ):
        evaluation.evaluate(evaluate_settings([f"--model_dir={model_dir}", "--attacks=clean"]))
    # the flag overrides the run's path
    report = evaluation.evaluate(
        evaluate_settings(
            [
                f"--model_dir={model_dir}",
                "--attacks=clean",
                "--max_examples=8",
                f"--tfds_data_dir={tmp_path}",
            ]
        ),
        log=lambda *_: None,
    )
    assert report["results"]["clean"]["examples"] == 8


def test_library_call_with_some_settings_is_the_binary_with_its_defaults(source, tmp_path):
    """`twins_tf.evaluation.evaluate` needs only the settings that differ from the flags'."""
    from twins_tf import evaluation

    args = {"model_dir": str(source), "attacks": ["clean", "pgd2"], "max_examples": 16}
    by_library = evaluation.evaluate(
        {**args, "output": str(tmp_path / "lib.json")}, log=lambda _: None
    )
    by_flags = evaluation.evaluate(
        evaluate_settings(
            [
                f"--model_dir={source}",
                "--attacks=clean,pgd2",
                "--max_examples=16",
                f"--output={tmp_path / 'flags.json'}",
            ]
        ),
        log=lambda _: None,
    )
    for name in ("clean", "pgd2"):
        assert by_library["results"][name]["correct"] == by_flags["results"][name]["correct"]
    assert by_library["results"]["pgd2"]["restarts"] == 1 and by_library["seed"] == 0
    # the flags' defaults, written out here (the flags are built from DEFAULTS, so comparing
    # the two would prove nothing): a run's value (None) where the run decides
    assert evaluate_settings([]) == {
        "model_dir": None,
        "weights": None,
        "arch": None,
        "dataset": None,
        "data_dir": None,
        "tfds_data_dir": None,
        "image_size": None,
        "upsample": None,
        "train_per_class": None,
        "split": "test",
        "attacks": ["clean", "pgd10", "autoattack"],
        "attack_norm": None,
        "attack_eps": None,
        "attack_step": None,
        "pgd_restarts": 1,
        "autoattack_version": "standard",
        "batch_size": 128,
        "max_examples": None,
        "skip_bad_images": None,
        "seed": 0,
        "precision": "float32",
        "output": None,
        "allow_unfinished": False,
        "strategy": "default",
        "tpu_address": None,
    }
    with pytest.raises(
        SetupError,
        match=r"unknown evaluation setting\(s\) attack; the "
        "settings are model_dir, weights",
    ):
        evaluation.evaluate({"model_dir": str(source), "attack": ["clean"]})


def test_an_accuracy_counter_traces_once_whatever_the_batch_size():
    """An evaluation's last batch is usually smaller; a counter traced per batch size traced
    its whole graph (a PGD-k loop around the model) twice per evaluation."""
    traces = []

    def model(images, training=False):  # class 0 where the mean pixel exceeds 1/2
        traces.append(images.shape[0])  # Python runs only while the counter is traced
        means = tf.reduce_mean(images, axis=[1, 2, 3])
        return tf.stack([means, tf.fill(tf.shape(means), 0.5)], axis=-1)

    counter = evaluation.accuracy_counter(model)
    rng = np.random.default_rng(0)
    for size in (5, 3, 5, 1):
        x = rng.uniform(size=(size, 4, 4, 3)).astype("float32")
        y = rng.integers(0, 2, size)
        predicted = np.where(x.mean(axis=(1, 2, 3)) > 0.5, 0, 1)
        assert int(counter(x, y)) == int(np.sum(predicted == y))
    assert len(traces) == 1, traces
