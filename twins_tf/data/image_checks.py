"""Bad-image checks of image folders, before anything is written (`find_bad_images`)."""

import os

import tensorflow as tf


class BadImagesError(ValueError):
    """Folder images that cannot be decoded; the message lists them and says what to do."""


# (signature at the start, marker that must be near the end) of each format decode_image reads.
# A file that is not an image, or whose end was cut off (interrupted copy or download), fails.
_SIGNATURES = {
    "jpeg": (b"\xff\xd8\xff", b"\xff\xd9"),  # SOI ... EOI
    "png": (b"\x89PNG\r\n\x1a\n", b"IEND\xaeB`\x82"),  # signature ... IEND chunk + CRC
    "gif": (b"GIF8", b";"),  # GIF87a/GIF89a ... trailer
}
_TAIL_BYTES = 1024


def _image_file_is_whole(path):
    # Remote folders (gs://...) through tf.io.gfile like their listing; local files through
    # Python's open, 30x faster here than GFile (0.3 s against 9.5 s for 10,000 files).
    remote = "://" in path
    try:
        with tf.io.gfile.GFile(path, "rb") if remote else open(path, "rb") as f:
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


def checked_images(root, file_dicts, skip_bad_images):
    """`file_dicts` ({class: paths} each) without bad images, or BadImagesError naming them."""
    bad = set(find_bad_images([p for files in file_dicts for ps in files.values() for p in ps]))
    if not bad:
        return file_dicts
    listed = sorted(bad)
    if not skip_bad_images:
        raise BadImagesError(
            f"{len(bad)} image file(s) under {root} are not whole JPEG/PNG/GIF/BMP images: "
            f"{', '.join(listed[:10])}{', ...' if len(bad) > 10 else ''}; delete or replace "
            f"them, or pass --skip_bad_images to leave them out."
        )
    from absl import logging

    logging.warning(
        "Skipped %d image file(s) under %s that are not whole images (first: %s).",
        len(bad),
        root,
        ", ".join(listed[:10]),
    )
    kept = tuple(
        {c: [p for p in ps if p not in bad] for c, ps in files.items()} for files in file_dicts
    )
    empty = sorted({c for files in kept for c, ps in files.items() if not ps})
    if empty:
        raise BadImagesError(
            f"{root}: class folder(s) {', '.join(empty[:5])} hold no good "
            f"image after skipping bad ones; add images or remove the folder."
        )
    return kept
