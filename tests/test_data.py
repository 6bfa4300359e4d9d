"""Tests of twins_tf.data: the registry, offline loading, splits, augmentation, pipelines.

References are independent of the code under test: tensorflow-datasets' own split arithmetic
and feature specs (through `tfds.testing.mock_data`), scikit-learn's digits, a numpy
re-implementation of PIL's antialiased bilinear resize (what torchvision's `Resize` applies to
PIL images) and of torchvision's `RandomResizedCrop` fallback window, and images written to
disk by the test itself.
"""

import os
import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from tfds_testlib import mocked_tfds, prepare_fake_tfds, split_infos

from twins_tf import data

TFDS_NAMES = [n for n, s in data.DATASETS.items() if s.source == data.TFDS]


# --- references --------------------------------------------------------------------------
def _pil_bilinear_weights(in_size, out_size):
    """PIL's ImagingResample coefficients for the bilinear (triangle) filter, as a matrix."""
    scale = in_size / out_size
    support_scale = max(scale, 1.0)
    weights = np.zeros((out_size, in_size))
    for i in range(out_size):
        centre = (i + 0.5) * scale
        low = max(int(centre - support_scale + 0.5), 0)
        high = min(int(centre + support_scale + 0.5), in_size)
        j = np.arange(low, high)
        w = np.maximum(0.0, 1.0 - np.abs((j + 0.5 - centre) / support_scale))
        weights[i, low:high] = w / w.sum()
    return weights


def _np_resize(image, out_h, out_w):
    rows = _pil_bilinear_weights(image.shape[0], out_h)
    cols = _pil_bilinear_weights(image.shape[1], out_w)
    return np.einsum("ih,hwc,jw->ijc", rows, image.astype(np.float64), cols, optimize=True)


def _np_resize_centre_crop(image, size):
    """torchvision Resize(round(size / 0.875)) + CenterCrop(size) on a float HWC image."""
    shorter = int(round(size / 0.875))
    h, w = image.shape[:2]
    if h <= w:
        new_h, new_w = shorter, int(shorter * w / h)
    else:
        new_h, new_w = int(shorter * h / w), shorter
    resized = _np_resize(image, new_h, new_w)
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    return resized[top : top + size, left : left + size]


