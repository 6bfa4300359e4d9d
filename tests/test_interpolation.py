"""`twins_tf.interpolation` / `python -m twins_tf.interpolate`, against independent references.

References: the written weights against numpy's (1 - a) A + a B of the sources' `.weights.h5`
files read with h5py; logits at alpha 0 / 1 against the sources' networks loaded by Keras's
own `load_weights`; the table against a plain `build_resnet` given numpy-interpolated weights,
run on the validation batches the train binary builds (`training.trainer_setup.pipelines`),
accuracy counted in numpy.

The runs: run A is the session's tiny trained PGD-AT run (binaries_testlib.source_run, digits
0-4) or a TWINS copy of it (its network twinified, the Frozen wing moved away, so only an
interpolation of the *evaluated* Adaptive wing reproduces it); run B is run A's network with
every variable moved (kernels, gamma/beta and the moving statistics), saved with the same
config.json, so no second training run is needed.
"""

import json
import shutil

import numpy as np
import pytest
from binaries_testlib import read_weights, run_binary, settings, source_run

import twins_tf
from twins_tf import interpolation
from twins_tf.interpolation import InterpolationRow, interpolate_runs, select_alpha
from twins_tf.layers import twin_layers
from twins_tf.models.resnet import build_resnet
from twins_tf.training import model_dir as run_files
from twins_tf.training.settings import SetupError
from twins_tf.twinify import twinify


def _build(config, twin):
    size = config["image_size"]
    return build_resnet(
        config["arch"],
        config["num_classes"],
        twin=twin,
        input_shape=(size, size, 3),
        upsample=config["upsample"],
    )


def _keras_model(model_dir, twin=None):
    """The run's network loaded by Keras's `load_weights` (no twins_tf loading code)."""
    config = json.loads((model_dir / "config.json").read_text())
    model = _build(config, config["twin"] if twin is None else twin)
    model.load_weights(model_dir / run_files.BEST_WEIGHTS)
    return model


def _write_run(model_dir, config, model):
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text(json.dumps({**config, "model_dir": str(model_dir)}))
    model.save_weights(model_dir / run_files.BEST_WEIGHTS)
    model.save_weights(model_dir / run_files.LAST_WEIGHTS)
    run_files.write_json(model_dir / run_files.SUMMARY_FILE, {"epochs": config["epochs"]})


