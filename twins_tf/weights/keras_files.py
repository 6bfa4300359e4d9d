"""Loading Keras weights files of a `build_model` network into another of the same arch.

The files are those `python -m twins_tf.convert` writes and those `model.save_weights` of any
`build_model` model writes (a pre-training run's best weights, for instance): twin or plain,
any number of classes.  The file is first loaded into a template of its own kind, then copied
layer by layer, so a twin file can fill a plain model (the Adaptive wing) and a plain file a
twin model (both wings), through `twins_tf.bn_wings`.
"""

import os

import keras

from twins_tf import bn_wings
from twins_tf.layers import TwinBatchNormalization
from twins_tf.models import heads as heads_lib
from twins_tf.models import registry
from twins_tf.models.resnet import ARCHITECTURES as RESNETS
from twins_tf.platform import keras_private
from twins_tf.weights.architectures import conv_layer_count
from twins_tf.weights.errors import CheckpointError
from twins_tf.weights.torch_names import model_arch

# The HDF5 attributes `convert` writes into its output (before the file gets its name, so a
# conversion's file always has them): whether `fc` came from the checkpoint, and the arch.
HEAD_ATTRIBUTE = "twins_tf_head_from_checkpoint"
ARCH_ATTRIBUTE = "twins_tf_arch"


def load_pretrained(model, path, *, head=False):
    """Loads a Keras weights file of a `build_model` network into `model` (same arch).

    Accepts the `.weights.h5` files `python -m twins_tf.convert` writes and those
    `model.save_weights` writes for any `build_model` model of the same arch, twin or plain,
    any number of classes.  A ViT's position embeddings have the shape of its patch grid, so
    its file must come from a model that sees images of the same size (`convert
    --image_size`).  Every layer's weights are copied; BN layers map as plain -> plain,
    plain -> both wings of a twin, twin -> twin (both wings as saved), twin -> plain (the
    Adaptive wing, as `untwin` does).  With `head=False` (fine-tuning) the model keeps its
    fresh head; `head=True` copies the head too and needs the same num_classes.

    Where the head came from is `convert`'s attribute `HEAD_ATTRIBUTE`: False (the checkpoint
    had no `fc`, the head is random) refuses `head=True`.  A file without it is not a
    conversion (`convert` writes it inside the file before the file appears, so no kill
    leaves a conversion without it) but a `model.save_weights` file, a run's or a user's:
    its head is the one the saved model held, neither known trained nor known random, and
    `head=True` copies it as saved, since whoever saved that model chose its head.

    Args:
      model: a `build_model` model (any num_classes, input_shape, upsample; twin or plain).
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
    arch = model_arch(model)
    if not path.endswith(".weights.h5"):
        raise CheckpointError(
            f"{path}: expected a Keras .weights.h5 file (from python -m twins_tf.convert or "
            "model.save_weights); convert PyTorch checkpoints with python -m twins_tf.convert."
        )
    try:
        with h5py.File(path, "r") as f:
            inventory = {kind: keras_private.saved_layer_shapes(f, kind) for kind in _KINDS}
            head_from_checkpoint = f.attrs.get(HEAD_ATTRIBUTE)  # None: not a conversion
            file_arch = f.attrs.get(ARCH_ATTRIBUTE)
    except (OSError, KeyError) as e:
        raise CheckpointError(
            f"{path} is corrupt, truncated or not a Keras weights file ({e}); expected a "
            ".weights.h5 written by python -m twins_tf.convert or model.save_weights."
        ) from None
    heads = inventory[keras.layers.Dense]
    if not heads:
        raise CheckpointError(f"{path} holds no Dense head: it is not a twins_tf model's file.")
    source_classes = int(heads[-1][0][1])  # the head is the last Dense; its kernel (in, classes)
    source_twin = bool(inventory[TwinBatchNormalization])
    template = registry.build_model(
        arch, source_classes, twin=source_twin, **_geometry(model, arch)
    )
    _check_inventory(path, arch, inventory, template)
    file_arch = file_arch.decode() if isinstance(file_arch, bytes) else file_arch
    if file_arch and str(file_arch) != arch:
        raise CheckpointError(
            f"{path} does not hold {arch} weights: it was converted as {file_arch}; "
            "convert/build the same arch."
        )
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
                f"{path} was converted from a checkpoint without a head (no fc), so it has no "
                "trained head to load: use head=False."
            )
        head_layer = heads_lib.head_layer(model)
        units = head_layer.units
        if units != source_classes:
            raise CheckpointError(
                f"{path} has a {source_classes}-class head but the model's {head_layer.name} "
                f"has {units}: build the model with num_classes={source_classes} or use "
                "head=False."
            )
    _copy_weights(template, model, head=head)
    return {
        "arch": arch,
        "source_twin": source_twin,
        "source_classes": source_classes,
        "head_loaded": bool(head),
    }


# The layer kinds whose count in a file tells an arch apart (the head is the last Dense).
_KINDS = (
    keras.layers.Conv2D,
    keras.layers.Dense,
    keras.layers.LayerNormalization,
    TwinBatchNormalization,
)


def _geometry(model, arch):
    """The input shape and upsampling to build a template of `model`'s arch at.

    A ResNet's or ConvNeXt's weights fit any image size; a ViT's position embeddings fit one
    patch grid, so its template sees the images `model` sees.
    """
    if not registry.weights_depend_on_image_size(arch):
        return {"input_shape": (None, None, 3)}
    upsample = next((layer.size[0] for layer in model.layers if layer.name == "upsample"), 1)
    return {"input_shape": tuple(model.input_shape[1:]), "upsample": int(upsample)}


def _check_inventory(path, arch, inventory, template):
    """CheckpointError unless the file holds as many layers of each kind as `arch` has."""
    with_weights = [layer for layer in template.layers if layer.weights]
    for kind, saved in inventory.items():
        if kind is TwinBatchNormalization:
            continue  # twin or plain: both load
        wanted = sum(1 for layer in with_weights if type(layer) is kind)
        if len(saved) == wanted:
            continue
        name = kind.__name__
        if kind is keras.layers.Conv2D:
            same = [a for a in RESNETS if conv_layer_count(a) == len(saved)]
            found = " or ".join(same) if same else "no twins_tf ResNet"
            raise CheckpointError(
                f"{path} does not hold {arch} weights: it has {len(saved)} conv layers "
                f"({found}), {arch} has {wanted}; convert/build the same arch."
            )
        raise CheckpointError(
            f"{path} does not hold {arch} weights: it has {len(saved)} {name} layers, "
            f"{arch} has {wanted}; convert/build the same arch."
        )


def _copy_weights(source, target, *, head):
    """Copies the template `source` into `target` layer by layer, all or nothing."""
    source_layers = {layer.name: layer for layer in bn_wings.nested_layers(source)}
    head_name = heads_lib.head_layer(target).name
    assignments = []
    for layer in bn_wings.nested_layers(target):
        if isinstance(layer, keras.Model) or not layer.weights:
            continue  # a nested model's weights are its layers'
        if layer.name == head_name and not head:
            continue
        src = source_layers[layer.name]
        if bn_wings.is_plain_bn(layer) or bn_wings.is_twin_bn(layer):
            assignments.extend(bn_wings.bn_assignments(src, layer))
        else:
            assignments.extend(zip(layer.weights, src.weights))
    for variable, value in assignments:
        if tuple(variable.shape) != tuple(value.shape):
            raise CheckpointError(
                f"{variable.path}: saved shape {tuple(value.shape)} does not fit "
                f"{tuple(variable.shape)}."
            )
    for variable, value in assignments:
        variable.assign(value)
