"""Putting a PyTorch state dict into a `build_model` model, all or nothing.

Each family's layout module (`weights.layouts`) says which Keras variables each of its PyTorch
keys fills; this module checks a state dict against that list (missing, unexpected and mis-shaped
keys are errors that name them) and assigns it whole.
"""

import numpy as np

from twins_tf.models import heads, registry
from twins_tf.weights.errors import CheckpointError
from twins_tf.weights.layouts import arch_from_state_dict, layout_of
from twins_tf.weights.reading import to_numpy


def model_arch(model):
    """The arch of a `build_model` model; CheckpointError if it is not one."""
    try:
        return registry.arch_of(model)
    except ValueError as error:
        raise CheckpointError(str(error)) from None


def _summarise(keys, limit=6):
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > limit else shown


def load_torch_state_dict(model, state_dict, *, head=False):
    """Puts a PyTorch state dict of the model's layout into a `build_model` model, all or nothing.

    The layout is the one the checkpoints of the model's family are written in (torchvision's
    for ResNets, timm's for ConvNeXts).  Conv kernels go from OIHW to HWIO, Linear weights from
    (out, in) to (in, out); every BN gets gamma/beta/running mean/running variance, in **both**
    wings of a `TwinBatchNormalization`.  With `head=False` the model keeps its fresh head and
    the checkpoint's head entries (`fc.*` for ResNets, `head.fc.*` for ConvNeXts) are ignored;
    with `head=True` they are loaded and must fit the model's head.

    Args:
      model: a model from `twins_tf.models.build_model` (twin or plain).
      state_dict: {PyTorch key: array}, e.g. from `read_torch_checkpoint`.
      head: also load the head's weight and bias.

    Returns:
      The sorted list of PyTorch keys that were loaded.

    Raises:
      CheckpointError: missing or unexpected keys (listed; with the checkpoint's arch when it
        can be told), or shapes that do not fit, including a head with a different number of
        classes.  Nothing is assigned when this is raised.

    Example:
      >>> model = build_resnet("resnet50", num_classes=10)
      >>> load_torch_state_dict(model, read_torch_checkpoint("resnet50_linf_eps4.0.ckpt"))
    """
    arch = model_arch(model)
    layout = layout_of(arch)
    head_prefix = layout.HEAD_PREFIX
    state_dict = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    expected = {  # PyTorch key -> (variables, transform)
        key: entry
        for key, entry in layout.torch_keys(model).items()
        if head or not key.startswith(head_prefix)
    }
    provided = {k for k in state_dict if head or not k.startswith(head_prefix)}
    missing, unexpected = set(expected) - provided, provided - set(expected)
    if missing or unexpected:
        raise CheckpointError(_key_mismatch_message(arch, state_dict, missing, unexpected))

    assignments, bad_shapes = [], []
    for key, (variables, transform) in expected.items():
        value = np.asarray(to_numpy("state dict", key, state_dict[key]))
        value = transform(value) if transform else value
        if tuple(value.shape) != tuple(variables[0].shape):
            bad_shapes.append(f"{key} {tuple(value.shape)} vs {tuple(variables[0].shape)}")
            continue
        assignments.extend((variable, value) for variable in variables)
    if bad_shapes:
        head_shape = np.shape(state_dict.get(f"{head_prefix}weight", ()))
        if head and any(s.startswith(head_prefix) for s in bad_shapes) and len(head_shape) == 2:
            layer = heads.head_layer(model)
            raise CheckpointError(
                f"the checkpoint's head has {head_shape[0]} classes but the model's "
                f"{layer.name} has {layer.units}: build the model with num_classes="
                f"{head_shape[0]} or load with head=False for a fresh head."
            )
        raise CheckpointError(
            "checkpoint shapes (after transposing to Keras layout) do not fit the model: "
            + _summarise(bad_shapes, limit=4)
        )
    for variable, value in assignments:
        variable.assign(value.astype(variable.dtype))
    return sorted(expected)


def _key_mismatch_message(wanted, state_dict, missing, unexpected):
    found = arch_from_state_dict(state_dict)
    parts = []
    if found and found != wanted:
        parts.append(f"the checkpoint holds a {found} but the model is a {wanted}")
    if missing:
        parts.append(f"missing keys: {_summarise(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {_summarise(unexpected)}")
    return (
        f"checkpoint does not fit {wanted} (expected the PyTorch keys of {wanted}): "
        + "; ".join(parts)
    )