def _fit_head_on_validation(model, config):
    """Sets the head of `model` to the least-squares fit (numpy) of its features of the 24
    validation images to their one-hot labels: run B then classifies them, while the tiny run
    A may be at chance, so the interpolation path's accuracies vary and a wrong table shows."""
    import keras

    images, labels = _validation_examples(config, 24)
    head = model.get_layer("fc")
    features = keras.Model(model.inputs[0], head.input)(images, training=False).numpy()
    design = np.concatenate([features, np.ones((len(features), 1))], axis=1).astype("float64")
    target = np.eye(config["num_classes"])[labels]
    solution = np.linalg.lstsq(design, target, rcond=None)[0].astype("float32")
    head.set_weights([solution[:-1], solution[-1]])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{"a": plain trained run, "twin_a": its TWINS copy, "b": run A moved; "*_arrays": the
    evaluated (plain) network's arrays of each, in `build_resnet(twin=False).weights` order}."""
    source = source_run(tmp_path_factory)
    root = tmp_path_factory.mktemp("interpolation_runs")
    config = json.loads((source / "config.json").read_text())
    plain = _keras_model(source)
    arrays_a = [v.numpy() for v in plain.weights]

    rng = np.random.default_rng(3)
    moved = _build(config, twin=False)
    for variable, value in zip(moved.weights, arrays_a):
        name = variable.path
        if name.endswith("moving_variance"):
            value = value * rng.uniform(0.5, 2.0, value.shape)
        elif name.endswith("moving_mean"):
            value = value + rng.normal(0, 0.2, value.shape) * (np.abs(value).mean() + 1e-3)
        else:
            value = value + rng.normal(0, 0.6, value.shape) * (value.std() + 1e-3)
        variable.assign(value.astype("float32"))
    _fit_head_on_validation(moved, config)
    arrays_b = [v.numpy() for v in moved.weights]
    _write_run(root / "b", config, moved)

    twin = twinify(plain)
    for layer in twin_layers(twin):  # the Frozen wing: never evaluated, so it must not count
        n = layer.frozen_gamma.shape[0]
        layer.frozen_gamma.assign(rng.uniform(0.2, 3.0, n).astype("float32"))
        layer.frozen_mean.assign(rng.normal(0, 1.0, n).astype("float32"))
        layer.frozen_variance.assign(rng.uniform(0.1, 5.0, n).astype("float32"))
    _write_run(
        root / "twin_a", {**config, "binary": "train", "method": "twins_at", "twin": True}, twin
    )
    return {
        "a": source,
        "twin_a": root / "twin_a",
        "b": root / "b",
        "config": config,
        "a_arrays": arrays_a,
        "b_arrays": arrays_b,
        "root": root,
    }


def _images(config, count=6, seed=1):
    size = config["image_size"]
    return np.random.default_rng(seed).random((count, size, size, 3)).astype("float32")


def test_written_weights_are_numpy_interpolation_of_every_variable(runs, tmp_path):
    """Every dataset of the written .weights.h5, moving statistics included, is
    (1 - a) A + a B of the sources' files (read with h5py, combined in float64)."""
    alpha = 0.3
    result = interpolate_runs(
        runs["a"], runs["b"], tmp_path / "out", alphas=[alpha], validation_examples=8, verbose=0
    )
    assert result.best_alpha == alpha
    a = read_weights(runs["a"] / run_files.BEST_WEIGHTS)
    b = read_weights(runs["b"] / run_files.BEST_WEIGHTS)
    out = read_weights(tmp_path / "out" / run_files.BEST_WEIGHTS)
    assert sorted(out) == sorted(a) == sorted(b)
    # a BatchNormalization's vars are gamma, beta, moving mean, moving variance: 2 and 3 here
    assert any("batch_normalization" in key and key.endswith("vars/3") for key in out)
    for key in a:
        expected = (1 - alpha) * a[key].astype("float64") + alpha * b[key].astype("float64")
        np.testing.assert_allclose(out[key], expected, rtol=1e-6, atol=1e-7, err_msg=key)
        if a[key].size > 1:
            assert not np.allclose(out[key], a[key]), key  # every variable moved
    assert (tmp_path / "out" / interpolation.PLOT_FILE).stat().st_size > 1000
    assert list((tmp_path / "out" / "tensorboard").iterdir())


def test_alpha_0_and_1_reproduce_the_sources_logits(runs):
    """At alpha 0 a TWINS run's evaluated network (`plain_network`: its Adaptive wing)
    interpolated with `interpolate` gives the run's own inference logits; at alpha 1 the
    plain run B's.  (The written run's weights are the same `interpolate` of the same networks:
    the test above and the table test check that end to end.)"""
    images = _images(runs["config"])
    network_a = interpolation.plain_network(runs["twin_a"])
    network_b = interpolation.plain_network(runs["b"])
    assert not twin_layers(network_a)
    values_a = [v.numpy() for v in network_a.weights]
    values_b = [v.numpy() for v in network_b.weights]
    model = _build(runs["config"], twin=False)
    for alpha, source in ((0.0, "twin_a"), (1.0, "b")):
        model.set_weights(interpolation.interpolate(values_a, values_b, alpha))
        expected = _keras_model(runs[source])(images, training=False).numpy()
        np.testing.assert_allclose(
            model(images, training=False).numpy(), expected, rtol=1e-5, atol=1e-5
        )


def _validation_examples(config, count):
    """The validation batches `python -m twins_tf.train` validates on, as numpy arrays."""
    from twins_tf import data as data_lib
    from twins_tf.training.trainer_setup import pipelines

    s = settings(
        "pretrain",
        [
            f"--{k}={v}"
            for k, v in (
                ("dataset", config["dataset"]),
                ("image_size", config["image_size"]),
                ("batch_size", 16),
                ("max_validation_examples", count),
                ("model_dir", "unused"),
            )
        ],
    )
    spec = data_lib.get_dataset_spec(
        s["dataset"], image_size=s["image_size"], upsample=s["upsample"]
    )
    _, validation = pipelines(s, spec, data_lib.load_splits(spec), 0)
    images, labels = zip(*[(x.numpy(), y.numpy()) for x, y in validation])
    return np.concatenate(images), np.concatenate(labels)


def test_the_table_equals_an_independent_evaluation_on_the_validation_split(runs, tmp_path, capsys):
    """Through the binary's main (in process: flags, then interpolate_runs), a TWINS run A and
    a plain run B; the reference is the plain network of A's arrays interpolated in numpy."""
    from absl import flags

    from twins_tf import interpolate
    from twins_tf.attacks.pgd import PGD

    out = tmp_path / "out"
    flag_values = flags.FlagValues()
    interpolate.define_flags(flag_values)
    flag_values(
        [
            "interpolate",
            f"--run_a={runs['twin_a']}",
            f"--run_b={runs['b']}",
            f"--output_dir={out}",
            "--alphas=0,0.5,0.8,1",
            "--validation_examples=24",
        ]
    )
    interpolate.main(["interpolate"], flag_values)
    printed = capsys.readouterr().out
    alphas = [0.0, 0.5, 0.8, 1.0]
    written = (out / interpolation.INTERPOLATION_FILE).stat().st_mtime_ns
    # the same request again is the stored result (no second evaluation)
    result = interpolate_runs(
        runs["twin_a"], runs["b"], out, alphas=alphas, validation_examples=24, verbose=0
    )
    assert (out / interpolation.INTERPOLATION_FILE).stat().st_mtime_ns == written

    config = runs["config"]
    images, labels = _validation_examples(config, 24)
    assert result.validation_examples == len(labels) == 24
    pgd = PGD(
        config["attack_eps"], config["attack_step"], config["attack_steps"], random_start=False
    )
    reference = _build(config, twin=False)
    expected, arrays = [], {}
    for alpha in alphas:
        arrays[alpha] = [
            ((1 - alpha) * a + alpha * b).astype("float32")
            for a, b in zip(runs["a_arrays"], runs["b_arrays"])
        ]
        reference.set_weights(arrays[alpha])
        clean = np.argmax(reference(images, training=False).numpy(), axis=-1)
        adversarial = pgd(reference, images, labels).numpy()
        robust = np.argmax(reference(adversarial, training=False).numpy(), axis=-1)
        expected.append(
            InterpolationRow(
                alpha, float(np.mean(clean == labels)), float(np.mean(robust == labels))
            )
        )
    assert list(result.rows) == expected
    assert len({(r.clean_accuracy, r.pgd_accuracy) for r in expected}) > 1  # the path varies
    best = max(expected, key=lambda r: (r.pgd_accuracy, r.clean_accuracy, -r.alpha))
    assert result.best_alpha == best.alpha
    assert f"best alpha (robust): {best.alpha:g}" in printed
    record = json.loads((out / interpolation.INTERPOLATION_FILE).read_text())
    assert record["rows"] == [vars(r) for r in expected] and record["best_alpha"] == best.alpha
    assert record["request"]["run_a"]["model_dir"] == str(runs["twin_a"])
    assert record["validation"]["split"] == "validation"
    written_config = json.loads((out / "config.json").read_text())
    assert written_config == {**config, "model_dir": str(out), "twin": False}  # B's, plain
    with pytest.raises(
        SetupError,
        match="holds another interpolation .*use a new output_dir "
        r"or overwrite=True \(--overwrite\)",
    ) as error:
        interpolate_runs(runs["twin_a"], runs["b"], out, alphas=[0.5], validation_examples=24)
    _one_line(error)
    # the written run is the selected alpha's network
    reference.set_weights(arrays[best.alpha])
    probe = _images(config)
    np.testing.assert_allclose(
        twins_tf.load_run(out)(probe, training=False).numpy(),
        reference(probe, training=False).numpy(),
        rtol=1e-5,
        atol=1e-5,
    )


def test_selection_is_the_argmax_with_the_stated_tie_rule():
    rows = [
        InterpolationRow(0.0, 0.50, 0.20),
        InterpolationRow(0.2, 0.70, 0.30),
        InterpolationRow(0.4, 0.80, 0.30),
        InterpolationRow(0.6, 0.80, 0.30),
        InterpolationRow(0.8, 0.90, 0.25),
        InterpolationRow(1.0, 0.90, 0.10),
    ]
    # robust: PGD 0.30 three times; the clean tie-break leaves 0.4 and 0.6; the smaller alpha
    assert select_alpha(rows, "robust") == 0.4
    # clean: 0.90 twice; PGD breaks it
    assert select_alpha(rows, "clean") == 0.8
    assert select_alpha(list(reversed(rows)), "robust") == 0.4  # not the order of the grid
    with pytest.raises(SetupError, match="select='best': choose one of robust, clean"):
        select_alpha(rows, "best")
    assert twins_tf.interpolate_runs is interpolate_runs  # the package's lazy name


def _one_line(error):
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "key, value",
    [
        ("arch", "resnet34"),
        ("num_classes", 7),
        ("image_size", 24),
        ("dataset", "digits_5_9"),
        ("upsample", 2),
    ],
)
def test_runs_that_do_not_match_are_refused_in_one_line(runs, tmp_path, key, value):
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(runs["b"] / run_files.BEST_WEIGHTS, other / run_files.BEST_WEIGHTS)
    (other / "config.json").write_text(json.dumps({**runs["config"], key: value}))
    with pytest.raises(
        SetupError,
        match=rf"the runs differ in {key} .*: only runs of the same "
        "architecture, head, input size and dataset interpolate",
    ) as error:
        interpolate_runs(runs["a"], other, tmp_path / "out", verbose=0)
    _one_line(error)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(alphas=[]), "the alpha grid is empty"),
        (dict(alphas=[0, 1.5]), r"alpha 1.5 is outside \[0, 1\]"),
        (dict(alphas=[0.5, 0.5]), "names an alpha twice"),
        (dict(alphas=["x"]), "are not numbers"),
        (dict(select="best"), "select='best': choose one of robust, clean"),
        (dict(validation_examples=0), "validation_examples must be at least 1"),
        (dict(batch_size=0), "batch_size must be at least 1"),
        (dict(attack_eps=8), r"attack_eps=8 is outside \[0, 1\]: .* write e.g. 8/255"),
        (dict(attack_steps=0), "attack_steps must be at least 1"),
    ],
)
def test_bad_arguments_are_refused_in_one_line(runs, tmp_path, kwargs, message):
    with pytest.raises(SetupError, match=message) as error:
        interpolate_runs(runs["a"], runs["b"], tmp_path / "out", verbose=0, **kwargs)
    _one_line(error)


