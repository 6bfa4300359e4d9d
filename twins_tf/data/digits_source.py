"""scikit-learn's handwritten digits as a dataset: shipped with scikit-learn, no download."""

import numpy as np
import tensorflow as tf

from twins_tf.data.registry import SPLIT_SEED
from twins_tf.data.splits import Rows, splits_from_rows


def digits_arrays(classes, image_size):
    """scikit-learn's 8x8 digits of `classes`, resized: (images, labels, original digits).

    Images are float32 (n, image_size, image_size, 3) in [0, 1] (the 0-16 grey levels divided
    by 16, bilinear resize, grey copied to three channels); labels are int32 positions in
    `classes` (so digits 5-9 become labels 0-4).
    """
    from sklearn.datasets import load_digits  # shipped with scikit-learn: no download

    digits = load_digits()
    keep = np.isin(digits.target, classes)
    grey = digits.images[keep].astype(np.float32)[..., None] / 16.0
    images = tf.image.resize(grey, (image_size, image_size), method="bilinear").numpy()
    images = np.clip(np.repeat(images, 3, axis=-1), 0.0, 1.0).astype(np.float32)
    position = {c: i for i, c in enumerate(classes)}
    labels = np.array([position[t] for t in digits.target[keep]], np.int32)
    return images, labels, digits.target[keep]


def load_digits(spec, carve):
    images, labels, _ = digits_arrays(spec.classes, spec.image_size)
    all_rows = Rows(keys=images, labels=labels, paths=False)
    rng = np.random.default_rng(SPLIT_SEED)
    index = {"train": [], "validation": [], "test": []}
    for label in range(len(spec.classes)):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_test = int(round(len(members) * spec.test_fraction))
        n_validation = int(round(len(members) * spec.validation_fraction)) if carve else 0
        index["test"].extend(members[:n_test])
        index["validation"].extend(members[n_test : n_test + n_validation])
        index["train"].extend(members[n_test + n_validation :])
    if not carve:
        del index["validation"]
    rows = {
        key: all_rows.take(np.sort(np.asarray(members, np.int64))) for key, members in index.items()
    }
    return splits_from_rows(spec, rows, [str(c) for c in spec.classes])
