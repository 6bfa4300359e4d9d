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

Pipelines (`make_pipeline`) decode in a parallel map, augment, batch and prefetch:

* "cifar": training: zero-pad 4 pixels, random 32x32 crop, horizontal flip (torchvision
  `RandomCrop(32, padding=4)` + `RandomHorizontalFlip`); evaluation: the image as is.
* "imagenet": training: random resized crop (scale 0.08-1, aspect ratio 3/4-4/3) to
  `image_size` + horizontal flip; evaluation: resize the *shorter side* to
  `round(image_size / 0.875)` (256 for 224, as torchvision's `Resize(256)`), then a centre crop
  of `image_size`.  Resizing is bilinear with antialiasing, like PIL's resize that
  torchvision applies to PIL images.
* "digits": training: zero-pad `image_size // 8` pixels and random crop, no flip (a flipped
  digit is a different glyph); evaluation: the image as is.

Every training epoch visits the whole training split in a uniform permutation keyed by
(seed, epoch) (`epoch_permutation`): folder and digits splits are `Rows` (file paths or decoded
images in memory) gathered by it; tfds splits are read in passes (`stateless_shuffle`).  Subsets
(`--max_*`) are stratified by class (`stratified_subset`), and folder images are checked before
anything is written (`find_bad_images`).

Randomness is stateless and keyed by (seed, epoch, position in the epoch), so a pipeline's
output is a pure function of its arguments: a training run resumed at epoch k with
`start_epoch=k` sees exactly the batches an uninterrupted run sees, and every worker of a
multi-worker job builds the same stream.  That is why the augmentations are written with
`tf.image.stateless_*` ops rather than Keras's random preprocessing layers (those draw from a
stateful `SeedGenerator`, whose draws depend on how tf.data schedules the parallel map) or
keras-cv's `RandomCropAndResize` (which samples the aspect ratio uniformly, relative to the
image's own aspect ratio, and clips crops that do not fit instead of re-drawing them, so its
crops differ from torchvision's `RandomResizedCrop`).

Images come out as float32 in [0, 1], NHWC; labels as int32.

Example:
  >>> spec = get_dataset_spec("digits_0_4")
  >>> splits = load_splits(spec)
  >>> train = make_pipeline(splits.source("train"), spec, training=True, batch_size=32, seed=0)
  >>> steps = steps_per_epoch(splits.num_examples["train"], 32)
