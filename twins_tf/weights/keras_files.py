"""Loading Keras weights files of a `build_resnet` ResNet into another of the same arch.

The files are those `python -m twins_tf.convert` writes and those `model.save_weights` of any
`build_resnet` model writes (a pre-training run's best weights, for instance): twin or plain,
any number of classes.  The file is first loaded into a template of its own kind, then copied
layer by layer, so a twin file can fill a plain model (the Adaptive wing) and a plain file a
twin model (both wings), through `twins_tf.bn_wings`.
"""

import os

import keras

from twins_tf import bn_wings
from twins_tf.layers import TwinBatchNormalization
from twins_tf.models.resnet import ARCHITECTURES, build_resnet
from twins_tf.platform import keras_private
from twins_tf.weights.architectures import conv_layer_count, infer_arch, weighted_layers
from twins_tf.weights.errors import CheckpointError

# The HDF5 attributes `convert` writes into its output (before the file gets its name, so a
# conversion's file always has them): whether `fc` came from the checkpoint, and the arch.
HEAD_ATTRIBUTE = "twins_tf_head_from_checkpoint"
ARCH_ATTRIBUTE = "twins_tf_arch"


def load_pretrained(model, path, *, head=False):
    """Loads a Keras weights file of a `build_resnet` ResNet into `model` (same arch).

    Accepts the `.weights.h5` files `python -m twins_tf.convert` writes and those
    `model.save_weights` writes for any `build_resnet` model of the same arch, twin or plain,
    any number of classes.  Convolutions are copied; BN layers map as
    plain -> plain, plain -> both wings of a twin, twin -> twin (both wings as saved),
    twin -> plain (the Adaptive wing, as `untwin` does).  With `head=False` (fine-tuning) the
    model keeps its fresh `fc`; `head=True` copies `fc` too and needs the same num_classes.

    Where the head came from is `convert`'s attribute `HEAD_ATTRIBUTE`: False (the checkpoint
    had no `fc`, the head is random) refuses `head=True`.  A file without it is not a
    conversion (`convert` writes it inside the file before the file appears, so no kill
    leaves a conversion without it) but a `model.save_weights` file, a run's or a user's:
    its head is the one the saved model held, neither known trained nor known random, and
    `head=True` copies it as saved, since whoever saved that model chose its head.

    Args:
      model: a `build_resnet` model (any num_classes, input_shape, upsample; twin or plain).
      path: the `.weights.h5` file.
      head: also copy the classifier head.

    Returns:
      A dict describing the load: "arch", "source_twin", "source_classes", "head_loaded".

    Raises:
      FileNotFoundError: no such file.
      CheckpointError: corrupt/truncated/not a Keras weights file, a file of another arch,
        or (head=True) a head that does not fit or was never loaded from a checkpoint.
    """
    import h5py

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pre-trained weights file not found: {path}")
    arch = infer_arch(model)
    if not path.endswith(".weights.h5"):
        raise CheckpointError(
            f"{path}: expected a Keras .weights.h5 file (from python -m twins_tf.convert or "
            "model.save_weights); convert PyTorch checkpoints with python -m twins_tf.convert."
        )
    try:
        with h5py.File(path, "r") as f:
            convs = len(keras_private.saved_layer_shapes(f, keras.layers.Conv2D))
            heads = keras_private.saved_layer_shapes(f, keras.layers.Dense)
            source_twin = bool(keras_private.saved_layer_shapes(f, TwinBatchNormalization))
            head_from_checkpoint = f.attrs.get(HEAD_ATTRIBUTE)  # None: not a conversion
    except (OSError, KeyError) as e:
        raise CheckpointError(
            f"{path} is corrupt, truncated or not a Keras weights file ({e}); expected a "
            ".weights.h5 written by python -m twins_tf.convert or model.save_weights."
        ) from None
    if convs != conv_layer_count(arch) or not heads:
        same_count = [a for a in ARCHITECTURES if conv_layer_count(a) == convs]
        found = " or ".join(same_count) if same_count else "no twins_tf ResNet"
        raise CheckpointError(
            f"{path} does not hold {arch} weights: it has {convs} conv layers "
            f"({found}), {arch} has {conv_layer_count(arch)}; convert/build the same arch."
        )
    source_classes = int(heads[0][0][1])  # the fc kernel is (features, classes)
    template = build_resnet(arch, source_classes, twin=source_twin, input_shape=(None, None, 3))
    try:
        skipped = keras_private.load_weights_collecting_skips(template, path)
    except (ValueError, OSError, KeyError) as e:
        raise CheckpointError(f"{path} does not fit a {arch} ({str(e).splitlines()[0]}).") from None
    if skipped:
        raise CheckpointError(
            f"{path} does not fit a {arch}: Keras skipped parts of it ({skipped[0]})."
        )
    if head:
        if head_from_checkpoint is not None and not bool(head_from_checkpoint):
            raise CheckpointError(
                f"{path} was converted from a checkpoint without an fc head, so it has no "
                "trained head to load: use head=False."
            )
        units = model.get_layer("fc").units
        if units != source_classes:
            raise CheckpointError(
                f"{path} has a {source_classes}-class head but the model's fc has {units}: "
                f"build the model with num_classes={source_classes} or use head=False."
            )
    _copy_weights(template, model, head=head)
    return {
        "arch": arch,
        "source_twin": source_twin,
        "source_classes": source_classes,
        "head_loaded": bool(head),
    }


def _copy_weights(source, target, *, head):
    """Copies the template `source` into `target` layer by layer, all or nothing."""
    source_layers = weighted_layers(source)
    assignments = []
    for name, layer in weighted_layers(target).items():
        if name == "fc" and not head:
            continue
        src = source_layers[name]
        if hasattr(layer, "kernel"):  # Conv2D, and the Dense head
            attributes = ("kernel", "bias") if name == "fc" else ("kernel",)
            assignments.extend((getattr(layer, a), getattr(src, a)) for a in attributes)
        else:
            assignments.extend(bn_wings.bn_assignments(src, layer))
    for variable, value in assignments:
        if tuple(variable.shape) != tuple(value.shape):
            raise CheckpointError(
                f"{variable.path}: saved shape {tuple(value.shape)} does not fit "
                f"{tuple(variable.shape)}."
            )
    for variable, value in assignments:
        variable.assign(value)
