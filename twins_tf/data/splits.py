"""What loading a dataset gives: `Rows` (in-memory splits) and `DatasetSplits`."""

import dataclasses

import numpy as np
import tensorflow as tf

from twins_tf.data.registry import DatasetSpec


@dataclasses.dataclass(frozen=True)
class Rows:
    """A split held as in-memory rows: (keys, labels), keys file paths or decoded images.

    Folder and digits splits are rows, so any order of them costs the same: a training epoch
    is a gather of the rows by a permutation of the whole split, and only then are files read
    (`make_pipeline`).  A folder's rows are its file paths, a few MB even for a large folder.

    Attributes:
      keys: numpy array, one row per example: file paths (bytes/str) or float32 HWC images.
      labels: int32 numpy array of the same length.
      paths: whether `keys` are file paths to read (else they are the images).
    """

    keys: np.ndarray
    labels: np.ndarray
    paths: bool

    def __len__(self):
        return len(self.labels)

    def take(self, rows):
        """The rows at the integer positions `rows`, in that order."""
        rows = np.asarray(rows, np.int64)
        return Rows(keys=self.keys[rows], labels=self.labels[rows], paths=self.paths)

    def dataset(self, order=None):
        """`(image, label)` elements in row order, or in `order` (an int tensor of rows)."""
        keys = tf.constant(self.keys, tf.string) if self.paths else tf.constant(self.keys)
        labels = tf.constant(self.labels, tf.int32)
        if order is not None:
            keys, labels = tf.gather(keys, order), tf.gather(labels, order)
        ds = tf.data.Dataset.from_tensor_slices((keys, labels))
        if self.paths:
            ds = ds.map(
                lambda path, label: (tf.io.read_file(path), label),
                num_parallel_calls=tf.data.AUTOTUNE,
            )
        return ds


@dataclasses.dataclass(frozen=True)
class DatasetSplits:
    """The three splits of a dataset, before decoding and augmentation.

    Each split yields `(image, label)`: `image` is either encoded bytes (tf.string: JPEG, PNG,
    ...) or an already decoded float32 HWC image in [0, 1]; `label` is int32.  Feed
    `source(name)` (or the split itself) to `make_pipeline` to get batches.

    Attributes:
      spec: the `DatasetSpec` used.
      train, validation, test: the splits as `tf.data.Dataset`s; `validation` is None when
        loaded with `validation="none"`.
      num_examples: {"train": n, "validation": n, "test": n}.
      num_classes: number of classes (label values are 0 .. num_classes - 1).
      class_names: the class names in label order, when known.
      rows: {split name: `Rows`} for folder and digits datasets (None for tfds).
    """

    spec: DatasetSpec
    train: tf.data.Dataset
    validation: tf.data.Dataset | None
    test: tf.data.Dataset
    num_examples: dict
    num_classes: int
    class_names: tuple | None = None
    rows: dict | None = None

    def split(self, name):
        """Returns the split called "train", "validation" or "test"."""
        if name not in ("train", "validation", "test"):
            raise ValueError(f"Unknown split {name!r}; choose train, validation or test.")
        if getattr(self, name) is None:
            raise ValueError(
                f"{self.spec.name} was loaded without a {name} split "
                f"(validation='none'); load it with validation='carve'."
            )
        return getattr(self, name)

    def source(self, name):
        """The split as `make_pipeline` input: its `Rows` when it has them, else the dataset."""
        dataset = self.split(name)
        return self.rows[name] if self.rows else dataset


def splits_from_rows(spec, rows, class_names):
    """The `DatasetSplits` of splits held as `Rows` ({split name: rows})."""
    datasets = {key: split_rows.dataset() for key, split_rows in rows.items()}
    counts = {key: len(split_rows) for key, split_rows in rows.items()}
    datasets.setdefault("validation", None)
    counts.setdefault("validation", 0)
    return DatasetSplits(
        spec=spec,
        num_examples=counts,
        num_classes=len(class_names),
        class_names=tuple(class_names),
        rows=rows,
        **datasets,
    )
