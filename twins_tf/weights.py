"""Pre-trained weights: reading robust PyTorch checkpoints and loading them into Keras ResNets.

The robust ImageNet models TWINS starts from (Salman et al. 2020) exist only as PyTorch
checkpoints written by the robustness library: a `torch.save` dict with the state dict under
'model' (older files: 'state_dict'), keys `module.model.<torchvision key>`, a duplicate copy
under `module.attacker.model.`, the input normaliser at `module.normalizer.new_mean/new_std`,
plus 'epoch' and optimiser entries.  Nothing in Keras reads such files, and torch's generic
`load_state_dict` machinery needs a torch module, so this module does the mapping itself:

  * `read_checkpoint` / `read_torch_checkpoint`: a file (robustness checkpoint, torchvision
    `.pth`/`.pt`, `.safetensors`, `.npz`) to {torchvision key: numpy array}.
  * `load_torch_state_dict`: such a dict into a `twins_tf.models.build_resnet` model (OIHW to
    HWIO, (out, in) to (in, out), BN statistics into both wings of a twin layer).
  * `load_pretrained`: a Keras `.weights.h5` file written by `python -m twins_tf.convert` or by
    `model.save_weights` of a `build_resnet` model, into a freshly built model of the same arch,
    twin or plain, with a fresh head by default.

Safety: a PyTorch checkpoint is a pickle, and unpickling runs code.  Files are read with
`torch.load(weights_only=True)`, which only rebuilds tensors and plain containers; a file that
needs more is refused unless the caller passes `allow_pickle=True` (`--allow_pickle`).
`.safetensors` and `.npz` (read with `allow_pickle=False`) hold raw arrays only and need no
torch.  torch is an optional dependency (`pip install twins_tf[torch]`).

Every mismatch (missing or unexpected keys, wrong shapes, wrong arch, wrong number of classes)
is an error that names the offending keys; nothing is ever partially loaded.
"""
import dataclasses
import os
import pickle
import re
import warnings
import zipfile

import keras
import numpy as np

from twins_tf.layers import TwinBatchNormalization
from twins_tf.models.resnet import ARCHITECTURES, IMAGENET_MEAN, IMAGENET_STD, build_resnet

_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_CONTAINER_KEYS = ("model", "state_dict")
_SKIPPED_TOP_LEVEL = ("optimizer", "schedule", "amp")
_EPS_IN_NAME = re.compile(r"(linf|l2)_eps([0-9]+(?:\.[0-9]+)?)", re.IGNORECASE)


class CheckpointError(ValueError):
    """A weights file cannot be read or does not fit the model."""


class UnsafeCheckpointError(CheckpointError):
    """A PyTorch file needs full unpickling (code execution) and allow_pickle was not given."""


class CheckpointWarning(UserWarning):
    """Something in a checkpoint is unusual but loadable (e.g. non-ImageNet normaliser)."""


@dataclasses.dataclass
class Checkpoint:
    """What `read_checkpoint` found in a file.

    Attributes:
      state_dict: {torchvision key: float32 numpy array}, prefixes and duplicates removed,
        `num_batches_tracked` dropped.
      metadata: what else the file says, for reports: "format" (robustness / torch /
        safetensors / npz), "container" ('model', 'state_dict' or None), "epoch" and "eps"
        when present ("eps_source" says whether from the file or its name), "arch" (inferred
        from the keys, None if unknown; an 'arch' entry of the file is kept as "file_arch"),
        "normalizer_mean"/"normalizer_std" when present, "dropped_keys" (duplicates under
        `attacker.` and `num_batches_tracked`), and the file's other top-level scalars.
    """

    state_dict: dict
    metadata: dict