"""
import dataclasses
import math
import os

import numpy as np
import tensorflow as tf

CIFAR = "cifar"
IMAGENET = "imagenet"
DIGITS = "digits"
PREPROCESSING_KINDS = (CIFAR, IMAGENET, DIGITS)

TFDS = "tfds"
FOLDER = "folder"
SKLEARN_DIGITS = "sklearn_digits"

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
# Fixed seed of the deterministic splits of folder and digits datasets.  It is deliberately not
# the training seed: changing --seed must not move images between train and test.
SPLIT_SEED = 0
# The eval resize of "imagenet" preprocessing: shorter side image_size / 0.875 (224 -> 256).
CENTRE_CROP_FRACTION = 0.875
RANDOM_RESIZED_CROP_SCALE = (0.08, 1.0)
RANDOM_RESIZED_CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
CIFAR_PADDING = 4


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's files are not where twins_tf looked; the message says how to get them."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """One row of the dataset registry.

    Attributes:
      name: the registry name (`--dataset`).
      source: "tfds", "folder" or "sklearn_digits".
      num_classes: number of classes; None for `folder` (counted from the class folders).
      image_size: side of the square image the model receives.
      upsample: nearest-neighbour upsampling factor the model applies to its input (spec §3).
      preprocessing: "cifar", "imagenet" or "digits" (see the module docstring).
      tfds_name: the tensorflow-datasets builder name (tfds only).
      train_split, validation_split, test_split: tfds split strings (tfds only).
      validation_fraction: share of each class's training images held out for validation
        (folder and digits datasets).
      test_fraction: share of each class's images used as test set (digits only).
      train_per_class: for a folder without train/ and test/ subfolders, the number of images
        per class drawn (seeded) for training; the rest is the test set (Caltech-256: 60).
      classes: the digit classes kept, in label order (digits only).
      description: one line for `--help` and error messages.
    """

    name: str
    source: str
    num_classes: int | None
    image_size: int
    upsample: int
    preprocessing: str
    tfds_name: str | None = None
    train_split: str | None = None
    validation_split: str | None = None
    test_split: str | None = None
    validation_fraction: float = 0.1
    test_fraction: float = 0.2
    train_per_class: int | None = None
    classes: tuple | None = None
    description: str = ""


def _tfds(name, num_classes, *, image_size=224, upsample=1, preprocessing=IMAGENET,
          train="train[:90%]", validation="train[90%:]", test="test", description=""):
    return DatasetSpec(
        name=name, source=TFDS, tfds_name=name, num_classes=num_classes, image_size=image_size,
        upsample=upsample, preprocessing=preprocessing, train_split=train,
        validation_split=validation, test_split=test, description=description)


def _digits(name, classes, description):
    return DatasetSpec(
        name=name, source=SKLEARN_DIGITS, num_classes=len(classes), image_size=32, upsample=1,
        preprocessing=DIGITS, classes=tuple(classes), description=description)


DATASETS = {
    spec.name: spec
    for spec in (
        _tfds("cifar10", 10, image_size=32, upsample=7, preprocessing=CIFAR,
              description="CIFAR-10, 32 px upsampled x7 to 224 inside the model"),
        _tfds("cifar100", 100, image_size=32, upsample=7, preprocessing=CIFAR,
              description="CIFAR-100, 32 px upsampled x7 to 224 inside the model"),
        _tfds("stanford_dogs", 120, description="Stanford Dogs, 12,000 train / 8,580 test"),
        _tfds("caltech_birds2011", 200, description="CUB-200-2011, 5,994 train / 5,794 test"),
        _tfds("caltech101", 102, description="Caltech-101 (tfds: 30 train images per class)"),
        _tfds("oxford_flowers102", 102, validation="validation",
              description="Oxford Flowers-102 with its official validation split"),
        _tfds("oxford_iiit_pet", 37, description="Oxford-IIIT Pet"),
        _tfds("dtd", 47, validation="validation",
              description="Describable Textures (split 1) with its official validation split"),
        _tfds("food101", 101, test="validation",
              description="Food-101; tfds calls the official test images 'validation'"),
        DatasetSpec(
            name="caltech256", source=FOLDER, num_classes=257, image_size=224, upsample=1,
            preprocessing=IMAGENET, train_per_class=60,
            description="Caltech-256 (257 folders incl. clutter), seeded 60 train images per "
                        "class, the rest test; --data_dir=.../256_ObjectCategories"),
        DatasetSpec(
            name="folder", source=FOLDER, num_classes=None, image_size=224, upsample=1,
            preprocessing=IMAGENET,
            description="your images: --data_dir=PATH with train/ and test/ of class folders"),
        _digits("digits", range(10), "scikit-learn's 8x8 digits 0-9, resized (no download)"),
        _digits("digits_0_4", range(5), "scikit-learn's digits 0-4 (the demo's source task)"),
        _digits("digits_5_9", range(5, 10), "scikit-learn's digits 5-9 (the demo's target task)"),
    )
}
ALIASES = {"cub200": "caltech_birds2011"}


def get_dataset_spec(name, *, image_size=None, upsample=None, classes=None):
    """Returns the registry row for `name`, optionally with another input size.

    Args:
      name: a key of `DATASETS` or an alias ("cub200").
      image_size: replaces the registered image size (not allowed for "cifar" preprocessing,
        whose images are stored at 32 px: change `upsample` instead).
      upsample: replaces the registered upsampling factor of the model input.
      classes: for the digits datasets, the digits to keep, in label order (e.g. (1, 3, 7)
        gives labels 0, 1, 2).

    Returns:
      A `DatasetSpec`.
    """
    key = ALIASES.get(name, name)
    if key not in DATASETS:
        known = ", ".join(sorted([*DATASETS, *ALIASES]))
        raise ValueError(f"Unknown dataset {name!r}; choose one of: {known}.")
    spec = DATASETS[key]
    if image_size is not None:
        if int(image_size) < 8:
            raise ValueError(f"image_size must be at least 8 pixels, got {image_size}.")
        if spec.preprocessing == CIFAR and int(image_size) != spec.image_size:
            raise ValueError(
                f"{spec.name} images are stored at {spec.image_size} px, so image_size cannot "
                f"be {image_size}; set upsample to enlarge them inside the model instead.")
        spec = dataclasses.replace(spec, image_size=int(image_size))
    if upsample is not None:
        if int(upsample) < 1:
            raise ValueError(f"upsample must be a positive integer, got {upsample}.")
        spec = dataclasses.replace(spec, upsample=int(upsample))
    if classes is not None:
        classes = tuple(int(c) for c in classes)
        if spec.source != SKLEARN_DIGITS:
            raise ValueError(f"classes= selects digits; {spec.name} keeps all its classes.")
        if not classes or len(set(classes)) != len(classes) or not set(classes) <= set(range(10)):
            raise ValueError(f"classes must be distinct digits 0-9, got {classes}.")
        spec = dataclasses.replace(spec, classes=classes, num_classes=len(classes))
    return spec


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
            ds = ds.map(lambda path, label: (tf.io.read_file(path), label),
                        num_parallel_calls=tf.data.AUTOTUNE)
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
            raise ValueError(f"{self.spec.name} was loaded without a {name} split "
                             f"(validation='none'); load it with validation='carve'.")
        return getattr(self, name)

    def source(self, name):
        """The split as `make_pipeline` input: its `Rows` when it has them, else the dataset."""
        dataset = self.split(name)
        return self.rows[name] if self.rows else dataset


def default_tfds_data_dir():
    """`$TFDS_DATA_DIR` if set, else `~/tensorflow_datasets` (tensorflow-datasets' default)."""
    return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


VALIDATION_PROTOCOLS = ("carve", "none")


def load_splits(dataset, *, data_dir=None, tfds_data_dir=None, train_per_class=None,
                validation="carve", skip_bad_images=False):
    """Loads a registered dataset's train / validation / test splits from local files.

    Validation protocols (`validation`):
      * "carve" (default): the registry's validation split, a held-out part of the official
        train split (10% of it, per class for folders and digits) or the dataset's official
        validation split (Oxford Flowers-102, DTD).  It selects the best epoch.
      * "none": the published protocol of the reference code and the AutoLoRa table: train
        is the WHOLE official train split (nothing carved out; an official validation split
        is left unused), `validation` is None and `num_examples["validation"]` is 0; the run
        keeps its final epoch.  The test split is the same under both.

    Folder images are checked before anything else happens (`find_bad_images`): a file that
    does not look like a whole JPEG / PNG / GIF / BMP raises `BadImagesError` naming it, unless
    `skip_bad_images`, which leaves such files out and logs how many.

    Args:
      dataset: a registry name or a `DatasetSpec` (from `get_dataset_spec`).
      data_dir: the image folder of "folder" and "caltech256".
      tfds_data_dir: where tensorflow-datasets keeps prepared data (default
        `default_tfds_data_dir()`).
      train_per_class: for a folder without train/ and test/ subfolders, the number of
        training images per class (overrides the registry's; "caltech256" uses 60).
      validation: "carve" or "none" (see above).
      skip_bad_images: leave unreadable folder images out instead of raising.

    Returns:
      A `DatasetSplits`.

    Raises:
      DatasetNotFoundError: the data is not on disk; the message says how to get it.
      BadImagesError: folder images that cannot be decoded (a ValueError).
      ValueError: unknown dataset or inconsistent folder contents.
    """
    spec = dataset if isinstance(dataset, DatasetSpec) else get_dataset_spec(dataset)
    if validation not in VALIDATION_PROTOCOLS:
        raise ValueError(f"validation={validation!r} is not a protocol; choose one of "
                         f"{', '.join(VALIDATION_PROTOCOLS)}.")
    carve = validation == "carve"
    if spec.source == TFDS:
        return _load_tfds(spec, tfds_data_dir or default_tfds_data_dir(), carve)
    if spec.source == FOLDER:
        return _load_folder(spec, data_dir, train_per_class or spec.train_per_class, carve,
                            skip_bad_images)
    if spec.source == SKLEARN_DIGITS:
        return _load_digits(spec, carve)
    raise ValueError(f"{spec.name}: unknown source {spec.source!r}.")


# --- tensorflow-datasets ---------------------------------------------------------------------
def _missing_tfds_message(spec, builder, root):
    name, version = spec.tfds_name, str(builder.version)
    parts = [
        f"Dataset {spec.name!r} (tfds {name} {version}) is not prepared: no "
        f"{os.path.join(builder.data_dir, 'dataset_info.json')} (looked in "
        f"--tfds_data_dir={root})."
    ]
    dataset_root = os.path.join(root, name)
    if tf.io.gfile.isdir(dataset_root):
        found = sorted(tf.io.gfile.listdir(dataset_root))
        parts.append(f"Found only {', '.join(f.rstrip('/') for f in found) or 'nothing'} in "
                     f"{dataset_root}; this tensorflow-datasets reads version {version}.")
    parts.append(f"With network: `tfds build {name} --data_dir={root}` (or build it elsewhere "
                 f"and copy {name}/{version}/ into {root}/).")
    files = {}
    for url, info in sorted((type(builder).url_infos or {}).items()):
        if info.filename and info.filename not in files and "drive.google" not in url:
            files[info.filename] = f"{url} ({info.size})"
    manual = os.path.join(root, "downloads", "manual")
    if files:
        listing = "; ".join(files.values())
        parts.append(f"Offline: download {listing} into {manual}/ and run `tfds build {name} "
                     f"--data_dir={root} --manual_dir={manual}`.")
    return " ".join(parts)


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as error:  # pragma: no cover - it is an install requirement
        raise ImportError("tfds datasets need tensorflow-datasets: pip install "
                          "tensorflow-datasets==4.9.10") from error
    return tfds


def tfds_builder(spec, tfds_data_dir):
    """Returns the tfds builder of `spec`, raising `DatasetNotFoundError` if not prepared.

    Neither building the builder nor this check touches the network; the check runs before
    anything that could (`download_and_prepare`, which `tfds.load` calls, is never called).
    """
    tfds = _import_tfds()
    builder = tfds.builder(spec.tfds_name, data_dir=tfds_data_dir)
    if not tf.io.gfile.exists(os.path.join(builder.data_dir, "dataset_info.json")):
        raise DatasetNotFoundError(_missing_tfds_message(spec, builder, tfds_data_dir))
    return builder


def official_train_split(split):
    """The tfds split a registry train split is carved from: "train[:90%]" -> "train"."""
    return split.split("[", 1)[0]


def _load_tfds(spec, tfds_data_dir, carve):
    tfds = _import_tfds()
    builder = tfds_builder(spec, tfds_data_dir)
    features = builder.info.features
    if "image" not in features or "label" not in features:
        raise ValueError(f"{spec.name}: tfds {spec.tfds_name} has no 'image'/'label' features.")
    label_feature = features["label"]
    if label_feature.num_classes != spec.num_classes:
        raise ValueError(
            f"{spec.name}: tfds {spec.tfds_name} {builder.version} has "
            f"{label_feature.num_classes} classes, the registry says {spec.num_classes}.")
    # Images are decoded later in the pipeline's parallel map; skip every image-like feature
    # (segmentation masks included) so tfds does not decode what we never use.
    decoders = {key: tfds.decode.SkipDecoding() for key, feature in features.items()
                if isinstance(feature, tfds.features.Image)}

    def read(split):
        ds = builder.as_dataset(split=split, decoders=decoders, shuffle_files=False)
        return ds.map(lambda ex: (ex["image"], tf.cast(ex["label"], tf.int32)),
                      num_parallel_calls=tf.data.AUTOTUNE)

    names = {"train": spec.train_split, "validation": spec.validation_split,
             "test": spec.test_split}
    if not carve:
        names = {"train": official_train_split(spec.train_split), "test": spec.test_split}
    datasets = {key: read(split) for key, split in names.items()}
    counts = {key: int(ds.cardinality()) for key, ds in datasets.items()}
    datasets.setdefault("validation", None)
    counts.setdefault("validation", 0)
    return DatasetSplits(spec=spec, num_examples=counts, num_classes=spec.num_classes,
                         class_names=tuple(label_feature.names), **datasets)


# --- image folders ---------------------------------------------------------------------------
def _list_class_folders(root):
    return sorted(entry.rstrip("/") for entry in tf.io.gfile.listdir(root)
                  if tf.io.gfile.isdir(os.path.join(root, entry)))


def _list_images(folder):
    return sorted(os.path.join(folder, f) for f in tf.io.gfile.listdir(folder)
                  if f.lower().endswith(IMAGE_EXTENSIONS))


def _scan_folder(root):
    """{class name: sorted image paths} for every class folder of `root`."""
    classes = _list_class_folders(root)
    if not classes:
        raise ValueError(f"{root} holds no class folders (expected {root}/<class>/<image>).")
    found = {c: _list_images(os.path.join(root, c)) for c in classes}
    empty = [c for c, files in found.items() if not files]
    if empty:
        raise ValueError(f"{root}: class folder(s) without images ({', '.join(empty[:5])}); "
                         f"images must end in one of {', '.join(IMAGE_EXTENSIONS)}.")
    return found


class BadImagesError(ValueError):
    """Folder images that cannot be decoded; the message lists them and says what to do."""


# (signature at the start, marker that must be near the end) of each format decode_image reads.
# A file that is not an image, or whose end was cut off (interrupted copy or download), fails.
_SIGNATURES = {
    "jpeg": (b"\xff\xd8\xff", b"\xff\xd9"),            # SOI ... EOI
    "png": (b"\x89PNG\r\n\x1a\n", b"IEND\xaeB`\x82"),  # signature ... IEND chunk + CRC
    "gif": (b"GIF8", b";"),                              # GIF87a/GIF89a ... trailer
}
_TAIL_BYTES = 1024


def _image_file_is_whole(path):
    # Remote folders (gs://...) through tf.io.gfile like their listing; local files through
    # Python's open, 30x faster here than GFile (0.3 s against 9.5 s for 10,000 files).
    remote = "://" in path
    try:
        with (tf.io.gfile.GFile(path, "rb") if remote else open(path, "rb")) as f:
            size = f.size() if remote else os.fstat(f.fileno()).st_size
            head = f.read(16)
            f.seek(max(0, size - _TAIL_BYTES))
            tail = f.read()
    except (OSError, tf.errors.OpError):
        return False
    if head[:2] == b"BM":  # BMP: the header's file size must fit in the file
        return len(head) >= 6 and int.from_bytes(head[2:6], "little") <= size
    return any(head.startswith(start) and end in tail for start, end in _SIGNATURES.values())


def find_bad_images(paths):
    """The paths (in order) that do not hold a whole JPEG, PNG, GIF or BMP.

    A header and trailer check, not a decode: each file's first bytes must be a signature
    `tf.io.decode_image` reads and its last KiB must hold that format's end marker (BMP: the
    size in its header must fit).  That catches files that are no image at all or another
    format under an image name, empty files and truncated ones, which is what breaks
    training; it does not catch damage in the middle of the compressed data.

    Why not a full decode: measured on 2 shared CPU cores, 10,000 generated 64x48 images
    (half JPEG, half PNG of random pixels, 68 MB) took 0.3-0.5 s with this check and 8.5-9.8 s
    with a parallel `tf.io.decode_image` of every file (tf.data, AUTOTUNE); 1,000 photo-like
    500x375 JPEGs (33 MB) took 0.02 s and 1.7 s, so decoding all 30,607 Caltech-256 images
    would delay every start (evaluate's too) by about a minute.
    """
    return [path for path in paths if not _image_file_is_whole(path)]


def _checked_images(root, file_dicts, skip_bad_images):
    """`file_dicts` ({class: paths} each) without bad images, or BadImagesError naming them."""
    bad = set(find_bad_images([p for files in file_dicts for ps in files.values() for p in ps]))
    if not bad:
        return file_dicts
    listed = sorted(bad)
    if not skip_bad_images:
        raise BadImagesError(
            f"{len(bad)} image file(s) under {root} are not whole JPEG/PNG/GIF/BMP images: "
            f"{', '.join(listed[:10])}{', ...' if len(bad) > 10 else ''}; delete or replace "
            f"them, or pass --skip_bad_images to leave them out.")
    from absl import logging

    logging.warning("Skipped %d image file(s) under %s that are not whole images (first: %s).",
                    len(bad), root, ", ".join(listed[:10]))
    kept = tuple({c: [p for p in ps if p not in bad] for c, ps in files.items()}
                 for files in file_dicts)
    empty = sorted({c for files in kept for c, ps in files.items() if not ps})
    if empty:
        raise BadImagesError(f"{root}: class folder(s) {', '.join(empty[:5])} hold no good "
                             f"image after skipping bad ones; add images or remove the folder.")
    return kept


def _seeded_permutations(files_by_class):
    rng = np.random.default_rng(SPLIT_SEED)
    return {c: [files[i] for i in rng.permutation(len(files))]
            for c, files in files_by_class.items()}


def _hold_out(files_by_class, fraction):
    """Splits each class's (seeded-shuffled) files into (kept, held out): the last share."""
    kept, held = {}, {}
    for c, files in _seeded_permutations(files_by_class).items():
        n_held = int(round(len(files) * fraction))
        if n_held >= len(files):
            raise ValueError(f"class {c!r} has {len(files)} training images, too few to hold "
                             f"out {fraction:.0%} for validation.")
        kept[c], held[c] = files[:len(files) - n_held], files[len(files) - n_held:]
    return kept, held


def _folder_rows(files_by_class, class_index):
    paths, labels = [], []
    for c, files in files_by_class.items():
        paths.extend(files)
        labels.extend([class_index[c]] * len(files))
    return Rows(keys=np.array(paths, dtype=object), labels=np.array(labels, np.int32),
                paths=True)


def _check_class_count(spec, files_by_class, folder):
    if spec.num_classes is not None and len(files_by_class) != spec.num_classes:
        raise ValueError(f"{spec.name} expects {spec.num_classes} class folders, {folder} "
                         f"has {len(files_by_class)}.")


def _load_folder(spec, data_dir, train_per_class, carve, skip_bad_images):
    if not data_dir:
        raise ValueError(f"--dataset={spec.name} needs --data_dir ({spec.description}).")
    if not tf.io.gfile.isdir(data_dir):
        hint = (" Download 256_ObjectCategories.tar from https://data.caltech.edu/records/"
                "nyv15-4j048 and extract it; pass the extracted folder."
                if spec.name == "caltech256" else "")
        raise DatasetNotFoundError(
            f"--data_dir={data_dir} does not exist ({spec.name}: {spec.description}).{hint}")
    train_dir, test_dir = os.path.join(data_dir, "train"), os.path.join(data_dir, "test")
    if tf.io.gfile.isdir(train_dir) and tf.io.gfile.isdir(test_dir):
        train_files, test_files = _checked_images(
            data_dir, (_scan_folder(train_dir), _scan_folder(test_dir)), skip_bad_images)
        _check_class_count(spec, train_files, train_dir)
        unknown = sorted(set(test_files) - set(train_files))
        if unknown:
            raise ValueError(f"{test_dir} has classes that {train_dir} lacks: "
                             f"{', '.join(unknown[:5])}.")
    elif train_per_class:
        all_files, = _checked_images(data_dir, (_scan_folder(data_dir),), skip_bad_images)
        _check_class_count(spec, all_files, data_dir)
        short = [c for c, f in all_files.items() if len(f) <= train_per_class]
        if short:
            raise ValueError(f"{data_dir}: class(es) {', '.join(short[:5])} have at most "
                             f"{train_per_class} images, none left for the test set.")
        shuffled = _seeded_permutations(all_files)
        train_files = {c: f[:train_per_class] for c, f in shuffled.items()}
        test_files = {c: f[train_per_class:] for c, f in shuffled.items()}
    else:
        raise ValueError(f"{data_dir} must hold train/ and test/ subfolders of class folders "
                         f"(or pass train_per_class to split one folder of class folders).")
    classes = tuple(sorted(train_files))
    class_index = {c: i for i, c in enumerate(classes)}
    files = {"train": train_files, "test": test_files}
    if carve:
        files["train"], files["validation"] = _hold_out(train_files, spec.validation_fraction)
    rows = {key: _folder_rows(split_files, class_index) for key, split_files in files.items()}
    return _splits_from_rows(spec, rows, classes)


def _splits_from_rows(spec, rows, class_names):
    datasets = {key: split_rows.dataset() for key, split_rows in rows.items()}
    counts = {key: len(split_rows) for key, split_rows in rows.items()}
    datasets.setdefault("validation", None)
    counts.setdefault("validation", 0)
    return DatasetSplits(spec=spec, num_examples=counts, num_classes=len(class_names),
                         class_names=tuple(class_names), rows=rows, **datasets)


# --- scikit-learn digits ---------------------------------------------------------------------
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


def _load_digits(spec, carve):
    images, labels, _ = digits_arrays(spec.classes, spec.image_size)
    all_rows = Rows(keys=images, labels=labels, paths=False)
    rng = np.random.default_rng(SPLIT_SEED)
    index = {"train": [], "validation": [], "test": []}
    for label in range(len(spec.classes)):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_test = int(round(len(members) * spec.test_fraction))
        n_validation = int(round(len(members) * spec.validation_fraction)) if carve else 0
        index["test"].extend(members[:n_test])
        index["validation"].extend(members[n_test:n_test + n_validation])
        index["train"].extend(members[n_test + n_validation:])
    if not carve:
        del index["validation"]
    rows = {key: all_rows.take(np.sort(np.asarray(members, np.int64)))
            for key, members in index.items()}
    return _splits_from_rows(spec, rows, [str(c) for c in spec.classes])


# --- augmentation ----------------------------------------------------------------------------
def to_float_image(image):
    """Encoded bytes (JPEG/PNG/BMP/GIF), uint8 or float image -> float32 HWC3 in [0, 1]."""
    if image.dtype == tf.string:
        image = tf.io.decode_image(image, channels=3, expand_animations=False)
    if image.dtype != tf.float32:
        image = tf.image.convert_image_dtype(image, tf.float32)
    return image


def random_resized_crop_window(height, width, seed, *, scale=RANDOM_RESIZED_CROP_SCALE,
                               ratio=RANDOM_RESIZED_CROP_RATIO, attempts=10):
    """Samples a crop window exactly as torchvision's `RandomResizedCrop.get_params`.

    Up to `attempts` draws of an area share U(scale) and a log-uniform aspect ratio
    (width / height) in `ratio`; the first window that fits the image is placed uniformly at
    random.  If none fits, the largest centred window with an aspect ratio in `ratio`.

    Args:
      height, width: the image size (scalar int tensors).
      seed: a shape [2] integer tensor (stateless randomness).
      scale, ratio, attempts: as torchvision's.

    Returns:
      (top, left, crop_height, crop_width) as int32 scalars.
    """
    h = tf.cast(height, tf.float64)
    w = tf.cast(width, tf.float64)
    seeds = tf.random.experimental.stateless_split(seed, 4)
    target_area = h * w * tf.random.stateless_uniform(
        [attempts], seeds[0], scale[0], scale[1], dtype=tf.float64)
    aspect = tf.exp(tf.random.stateless_uniform(
        [attempts], seeds[1], math.log(ratio[0]), math.log(ratio[1]), dtype=tf.float64))
    crop_w = tf.round(tf.sqrt(target_area * aspect))  # round half to even, like Python's
    crop_h = tf.round(tf.sqrt(target_area / aspect))
    fits = (crop_w > 0) & (crop_w <= w) & (crop_h > 0) & (crop_h <= h)
    first = tf.argmax(tf.cast(fits, tf.int32))
    in_ratio = w / h
    fallback_w = tf.where(in_ratio > ratio[1], tf.round(h * ratio[1]), w)
    fallback_h = tf.where(in_ratio < ratio[0], tf.round(w / ratio[0]), h)
    found = tf.reduce_any(fits)
    crop_h = tf.cast(tf.where(found, crop_h[first], fallback_h), tf.int32)
    crop_w = tf.cast(tf.where(found, crop_w[first], fallback_w), tf.int32)
    height, width = tf.cast(height, tf.int32), tf.cast(width, tf.int32)
    random_top = tf.random.stateless_uniform(
        [], seeds[2], 0, height - crop_h + 1, dtype=tf.int32)
    random_left = tf.random.stateless_uniform(
        [], seeds[3], 0, width - crop_w + 1, dtype=tf.int32)
    top = tf.where(found, random_top, (height - crop_h) // 2)
    left = tf.where(found, random_left, (width - crop_w) // 2)
    return top, left, crop_h, crop_w


def _resize(image, height, width):
    resized = tf.image.resize(image, tf.stack([height, width]), method="bilinear",
                              antialias=True)
    return tf.clip_by_value(resized, 0.0, 1.0)


def random_resized_crop(image, size, seed):
    """torchvision-style random resized crop of a float HWC image to (size, size)."""
    shape = tf.shape(image)
    top, left, crop_h, crop_w = random_resized_crop_window(shape[0], shape[1], seed)
    crop = image[top:top + crop_h, left:left + crop_w]
    return _resize(crop, size, size)


def resize_shorter_side(image, shorter):
    """Resizes so the shorter side is `shorter`, the longer `int(shorter * long / short)`
    (torchvision's `Resize(int)` rule)."""
    shape = tf.cast(tf.shape(image)[:2], tf.float64)
    short, long = tf.reduce_min(shape), tf.reduce_max(shape)
    new_long = tf.cast(tf.floor(shorter * long / short), tf.int32)
    portrait = shape[0] > shape[1]
    new_h = tf.where(portrait, new_long, shorter)
    new_w = tf.where(portrait, shorter, new_long)
    return _resize(image, new_h, new_w)


def centre_crop(image, size):
    """The central (size, size) window; offsets `round((side - size) / 2)` as torchvision's."""
    shape = tf.shape(image)
    top = tf.cast(tf.round(tf.cast(shape[0] - size, tf.float64) / 2.0), tf.int32)
    left = tf.cast(tf.round(tf.cast(shape[1] - size, tf.float64) / 2.0), tf.int32)
    return image[top:top + size, left:left + size]


def pad_and_random_crop(image, size, padding, seed):
    """Zero-pads `padding` pixels on every side, then a random (size, size) crop."""
    padded = tf.pad(image, [[padding, padding], [padding, padding], [0, 0]])
    return tf.image.stateless_random_crop(padded, [size, size, 3], seed)


def augment(image, spec, seed):
    """The training augmentation of `spec.preprocessing` on one float HWC image."""
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    size = spec.image_size
    if spec.preprocessing == IMAGENET:
        image = random_resized_crop(image, size, crop_seed)
    elif spec.preprocessing == CIFAR:
        image = pad_and_random_crop(tf.ensure_shape(image, [size, size, 3]), size,
                                    CIFAR_PADDING, crop_seed)
    elif spec.preprocessing == DIGITS:
        image = pad_and_random_crop(tf.ensure_shape(image, [size, size, 3]), size,
                                    max(1, size // 8), crop_seed)
    else:
        raise ValueError(f"Unknown preprocessing {spec.preprocessing!r}; choose one of "
                         f"{PREPROCESSING_KINDS}.")
    if spec.preprocessing in (IMAGENET, CIFAR):
        image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    return tf.ensure_shape(image, [size, size, 3])


def evaluation_transform(image, spec):
    """The test-time transform of `spec.preprocessing` on one float HWC image."""
    size = spec.image_size
    if spec.preprocessing == IMAGENET:
        shorter = int(round(size / CENTRE_CROP_FRACTION))
        image = centre_crop(resize_shorter_side(image, shorter), size)
    elif spec.preprocessing not in (CIFAR, DIGITS):
        raise ValueError(f"Unknown preprocessing {spec.preprocessing!r}; choose one of "
                         f"{PREPROCESSING_KINDS}.")
    return tf.ensure_shape(image, [size, size, 3])


# --- pipelines -------------------------------------------------------------------------------
def check_batch_size(batch_size, num_replicas, twin):
    """Raises ValueError unless `batch_size` splits evenly over replicas (and wings).

    Each replica gets `batch_size / num_replicas` examples; a twin model further splits each
    replica's batch in two halves (spec §2), so twin methods need a multiple of
    2 x num_replicas.
    """
    if batch_size < 1 or num_replicas < 1:
        raise ValueError(f"batch_size ({batch_size}) and the number of replicas "
                         f"({num_replicas}) must be positive.")
    multiple = num_replicas * (2 if twin else 1)
    if batch_size % multiple:
        what = (f"2 x {num_replicas} replica(s) = {multiple} (each replica's batch is split "
                f"into a Frozen and an Adaptive half)" if twin else
                f"the {num_replicas} replicas")
        raise ValueError(f"--batch_size={batch_size} must be a multiple of {what}; use e.g. "
                         f"{max(multiple, batch_size // multiple * multiple)}.")


def steps_per_epoch(num_examples, batch_size):
    """Full batches per epoch of a training pipeline (the last partial batch is dropped)."""
    steps = num_examples // batch_size
    if steps < 1:
        raise ValueError(f"The training split has {num_examples} examples, fewer than one "
                         f"batch of {batch_size}; lower --batch_size.")
    return steps


# Offsets the shuffle's stateless seeds from the augmentation's (same seed, epoch, index).
_SHUFFLE_STREAM = 1_000_003


def _element_seed(seed, epoch, index):
    return tf.stack([tf.cast(seed, tf.int64), epoch * (2 ** 32) + index])


def epoch_permutation(seed, epoch, num_examples):
    """The training order of epoch `epoch`: a uniform permutation of range(num_examples).

    Element k of the result is the split position of the k-th example of the epoch.  A
    stateless draw keyed by (seed, epoch) only, so a resumed run and every worker of a
    multi-worker job compute the same order.

    Why not `ds.shuffle(buffer, seed=...)`: inside the per-epoch `flat_map` its seed is a
    tensor, and TensorFlow's seed resolution compares it with a Python `==`, which raises
    "Using a symbolic tf.Tensor as a Python bool" whenever the global seed is 0
    (`tf.random.set_seed(0)`, `keras.utils.set_random_seed(0)`); its order also depends on the
    global seed, and a shuffle buffer smaller than the split is no uniform permutation.
    """
    key = tf.stack([tf.cast(seed, tf.int64) + _SHUFFLE_STREAM, tf.cast(epoch, tf.int64)])
    return tf.random.experimental.stateless_shuffle(
        tf.range(num_examples, dtype=tf.int64), seed=key)


def stateless_shuffle(ds, seed, epoch, num_examples, window):
    """The `num_examples` elements of `ds` in the order `epoch_permutation(seed, epoch, n)`.

    For a split that is read as a stream (tfds's record files have no random access).  Memory
    holds at most `window` elements: pass j reads `ds` once, keeps the elements whose place in
    the epoch is in [j * window, (j + 1) * window) and emits them in that order, so an epoch
    costs ceil(n / window) reads of the split.  Why this rather than holding the whole split
    or a shuffle buffer: a buffer of `window` elements moves an element at most `window`
    places, so a class-sorted split stays class-sorted in blocks; holding Food-101's 75,750
    encoded images needs ~4 GB.  The price is CPU time in the input pipeline, overlapped with
    training by the prefetch: on 2 busy shared cores, a 45,000-example CIFAR-like TFRecord
    split (110 MB of PNGs) took 3.4 s to read once, 30 s for the 5 passes of window 10,000,
    7.2 s for one pass of window 45,000 (memory of 110 MB), against minutes per epoch of
    adversarial training on a GPU.  A small split can pass `shuffle_buffer=n` to
    `make_pipeline` for one pass.  Folder and digits splits are `Rows` and need no passes:
    `make_pipeline` gathers their rows by the permutation directly.
    """
    order = epoch_permutation(seed, epoch, num_examples)
    place = tf.math.invert_permutation(order)  # place[i]: where element i goes in the epoch
    spec = ds.element_spec
    uniform = all(s.shape.is_fully_defined() for s in tf.nest.flatten(spec))
    passes = -(-int(num_examples) // int(window))

    def one_pass(j):
        kept = ds.enumerate().filter(lambda i, element: place[i] // window == j)
        placed = kept.map(lambda i, element: (place[i], element))
        placed = placed.batch(window) if uniform else placed.ragged_batch(window)
        return placed.map(lambda places, elements: tf.nest.map_structure(
            lambda t: tf.gather(t, tf.argsort(places)), elements)).unbatch()

    out = tf.data.Dataset.range(passes).flat_map(one_pass)
    if not uniform:  # back from ragged to the dense elements of `ds`
        out = out.map(lambda *e: tf.nest.map_structure(
            lambda t: t.to_tensor() if isinstance(t, tf.RaggedTensor) else t,
            e if len(e) > 1 else e[0]))
    return out


def _labels(source):
    if isinstance(source, Rows):
        return source.labels
    return np.fromiter((int(label) for label in source.map(lambda image, label: label)),
                       np.int64)


def stratified_indices(labels, count, seed=SPLIT_SEED):
    """Sorted positions of `count` examples whose class shares follow those of `labels`.

    Each class gets floor(count * n_c / n) examples, and the examples still missing go to the
    classes with the largest remainders (ties: lower label first); within a class the
    examples are the first of a permutation seeded by `seed` (the split seed, not the
    training seed, so --seed does not change which examples a quick run uses).
    """
    labels = np.asarray(labels)
    total = len(labels)
    if count >= total:
        return np.arange(total)
    classes, sizes = np.unique(labels, return_counts=True)
    exact = count * sizes / total
    quota = np.floor(exact).astype(np.int64)
    by_remainder = sorted(range(len(classes)), key=lambda k: (-(exact[k] - quota[k]), k))
    quota[by_remainder[:count - int(quota.sum())]] += 1
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:q] for c, q in zip(classes, quota)]
    return np.sort(np.concatenate(chosen))


def stratified_subset(source, count):
    """`count` examples of a split (`Rows` or dataset), stratified by class; all if None.

    The subset keeps the split's order and every class's share (`stratified_indices`), so a
    quick run of a class-sorted folder sees every class rather than the first few.  A dataset
    (tfds) is read once for its labels.
    """
    if count is None:
        return source
    labels = _labels(source)
    rows = stratified_indices(labels, int(count))
    if isinstance(source, Rows):
        return source.take(rows)
    keep = tf.constant(np.isin(np.arange(len(labels)), rows))
    subset = source.enumerate().filter(lambda i, element: keep[i])
    subset = subset.map(lambda i, element: element)
    return subset.apply(tf.data.experimental.assert_cardinality(len(rows)))


def make_pipeline(ds, spec, *, training, batch_size, seed=0, start_epoch=0,
                  shuffle_buffer=10_000):
    """Decoded, augmented, batched and prefetched batches of `(images, labels)`.

    Training (`training=True`): an endless stream of epochs `start_epoch, start_epoch+1, ...`.
    Epoch e visits the whole split in the order `epoch_permutation(seed, e, n)`, a uniform
    permutation (gathered from `Rows`, read in passes by `stateless_shuffle` from a dataset),
    augments with per-example stateless seeds from (seed, e, position), and is cut into
    `steps_per_epoch(n, batch_size)` full batches (`drop_remainder=True`: the remainder of each
    epoch is dropped, so every batch splits into equal halves).  Pass `steps_per_epoch=` to
    `fit`.  To resume at epoch k, build the pipeline with `start_epoch=k`: the batches equal
    those an uninterrupted run sees.

    Evaluation (`training=False`): one pass in order, the test transform, the last batch kept
    even if smaller.

    Args:
      ds: a split: `DatasetSplits.source(name)` (`Rows` or a dataset), `stratified_subset` of
        one, or any `tf.data.Dataset` of `(image, label)` of known size.
      spec: the `DatasetSpec` (its `image_size` and `preprocessing` are used).
      training: training or evaluation pipeline.
      batch_size: the global batch size (split over replicas by tf.distribute).
      seed: the data seed (order and augmentation).
      start_epoch: the first epoch of a training stream.
      shuffle_buffer: for a dataset, how many encoded elements `stateless_shuffle` holds at a
        time (memory only: the order does not depend on it).

    Returns:
      A `tf.data.Dataset` of float32 images (B, S, S, 3) in [0, 1] and int32 labels (B,).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    rows = ds if isinstance(ds, Rows) else None
    if rows is not None:
        ds, num_examples = rows.dataset(), len(rows)
    else:
        num_examples = int(ds.cardinality())
    image_spec = ds.element_spec[0]
    if image_spec.dtype != tf.string and image_spec.shape.rank != 3:
        raise ValueError(f"Expected (image, label) elements with HWC images, got "
                         f"{ds.element_spec}.")
    seed = int(seed)

    if training:
        if num_examples < 0:
            raise ValueError("The training split's size is unknown; give it one with "
                             "ds.apply(tf.data.experimental.assert_cardinality(n)).")

        def one_epoch(epoch):
            if rows is not None:
                shuffled = rows.dataset(order=epoch_permutation(seed, epoch, num_examples))
            else:
                shuffled = stateless_shuffle(ds, seed, epoch, num_examples, shuffle_buffer)

            def transform(index, element):
                image, label = element
                image = augment(to_float_image(image), spec, _element_seed(seed, epoch, index))
                return image, label

            return (shuffled.enumerate()
                    .map(transform, num_parallel_calls=tf.data.AUTOTUNE)
                    .batch(batch_size, drop_remainder=True))

        out = tf.data.Dataset.counter(start=int(start_epoch)).flat_map(one_epoch)
    else:
        out = ds.map(lambda image, label: (evaluation_transform(to_float_image(image), spec),
                                           label),
                     num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size)
    options = tf.data.Options()
    options.deterministic = True
    # Every worker builds the same stream and keeps its share of the batches; file-based
    # sharding does not apply to a stream of epochs.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return out.with_options(options).prefetch(tf.data.AUTOTUNE)
