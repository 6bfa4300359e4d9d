"""`load_splits`: a registered dataset's splits from local files, whatever their source."""

from twins_tf.data.digits_source import load_digits
from twins_tf.data.folder_source import load_folder
from twins_tf.data.registry import (
    FOLDER,
    SKLEARN_DIGITS,
    TFDS,
    DatasetSpec,
    get_dataset_spec,
)
from twins_tf.data.tfds_source import default_tfds_data_dir, load_tfds

VALIDATION_PROTOCOLS = ("carve", "none")


def load_splits(
    dataset,
    *,
    data_dir=None,
    tfds_data_dir=None,
    train_per_class=None,
    validation="carve",
    skip_bad_images=False,
):
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
        raise ValueError(
            f"validation={validation!r} is not a protocol; choose one of "
            f"{', '.join(VALIDATION_PROTOCOLS)}."
        )
    carve = validation == "carve"
    if spec.source == TFDS:
        return load_tfds(spec, tfds_data_dir or default_tfds_data_dir(), carve)
    if spec.source == FOLDER:
        return load_folder(
            spec, data_dir, train_per_class or spec.train_per_class, carve, skip_bad_images
        )
    if spec.source == SKLEARN_DIGITS:
        return load_digits(spec, carve)
    raise ValueError(f"{spec.name}: unknown source {spec.source!r}.")