# --- reading files --------------------------------------------------------------------------
def read_torch_checkpoint(path, *, allow_pickle=False):
    """Reads a checkpoint file into {torchvision key: numpy array}.

    Accepts robustness-library checkpoints ('model' or 'state_dict' entry; `module.`,
    `model.`, `module.model.` prefixes; `attacker.` duplicates dropped; the normaliser checked
    against the ImageNet mean/std with a `CheckpointWarning` if different), plain torchvision
    state dicts (`.pth`/`.pt`, with or without DataParallel's `module.`), `.safetensors` and
    `.npz` files of such dicts.  The format is recognised from the file's content, not its name.

    Args:
      path: the file.
      allow_pickle: let `torch.load` unpickle arbitrary Python objects.  This runs code from
        the file: only for files from a source you trust.

    Returns:
      {torchvision key: float32 numpy array}.  See `read_checkpoint` for the metadata too.

    Raises:
      FileNotFoundError: no such file.
      UnsafeCheckpointError: the file needs full unpickling and allow_pickle is False.
      CheckpointError: corrupt, truncated or not a checkpoint.
      ImportError: a PyTorch file and torch is not installed.

    Example:
      >>> state_dict = read_torch_checkpoint("resnet50_linf_eps4.0.ckpt")
      >>> state_dict["layer1.0.bn1.running_var"].shape
      (64,)
    """
    return read_checkpoint(path, allow_pickle=allow_pickle).state_dict


