"""Every registered dataset end to end: load_splits -> make_pipeline -> one TWINS-AT step of a
minimal twin model -> evaluate's example loading and accuracy.

Parametrized over `data.DATASETS`, so a new registry row is covered without editing this file.
tfds rows read `tfds.testing.mock_data` (random examples drawn from each builder's real
features; the builder's dataset_info.json is written from tensorflow-datasets' code, offline);
folder rows read generated class folders; digits rows read scikit-learn's bundled digits.
Images are 16 px (CIFAR: its stored 32 px), batches of 4, one step.  What is checked against
something independent: the label range and image shapes against the registry row, the number
of evaluated examples against --max_examples, and that the step moved the weights.
"""

import contextlib

import keras
import numpy as np
import pytest
import tensorflow as tf
from tfds_testlib import mocked_tfds, prepare_fake_tfds

from twins_tf import data, evaluation
from twins_tf.attacks.pgd import PGD
from twins_tf.trainer import AdversarialTrainer
from twins_tf.twinify import twinify, untwin

IMAGE_SIZE = 16
BATCH = 4
# tfds splits the mock must answer; food101's test split is tfds's "validation".
TFDS_SIZES = {"train": 1000, "validation": 200, "test": 500}


def _write_folder(root, classes, per_class):
    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / f"class_{c:03d}"
        folder.mkdir(parents=True)
        for k in range(per_class):
            image = rng.integers(0, 255, (10 + k % 3, 12, 3), np.uint8)
            encode = tf.io.encode_png if k % 2 else tf.io.encode_jpeg
            (folder / f"{k}.{'png' if k % 2 else 'jpg'}").write_bytes(encode(image).numpy())


def _source(name, root):
    """(load_splits keyword arguments, context the loading runs in) for a registry row."""
    spec = data.DATASETS[name]
    if spec.source == data.TFDS:
        prepare_fake_tfds(spec.tfds_name, root, TFDS_SIZES)
        return {"tfds_data_dir": str(root)}, mocked_tfds(root, num_examples=2 * BATCH)
    if spec.source == data.FOLDER and spec.num_classes:  # caltech256: one folder of classes
        _write_folder(root, spec.num_classes, per_class=12)
        return {"data_dir": str(root), "train_per_class": 10}, contextlib.nullcontext()
    if spec.source == data.FOLDER:
        _write_folder(root / "train", 3, per_class=10)
        _write_folder(root / "test", 3, per_class=3)
        return {"data_dir": str(root)}, contextlib.nullcontext()
    return {}, contextlib.nullcontext()


def _twin_model(image_size, num_classes):
    inputs = keras.Input((image_size, image_size, 3))
    x = keras.layers.Conv2D(4, 3, strides=2, use_bias=False)(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(num_classes)(x)
    return twinify(keras.Model(inputs, outputs))


@pytest.mark.parametrize("name", sorted(data.DATASETS))
def test_dataset_trains_one_step_and_evaluates(name, tmp_path):
    keras.utils.set_random_seed(0)
    tf.random.set_seed(None)
    kwargs, context = _source(name, tmp_path)
    image_size = None if data.DATASETS[name].preprocessing == data.CIFAR else IMAGE_SIZE
    spec = data.get_dataset_spec(name, image_size=image_size)
    with context:
        splits = data.load_splits(spec, **kwargs)
        num_classes = splits.num_classes
        assert num_classes == (spec.num_classes or 3)
        assert splits.num_examples["train"] >= BATCH and splits.num_examples["validation"] > 0
        train = data.stratified_subset(splits.source("train"), 2 * BATCH)
        batches = data.make_pipeline(train, spec, training=True, batch_size=BATCH, seed=1)
        images, labels = next(iter(batches))
        assert images.shape == (BATCH, spec.image_size, spec.image_size, 3)
        assert np.all((labels.numpy() >= 0) & (labels.numpy() < num_classes))

        model = _twin_model(spec.image_size, num_classes)
        pgd = dict(epsilon=8 / 255, step_size=4 / 255, steps=1, seed=0)
        trainer = AdversarialTrainer(
            model,
            method="twins_at",
            attack=PGD(**pgd, random_start=True),
            eval_attack=PGD(**pgd, random_start=False),
        )
        trainer.compile(optimizer=keras.optimizers.SGD(0.1), run_eagerly=True)  # 1 step: no tracing
        before = [v.numpy() for v in model.trainable_variables]
        history = trainer.fit(batches, steps_per_epoch=1, epochs=1, verbose=0, shuffle=False)
        assert np.isfinite(history.history["loss"][0])
        assert any(
            not np.array_equal(b, v.numpy()) for b, v in zip(before, model.trainable_variables)
        )

        settings = {
            "dataset": name,
            "image_size": image_size,
            "upsample": None,
            "split": "test",
            "batch_size": BATCH,
            "max_examples": 3,
            "num_classes": num_classes,
            **kwargs,
        }
        test_batches, count = evaluation.load_examples(settings)
        report = evaluation.evaluate_batched(untwin(model), test_batches, None)
    assert count == report["examples"] == 3
    assert 0.0 <= report["accuracy"] <= 1.0


# --- unreadable folder images stop train before anything is written ---------------------------
def _folder_with_bad_images(root):
    _write_folder(root / "train", 3, per_class=10)
    _write_folder(root / "test", 3, per_class=3)
    good_png = (root / "train" / "class_000" / "1.png").read_bytes()
    corrupt = root / "train" / "class_001" / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0" + bytes(200))  # JPEG header, no image after it
    truncated = root / "test" / "class_002" / "truncated.png"
    truncated.write_bytes(good_png[: len(good_png) // 2])
    return corrupt, truncated


def _folder_train_args(root, model_dir, *extra):
    return [
        "--dataset=folder",
        f"--data_dir={root}",
        f"--model_dir={model_dir}",
        "--method=at",
        "--arch=resnet18",
        "--image_size=16",
        "--batch_size=4",
        "--epochs=1",
        "--attack_steps=1",
        "--attack_step=4/255",
        "--lr_decay_epochs=",
        "--max_train_examples=8",
        "--max_validation_examples=4",
        *extra,
    ]


def test_train_refuses_bad_folder_images_before_writing_anything(tmp_path, caplog):
    from binaries_testlib import run_binary, settings

    from twins_tf.training import loop

    root, model_dir = tmp_path / "images", tmp_path / "run"
    corrupt, truncated = _folder_with_bad_images(root)
    result = run_binary("train", _folder_train_args(root, model_dir), timeout=240)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(f"train: error: 2 image file(s) under {root} "), result.stderr
    assert str(corrupt) in lines[-1] and str(truncated) in lines[-1]
    assert "--skip_bad_images" in lines[-1]
    assert not model_dir.exists() or not any(model_dir.iterdir())
    with caplog.at_level("WARNING"):  # the flag reaches load_splits
        prepared = loop.prepare(
            settings("train", _folder_train_args(root, model_dir, "--skip_bad_images"))
        )
    assert "Skipped 2 image file(s)" in caplog.text
    counts = prepared.splits.num_examples  # the generated images, without the 2 bad ones
    assert (counts["train"] + counts["validation"], counts["test"]) == (30, 9)


def test_train_with_skip_bad_images_trains(tmp_path):
    from binaries_testlib import run_binary

    root, model_dir = tmp_path / "images", tmp_path / "run"
    _folder_with_bad_images(root)
    result = run_binary(
        "train", _folder_train_args(root, model_dir, "--skip_bad_images"), timeout=600
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Skipped 2 image file(s)" in result.stderr
    assert (model_dir / "best.weights.h5").exists() and (model_dir / "summary.json").exists()
