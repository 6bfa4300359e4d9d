"""Converting a PyTorch / safetensors / npz checkpoint into a Keras weights file."""

import os

from twins_tf.models import registry
from twins_tf.platform import atomic_files
from twins_tf.weights.errors import CheckpointError
from twins_tf.weights.keras_files import ARCH_ATTRIBUTE, HEAD_ATTRIBUTE
from twins_tf.weights.layouts import layout_of
from twins_tf.weights.reading import read_checkpoint
from twins_tf.weights.torch_names import load_torch_state_dict


def convert_checkpoint(
    checkpoint, arch, output, *, allow_pickle=False, num_classes=None, image_size=224
):
    """Converts a PyTorch checkpoint into the Keras weights file `load_pretrained` reads.

    The output is `model.save_weights` of `build_model(arch, C, twin=False)` (plain BN, the
    compact form; `load_pretrained` fills both wings of a twin model from it), with every
    tensor of the checkpoint loaded.  C is the checkpoint's head size (the head weight's rows,
    1000 for ImageNet models).  A checkpoint without a head gets a fresh C-class head
    (C = `num_classes`, default 1000) and the file is marked so that
    `load_pretrained(..., head=True)` refuses it.
    The file appears at `output` whole, marks included, or not at all (`platform.atomic_files`):
    an interrupted conversion leaves the previous file there, if any, or none.

    Args:
      checkpoint: the PyTorch / safetensors / npz file.
      arch: one of `twins_tf.models.ARCHITECTURES`; must match the checkpoint.
      output: the `.weights.h5` file to write.
      allow_pickle: see `read_torch_checkpoint` (runs code from the file).
      num_classes: the expected head size; an error if the checkpoint's differs.
      image_size: the images the network will see (after any upsampling); only a ViT depends
        on it (its position embeddings are resampled to that patch grid, as timm does).

    Returns:
      The checkpoint's metadata (see `Checkpoint`) plus "tensors" (number of torchvision
      tensors loaded), "num_classes", "head_from_checkpoint" and "output".

    Raises:
      CheckpointError: an unknown arch, a file of another arch or size (naming the first key
        or shape that does not fit), or a head of another size than `num_classes`.
    """
    output = os.fspath(output)
    if not output.endswith(".weights.h5"):
        raise CheckpointError(f"output must end in .weights.h5 (Keras's format), got {output}.")
    try:
        layout = layout_of(arch)
    except ValueError as error:
        raise CheckpointError(str(error)) from None
    read = read_checkpoint(checkpoint, allow_pickle=allow_pickle)
    fc = read.state_dict.get(f"{layout.HEAD_PREFIX}weight")
    has_head = fc is not None
    classes = int(fc.shape[0]) if has_head and fc.ndim == 2 else int(num_classes or 1000)
    if num_classes is not None and has_head and classes != num_classes:
        raise CheckpointError(
            f"{checkpoint} has a {classes}-class head, not the {num_classes} classes asked for; "
            "drop --num_classes to keep the checkpoint's head."
        )
    size = int(image_size) if registry.weights_depend_on_image_size(arch) else None
    try:
        model = registry.build_model(arch, classes, twin=False, input_shape=(size, size, 3))
    except ValueError as error:  # an image size the ViT's patches do not tile
        raise CheckpointError(f"--image_size: {error}") from None
    loaded = load_torch_state_dict(model, read.state_dict, head=has_head)
    directory = os.path.dirname(os.path.abspath(output))
    os.makedirs(directory, exist_ok=True)
    # One step, the head's origin inside: no kill can leave weights at `output` that do not
    # say whether their head is the checkpoint's (load_pretrained refuses head=True when not).
    atomic_files.save_weights(model, output, {HEAD_ATTRIBUTE: has_head, ARCH_ATTRIBUTE: arch})
    return {
        **read.metadata,
        "tensors": len(loaded),
        "num_classes": classes,
        "head_from_checkpoint": has_head,
        "output": output,
    }
