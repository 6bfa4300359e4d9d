"""Pre-trained weights: reading robust PyTorch checkpoints and loading them into Keras ResNets.

The robust ImageNet models TWINS starts from (Salman et al. 2020) exist only as PyTorch
checkpoints written by the robustness library: a `torch.save` dict with the state dict under
'model' (older files: 'state_dict'), keys `module.model.<torchvision key>`, a duplicate copy
under `module.attacker.model.`, the input normaliser at `module.normalizer.new_mean/new_std`,
plus 'epoch' and optimiser entries.  Nothing in Keras reads such files, and torch's generic
`load_state_dict` machinery needs a torch module, so this package does the mapping itself,
one module a job:

  * `reading`: `read_checkpoint` / `read_torch_checkpoint`, a file (robustness checkpoint,
    torchvision `.pth`/`.pt`, `.safetensors`, `.npz`) to {PyTorch key: numpy array}, and
    the safety rules for pickles;
  * `torch_names`: `load_torch_state_dict`, such a dict into a `twins_tf.models.build_model`
    model (OIHW to HWIO, (out, in) to (in, out), BN statistics into both wings of a twin);
  * `keras_files`: `load_pretrained`, a Keras `.weights.h5` file written by
    `python -m twins_tf.convert` or by `model.save_weights` of a `build_model` model, into a
    freshly built model of the same arch, twin or plain, with a fresh head by default;
  * `conversion`: `convert_checkpoint`, a checkpoint file to such a Keras file;
  * `layouts`: each family's PyTorch layout (`resnet_keys`: torchvision's; `convnext_keys`,
    `vit_keys`, sharing `timm_layers`: timm's) and which arch a state dict holds;
  * `architectures`: which ResNet a state dict or a model holds; `errors`: what they raise.

Which BN weight goes into which wing of a twin layer is `twins_tf.bn_wings`, shared with
`twinify`.  Every public name is importable from `twins_tf.weights` itself.

Safety: a PyTorch checkpoint is a pickle, and unpickling runs code.  Files are read with
`torch.load(weights_only=True)`, which only rebuilds tensors and plain containers; a file that
needs more is refused unless the caller passes `allow_pickle=True` (`--allow_pickle`).
`.safetensors` and `.npz` (read with `allow_pickle=False`) hold raw arrays only and need no
torch.  torch is an optional dependency (`pip install twins_tf[torch]`).

Every mismatch (missing or unexpected keys, wrong shapes, wrong arch, wrong number of classes)
is an error that names the offending keys; nothing is ever partially loaded.
"""

from twins_tf.weights.architectures import (
    conv_layer_count,
    infer_arch,
    infer_arch_from_state_dict,
)
from twins_tf.weights.conversion import convert_checkpoint
from twins_tf.weights.errors import CheckpointError, CheckpointWarning, UnsafeCheckpointError
from twins_tf.weights.keras_files import HEAD_ATTRIBUTE, load_pretrained
from twins_tf.weights.reading import Checkpoint, read_checkpoint, read_torch_checkpoint
from twins_tf.weights.torch_names import load_torch_state_dict

__all__ = [
    "HEAD_ATTRIBUTE",
    "Checkpoint",
    "CheckpointError",
    "CheckpointWarning",
    "UnsafeCheckpointError",
    "conv_layer_count",
    "convert_checkpoint",
    "infer_arch",
    "infer_arch_from_state_dict",
    "load_pretrained",
    "load_torch_state_dict",
    "read_checkpoint",
    "read_torch_checkpoint",
]
