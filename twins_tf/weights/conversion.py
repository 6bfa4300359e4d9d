"""Converting a PyTorch / safetensors / npz checkpoint into a Keras weights file."""

import os

from twins_tf.models.resnet import ARCHITECTURES, build_resnet
from twins_tf.platform import atomic_files
from twins_tf.weights.errors import CheckpointError
from twins_tf.weights.keras_files import ARCH_ATTRIBUTE, HEAD_ATTRIBUTE
from twins_tf.weights.reading import read_checkpoint
from twins_tf.weights.torch_names import load_torch_state_dict


def convert_checkpoint(checkpoint, arch, output, *, allow_pickle=False, num_classes=None):
    """Converts a PyTorch checkpoint into the Keras weights file `load_pretrained` reads.

    The output is `model.save_weights` of `build_resnet(arch, C, twin=False)` (plain BN, the
    compact form; `load_pretrained` fills both wings of a twin model from it), with every
    tensor of the checkpoint loaded.  C is the checkpoint's head size (`fc.weight` rows, 1000 for
    ImageNet models).  A checkpoint without `fc` gets a fresh C-class head (C = `num_classes`,
    default 1000) and the file is marked so that `load_pretrained(..., head=True)` refuses it.
    The file appears at `output` whole, marks included, or not at all (`platform.atomic_files`):
    an interrupted conversion leaves the previous file there, if any, or none.

    Args:
      checkpoint: the PyTorch / safetensors / npz file.
      arch: one of `ARCHITECTURES`; must match the checkpoint.
      output: the `.weights.h5` file to write.
      allow_pickle: see `read_torch_checkpoint` (runs code from the file).
      num_classes: the expected head size; an error if the checkpoint's differs.

    Returns:
      The checkpoint's metadata (see `Checkpoint`) plus "tensors" (number of torchvision
      tensors loaded), "num_classes", "head_from_checkpoint" and "output".
    """
    output = os.fspath(output)
    if not output.endswith(".weights.h5"):
        raise CheckpointError(f"output must end in .weights.h5 (Keras's format), got {output}.")
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"unknown arch {arch!r}: expected one of {sorted(ARCHITECTURES)}.")
    read = read_checkpoint(checkpoint, allow_pickle=allow_pickle)
    fc = read.state_dict.get("fc.weight")
    has_head = fc is not None
    classes = int(fc.shape[0]) if has_head and fc.ndim == 2 else int(num_classes or 1000)
    if num_classes is not None and has_head and classes != num_classes:
        raise CheckpointError(
            f"{checkpoint} has a {classes}-class head, not the {num_classes} classes asked for; "
            "drop --num_classes to keep the checkpoint's head."
        )
    model = build_resnet(arch, classes, twin=False, input_shape=(None, None, 3))
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
