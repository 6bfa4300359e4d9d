"""Putting a torchvision-keyed state dict into a `build_resnet` model.

The Keras layers of `build_resnet` are named after torchvision's modules with `_` for `.`
(`layer1_0_bn1` is `layer1.0.bn1`), so each torchvision key names its layer and variable:
conv kernels go from OIHW to HWIO, the `fc` weight from (out, in) to (in, out), and every BN
key goes into the BN's variable, in both wings of a twin layer (`twins_tf.bn_wings`).
"""

import keras
import numpy as np

from twins_tf import bn_wings
from twins_tf.weights.architectures import (
    infer_arch,
    infer_arch_from_state_dict,
    weighted_layers,
)
from twins_tf.weights.errors import CheckpointError
from twins_tf.weights.reading import to_numpy

_TORCH_BN = ("weight", "bias", "running_mean", "running_var")


def _torch_keys(layer):
    """torchvision key -> (the Keras variables it goes into, transform) for one layer."""
    prefix = layer.name.replace("_", ".")
    if isinstance(layer, keras.layers.Conv2D):
        return {f"{prefix}.weight": ([layer.kernel], lambda w: np.transpose(w, (2, 3, 1, 0)))}
    if isinstance(layer, keras.layers.Dense):
        return {
            f"{prefix}.weight": ([layer.kernel], np.transpose),
            f"{prefix}.bias": ([layer.bias], None),
        }
    return {  # BatchNormalization (one variable each) and TwinBatchNormalization (both wings)
        f"{prefix}.{torch_name}": (bn_wings.wing_variables(layer, attribute), None)
        for torch_name, attribute in zip(_TORCH_BN, bn_wings.PLAIN)
    }


def _summarise(keys, limit=6):
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > limit else shown


def load_torch_state_dict(model, state_dict, *, head=False):
    """Puts a torchvision-keyed state dict into a `build_resnet` model, all or nothing.

    Conv kernels go from OIHW to HWIO, the `fc` weight from (out, in) to (in, out); every BN
    gets gamma/beta/running mean/running variance, in **both** wings of a
    `TwinBatchNormalization`.  With `head=False` the model keeps its fresh `fc` and any `fc.*`
    entries are ignored; with `head=True` they are loaded and must fit the model's head.

    Args:
      model: a model from `twins_tf.models.build_resnet` (twin or plain).
      state_dict: {torchvision key: array}, e.g. from `read_torch_checkpoint`.
      head: also load `fc.weight` / `fc.bias`.

    Returns:
      The sorted list of torchvision keys that were loaded.

    Raises:
      CheckpointError: missing or unexpected keys (listed; with the checkpoint's arch when it
        can be told), or shapes that do not fit, including a head with a different number of
        classes.  Nothing is assigned when this is raised.

    Example:
      >>> model = build_resnet("resnet50", num_classes=10)
      >>> load_torch_state_dict(model, read_torch_checkpoint("resnet50_linf_eps4.0.ckpt"))
    """
    arch = infer_arch(model)
    state_dict = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    expected = {}  # torchvision key -> (variables, transform)
    for layer in weighted_layers(model).values():
        for key, (variables, transform) in _torch_keys(layer).items():
            if key.startswith("fc.") and not head:
                continue
            expected[key] = (variables, transform)
    provided = {k for k in state_dict if head or not k.startswith("fc.")}
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
        fc_shape = np.shape(state_dict.get("fc.weight", ()))
        if head and any(s.startswith("fc.") for s in bad_shapes) and len(fc_shape) == 2:
            raise CheckpointError(
                f"the checkpoint's head has {fc_shape[0]} classes but the model's fc has "
                f"{model.get_layer('fc').units}: build the model with num_classes="
                f"{fc_shape[0]} or load with head=False for a fresh head."
            )
        raise CheckpointError(
            "checkpoint shapes (after transposing to Keras layout) do not fit the model: "
            + _summarise(bad_shapes, limit=4)
        )
    for variable, value in assignments:
        variable.assign(value.astype(variable.dtype))
    return sorted(expected)


def _key_mismatch_message(wanted, state_dict, missing, unexpected):
    found = infer_arch_from_state_dict(state_dict)
    parts = []
    if found and found != wanted:
        parts.append(f"the checkpoint holds a {found} but the model is a {wanted}")
    if missing:
        parts.append(f"missing keys: {_summarise(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {_summarise(unexpected)}")
    return f"checkpoint does not fit {wanted} (expected torchvision {wanted} keys): " + "; ".join(
        parts
    )