def _np_fallback_window(height, width, ratio=(3 / 4, 4 / 3)):
    """torchvision RandomResizedCrop.get_params when no random draw fits: the centre crop."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


# --- tfds helpers ------------------------------------------------------------------------
def _load_mocked(name, root, num_examples, **spec_overrides):
    """load_splits under mock_data, recording the split strings passed to as_dataset."""
    with mocked_tfds(root, num_examples) as calls:
        spec = data.get_dataset_spec(name, **spec_overrides)
        splits = data.load_splits(spec, tfds_data_dir=str(root))
        batches = {
            "train": list(
                data.make_pipeline(splits.train, spec, training=True, batch_size=4, seed=1).take(3)
            ),
            "test": list(data.make_pipeline(splits.test, spec, training=False, batch_size=4)),
            "raw_test": list(splits.test),
        }
    return spec, splits, batches, calls


# --- registry (twins_tf.data.registry) ---------------------------------------------------
def test_registry_rows_are_complete():
    for name, spec in data.DATASETS.items():
        assert spec.name == name
        assert spec.preprocessing in data.PREPROCESSING_KINDS
        assert spec.source in (data.TFDS, data.FOLDER, data.SKLEARN_DIGITS)
        if spec.source == data.TFDS:
            assert spec.train_split and spec.validation_split and spec.test_split


@pytest.mark.parametrize("name", TFDS_NAMES)
def test_registry_matches_tfds_and_validation_never_touches_test(name, tmp_path):
    spec = data.DATASETS[name]
    builder = tfds.builder(spec.tfds_name, data_dir=str(tmp_path))  # offline: from code
    assert builder.info.features["label"].num_classes == spec.num_classes
    sizes = {"train": 1000, "validation": 300, "test": 500}

    def rows(split):
        instructions = tfds.core.ReadInstruction.from_spec(split).to_absolute(
            {k: s for k, s in zip(sizes, split_infos(sizes))}
        )
        return {
            (i.splitname, r)
            for i in instructions
            for r in range(i.from_ or 0, sizes[i.splitname] if i.to is None else i.to)
        }

    train, validation, test = (
        rows(spec.train_split),
        rows(spec.validation_split),
        rows(spec.test_split),
    )
    assert train and validation and test
    assert not train & validation and not train & test and not validation & test
    if spec.validation_split.startswith("train"):  # carved from train: together all of it
        assert train | validation == {("train", r) for r in range(sizes["train"])}


def test_unknown_dataset_and_alias():
    with pytest.raises(ValueError, match="Unknown dataset 'imagenet_a'.*cifar10"):
        data.get_dataset_spec("imagenet_a")
    assert data.get_dataset_spec("cub200").tfds_name == "caltech_birds2011"
    assert data.get_dataset_spec("stanford_dogs", image_size=64).image_size == 64
    assert data.get_dataset_spec("cifar10", upsample=2).upsample == 2
    with pytest.raises(ValueError, match="stored at 32 px"):
        data.get_dataset_spec("cifar10", image_size=64)


def test_missing_tfds_data_fails_at_once_with_instructions(tmp_path):
    other_version = tmp_path / "stanford_dogs" / "0.1.0"
    other_version.mkdir(parents=True)
    tfds.builder("stanford_dogs", data_dir=str(tmp_path))  # import and registry warm-up
    start = time.monotonic()
    with pytest.raises(data.DatasetNotFoundError) as raised:
        data.load_splits("stanford_dogs", tfds_data_dir=str(tmp_path))
    assert time.monotonic() - start < 2.0
    message = str(raised.value)
    assert "\n" not in message
    assert str(tmp_path / "stanford_dogs" / "0.2.0" / "dataset_info.json") in message
    assert "Found only 0.1.0" in message
    assert f"tfds build stanford_dogs --data_dir={tmp_path}" in message
    assert "images.tar" in message and "annotation.tar" in message and "lists.tar" in message
    assert str(tmp_path / "downloads" / "manual") in message


# --- tfds datasets through mock_data (twins_tf.data.tfds_source) -------------------------
def test_cifar10_mocked(tmp_path):
    prepare_fake_tfds("cifar10", tmp_path, {"train": 50000, "test": 10000})
    spec, splits, batches, calls = _load_mocked("cifar10", tmp_path, num_examples=10)
    assert calls == ["train[:90%]", "train[90%:]", "test"]
    assert splits.num_classes == 10 and len(splits.class_names) == 10
    assert splits.num_examples == {"train": 10, "validation": 10, "test": 10}
    for images, labels in batches["train"]:
        assert images.shape == (4, 32, 32, 3) and images.dtype == tf.float32
        assert labels.dtype == tf.int32
        assert 0.0 <= float(tf.reduce_min(images)) and float(tf.reduce_max(images)) <= 1.0
        assert np.all((labels.numpy() >= 0) & (labels.numpy() < 10))
    # Evaluation: no augmentation, the decoded PNG / 255, in order, last batch kept.
    assert [b[0].shape[0] for b in batches["test"]] == [4, 4, 2]
    images = np.concatenate([b[0].numpy() for b in batches["test"]])
    expected = np.stack([tf.io.decode_png(raw).numpy() for raw, _ in batches["raw_test"]])
    np.testing.assert_allclose(images, expected / 255.0, atol=1e-6)
    labels = np.concatenate([b[1].numpy() for b in batches["test"]])
    np.testing.assert_array_equal(labels, [int(l) for _, l in batches["raw_test"]])


def test_stanford_dogs_mocked(tmp_path):
    prepare_fake_tfds("stanford_dogs", tmp_path, {"train": 12000, "test": 8580})
    spec, splits, batches, calls = _load_mocked(
        "stanford_dogs", tmp_path, num_examples=6, image_size=40
    )
    assert calls == ["train[:90%]", "train[90%:]", "test"]
    assert splits.num_classes == 120 and len(splits.class_names) == 120
    for images, labels in batches["train"]:
        assert images.shape == (4, 40, 40, 3) and images.dtype == tf.float32
        assert 0.0 <= float(tf.reduce_min(images)) and float(tf.reduce_max(images)) <= 1.0
        assert np.all(labels.numpy() < 120)
    assert [b[0].shape for b in batches["test"]] == [(4, 40, 40, 3), (2, 40, 40, 3)]
    # Mocked images have random sizes (5-49 px): the test transform is torchvision's
    # Resize(round(40 / 0.875)) + CenterCrop(40).
    images = np.concatenate([b[0].numpy() for b in batches["test"]])
    for image, (raw, _) in zip(images, batches["raw_test"]):
        decoded = tf.io.decode_jpeg(raw, channels=3).numpy() / 255.0
        np.testing.assert_allclose(image, _np_resize_centre_crop(decoded, 40), atol=2e-5)


# --- image folders (twins_tf.data.folder_source) -----------------------------------------
CLASS_GREY = {"cat": 40, "dog": 120, "emu": 200}


def _write_class_images(folder, count, start=0, sizes=((20, 30), (30, 22))):
    """PNGs of a constant class grey with the image number in pixel (0, 0), channel 0."""
    for name, grey in CLASS_GREY.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for k in range(start, start + count):
            h, w = sizes[k % len(sizes)]
            image = np.full((h, w, 3), grey, np.uint8)
            image[0, 0, 0] = k
            (folder / name / f"{k:03d}.png").write_bytes(tf.io.encode_png(image).numpy())
        (folder / name / "notes.txt").write_text("not an image")


def _identities(split):
    """{(class grey, image number)} of a raw folder split, checking labels match the grey."""
    found = set()
    for raw, label in split:
        image = tf.io.decode_png(raw).numpy()
        grey = int(image[1, 1, 0])
        assert sorted(CLASS_GREY.values())[int(label)] == grey
        found.add((grey, int(image[0, 0, 0])))
    return found


def test_folder_dataset_train_test_subfolders(tmp_path):
    _write_class_images(tmp_path / "train", 10)
    _write_class_images(tmp_path / "test", 4, start=100)
    spec = data.get_dataset_spec("folder", image_size=16)
    splits = data.load_splits(spec, data_dir=str(tmp_path))
    assert splits.class_names == ("cat", "dog", "emu") and splits.num_classes == 3
    assert splits.num_examples == {"train": 27, "validation": 3, "test": 12}
    train, validation = _identities(splits.train), _identities(splits.validation)
    test = _identities(splits.test)
    assert not train & validation
    assert train | validation == {(g, k) for g in CLASS_GREY.values() for k in range(10)}
    assert {g for g, _ in validation} == set(CLASS_GREY.values())  # 10% of every class
    assert test == {(g, k) for g in CLASS_GREY.values() for k in range(100, 104)}
    batches = list(data.make_pipeline(splits.test, spec, training=False, batch_size=5))
    images = np.concatenate([b[0].numpy() for b in batches])
    labels = np.concatenate([b[1].numpy() for b in batches])
    assert images.shape == (12, 16, 16, 3)
    greys = np.array(sorted(CLASS_GREY.values()))[labels] / 255.0
    np.testing.assert_allclose(
        images[:, 4:, 4:, :],
        np.broadcast_to(greys[:, None, None, None], (12, 12, 12, 3)),
        atol=1e-5,
    )


def test_folder_dataset_seeded_per_class_split(tmp_path):
    _write_class_images(tmp_path, 14)
    first = data.load_splits("folder", data_dir=str(tmp_path), train_per_class=10)
    again = data.load_splits("folder", data_dir=str(tmp_path), train_per_class=10)
    assert first.num_examples == {"train": 27, "validation": 3, "test": 12}
    sets = [
        (_identities(s.train), _identities(s.validation), _identities(s.test))
        for s in (first, again)
    ]
    assert sets[0] == sets[1]  # seeded: the same split every time
    train, validation, test = sets[0]
    assert not (train & test) and not (validation & test) and not (train & validation)
    assert train | validation | test == {(g, k) for g in CLASS_GREY.values() for k in range(14)}
    for grey in CLASS_GREY.values():
        assert sum(g == grey for g, _ in test) == 4
    with pytest.raises(ValueError, match="expects 257 class folders"):
        data.load_splits("caltech256", data_dir=str(tmp_path))


def test_folder_dataset_errors(tmp_path):
    with pytest.raises(ValueError, match="needs --data_dir"):
        data.load_splits("folder")
    with pytest.raises(data.DatasetNotFoundError, match="does not exist"):
        data.load_splits("folder", data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(data.DatasetNotFoundError, match="256_ObjectCategories"):
        data.load_splits("caltech256", data_dir=str(tmp_path / "nowhere"))
    _write_class_images(tmp_path, 3)
    with pytest.raises(ValueError, match="train/ and test/"):
        data.load_splits("folder", data_dir=str(tmp_path))


# --- digits (twins_tf.data.digits_source) ------------------------------------------------
def test_digits_classes_and_splits():
    from sklearn.datasets import load_digits

    digits = load_digits()
    originals = {}
    for image, target in zip(digits.images, digits.target):
        originals.setdefault((image / 16.0).astype(np.float32).tobytes(), set()).add(target)
    spec = data.get_dataset_spec("digits_5_9", image_size=8)
    splits = data.load_splits(spec)
    assert splits.num_classes == 5 and splits.class_names == ("5", "6", "7", "8", "9")
    total = int(np.isin(digits.target, range(5, 10)).sum())
    assert sum(splits.num_examples.values()) == total
    seen = []
    for name in ("train", "validation", "test"):
        split = list(splits.split(name))
        assert len(split) == splits.num_examples[name]
        for image, label in split:
            image = image.numpy()
            np.testing.assert_array_equal(image[..., 0], image[..., 2])
            assert int(label) + 5 in originals[image[..., 0].tobytes()]
            seen.append(image[..., 0].tobytes())
    assert len(seen) == len(set(seen)) == total  # every image in exactly one split
    counts = splits.num_examples
    assert abs(counts["test"] / total - 0.2) < 0.01
    assert abs(counts["validation"] / total - 0.1) < 0.01
    full = data.load_splits("digits")
    assert sum(full.num_examples.values()) == len(digits.target) == 1797
    chosen = data.load_splits(data.get_dataset_spec("digits", classes=(7, 1), image_size=8))
    for image, label in chosen.test:
        assert (7, 1)[int(label)] in originals[image.numpy()[..., 0].tobytes()]
    assert sum(chosen.num_examples.values()) == int(np.isin(digits.target, (1, 7)).sum())
    with pytest.raises(ValueError, match="distinct digits 0-9"):
        data.get_dataset_spec("digits", classes=(3, 3))
    with pytest.raises(ValueError, match="classes= selects digits"):
        data.get_dataset_spec("cifar10", classes=(1, 2))


def test_digits_resize_matches_bilinear_reference():
    images, labels, targets = data.digits_arrays((0, 1, 2), 32)
    from sklearn.datasets import load_digits

    digits = load_digits()
    keep = np.isin(digits.target, (0, 1, 2))
    np.testing.assert_array_equal(targets, digits.target[keep])
    np.testing.assert_array_equal(labels, digits.target[keep])
    expected = _np_resize(digits.images[keep][0][..., None] / 16.0, 32, 32)[..., 0]
    np.testing.assert_allclose(images[0, ..., 1], expected, atol=1e-5)
    assert images.shape == (int(keep.sum()), 32, 32, 3) and images.dtype == np.float32


# --- augmentation (twins_tf.data.augmentation) -------------------------------------------
@pytest.mark.parametrize("shape", [(300, 400), (401, 257), (224, 224), (90, 120)])
def test_evaluation_transform_is_torchvision_resize_and_centre_crop(shape):
    rng = np.random.default_rng(0)
    image = rng.random((*shape, 3)).astype(np.float32)
    spec = data.get_dataset_spec("stanford_dogs")
    out = data.evaluation_transform(tf.constant(image), spec).numpy()
    np.testing.assert_allclose(out, _np_resize_centre_crop(image, 224), atol=5e-5)


@pytest.mark.parametrize("shape", [(10, 400), (400, 10)])
def test_random_resized_crop_falls_back_to_torchvision_centre_window(shape):
    for s in range(5):
        window = data.random_resized_crop_window(*shape, tf.constant([s, 1]))
        assert tuple(int(v) for v in window) == _np_fallback_window(*shape)


def _np_torchvision_window(height, width, rng, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision RandomResizedCrop.get_params, with numpy's random numbers."""
    area = height * width
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
        w = int(round(np.sqrt(target_area * aspect)))
        h = int(round(np.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.integers(0, height - h + 1), rng.integers(0, width - w + 1), h, w
    return _np_fallback_window(height, width, ratio)


def test_random_resized_crop_windows_match_torchvision_distribution():
    from scipy import stats

    height, width, n = 120, 200, 4000
    windows = (
        tf.data.Dataset.range(n)
        .map(
            lambda i: tf.stack(
                data.random_resized_crop_window(
                    height, width, tf.stack([tf.constant(7, tf.int64), i])
                )
            )
        )
        .batch(n)
        .get_single_element()
        .numpy()
    )
    top, left, h, w = windows.T
    assert np.all(top >= 0) and np.all(left >= 0)
    assert np.all(top + h <= height) and np.all(left + w <= width)
    assert len(set(zip(top, left))) > n // 4  # placed at random
    rng = np.random.default_rng(0)
    reference = np.array([_np_torchvision_window(height, width, rng) for _ in range(n)])
    for ours, theirs in (
        (w * h, reference[:, 3] * reference[:, 2]),  # area
        (np.log(w / h), np.log(reference[:, 3] / reference[:, 2])),
        (
            top / np.maximum(height - h, 1),
            reference[:, 0] / np.maximum(height - reference[:, 2], 1),
        ),
    ):
        assert stats.ks_2samp(ours, theirs).pvalue > 1e-3


def test_random_resized_crop_is_window_then_antialiased_resize():
    image = np.random.default_rng(1).random((60, 90, 3)).astype(np.float32)
    for s in range(4):
        seed = tf.constant([3, s])
        top, left, h, w = (int(v) for v in data.random_resized_crop_window(60, 90, seed))
        out = data.random_resized_crop(tf.constant(image), 32, seed).numpy()
        expected = _np_resize(image[top : top + h, left : left + w], 32, 32)
        np.testing.assert_allclose(out, expected, atol=2e-5)


def _match_window(out, padded, size):
    for dy in range(padded.shape[0] - size + 1):
        for dx in range(padded.shape[1] - size + 1):
            window = padded[dy : dy + size, dx : dx + size]
            if np.array_equal(out, window):
                return dy, dx, False
            if np.array_equal(out, window[:, ::-1]):
                return dy, dx, True
    raise AssertionError("output is no (flipped) window of the padded image")


@pytest.mark.parametrize("name, padding, flips", [("cifar10", 4, True), ("digits", 2, False)])
def test_pad_crop_flip_against_numpy(name, padding, flips):
    spec = data.get_dataset_spec(name, image_size=16 if name == "digits" else None)
    size = spec.image_size
    image = (np.arange(size * size * 3, dtype=np.float32).reshape(size, size, 3) + 1) / (
        size * size * 3
    )
    padded = np.pad(image, [(padding, padding), (padding, padding), (0, 0)])
    found = [
        _match_window(
            data.augment(tf.constant(image), spec, tf.constant([5, s])).numpy(), padded, size
        )
        for s in range(150)
    ]
    offsets = np.array([(dy, dx) for dy, dx, _ in found])
    assert set(offsets[:, 0]) == set(range(2 * padding + 1)) == set(offsets[:, 1])
    flipped = np.mean([f for _, _, f in found])
    if flips:
        assert 0.3 < flipped < 0.7
    else:
        assert flipped == 0.0


# --- pipelines (twins_tf.data.pipeline) --------------------------------------------------
def _indexed_dataset(n, size=16):
    images = np.random.default_rng(0).random((n, size, size, 3)).astype(np.float32)
    return tf.data.Dataset.from_tensor_slices((images, np.arange(n, dtype=np.int32)))


def test_training_pipeline_epochs_drop_remainder_and_resume():
    spec = data.get_dataset_spec("digits", image_size=16)
    ds = _indexed_dataset(10)
    assert data.steps_per_epoch(10, 4) == 2

    def stream(seed, start_epoch, batches):
        pipeline = data.make_pipeline(
            ds, spec, training=True, batch_size=4, seed=seed, start_epoch=start_epoch
        )
        return [(x.numpy(), y.numpy()) for x, y in pipeline.take(batches)]

    run = stream(seed=3, start_epoch=0, batches=6)
    assert all(x.shape == (4, 16, 16, 3) and y.shape == (4,) for x, y in run)
    epochs = [np.concatenate([run[2 * e][1], run[2 * e + 1][1]]) for e in range(3)]
    for labels in epochs:
        assert len(set(labels)) == 8  # 8 distinct examples, the 2 left over dropped
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled every epoch
    resumed = stream(seed=3, start_epoch=1, batches=4)
    for (x, y), (rx, ry) in zip(run[2:], resumed):
        np.testing.assert_array_equal(y, ry)
        np.testing.assert_array_equal(x, rx)
    other_seed = stream(seed=4, start_epoch=0, batches=2)
    assert not np.array_equal(np.concatenate([b[1] for b in other_seed]), epochs[0])


def test_evaluation_pipeline_keeps_order_and_last_batch():
    spec = data.get_dataset_spec("digits", image_size=16)
    ds = _indexed_dataset(10)
    batches = list(data.make_pipeline(ds, spec, training=False, batch_size=4))
    assert [b[1].numpy().tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    expected = np.stack([x.numpy() for x, _ in ds])
    np.testing.assert_array_equal(np.concatenate([b[0].numpy() for b in batches]), expected)


def test_check_batch_size():
    data.check_batch_size(128, 1, twin=True)
    data.check_batch_size(128, 2, twin=True)
    data.check_batch_size(6, 2, twin=False)
    with pytest.raises(ValueError, match="multiple of 2 x 2 replica"):
        data.check_batch_size(6, 2, twin=True)
    with pytest.raises(ValueError, match="multiple of 2 x 1 replica"):
        data.check_batch_size(7, 1, twin=True)
    with pytest.raises(ValueError, match="multiple of the 4 replicas"):
        data.check_batch_size(6, 4, twin=False)
    with pytest.raises(ValueError, match="fewer than one batch"):
        data.steps_per_epoch(3, 4)


# --- flagfiles ---------------------------------------------------------------------------
# Spec §6's table: dataset -> (lr, weight decay, lambda_twins); CIFAR at 32 px upsampled x7.
SPEC_SETTINGS = {
    "cifar10": (0.003, 1e-5, 1.0),
    "cifar100": (0.003, 1e-5, 1.0),
    "caltech256": (0.003, 1e-3, 0.4),
    "caltech_birds2011": (0.003, 1e-3, 0.4),
    "stanford_dogs": (0.003, 1e-3, 0.4),
}
FLAGS_DIR = os.path.join(os.path.dirname(__file__), os.pardir, "flags")


def test_flagfiles_parse_with_the_train_flags_and_follow_the_spec():
    from absl import flags

    from twins_tf.training import flags as run_flags

    files = sorted(f for f in os.listdir(FLAGS_DIR) if f.endswith(".flags"))
    datasets = set()
    for name in files:
        values = flags.FlagValues()
        run_flags.define_flags(values, "train")
        values(["train", f"--flagfile={os.path.join(FLAGS_DIR, name)}"])
        spec = data.get_dataset_spec(values.dataset)
        datasets.add(spec.name)
        assert (values.image_size, values.upsample) == (spec.image_size, spec.upsample), name
        assert values.epochs == 60 and values.batch_size == 128, name
        assert [int(e) for e in values.lr_decay_epochs] == [30, 50], name
        assert values.attack_eps == pytest.approx(8 / 255) and values.attack_steps == 10, name
        assert values.attack_step == pytest.approx(2 / 255) and values.beta == 6.0, name
        if spec.name in SPEC_SETTINGS:
            assert (values.lr, values.weight_decay, values.lambda_twins) == pytest.approx(
                SPEC_SETTINGS[spec.name]
            ), name
    assert set(SPEC_SETTINGS) <= datasets
    assert datasets == {
        n for n, s in data.DATASETS.items() if s.source == data.TFDS or n == "caltech256"
    }


@pytest.mark.parametrize("global_seed", [0, 5, None])
def test_training_order_ignores_the_global_seed(global_seed):
    """The training order is a function of the pipeline's seed only; a global seed of 0 (what
    `keras.utils.set_random_seed(0)` sets) once crashed `ds.shuffle` with a tensor seed."""
    spec = data.get_dataset_spec("digits", image_size=16)
    ds = _indexed_dataset(12)

    def labels():
        pipeline = data.make_pipeline(
            ds, spec, training=True, batch_size=4, seed=3, shuffle_buffer=5
        )
        return np.concatenate([y.numpy() for _, y in pipeline.take(6)])

    tf.random.set_seed(7)
    expected = labels()
    tf.random.set_seed(global_seed)
    try:
        got = labels()
    finally:
        tf.random.set_seed(None)
    np.testing.assert_array_equal(got, expected)
    for epoch in (expected[:12], expected[12:]):
        assert sorted(epoch) == list(range(12))  # a permutation of the 12 examples per epoch
    assert not np.array_equal(expected[:12], expected[12:])


def test_stateless_shuffle_of_variable_size_images():
    images = [np.full((h, 3, 3), h, np.uint8) for h in (2, 3, 4, 5)]
    ds = tf.data.Dataset.from_generator(
        lambda: ((image, np.int32(image[0, 0, 0])) for image in images),
        output_signature=(tf.TensorSpec((None, 3, 3), tf.uint8), tf.TensorSpec((), tf.int32)),
    )
    orders = []
    for window in (4, 3, 1):  # one pass, two passes, four passes
        out = list(data.stateless_shuffle(ds, seed=1, epoch=0, num_examples=4, window=window))
        orders.append([int(y) for _, y in out])
        assert sorted(orders[-1]) == [2, 3, 4, 5]
        for image, label in out:
            assert isinstance(image, tf.Tensor) and image.shape == (int(label), 3, 3)
    assert orders[0] == orders[1] == orders[2]  # the window sets memory, not the order


# --- whole-split training order (twins_tf.data.ordering) -----------------------------------
CHI2_CRITICAL = {2: 13.816, 11: 31.264, 143: 194.7}  # chi-square quantiles at p = 0.999 (scipy)


def _chi_square(observed, expected):
    observed, expected = np.asarray(observed, float), np.asarray(expected, float)
    return float(((observed - expected) ** 2 / expected).sum())


def _class_sorted(kind, per_class=200, classes=3, size=8):
    """A split sorted by class (class 0 first, ...) as a dataset (tfds path) or `Rows`."""
    labels = np.repeat(np.arange(classes, dtype=np.int32), per_class)
    images = np.zeros((len(labels), size, size, 3), np.float32)
    if kind == "rows":
        return data.Rows(keys=images, labels=labels, paths=False)
    return tf.data.Dataset.from_tensor_slices((images, labels))


@pytest.mark.parametrize("kind", ["dataset", "rows"])
def test_first_batches_of_a_class_sorted_split_mix_all_classes(kind):
    """The first 3 batches of every epoch hold each of 3 classes about equally often (chi-square
    against uniform), although the shuffle window (64) is far smaller than the split (600): a
    windowed shuffle starts every epoch with class 0 only."""
    spec = data.get_dataset_spec("digits", image_size=8)
    pipeline = data.make_pipeline(
        _class_sorted(kind), spec, training=True, batch_size=30, seed=2, shuffle_buffer=64
    )
    batches = [y.numpy() for _, y in pipeline.take(60)]  # 3 epochs of 20 batches
    for epoch in range(3):
        first = np.concatenate(batches[20 * epoch : 20 * epoch + 3])
        assert len(set(batches[20 * epoch])) == 3
        counts = np.bincount(first, minlength=3)
        assert _chi_square(counts, [30, 30, 30]) < CHI2_CRITICAL[2], counts
        whole = np.concatenate(batches[20 * epoch : 20 * epoch + 20])
        assert np.array_equal(np.bincount(whole), [200, 200, 200])  # every example once


def test_epoch_order_is_uniform_over_the_whole_split():
    """Over 1,200 epochs each of 12 elements lands in each of the 12 places about 100 times
    (chi-square, 143 degrees of freedom); a shuffle window of 5 would keep element 0 in the
    first 5 places.  The dataset path (3 passes of window 5) and the Rows path give these
    orders."""
    n, epochs, window = 12, 1200, 5
    orders = np.stack([data.epoch_permutation(9, e, n).numpy() for e in range(epochs)])
    images = np.zeros((n, 2, 2, 3), np.float32)
    ds = tf.data.Dataset.from_tensor_slices((images, np.arange(n, dtype=np.int32)))
    rows = data.Rows(keys=images, labels=np.arange(n, dtype=np.int32), paths=False)
    streamed = tf.data.Dataset.range(4).flat_map(
        lambda e: data.stateless_shuffle(ds, 9, e, n, window)
    )
    gathered = tf.data.Dataset.range(4).flat_map(
        lambda e: rows.dataset(order=data.epoch_permutation(9, e, n))
    )
    for got in (streamed, gathered):
        np.testing.assert_array_equal(np.array([int(y) for _, y in got]), orders[:4].ravel())
    counts = np.zeros((n, n))
    for order in orders:
        assert sorted(order) == list(range(n))
        counts[order, np.arange(n)] += 1  # counts[element, place]
    statistic = _chi_square(counts[:, :-1], np.full((n, n - 1), epochs / n))
    assert statistic < CHI2_CRITICAL[143], statistic
    assert counts[0, window:].sum() > 0.5 * epochs  # element 0 mostly beyond the first window


def test_folder_training_order_mixes_classes_and_resumes(tmp_path):
    """A folder split (class after class on disk) trains in a whole-split permutation of its
    file paths, equal on resume (start_epoch) to the uninterrupted stream."""
    _write_class_images(tmp_path / "train", 20)
    _write_class_images(tmp_path / "test", 2, start=100)
    spec = data.get_dataset_spec("folder", image_size=8)
    splits = data.load_splits(spec, data_dir=str(tmp_path), validation="none")
    assert isinstance(splits.source("train"), data.Rows)

    def stream(start_epoch, batches):
        pipeline = data.make_pipeline(
            splits.source("train"),
            spec,
            training=True,
            batch_size=6,
            seed=4,
            start_epoch=start_epoch,
            shuffle_buffer=5,
        )
        return [(x.numpy(), y.numpy()) for x, y in pipeline.take(batches)]

    run = stream(0, 20)  # 2 epochs of 10 batches
    assert all(len(set(y)) >= 2 for _, y in run[:1] + run[10:11])
    for x, y in run:
        greys = np.array(sorted(CLASS_GREY.values()))[y] / 255.0
        np.testing.assert_allclose(x[:, 4, 4, 0], greys, atol=1e-5)  # labels follow images
    for (x, y), (rx, ry) in zip(run[10:], stream(1, 10)):
        np.testing.assert_array_equal(y, ry)
        np.testing.assert_array_equal(x, rx)


# --- class-stratified subsets (twins_tf.data.ordering) -------------------------------------
def test_stratified_indices_follow_the_class_shares():
    labels = np.repeat([3, 0, 1, 2], [100, 50, 25, 25])  # 200 examples, sorted by class
    chosen = data.stratified_indices(labels, 40)
    np.testing.assert_array_equal(np.bincount(labels[chosen]), [10, 5, 5, 20])  # 40 * shares
    assert len(set(chosen)) == 40 and np.all(np.diff(chosen) > 0)
    np.testing.assert_array_equal(chosen, data.stratified_indices(labels, 40))  # seeded
    rng = np.random.default_rng(1)
    for _ in range(20):
        labels = rng.integers(0, 7, rng.integers(30, 300))
        count = int(rng.integers(1, len(labels)))
        chosen = data.stratified_indices(labels, count)
        assert len(set(chosen)) == count
        sizes = np.bincount(labels, minlength=7)
        got = np.bincount(labels[chosen], minlength=7)
        assert np.all(np.abs(got - count * sizes / len(labels)) < 1), (got, sizes, count)
    np.testing.assert_array_equal(data.stratified_indices(labels, 10_000), np.arange(len(labels)))


@pytest.mark.parametrize("kind", ["dataset", "rows"])
def test_stratified_subset_of_a_class_sorted_split(kind):
    subset = data.stratified_subset(_class_sorted(kind, per_class=20), 9)
    labels = subset.labels if kind == "rows" else np.array([int(label) for _, label in subset])
    np.testing.assert_array_equal(np.bincount(labels), [3, 3, 3])  # not the first 9 (class 0)
    if kind == "dataset":
        assert int(subset.cardinality()) == 9
    whole = _class_sorted(kind)
    assert data.stratified_subset(whole, None) is whole


# --- validation protocols (twins_tf.data.loading) ------------------------------------------
def test_validation_none_trains_on_the_whole_official_train_split(tmp_path):
    _write_class_images(tmp_path / "train", 10)
    _write_class_images(tmp_path / "test", 4, start=100)
    carve = data.load_splits("folder", data_dir=str(tmp_path))
    none = data.load_splits("folder", data_dir=str(tmp_path), validation="none")
    assert none.validation is None and none.num_examples == {
        "train": 30,
        "validation": 0,
        "test": 12,
    }
    assert _identities(none.train) == _identities(carve.train) | _identities(carve.validation)
    assert _identities(none.test) == _identities(carve.test)
    with pytest.raises(ValueError, match="without a validation split"):
        none.source("validation")
    digits = data.load_splits("digits_0_4", validation="none")
    carved = data.load_splits("digits_0_4")
    assert (
        digits.num_examples["train"]
        == carved.num_examples["train"] + carved.num_examples["validation"]
        and digits.num_examples["test"] == carved.num_examples["test"]
    )
    with pytest.raises(ValueError, match="choose one of carve, none"):
        data.load_splits("digits", validation="test")


@pytest.mark.parametrize("name", ["cifar10", "oxford_flowers102"])
def test_validation_none_reads_the_official_tfds_train_split(name, tmp_path):
    prepare_fake_tfds(name, tmp_path, {"train": 1000, "validation": 100, "test": 500})
    with mocked_tfds(tmp_path, num_examples=7) as calls:
        splits = data.load_splits(name, tfds_data_dir=str(tmp_path), validation="none")
        official = len(list(tfds.builder(name, data_dir=str(tmp_path)).as_dataset("train")))
    assert calls == ["train", "test", "train"]
    assert splits.validation is None and splits.num_examples["validation"] == 0
    assert splits.num_examples["train"] == official == 7


# --- unreadable folder images (twins_tf.data.image_checks) ---------------------------------
def _image_files(folder):
    """Good and bad image files; returns {name: decodes with tf.io.decode_image}."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    image = np.random.default_rng(0).integers(0, 255, (20, 30, 3), np.uint8)
    png, jpeg = tf.io.encode_png(image).numpy(), tf.io.encode_jpeg(image).numpy()
    files = {
        "good.png": png,
        "good.jpg": jpeg,
        "png_named.jpg": png,
        "truncated.png": png[: len(png) // 2],
        "truncated.jpg": jpeg[: len(jpeg) - 40],
        "corrupt.jpg": b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4,
        "text.png": b"not an image at all",
        "empty.jpeg": b"",
    }
    for name, content in files.items():
        (folder / name).write_bytes(content)
    Image.fromarray(image).save(folder / "good.gif")
    Image.fromarray(image).save(folder / "good.bmp")
    (folder / "truncated.gif").write_bytes((folder / "good.gif").read_bytes()[:60])
    decodes = {}
    for path in sorted(folder.iterdir()):
        try:
            tf.io.decode_image(tf.io.read_file(str(path)), channels=3, expand_animations=False)
            decodes[path.name] = True
        except tf.errors.InvalidArgumentError:
            decodes[path.name] = False
    return decodes


def test_find_bad_images_agrees_with_a_full_decode(tmp_path):
    decodes = _image_files(tmp_path)
    assert sum(decodes.values()) == 5 and len(decodes) == 11  # the reference sees 6 bad ones
    bad = data.find_bad_images([str(tmp_path / name) for name in sorted(decodes)])
    assert sorted(os.path.basename(p) for p in bad) == sorted(
        n for n, ok in decodes.items() if not ok
    )
    assert data.find_bad_images([str(tmp_path / "missing.png")]) == [str(tmp_path / "missing.png")]


def test_bad_folder_images_are_listed_or_skipped(tmp_path, caplog):
    _write_class_images(tmp_path / "train", 4)
    _write_class_images(tmp_path / "test", 2, start=100)
    for k in range(12):
        (tmp_path / "train" / "dog" / f"bad{k:02d}.jpg").write_bytes(b"\xff\xd8\xffnope")
    (tmp_path / "test" / "emu" / "cut.png").write_bytes(
        (tmp_path / "test" / "emu" / "100.png").read_bytes()[:30]
    )
    with pytest.raises(data.BadImagesError) as raised:
        data.load_splits("folder", data_dir=str(tmp_path))
    message = str(raised.value)
    assert "\n" not in message and message.startswith(f"13 image file(s) under {tmp_path} ")
    # The first 10 in path order: test/emu/cut.png, then train/dog/bad00.jpg ... bad08.jpg.
    assert str(tmp_path / "test" / "emu" / "cut.png") in message
    assert all(str(tmp_path / "train" / "dog" / f"bad{k:02d}.jpg") in message for k in range(9))
    assert "bad09.jpg" not in message and message.endswith(
        "; delete or replace them, or pass --skip_bad_images to leave them out."
    )
    with caplog.at_level("WARNING"):
        splits = data.load_splits("folder", data_dir=str(tmp_path), skip_bad_images=True)
    assert "Skipped 13 image file(s)" in caplog.text
    assert splits.num_examples["train"] + splits.num_examples["validation"] == 12
    assert splits.num_examples["test"] == 6
    for path in (tmp_path / "train" / "cat").glob("*.png"):
        path.write_bytes(b"no longer a PNG")
    with pytest.raises(data.BadImagesError, match="hold no good image"):
        data.load_splits("folder", data_dir=str(tmp_path), skip_bad_images=True)


# --- the package's public names ----------------------------------------------------------
# Every public name of the single-module twins_tf/data.py before the split into a package,
# written out by hand: callers use them as twins_tf.data.X and must keep working.
PUBLIC_NAMES_BEFORE_THE_SPLIT = (
    "ALIASES",
    "BadImagesError",
    "CENTRE_CROP_FRACTION",
    "CIFAR",
    "CIFAR_PADDING",
    "DATASETS",
    "DIGITS",
    "DatasetNotFoundError",
    "DatasetSpec",
    "DatasetSplits",
    "FOLDER",
    "IMAGENET",
    "IMAGE_EXTENSIONS",
    "PREPROCESSING_KINDS",
    "RANDOM_RESIZED_CROP_RATIO",
    "RANDOM_RESIZED_CROP_SCALE",
    "Rows",
    "SKLEARN_DIGITS",
    "SPLIT_SEED",
    "TFDS",
    "VALIDATION_PROTOCOLS",
    "augment",
    "centre_crop",
    "check_batch_size",
    "default_tfds_data_dir",
    "digits_arrays",
    "epoch_permutation",
    "evaluation_transform",
    "find_bad_images",
    "get_dataset_spec",
    "load_splits",
    "make_pipeline",
    "official_train_split",
    "pad_and_random_crop",
    "random_resized_crop",
    "random_resized_crop_window",
    "resize_shorter_side",
    "stateless_shuffle",
    "steps_per_epoch",
    "stratified_indices",
    "stratified_subset",
    "tfds_builder",
    "to_float_image",
)


def test_every_old_public_name_is_still_in_twins_tf_data():
    missing = [name for name in PUBLIC_NAMES_BEFORE_THE_SPLIT if not hasattr(data, name)]
    assert not missing
    assert sorted(data.__all__) == sorted(PUBLIC_NAMES_BEFORE_THE_SPLIT)
    # Each is the object its home module defines, not a copy that could drift.
    for name in PUBLIC_NAMES_BEFORE_THE_SPLIT:
        value = getattr(data, name)
        if callable(value) and hasattr(value, "__module__"):
            assert value.__module__.startswith("twins_tf.data."), name
