"""The dataset registry: one `DatasetSpec` row per dataset twins_tf knows (spec §6).

Every dataset is one row of `DATASETS` (big_vision style): where the images come from
(tensorflow-datasets, an image folder, or scikit-learn's digits), the train / validation /
test splits, the number of classes, the input size the model sees, the nearest-neighbour
upsampling the model applies (spec §3), and the preprocessing kind (see
`twins_tf.data.augmentation`).  The splits carve validation out of the training data (or take
the dataset's official validation split), never out of the test set: model selection on the
test set is one of the reference code's defects (spec §9).
"""

import dataclasses

CIFAR = "cifar"
IMAGENET = "imagenet"
DIGITS = "digits"
PREPROCESSING_KINDS = (CIFAR, IMAGENET, DIGITS)

TFDS = "tfds"
FOLDER = "folder"
SKLEARN_DIGITS = "sklearn_digits"

# Fixed seed of the deterministic splits of folder and digits datasets.  It is deliberately not
# the training seed: changing --seed must not move images between train and test.
SPLIT_SEED = 0


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


def _tfds(
    name,
    num_classes,
    *,
    image_size=224,
    upsample=1,
    preprocessing=IMAGENET,
    train="train[:90%]",
    validation="train[90%:]",
    test="test",
    description="",
):
    return DatasetSpec(
        name=name,
        source=TFDS,
        tfds_name=name,
        num_classes=num_classes,
        image_size=image_size,
        upsample=upsample,
        preprocessing=preprocessing,
        train_split=train,
        validation_split=validation,
        test_split=test,
        description=description,
    )


def _digits(name, classes, description):
    return DatasetSpec(
        name=name,
        source=SKLEARN_DIGITS,
        num_classes=len(classes),
        image_size=32,
        upsample=1,
        preprocessing=DIGITS,
        classes=tuple(classes),
        description=description,
    )


DATASETS = {
    spec.name: spec
    for spec in (
        _tfds(
            "cifar10",
            10,
            image_size=32,
            upsample=7,
            preprocessing=CIFAR,
            description="CIFAR-10, 32 px upsampled x7 to 224 inside the model",
        ),
        _tfds(
            "cifar100",
            100,
            image_size=32,
            upsample=7,
            preprocessing=CIFAR,
            description="CIFAR-100, 32 px upsampled x7 to 224 inside the model",
        ),
        _tfds("stanford_dogs", 120, description="Stanford Dogs, 12,000 train / 8,580 test"),
        _tfds("caltech_birds2011", 200, description="CUB-200-2011, 5,994 train / 5,794 test"),
        _tfds("caltech101", 102, description="Caltech-101 (tfds: 30 train images per class)"),
        _tfds(
            "oxford_flowers102",
            102,
            validation="validation",
            description="Oxford Flowers-102 with its official validation split",
        ),
        _tfds("oxford_iiit_pet", 37, description="Oxford-IIIT Pet"),
        _tfds(
            "dtd",
            47,
            validation="validation",
            description="Describable Textures (split 1) with its official validation split",
        ),
        _tfds(
            "food101",
            101,
            test="validation",
            description="Food-101; tfds calls the official test images 'validation'",
        ),
        DatasetSpec(
            name="caltech256",
            source=FOLDER,
            num_classes=257,
            image_size=224,
            upsample=1,
            preprocessing=IMAGENET,
            train_per_class=60,
            description="Caltech-256 (257 folders incl. clutter), seeded 60 train images per "
            "class, the rest test; --data_dir=.../256_ObjectCategories",
        ),
        DatasetSpec(
            name="folder",
            source=FOLDER,
            num_classes=None,
            image_size=224,
            upsample=1,
            preprocessing=IMAGENET,
            description="your images: --data_dir=PATH with train/ and test/ of class folders",
        ),
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
                f"be {image_size}; set upsample to enlarge them inside the model instead."
            )
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
