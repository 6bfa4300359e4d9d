"""tensorflow-datasets without the data: real dataset_info files and `tfds.testing.mock_data`.

`prepare_fake_tfds` writes a builder's own dataset_info.json / features.json (features from
tensorflow-datasets' code, no download) so `data.load_splits` finds the dataset "prepared";
inside `mocked_tfds`, reading it yields random examples drawn from those features.
"""

import contextlib
import os
from unittest import mock

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.testing import mocking


def split_infos(sizes):
    return [
        tfds.core.SplitInfo(name=name, shard_lengths=[n], num_bytes=0, filename_template=None)
        for name, n in sizes.items()
    ]


def prepare_fake_tfds(name, root, sizes):
    """Writes the real dataset_info.json/features.json of `name` (features from tfds's code)."""
    with tfds.testing.mock_data(data_dir=str(root)):
        builder = tfds.builder(name, data_dir=str(root))
        builder.info.set_splits(tfds.core.SplitDict(split_infos(sizes)))
        os.makedirs(builder.data_dir)
        builder.info.write_to_directory(builder.data_dir)


_original_random_obj = mocking.RandomFakeGenerator._generate_random_obj


def _ordered_boxes(self, feature, tensor_info, rng):
    """tfds's mock draws BBox corners independently (ymin > ymax happens) and then fails to
    encode them; order each box's corners so datasets with boxes (Stanford Dogs) mock."""
    value = _original_random_obj(self, feature, tensor_info, rng)
    if isinstance(feature, tfds.features.BBoxFeature):
        value = np.asarray(value)
        low = np.minimum(value[..., :2], value[..., 2:])
        high = np.maximum(value[..., :2], value[..., 2:])
        value = np.concatenate([low, high], axis=-1).astype(value.dtype)
    return value


@contextlib.contextmanager
def mocked_tfds(root, num_examples):
    """`tfds.testing.mock_data` (every split: `num_examples` random examples) with boxes that
    encode; yields the list of split strings passed to `as_dataset`, in call order."""
    calls = []
    with (
        mock.patch.object(mocking.RandomFakeGenerator, "_generate_random_obj", _ordered_boxes),
        tfds.testing.mock_data(num_examples=num_examples, data_dir=str(root)),
    ):
        mocked_as_dataset = tfds.core.DatasetBuilder.as_dataset

        def spy(self, split=None, **kwargs):
            calls.append(split)
            return mocked_as_dataset(self, split=split, **kwargs)

        with mock.patch.object(tfds.core.DatasetBuilder, "as_dataset", spy):
            yield calls
