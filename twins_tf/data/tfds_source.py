"""tensorflow-datasets splits, read from prepared files only: loading never downloads.

`tfds.load` on a machine without the prepared data starts downloading and retries for
minutes before failing; `tfds_builder` instead checks that
`<tfds_data_dir>/<name>/<version>/dataset_info.json` exists and otherwise raises
`DatasetNotFoundError` at once, naming the files to download and where to put them.  Only then
are the prepared files read with `builder.as_dataset`, which never downloads.
"""

import os

import tensorflow as tf

from twins_tf.data.registry import DatasetNotFoundError
from twins_tf.data.splits import DatasetSplits


def default_tfds_data_dir():
    """`$TFDS_DATA_DIR` if set, else `~/tensorflow_datasets` (tensorflow-datasets' default)."""
    return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


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
        parts.append(
            f"Found only {', '.join(f.rstrip('/') for f in found) or 'nothing'} in "
            f"{dataset_root}; this tensorflow-datasets reads version {version}."
        )
    parts.append(
        f"With network: `tfds build {name} --data_dir={root}` (or build it elsewhere "
        f"and copy {name}/{version}/ into {root}/)."
    )
    files = {}
    for url, info in sorted((type(builder).url_infos or {}).items()):
        if info.filename and info.filename not in files and "drive.google" not in url:
            files[info.filename] = f"{url} ({info.size})"
    manual = os.path.join(root, "downloads", "manual")
    if files:
        listing = "; ".join(files.values())
        parts.append(
            f"Offline: download {listing} into {manual}/ and run `tfds build {name} "
            f"--data_dir={root} --manual_dir={manual}`."
        )
    return " ".join(parts)


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as error:  # pragma: no cover - it is an install requirement
        raise ImportError(
            "tfds datasets need tensorflow-datasets: pip install tensorflow-datasets==4.9.10"
        ) from error
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


def load_tfds(spec, tfds_data_dir, carve):
    tfds = _import_tfds()
    builder = tfds_builder(spec, tfds_data_dir)
    features = builder.info.features
    if "image" not in features or "label" not in features:
        raise ValueError(f"{spec.name}: tfds {spec.tfds_name} has no 'image'/'label' features.")
    label_feature = features["label"]
    if label_feature.num_classes != spec.num_classes:
        raise ValueError(
            f"{spec.name}: tfds {spec.tfds_name} {builder.version} has "
            f"{label_feature.num_classes} classes, the registry says {spec.num_classes}."
        )
    # Images are decoded later in the pipeline's parallel map; skip every image-like feature
    # (segmentation masks included) so tfds does not decode what we never use.
    decoders = {
        key: tfds.decode.SkipDecoding()
        for key, feature in features.items()
        if isinstance(feature, tfds.features.Image)
    }

    def read(split):
        ds = builder.as_dataset(split=split, decoders=decoders, shuffle_files=False)
        return ds.map(
            lambda ex: (ex["image"], tf.cast(ex["label"], tf.int32)),
            num_parallel_calls=tf.data.AUTOTUNE,
        )

    names = {
        "train": spec.train_split,
        "validation": spec.validation_split,
        "test": spec.test_split,
    }
    if not carve:
        names = {"train": official_train_split(spec.train_split), "test": spec.test_split}
    datasets = {key: read(split) for key, split in names.items()}
    counts = {key: int(ds.cardinality()) for key, ds in datasets.items()}
    datasets.setdefault("validation", None)
    counts.setdefault("validation", 0)
    return DatasetSplits(
        spec=spec,
        num_examples=counts,
        num_classes=spec.num_classes,
        class_names=tuple(label_feature.names),
        **datasets,
    )