def read_checkpoint(path, *, allow_pickle=False):
    """Like `read_torch_checkpoint`, returning a `Checkpoint` with the file's metadata too."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    kind = _sniff_format(path)
    container = None
    if kind == "safetensors":
        raw, top_level = _read_safetensors(path), {}
    elif kind == "npz":
        raw, top_level = _read_npz(path), {}
    else:
        payload = _torch_load(path, allow_pickle)
        raw, top_level, container = _unwrap_torch_payload(path, payload)
    state_dict, metadata = _normalise_keys(path, raw)
    metadata["container"] = container
    metadata["format"] = (
        "robustness" if metadata.pop("had_model_prefix") and kind == "torch" else kind
    )
    for key, value in _scalar_metadata(top_level).items():  # e.g. epoch, best_acc1
        metadata.setdefault("file_arch" if key == "arch" else key, value)
    _add_eps(metadata, top_level, path)
    metadata["arch"] = infer_arch_from_state_dict(state_dict)
    return Checkpoint(state_dict, metadata)


def _sniff_format(path):
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(_ZIP_MAGIC):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            raise CheckpointError(
                f"{path} is a corrupt or truncated zip archive ({e}); expected a complete "
                "PyTorch checkpoint or .npz file."
            ) from None
        if names and all(n.endswith(".npy") for n in names):
            return "npz"
        if any(n.endswith("data.pkl") for n in names):
            return "torch"
        raise CheckpointError(
            f"{path} is a zip archive but neither a PyTorch checkpoint (no data.pkl) nor an "
            ".npz of arrays."
        )
    if head.startswith(b"\x80"):  # pickle protocol >= 2: PyTorch's legacy (pre-1.6) format
        return "torch"
    if head.startswith(_HDF5_MAGIC):
        raise CheckpointError(
            f"{path} is an HDF5 file (a Keras weights file?), not a PyTorch checkpoint; load "
            "Keras weights with twins_tf.weights.load_pretrained."
        )
    if len(head) >= 9 and head[8:9] == b"{":  # 8-byte little-endian header size, JSON header
        return "safetensors"
    raise CheckpointError(
        f"{path} is not a checkpoint: expected a PyTorch file (.pt/.pth/.ckpt), .safetensors "
        "or .npz."
    )


def _torch_load(path, allow_pickle):
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"reading the PyTorch file {path} needs torch: pip install twins_tf[torch] (or "
            "convert it to .safetensors/.npz where torch is installed)."
        ) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as e:
        if not allow_pickle and _needs_unpickling(e):
            raise UnsafeCheckpointError(
                f"{path} holds pickled Python objects beyond tensors ({_unsafe_reason(e)}), "
                "so the safe loader (torch.load weights_only=True) refused it. Unpickling it "
                "can run arbitrary code from the file: only if you trust its source, pass "
                "allow_pickle=True (python -m twins_tf.convert --allow_pickle)."
            ) from None
        raise _corrupt(path, e) from None
    except ModuleNotFoundError as e:
        raise CheckpointError(
            f"{path} needs the Python module {e.name!r} to unpickle; install it and retry."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, ImportError) as e:
        raise _corrupt(path, e) from None


def _needs_unpickling(error):
    """True if weights_only refused a Python object (not a damaged byte stream)."""
    text = str(error)
    return "Weights only load failed" in text and any(
        # torch's messages for a refused Python object (module global, class, reduce call);
        # other failures ("Unsupported operand", ...) are damaged bytes, not unsafe content.
        marker in text for marker in ("GLOBAL ", "allowlist", "unrecognized function")
    )


def _unsafe_reason(error):
    match = re.search(r"GLOBAL ([\w.]+)", str(error))
    return f"it references {match.group(1)}" if match else "it is not tensors-only"


def _corrupt(path, error):
    text = str(error).strip()
    detail = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    if detail:
        first_line = detail.group(1).strip()
    else:
        first_line = text.splitlines()[0] if text else type(error).__name__
    return CheckpointError(
        f"{path} is corrupt, truncated or not a PyTorch checkpoint ({first_line}); expected a "
        "file written by torch.save."
    )


def _read_safetensors(path):
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{path} is a corrupt or truncated .safetensors file ({e}); expected a complete one."
        ) from None


def _read_npz(path):
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except ValueError as e:
        raise CheckpointError(
            f"{path}: an .npz of object arrays needs unpickling, which twins_tf refuses; save "
            f"plain numeric arrays instead ({e})."
        ) from None
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise CheckpointError(f"{path} is a corrupt or truncated .npz file ({e}).") from None


def _unwrap_torch_payload(path, payload):
    """Returns (flat state dict, top-level entries, container key)."""
    if hasattr(payload, "state_dict") and callable(payload.state_dict):  # a whole nn.Module
        return payload.state_dict(), {}, None
    if not isinstance(payload, dict):
        raise CheckpointError(
            f"{path} holds a {type(payload).__name__}, not a state dict or a dict with a "
            "'model'/'state_dict' entry."
        )
    for key in _CONTAINER_KEYS:
        if key in payload:
            inner = payload[key]
            if hasattr(inner, "state_dict") and callable(inner.state_dict):
                inner = inner.state_dict()
            if not isinstance(inner, dict):
                raise CheckpointError(
                    f"{path}: entry {key!r} is a {type(inner).__name__}, expected a state dict."
                )
            top_level = {k: v for k, v in payload.items() if k != key}
            return inner, top_level, key
    return payload, {}, None


def _to_numpy(path, key, value):
    if isinstance(value, np.ndarray):
        array = value
    elif hasattr(value, "detach"):  # a torch.Tensor (torch imported by whoever made it)
        tensor = value.detach().cpu()
        if tensor.is_floating_point():
            tensor = tensor.float()
        array = tensor.numpy()
    else:
        raise CheckpointError(
            f"{path}: entry {key!r} is a {type(value).__name__}, expected a tensor; is this a "
            "model state dict?"
        )
    return array.astype(np.float32) if array.dtype.kind == "f" else array


def _normalise_keys(path, raw):
    """Strips robustness/DataParallel prefixes; returns (state dict, metadata)."""
    state_dict, normalizer, dropped, had_model_prefix = {}, {}, 0, False
    for key, value in raw.items():
        name = key[len("module."):] if key.startswith("module.") else key
        if name.startswith("attacker.") or name.endswith("num_batches_tracked"):
            dropped += 1
            continue
        if name.startswith("normalizer."):
            normalizer[name[len("normalizer."):]] = _to_numpy(path, key, value)
            continue
        if name.startswith("model."):
            name, had_model_prefix = name[len("model."):], True
        array = _to_numpy(path, key, value)
        if name in state_dict and not np.array_equal(state_dict[name], array):
            raise CheckpointError(f"{path}: two different tensors map to {name!r}.")
        state_dict[name] = array
    if not state_dict:
        raise CheckpointError(f"{path} contains no model weights (after dropping {dropped}).")
    metadata = {"dropped_keys": dropped, "had_model_prefix": had_model_prefix}
    metadata.update(_check_normalizer(path, normalizer))
    return state_dict, metadata


def _check_normalizer(path, normalizer):
    if not normalizer:
        return {}
    mean = normalizer.get("new_mean")
    std = normalizer.get("new_std")
    info = {}
    if mean is not None:
        info["normalizer_mean"] = tuple(float(v) for v in mean.reshape(-1))
    if std is not None:
        info["normalizer_std"] = tuple(float(v) for v in std.reshape(-1))
    expected = {"normalizer_mean": IMAGENET_MEAN, "normalizer_std": IMAGENET_STD}
    for name, values in info.items():
        if len(values) != 3 or not np.allclose(values, expected[name], atol=1e-4):
            warnings.warn(
                f"{path}: the checkpoint's input normaliser {name.split('_')[1]} is {values}, "
                f"not ImageNet's {expected[name]}; twins_tf models normalise with ImageNet's, "
                "so this network will see differently scaled inputs than it was trained on.",
                CheckpointWarning,
                stacklevel=4,
            )
    return info


def _scalar_metadata(top_level):
    out = {}
    for key, value in top_level.items():
        if key in _SKIPPED_TOP_LEVEL:
            continue
        if isinstance(value, (bool, int, float, str)):
            out[key] = value
        elif hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
            out[key] = value.item()
    return out


def _add_eps(metadata, top_level, path):
    """eps from the file ('eps' entry or an 'args' namespace) or else from its name."""
    args = top_level.get("args")
    args = vars(args) if hasattr(args, "__dict__") else args
    for source in (top_level, args if isinstance(args, dict) else {}):
        for key in ("eps", "epsilon"):
            if key in source and isinstance(source[key], (int, float, str)):
                metadata["eps"], metadata["eps_source"] = source[key], "file"
                metadata.pop("epsilon", None)
                return
    match = _EPS_IN_NAME.search(os.path.basename(path))
    if match:
        # robustness-library file names give L-inf eps in 1/255 units, L2 eps as is.
        norm = match.group(1).lower()
        metadata["eps"] = float(match.group(2)) / (255.0 if norm == "linf" else 1.0)
        metadata["eps_source"] = f"file name: {norm} eps{match.group(2)}" + (
            "/255" if norm == "linf" else ""
        )


def infer_arch_from_state_dict(state_dict):
    """The `ARCHITECTURES` name whose torchvision keys `state_dict` has, or None."""
    depths = []
    for stage in range(1, 5):
        blocks = {int(k.split(".")[1]) for k in state_dict if k.startswith(f"layer{stage}.")}
        depths.append(max(blocks) + 1 if blocks else 0)
    kind = "bottleneck" if any(".conv3." in k for k in state_dict) else "basic"
    first = state_dict.get("layer1.0.conv1.weight")
    factor = 1
    if kind == "bottleneck" and first is not None:
        factor = int(first.shape[0]) // 64
    for name, spec in ARCHITECTURES.items():
        if spec == (kind, tuple(depths), factor):
            return name
    return None


# --- putting arrays into Keras models -------------------------------------------------------
def infer_arch(model):
    """The `ARCHITECTURES` name of a `build_resnet` model, from its layer names.

    Raises:
      CheckpointError: the model is not a torchvision-layout ResNet from `build_resnet`.
    """
    layers = {layer.name: layer for layer in model._flatten_layers(include_self=False)}
    depths = tuple(
        sum(1 for i in range(200) if f"layer{stage}_{i}_conv1" in layers) for stage in range(1, 5)
    )
    kind = "bottleneck" if "layer1_0_conv3" in layers else "basic"
    factor = layers["layer1_0_conv1"].filters // 64 if "layer1_0_conv1" in layers else 0
    factor = factor if kind == "bottleneck" else 1
    for name, spec in ARCHITECTURES.items():
        if spec == (kind, depths, factor) and "conv1" in layers and "fc" in layers:
            return name
    raise CheckpointError(
        f"model {model.name!r} is not a twins_tf.models.build_resnet ResNet (blocks per stage "
        f"{depths}); build it with build_resnet(arch, ...) to load pre-trained weights."
    )


def _weighted_layers(model):
    """{layer name: layer} for the layers that carry torchvision weights."""
    kinds = (
        keras.layers.Conv2D, keras.layers.BatchNormalization, TwinBatchNormalization,
        keras.layers.Dense,
    )
    return {
        layer.name: layer
        for layer in model._flatten_layers(include_self=False)
        if isinstance(layer, kinds)
    }


def _torch_keys(layer):
    """torchvision key -> (Keras attribute names, transform) for one layer."""
    prefix = layer.name.replace("_", ".")
    if isinstance(layer, keras.layers.Conv2D):
        return {f"{prefix}.weight": ("kernel", lambda w: np.transpose(w, (2, 3, 1, 0)))}
    if isinstance(layer, keras.layers.Dense):
        return {
            f"{prefix}.weight": ("kernel", lambda w: np.transpose(w)),
            f"{prefix}.bias": ("bias", None),
        }
    return {  # BatchNormalization and TwinBatchNormalization
        f"{prefix}.weight": ("gamma", None),
        f"{prefix}.bias": ("beta", None),
        f"{prefix}.running_mean": ("moving_mean", None),
        f"{prefix}.running_var": ("moving_variance", None),
    }


_FROZEN_TWIN = {
    "gamma": "frozen_gamma",
    "beta": "frozen_beta",
    "moving_mean": "frozen_mean",
    "moving_variance": "frozen_variance",
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
    expected = {}  # torchvision key -> (layer, attribute, transform)
    for layer in _weighted_layers(model).values():
        for key, (attribute, transform) in _torch_keys(layer).items():
            if key.startswith("fc.") and not head:
                continue
            expected[key] = (layer, attribute, transform)
    provided = {k for k in state_dict if head or not k.startswith("fc.")}
    missing, unexpected = set(expected) - provided, provided - set(expected)
    if missing or unexpected:
        raise CheckpointError(_key_mismatch_message(arch, state_dict, missing, unexpected))

    assignments, bad_shapes = [], []
    for key, (layer, attribute, transform) in expected.items():
        value = np.asarray(_to_numpy("state dict", key, state_dict[key]))
        value = transform(value) if transform else value
        variable = getattr(layer, attribute)
        if tuple(value.shape) != tuple(variable.shape):
            bad_shapes.append(f"{key} {tuple(value.shape)} vs {tuple(variable.shape)}")
            continue
        assignments.append((variable, value))
        if isinstance(layer, TwinBatchNormalization):
            assignments.append((getattr(layer, _FROZEN_TWIN[attribute]), value))
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
    return (
        f"checkpoint does not fit {wanted} (expected torchvision {wanted} keys): "
        + "; ".join(parts)
    )


# --- Keras weights files (`python -m twins_tf.convert`, `model.save_weights`) ---------------
HEAD_ATTRIBUTE = "twins_tf_head_from_checkpoint"


def conv_layer_count(arch):
    """Number of Conv2D layers of `arch` (stem, blocks, downsample shortcuts)."""
    kind, depths, _ = ARCHITECTURES[arch]
    return 1 + (2 if kind == "basic" else 3) * sum(depths) + (3 if kind == "basic" else 4)


def load_pretrained(model, path, *, head=False):
    """Loads a Keras weights file of a `build_resnet` ResNet into `model` (same arch).

    Accepts the `.weights.h5` files `python -m twins_tf.convert` writes and those
    `model.save_weights` writes for any `build_resnet` model of the same arch, twin or plain,
    any number of classes.  Convolutions are copied; BN layers map as
    plain -> plain, plain -> both wings of a twin, twin -> twin (both wings as saved),
    twin -> plain (the Adaptive wing, as `untwin` does).  With `head=False` (fine-tuning) the
    model keeps its fresh `fc`; `head=True` copies `fc` too and needs the same num_classes.

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
            groups = _weight_groups(f)
            head_from_checkpoint = bool(f.attrs.get(HEAD_ATTRIBUTE, True))
    except (OSError, KeyError) as e:
        raise CheckpointError(
            f"{path} is corrupt, truncated or not a Keras weights file ({e}); expected a "
            ".weights.h5 written by python -m twins_tf.convert or model.save_weights."
        ) from None
    source_twin = any(g.startswith("twin_batch_normalization") for g in groups)
    convs = sum(1 for g in groups if re.fullmatch(r"conv2d(_\d+)?", g))
    if convs != conv_layer_count(arch) or "dense" not in groups:
        same_count = [a for a in ARCHITECTURES if conv_layer_count(a) == convs]
        found = " or ".join(same_count) if same_count else "no twins_tf ResNet"
        raise CheckpointError(
            f"{path} does not hold {arch} weights: it has {convs} conv layers "
            f"({found}), {arch} has {conv_layer_count(arch)}; convert/build the same arch."
        )
    source_classes = int(groups["dense"][0][1])
    template = build_resnet(arch, source_classes, twin=source_twin, input_shape=(None, None, 3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            template.load_weights(path)
        except (ValueError, OSError, KeyError) as e:
            raise CheckpointError(
                f"{path} does not fit a {arch} ({str(e).splitlines()[0]})."
            ) from None
    skipped = [w for w in caught if "Skipping" in str(w.message)]
    if skipped:
        raise CheckpointError(
            f"{path} does not fit a {arch}: Keras skipped parts of it "
            f"({str(skipped[0].message).splitlines()[0]})."
        )
    if head:
        if not head_from_checkpoint:
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


def _weight_groups(h5file):
    """{Keras layer group: [shapes of its variables]} for groups that hold variables."""
    layers = h5file["layers"]
    out = {}
    for name in layers:
        group = layers[name]
        if "vars" in group and len(group["vars"]):
            out[name] = [group["vars"][str(i)].shape for i in range(len(group["vars"]))]
    return out


def _copy_weights(source, target, *, head):
    source_layers = _weighted_layers(source)
    assignments = []
    for name, layer in _weighted_layers(target).items():
        if name == "fc" and not head:
            continue
        src = source_layers[name]
        attributes = ("kernel", "bias") if name == "fc" else (
            ("kernel",) if hasattr(layer, "kernel") else tuple(_FROZEN_TWIN)
        )
        for attribute in attributes:
            assignments.append((getattr(layer, attribute), getattr(src, attribute)))
            if attribute in _FROZEN_TWIN and isinstance(layer, TwinBatchNormalization):
                frozen = _FROZEN_TWIN[attribute]
                from_wing = frozen if isinstance(src, TwinBatchNormalization) else attribute
                assignments.append((getattr(layer, frozen), getattr(src, from_wing)))
    for variable, value in assignments:
        if tuple(variable.shape) != tuple(value.shape):
            raise CheckpointError(
                f"{variable.path}: saved shape {tuple(value.shape)} does not fit "
                f"{tuple(variable.shape)}."
            )
    for variable, value in assignments:
        variable.assign(value)


def convert_checkpoint(checkpoint, arch, output, *, allow_pickle=False, num_classes=None):
    """Converts a PyTorch checkpoint into the Keras weights file `load_pretrained` reads.

    The output is `model.save_weights` of `build_resnet(arch, C, twin=False)` (plain BN, the
    compact form; `load_pretrained` fills both wings of a twin model from it), with every
    tensor of the checkpoint loaded.  C is the checkpoint's head size (`fc.weight` rows, 1000 for
    ImageNet models).  A checkpoint without `fc` gets a fresh C-class head (C = `num_classes`,
    default 1000) and the file is marked so that `load_pretrained(..., head=True)` refuses it.

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
    import h5py

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
    model.save_weights(output)
    with h5py.File(output, "a") as f:
        f.attrs[HEAD_ATTRIBUTE] = has_head
        f.attrs["twins_tf_arch"] = arch
    return {
        **read.metadata,
        "tensors": len(loaded),
        "num_classes": classes,
        "head_from_checkpoint": has_head,
        "output": output,
    }
