"""tf.data input pipelines: decode in a parallel map, augment, batch and prefetch.

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
"""

import tensorflow as tf

from twins_tf.data.augmentation import augment, evaluation_transform, to_float_image
from twins_tf.data.ordering import element_seed, epoch_permutation, stateless_shuffle
from twins_tf.data.splits import Rows


def check_batch_size(batch_size, num_replicas, twin):
    """Raises ValueError unless `batch_size` splits evenly over replicas (and wings).

    Each replica gets `batch_size / num_replicas` examples; a twin model further splits each
    replica's batch in two halves (spec §2), so twin methods need a multiple of
    2 x num_replicas.
    """
    if batch_size < 1 or num_replicas < 1:
        raise ValueError(
            f"batch_size ({batch_size}) and the number of replicas "
            f"({num_replicas}) must be positive."
        )
    multiple = num_replicas * (2 if twin else 1)
    if batch_size % multiple:
        what = (
            f"2 x {num_replicas} replica(s) = {multiple} (each replica's batch is split "
            f"into a Frozen and an Adaptive half)"
            if twin
            else f"the {num_replicas} replicas"
        )
        raise ValueError(
            f"--batch_size={batch_size} must be a multiple of {what}; use e.g. "
            f"{max(multiple, batch_size // multiple * multiple)}."
        )


def steps_per_epoch(num_examples, batch_size):
    """Full batches per epoch of a training pipeline (the last partial batch is dropped)."""
    steps = num_examples // batch_size
    if steps < 1:
        raise ValueError(
            f"The training split has {num_examples} examples, fewer than one "
            f"batch of {batch_size}; lower --batch_size."
        )
    return steps


def make_pipeline(ds, spec, *, training, batch_size, seed=0, start_epoch=0, shuffle_buffer=10_000):
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
        raise ValueError(
            f"Expected (image, label) elements with HWC images, got {ds.element_spec}."
        )
    seed = int(seed)

    if training:
        if num_examples < 0:
            raise ValueError(
                "The training split's size is unknown; give it one with "
                "ds.apply(tf.data.experimental.assert_cardinality(n))."
            )

        def one_epoch(epoch):
            if rows is not None:
                shuffled = rows.dataset(order=epoch_permutation(seed, epoch, num_examples))
            else:
                shuffled = stateless_shuffle(ds, seed, epoch, num_examples, shuffle_buffer)

            def transform(index, element):
                image, label = element
                image = augment(to_float_image(image), spec, element_seed(seed, epoch, index))
                return image, label

            return (
                shuffled.enumerate()
                .map(transform, num_parallel_calls=tf.data.AUTOTUNE)
                .batch(batch_size, drop_remainder=True)
            )

        out = tf.data.Dataset.counter(start=int(start_epoch)).flat_map(one_epoch)
    else:
        out = ds.map(
            lambda image, label: (evaluation_transform(to_float_image(image), spec), label),
            num_parallel_calls=tf.data.AUTOTUNE,
        ).batch(batch_size)
    options = tf.data.Options()
    options.deterministic = True
    # Every worker builds the same stream and keeps its share of the batches; file-based
    # sharding does not apply to a stream of epochs.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return out.with_options(options).prefetch(tf.data.AUTOTUNE)
