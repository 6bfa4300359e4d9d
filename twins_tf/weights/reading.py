"""Reading checkpoint files (PyTorch, .safetensors, .npz) into torchvision-keyed arrays.

The robust ImageNet models TWINS starts from (Salman et al. 2020) exist only as PyTorch
checkpoints written by the robustness library: a `torch.save` dict with the state dict under
'model' (older files: 'state_dict'), keys `module.model.<torchvision key>`, a duplicate copy
under `module.attacker.model.`, the input normaliser at `module.normalizer.new_mean/new_std`,
plus 'epoch' and optimiser entries.  This module turns any such file, a torchvision `.pth`,
a `.safetensors` or an `.npz` into {torchvision key: float32 numpy array} plus what else the
file says (format, epoch, eps, arch, normaliser).

Safety: a PyTorch checkpoint is a pickle, and unpickling runs code.  Files are read with
`torch.load(weights_only=True)`, which only rebuilds tensors and plain containers; a file that
needs more is refused unless the caller passes `allow_pickle=True` (`--allow_pickle`).
`.safetensors` and `.npz` (read with `allow_pickle=False`) hold raw arrays only and need no
torch.  The format is told from the file's bytes, never from its name.
"""

import dataclasses
import os
import pickle
import re
import warnings
import zipfile

import numpy as np

from twins_tf.models.common import IMAGENET_MEAN, IMAGENET_STD
from twins_tf.weights.errors import CheckpointError, CheckpointWarning, UnsafeCheckpointError
from twins_tf.weights.layouts import arch_from_state_dict

_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_CONTAINER_KEYS = ("model", "state_dict")
_SKIPPED_TOP_LEVEL = ("optimizer", "schedule", "amp")
_EPS_IN_NAME = re.compile(r"(linf|l2)_eps([0-9]+(?:\.[0-9]+)?)", re.IGNORECASE)


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


def read_torch_checkpoint(path, *, allow_pickle=False):
    """Reads a checkpoint file into {torchvision key: numpy array}.

    Accepts robustness-library checkpoints ('model' or 'state_dict' entry; `module.`,
    `model.`, `module.model.` prefixes; `attacker.` duplicates dropped; the normaliser checked
    against the ImageNet mean/std with a `CheckpointWarning` if different), plain torchvision
    state dicts (`.pth`/`.pt`, with or without DataParallel's `module.`), timm state dicts
    (ConvNeXt, ViT; Singh et al. 2023's files with their `base_model.` prefix), `.safetensors` and
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
    metadata["arch"] = arch_from_state_dict(state_dict)
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
        marker in text
        for marker in ("GLOBAL ", "allowlist", "unrecognized function")
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


def to_numpy(path, key, value):
    """A checkpoint entry (numpy array or torch tensor) as numpy, floats as float32.

    `path` and `key` only name the entry in the error for anything else.
    """
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
    """Strips robustness/DataParallel/`base_model.` prefixes; returns (state dict, metadata)."""
    state_dict, normalizer, dropped, had_model_prefix = {}, {}, 0, False
    for key, value in raw.items():
        name = key[len("module.") :] if key.startswith("module.") else key
        # Singh et al. 2023's training wraps the timm model as `base_model` of its attack wrapper.
        name = name[len("base_model.") :] if name.startswith("base_model.") else name
        if name.startswith("attacker.") or name.endswith("num_batches_tracked"):
            dropped += 1
            continue
        if name.startswith("normalizer."):
            normalizer[name[len("normalizer.") :]] = to_numpy(path, key, value)
            continue
        if name.startswith("model."):
            name, had_model_prefix = name[len("model.") :], True
        array = to_numpy(path, key, value)
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
