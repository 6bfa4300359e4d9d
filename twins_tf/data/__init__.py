"""Datasets: one registry table, offline-safe loading, and tf.data input pipelines (spec §6).

Every dataset twins_tf knows is one row of `DATASETS` (big_vision style): where the images come
from (tensorflow-datasets, an image folder, or scikit-learn's digits), the train / validation /
test splits, the number of classes, the input size the model sees, the nearest-neighbour
upsampling the model applies (spec §3), and the preprocessing kind.  Validation is carved out
of the training data (or is the dataset's official validation split), never out of the test
set: model selection on the test set is one of the reference code's defects (spec §9); or,
with `load_splits(validation="none")`, there is none and train is the whole official train
split (the published protocol).

Loading never touches the network.  `tfds.load` on a machine without the prepared data starts
downloading and retries for minutes before failing; `load_splits` instead checks that
`<tfds_data_dir>/<name>/<version>/dataset_info.json` exists and otherwise raises
`DatasetNotFoundError` at once, naming the files to download and where to put them.  Only then
does it read the prepared files with `builder.as_dataset`, which never downloads.

Pipelines (`make_pipeline`) decode in a parallel map, augment ("cifar", "imagenet" or
"digits" preprocessing, torchvision's transforms: `augmentation`), batch and prefetch.  Every
training epoch visits the whole training split in a uniform permutation keyed by
(seed, epoch) (`epoch_permutation`); subsets (`--max_*`) are stratified by class
(`stratified_subset`), and folder images are checked before anything is written
(`find_bad_images`).  All randomness is stateless, keyed by (seed, epoch, position in the
epoch), so a resumed run and every worker of a multi-worker job see exactly the batches of an
uninterrupted run (`pipeline` says why this rules out Keras's and keras-cv's random layers).

Images come out as float32 in [0, 1], NHWC; labels as int32.

Layout (one module a job; every public name is importable from `twins_tf.data` itself):
  registry       `DATASETS`, `DatasetSpec`, `get_dataset_spec`
  splits         `Rows`, `DatasetSplits` (what loading returns)
  loading        `load_splits` (validation protocols), dispatching to the sources:
  tfds_source    tensorflow-datasets, prepared files only
  folder_source  image folders (train/ + test/, or a seeded per-class split)
  digits_source  scikit-learn's digits
  image_checks   `find_bad_images`, `BadImagesError`
  ordering       `epoch_permutation`, `stateless_shuffle`, `stratified_subset`
  augmentation   the per-image training and evaluation transforms
  pipeline       `make_pipeline`, `check_batch_size`, `steps_per_epoch`

Example:
  >>> spec = get_dataset_spec("digits_0_4")
  >>> splits = load_splits(spec)
  >>> train = make_pipeline(splits.source("train"), spec, training=True, batch_size=32, seed=0)
  >>> steps = steps_per_epoch(splits.num_examples["train"], 32)
"""

from twins_tf.data.augmentation import (
    CENTRE_CROP_FRACTION,
    CIFAR_PADDING,
    RANDOM_RESIZED_CROP_RATIO,
    RANDOM_RESIZED_CROP_SCALE,
    augment,
    centre_crop,
    evaluation_transform,
    pad_and_random_crop,
    random_resized_crop,
    random_resized_crop_window,
    resize_shorter_side,
    to_float_image,
)
from twins_tf.data.digits_source import digits_arrays
from twins_tf.data.folder_source import IMAGE_EXTENSIONS
from twins_tf.data.image_checks import (
    BadImagesError,
    find_bad_images,
)
from twins_tf.data.loading import (
    VALIDATION_PROTOCOLS,
    load_splits,
)
from twins_tf.data.ordering import (
    epoch_permutation,
    stateless_shuffle,
    stratified_indices,
    stratified_subset,
)
from twins_tf.data.pipeline import (
    check_batch_size,
    make_pipeline,
    steps_per_epoch,
)
from twins_tf.data.registry import (
    ALIASES,
    CIFAR,
    DATASETS,
    DIGITS,
    FOLDER,
    IMAGENET,
    PREPROCESSING_KINDS,
    SKLEARN_DIGITS,
    SPLIT_SEED,
    TFDS,
    DatasetNotFoundError,
    DatasetSpec,
    get_dataset_spec,
)
from twins_tf.data.splits import (
    DatasetSplits,
    Rows,
)
from twins_tf.data.tfds_source import (
    default_tfds_data_dir,
    official_train_split,
    tfds_builder,
)

__all__ = [
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
]
