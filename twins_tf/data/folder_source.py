"""Image-folder datasets: class folders, split into train / validation / test by seeded draws.

A folder holds `train/` and `test/` of class folders, or one level of class folders split by
a seeded number of training images per class (Caltech-256: 60).  Its splits are `Rows` of file
paths; images are checked first (`twins_tf.data.image_checks`).
"""

import os

import numpy as np
import tensorflow as tf

from twins_tf.data.image_checks import checked_images
from twins_tf.data.registry import SPLIT_SEED, DatasetNotFoundError
from twins_tf.data.splits import Rows, splits_from_rows

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


def _list_class_folders(root):
    return sorted(
        entry.rstrip("/")
        for entry in tf.io.gfile.listdir(root)
        if tf.io.gfile.isdir(os.path.join(root, entry))
    )


def _list_images(folder):
    return sorted(
        os.path.join(folder, f)
        for f in tf.io.gfile.listdir(folder)
        if f.lower().endswith(IMAGE_EXTENSIONS)
    )


def _scan_folder(root):
    """{class name: sorted image paths} for every class folder of `root`."""
    classes = _list_class_folders(root)
    if not classes:
        raise ValueError(f"{root} holds no class folders (expected {root}/<class>/<image>).")
    found = {c: _list_images(os.path.join(root, c)) for c in classes}
    empty = [c for c, files in found.items() if not files]
    if empty:
        raise ValueError(
            f"{root}: class folder(s) without images ({', '.join(empty[:5])}); "
            f"images must end in one of {', '.join(IMAGE_EXTENSIONS)}."
        )
    return found


def _seeded_permutations(files_by_class):
    rng = np.random.default_rng(SPLIT_SEED)
    return {
        c: [files[i] for i in rng.permutation(len(files))] for c, files in files_by_class.items()
    }


def _hold_out(files_by_class, fraction):
    """Splits each class's (seeded-shuffled) files into (kept, held out): the last share."""
    kept, held = {}, {}
    for c, files in _seeded_permutations(files_by_class).items():
        n_held = int(round(len(files) * fraction))
        if n_held >= len(files):
            raise ValueError(
                f"class {c!r} has {len(files)} training images, too few to hold "
                f"out {fraction:.0%} for validation."
            )
        kept[c], held[c] = files[: len(files) - n_held], files[len(files) - n_held :]
    return kept, held


def _folder_rows(files_by_class, class_index):
    paths, labels = [], []
    for c, files in files_by_class.items():
        paths.extend(files)
        labels.extend([class_index[c]] * len(files))
    return Rows(keys=np.array(paths, dtype=object), labels=np.array(labels, np.int32), paths=True)


def _check_class_count(spec, files_by_class, folder):
    if spec.num_classes is not None and len(files_by_class) != spec.num_classes:
        raise ValueError(
            f"{spec.name} expects {spec.num_classes} class folders, {folder} "
            f"has {len(files_by_class)}."
        )


def load_folder(spec, data_dir, train_per_class, carve, skip_bad_images):
    if not data_dir:
        raise ValueError(f"--dataset={spec.name} needs --data_dir ({spec.description}).")
    if not tf.io.gfile.isdir(data_dir):
        hint = (
            " Download 256_ObjectCategories.tar from https://data.caltech.edu/records/"
            "nyv15-4j048 and extract it; pass the extracted folder."
            if spec.name == "caltech256"
            else ""
        )
        raise DatasetNotFoundError(
            f"--data_dir={data_dir} does not exist ({spec.name}: {spec.description}).{hint}"
        )
    train_dir, test_dir = os.path.join(data_dir, "train"), os.path.join(data_dir, "test")
    if tf.io.gfile.isdir(train_dir) and tf.io.gfile.isdir(test_dir):
        train_files, test_files = checked_images(
            data_dir, (_scan_folder(train_dir), _scan_folder(test_dir)), skip_bad_images
        )
        _check_class_count(spec, train_files, train_dir)
        unknown = sorted(set(test_files) - set(train_files))
        if unknown:
            raise ValueError(
                f"{test_dir} has classes that {train_dir} lacks: {', '.join(unknown[:5])}."
            )
    elif train_per_class:
        (all_files,) = checked_images(data_dir, (_scan_folder(data_dir),), skip_bad_images)
        _check_class_count(spec, all_files, data_dir)
        short = [c for c, f in all_files.items() if len(f) <= train_per_class]
        if short:
            raise ValueError(
                f"{data_dir}: class(es) {', '.join(short[:5])} have at most "
                f"{train_per_class} images, none left for the test set."
            )
        shuffled = _seeded_permutations(all_files)
        train_files = {c: f[:train_per_class] for c, f in shuffled.items()}
        test_files = {c: f[train_per_class:] for c, f in shuffled.items()}
    else:
        raise ValueError(
            f"{data_dir} must hold train/ and test/ subfolders of class folders "
            f"(or pass train_per_class to split one folder of class folders)."
        )
    classes = tuple(sorted(train_files))
    class_index = {c: i for i, c in enumerate(classes)}
    files = {"train": train_files, "test": test_files}
    if carve:
        files["train"], files["validation"] = _hold_out(train_files, spec.validation_fraction)
    rows = {key: _folder_rows(split_files, class_index) for key, split_files in files.items()}
    return splits_from_rows(spec, rows, classes)
