"""`python -m twins_tf.pretrain`: PGD-AT from scratch and the model_dir it leaves.

One tiny run (ResNet-18, 16-pixel digits 0-4, two epochs; `binaries_testlib.source_run`) is
read by every test here, and reused as the pre-trained model of the train/evaluate tests.
"""

import csv
import json

import numpy as np
import pytest
from absl import flags
from binaries_testlib import SOURCE_ARGS, evaluate_settings, read_weights, settings, source_run

from twins_tf.models.resnet import build_resnet
from twins_tf.training import loop
from twins_tf.training import model_dir as run_files
from twins_tf.training.settings import SetupError


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return source_run(tmp_path_factory)


def _metrics(model_dir):
    with open(model_dir / run_files.METRICS_FILE, newline="") as f:
        return list(csv.DictReader(f))


def test_writes_the_model_dir_contract(source):
    for name in (
        "config.json",
        "best.weights.h5",
        "best.json",
        "last.weights.h5",
        "metrics.csv",
        "summary.json",
    ):
        assert (source / name).is_file(), name
    assert list((source / "tensorboard" / "train").glob("events.out.tfevents.*"))
    assert list((source / "tensorboard" / "validation").glob("events.out.tfevents.*"))
    # kept (to extend the run with a higher --epochs), without the previous epoch's copy
    assert sorted(p.name for p in (source / "backup").iterdir()) == [
        "latest.weights.h5",
        "training_metadata.json",
    ]
    assert json.loads((source / "backup" / "training_metadata.json").read_text())["epoch"] == 2

    config = json.loads((source / "config.json").read_text())
    assert config["binary"] == "pretrain"
    assert (config["arch"], config["dataset"], config["method"]) == ("resnet18", "digits_0_4", "at")
    assert (config["num_classes"], config["image_size"], config["upsample"]) == (5, 16, 1)
    assert config["twin"] is False and config["pretrained"] is None
    assert config["seed"] == 7 and config["epochs"] == 2 and config["batch_size"] == 16
    assert config["lr"] == 0.02 and config["weight_decay"] == 5e-4
    assert config["attack_eps"] == pytest.approx(8 / 255)
    assert config["attack_step"] == pytest.approx(4 / 255)
    assert config["lr_decay_epochs"] == [] and config["attack_steps"] == 1


def test_metrics_have_one_row_per_epoch(source):
    rows = _metrics(source)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for row in rows:
        assert float(row["lr"]) == pytest.approx(0.02)
        for column in ("loss", "clean_acc", "adv_acc", "val_clean_acc", "val_adv_acc"):
            assert np.isfinite(float(row[column])), column
        assert 0.0 <= float(row["val_adv_acc"]) <= 1.0


def test_best_weights_are_those_of_the_best_validation_pgd_epoch(source, tmp_path):
    rows = _metrics(source)
    values = [float(r["val_adv_acc"]) for r in rows]
    best = json.loads((source / "best.json").read_text())
    assert best["epoch"] == int(np.argmax(values)) + 1  # the first epoch reaching the max
    assert best["value"] == pytest.approx(max(values))
    # The saved weights reproduce that epoch's validation PGD accuracy when evaluated anew.
    from twins_tf import evaluation

    report = evaluation.evaluate(
        evaluate_settings(
            [
                f"--model_dir={source}",
                "--split=validation",
                "--attacks=pgd1",
                "--batch_size=16",
                "--max_examples=32",
                f"--output={tmp_path / 'report.json'}",
            ]
        ),
        log=lambda _: None,
    )
    assert report["results"]["pgd1"]["accuracy"] == pytest.approx(best["value"], abs=1 / 32)
    if best["epoch"] == len(rows):
        assert_arrays_equal(source / "best.weights.h5", source / "last.weights.h5")


def assert_arrays_equal(a, b):
    a, b = read_weights(a), read_weights(b)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_weights_load_into_the_train_binarys_twin_model(source):
    from twins_tf import weights

    model = build_resnet("resnet18", 5, twin=True, input_shape=(16, 16, 3))
    info = weights.load_pretrained(model, source / "best.weights.h5")
    assert info["arch"] == "resnet18" and info["source_twin"] is False
    saved = read_weights(source / "best.weights.h5")
    # conv1 is the first Conv2D the file holds (Keras names the h5 groups by class).
    np.testing.assert_array_equal(
        model.get_layer("conv1").kernel.numpy(), saved["layers/conv2d/vars/0"]
    )
    bn = model.get_layer("bn1")  # both wings start from the pre-trained BN
    np.testing.assert_array_equal(bn.frozen_mean.numpy(), bn.moving_mean.numpy())
    np.testing.assert_array_equal(bn.frozen_gamma.numpy(), bn.gamma.numpy())


def test_a_second_start_finds_the_run_finished_and_changes_nothing(source, capsys):
    before = {p: p.read_bytes() for p in source.iterdir() if p.is_file()}
    summary = loop.run(settings("pretrain", [*SOURCE_ARGS, f"--model_dir={source}"]), verbose=0)
    assert "already holds this finished run" in capsys.readouterr().out
    assert summary == json.loads((source / "summary.json").read_text())
    assert {p: p.read_bytes() for p in source.iterdir() if p.is_file()} == before


def test_refuses_twin_methods_and_has_no_pretrained_flag(tmp_path):
    with pytest.raises(SetupError, match="use python -m twins_tf.train"):
        loop.run(
            settings(
                "pretrain", [*SOURCE_ARGS, "--method=twins_at", f"--model_dir={tmp_path / 'run'}"]
            )
        )
    with pytest.raises(flags.UnrecognizedFlagError):
        settings("pretrain", [*SOURCE_ARGS, "--pretrained=x.weights.h5"])
    assert not (tmp_path / "run").exists()


def test_defaults_are_the_from_scratch_recipe():
    s = settings("pretrain", ["--dataset=cifar10", "--model_dir=x"])
    assert (s["method"], s["arch"], s["epochs"], s["lr"], s["weight_decay"]) == (
        "at",
        "resnet18",
        100,
        0.1,
        5e-4,
    )
    assert s["lr_decay_epochs"] == ["50", "75"]
