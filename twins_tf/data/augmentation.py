"""Per-image transforms: decoding, the training augmentations and the evaluation transforms.

* "cifar": training: zero-pad 4 pixels, random 32x32 crop, horizontal flip (torchvision
  `RandomCrop(32, padding=4)` + `RandomHorizontalFlip`); evaluation: the image as is.
* "imagenet": training: random resized crop (scale 0.08-1, aspect ratio 3/4-4/3) to
  `image_size` + horizontal flip; evaluation: resize the *shorter side* to
  `round(image_size / 0.875)` (256 for 224, as torchvision's `Resize(256)`), then a centre crop
  of `image_size`.  Resizing is bilinear with antialiasing, like PIL's resize that
  torchvision applies to PIL images.
* "digits": training: zero-pad `image_size // 8` pixels and random crop, no flip (a flipped
  digit is a different glyph); evaluation: the image as is.

Randomness is stateless (`tf.image.stateless_*`, seeds passed in), so an augmented image is a
pure function of the image and its seed; `twins_tf.data.pipeline` says why.
"""

import math

import tensorflow as tf

from twins_tf.data.registry import CIFAR, DIGITS, IMAGENET, PREPROCESSING_KINDS

# The eval resize of "imagenet" preprocessing: shorter side image_size / 0.875 (224 -> 256).
CENTRE_CROP_FRACTION = 0.875
RANDOM_RESIZED_CROP_SCALE = (0.08, 1.0)
RANDOM_RESIZED_CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
CIFAR_PADDING = 4


def to_float_image(image):
    """Encoded bytes (JPEG/PNG/BMP/GIF), uint8 or float image -> float32 HWC3 in [0, 1]."""
    if image.dtype == tf.string:
        image = tf.io.decode_image(image, channels=3, expand_animations=False)
    if image.dtype != tf.float32:
        image = tf.image.convert_image_dtype(image, tf.float32)
    return image


def random_resized_crop_window(
    height,
    width,
    seed,
    *,
    scale=RANDOM_RESIZED_CROP_SCALE,
    ratio=RANDOM_RESIZED_CROP_RATIO,
    attempts=10,
):
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
    target_area = (
        h
        * w
        * tf.random.stateless_uniform([attempts], seeds[0], scale[0], scale[1], dtype=tf.float64)
    )
    aspect = tf.exp(
        tf.random.stateless_uniform(
            [attempts], seeds[1], math.log(ratio[0]), math.log(ratio[1]), dtype=tf.float64
        )
    )
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
    random_top = tf.random.stateless_uniform([], seeds[2], 0, height - crop_h + 1, dtype=tf.int32)
    random_left = tf.random.stateless_uniform([], seeds[3], 0, width - crop_w + 1, dtype=tf.int32)
    top = tf.where(found, random_top, (height - crop_h) // 2)
    left = tf.where(found, random_left, (width - crop_w) // 2)
    return top, left, crop_h, crop_w


def _resize(image, height, width):
    resized = tf.image.resize(image, tf.stack([height, width]), method="bilinear", antialias=True)
    return tf.clip_by_value(resized, 0.0, 1.0)


def random_resized_crop(image, size, seed):
    """torchvision-style random resized crop of a float HWC image to (size, size)."""
    shape = tf.shape(image)
    top, left, crop_h, crop_w = random_resized_crop_window(shape[0], shape[1], seed)
    crop = image[top : top + crop_h, left : left + crop_w]
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
    return image[top : top + size, left : left + size]


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
        image = pad_and_random_crop(
            tf.ensure_shape(image, [size, size, 3]), size, CIFAR_PADDING, crop_seed
        )
    elif spec.preprocessing == DIGITS:
        image = pad_and_random_crop(
            tf.ensure_shape(image, [size, size, 3]), size, max(1, size // 8), crop_seed
        )
    else:
        raise ValueError(
            f"Unknown preprocessing {spec.preprocessing!r}; choose one of {PREPROCESSING_KINDS}."
        )
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
        raise ValueError(
            f"Unknown preprocessing {spec.preprocessing!r}; choose one of {PREPROCESSING_KINDS}."
        )
    return tf.ensure_shape(image, [size, size, 3])