def test_missing_runs_used_outputs_and_other_validation_are_refused(runs, tmp_path):
    cases = []
    with pytest.raises(SetupError, match="run B: .*nowhere holds no config.json") as error:
        interpolate_runs(runs["a"], tmp_path / "nowhere", tmp_path / "out", verbose=0)
    cases.append(error)
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(runs["b"] / "config.json", unfinished / "config.json")
    with pytest.raises(SetupError, match="run A: .*holds no best.weights.h5") as error:
        interpolate_runs(unfinished, runs["b"], tmp_path / "out", verbose=0)
    cases.append(error)
    whole = tmp_path / "whole"
    shutil.copytree(runs["b"], whole)
    (whole / "config.json").write_text(json.dumps({**runs["config"], "validation": "none"}))
    with pytest.raises(SetupError, match=r"--validation=none\), so no validation split") as error:
        interpolate_runs(runs["a"], whole, tmp_path / "out", verbose=0)
    cases.append(error)
    steps = tmp_path / "steps"
    shutil.copytree(runs["b"], steps)
    (steps / "config.json").write_text(json.dumps({**runs["config"], "attack_steps": 5}))
    with pytest.raises(
        SetupError,
        match=r"different attack_steps \(1 and 5\): pass "
        "attack_steps=",
    ) as error:
        interpolate_runs(runs["a"], steps, tmp_path / "out", verbose=0)
    cases.append(error)
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("mine")
    with pytest.raises(SetupError, match="exists and is not empty; refusing to overwrite") as error:
        interpolate_runs(runs["a"], runs["b"], used, verbose=0)
    cases.append(error)
    with pytest.raises(SetupError, match="output_dir is one of the two runs") as error:
        interpolate_runs(runs["a"], runs["b"], runs["b"], verbose=0)
    cases.append(error)
    for error in cases:
        _one_line(error)
    assert (used / "notes.txt").read_text() == "mine"


def test_binary_end_to_end_then_evaluate_and_export_accept_the_run(runs, tmp_path):
    """The binary on a TWINS run and a plain run; evaluate on the written run reproduces the
    selected row (same validation examples and PGD); export serves load_run's logits."""
    import tensorflow as tf
    from absl import flags
    from binaries_testlib import evaluate_settings

    from twins_tf import evaluation, export

    out = tmp_path / "wise"
    process = run_binary(
        "interpolate",
        [
            f"--run_a={runs['twin_a']}",
            f"--run_b={runs['b']}",
            f"--output_dir={out}",
            "--alphas=0,0.5,1",
            "--validation_examples=16",
            "--select=clean",
        ],
    )
    assert process.returncode == 0, process.stderr[-3000:]
    record = json.loads((out / interpolation.INTERPOLATION_FILE).read_text())
    assert [r["alpha"] for r in record["rows"]] == [0.0, 0.5, 1.0]
    assert record["request"]["select"] == "clean"
    assert f"best alpha (clean): {record['best_alpha']:g}" in process.stdout
    best = next(r for r in record["rows"] if r["alpha"] == record["best_alpha"])

    report = evaluation.evaluate(
        evaluate_settings(
            [
                f"--model_dir={out}",
                "--split=validation",
                "--max_examples=16",
                f"--attacks=clean,pgd{runs['config']['attack_steps']}",
            ]
        ),
        log=lambda *_: None,
    )
    assert report["results"]["clean"]["accuracy"] == best["clean_accuracy"]
    assert (
        report["results"][f"pgd{runs['config']['attack_steps']}"]["accuracy"]
        == best["pgd_accuracy"]
    )

    flag_values = flags.FlagValues()  # python -m twins_tf.export, in process
    export.define_flags(flag_values)
    flag_values(["export", f"--model_dir={out}", f"--output={tmp_path / 'saved'}"])
    export.main(["export"], flag_values)
    images = _images(runs["config"])
    served = (
        tf.saved_model.load(str(tmp_path / "saved"))
        .signatures["serving_default"](images=tf.constant(images))["logits"]
        .numpy()
    )
    np.testing.assert_allclose(
        served, twins_tf.load_run(out)(images, training=False).numpy(), rtol=1e-5, atol=1e-5
    )

    refused = run_binary(
        "interpolate",
        [f"--run_a={runs['a']}", f"--run_b={runs['b']}", f"--output_dir={out}", "--alphas=0,1"],
    )
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines()[-1].startswith("interpolate: error: output_dir=")
    # --overwrite replaces it, and drops the evaluation report of the network that is gone
    assert list(out.glob("evaluation_validation_*.json"))
    replaced = run_binary(
        "interpolate",
        [
            f"--run_a={runs['a']}",
            f"--run_b={runs['b']}",
            f"--output_dir={out}",
            "--alphas=1",
            "--validation_examples=16",
            "--overwrite",
        ],
    )
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    assert json.loads((out / interpolation.INTERPOLATION_FILE).read_text())["best_alpha"] == 1.0
    assert not list(out.glob("evaluation_*"))
    np.testing.assert_allclose(
        twins_tf.load_run(out)(images, training=False).numpy(),
        _keras_model(runs["b"])(images, training=False).numpy(),
        rtol=1e-5,
        atol=1e-5,
    )
