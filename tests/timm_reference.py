"""Runs timm, the reference for the ConvNeXt and ViT backbones, in its own virtualenv.

Executed by `.venv-timm/bin/python` (tests/timm_requirements.txt says why it is a separate
environment); the tests call it through `timm_testlib.run`.  One request, one `.npz` answer:

    python tests/timm_reference.py request.json answer.npz

request.json: {"command": "logits", "model": timm name, "kwargs": create_model kwargs,
"seed": int, "images": path of an NHWC float32 .npy in [0, 1], "mean": [...], "std": [...]};
"convstem_logits" takes the same plus "stem": [[channels, stride], ...] (Singh et al.'s stem).
The answer holds the model's state dict (`state/<key>`), its eval-mode `logits` for the
normalised images and its normalisation modules' epsilons (`eps/<module name>`).  Every
parameter and BN statistic is redrawn at a scale where it matters (timm initialises
LayerScale to 1e-6, which would hide any error in the blocks behind it).
"""

import json
import sys

import numpy as np
import timm
import torch


def randomise(model, seed):
    """Redraws every parameter and BN buffer: weights ~ N(0, 1/fan_in), 1-d parameters
    around 1 (norm scales) or 0 (biases, LayerScale), embeddings ~ N(0, 0.5^2)."""
    generator = torch.Generator().manual_seed(seed)

    def normal(shape, std):
        return torch.randn(shape, generator=generator) * std

    with torch.no_grad():
        for name, parameter in model.named_parameters():
            shape = parameter.shape
            if parameter.ndim == 1 and name.endswith("weight"):
                parameter.copy_(1.0 + normal(shape, 0.2))
            elif parameter.ndim == 1:
                parameter.copy_(normal(shape, 0.2))
            elif name.endswith(("pos_embed", "cls_token")):
                parameter.copy_(normal(shape, 0.5))
            else:
                fan_in = int(np.prod(shape[1:]))
                parameter.copy_(normal(shape, fan_in**-0.5))
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.copy_(normal(buffer.shape, 0.1))
            elif name.endswith("running_var"):
                buffer.copy_(0.5 + torch.rand(buffer.shape, generator=generator))


def logits(request):
    model = timm.create_model(request["model"], pretrained=False, **request.get("kwargs", {}))
    return _answer(model, request)


def _answer(model, request):
    """Randomised `model`'s eval-mode logits for the request's images, its state dict, and the
    epsilon of every normalisation module (`eps/<module name>`), which the logits barely see."""
    randomise(model, int(request["seed"]))
    model.eval()
    images = np.load(request["images"]).astype(np.float32)
    mean = np.asarray(request["mean"], np.float32)
    std = np.asarray(request["std"], np.float32)
    x = torch.from_numpy(((images - mean) / std).transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        out = model(x).numpy()
    state = {f"state/{k}": v.detach().numpy() for k, v in model.state_dict().items()}
    eps = {
        f"eps/{name}": np.float64(module.eps)
        for name, module in model.named_modules()
        if isinstance(getattr(module, "eps", None), float)
    }
    return {"logits": out, **state, **eps}


class ConvStem(torch.nn.Module):
    """Singh et al. 2023's ConvNeXt stem, from its published layout: per (channels, stride),
    Conv2d 3x3 (padding 1) -> LayerNorm over channels (eps 1e-6) -> GELU, in one Sequential
    `stem` (keys stem.stem.0, stem.stem.1, stem.stem.3, ...)."""

    def __init__(self, convs):
        super().__init__()
        layers, in_channels = [], 3
        for channels, stride in convs:
            layers += [
                torch.nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1),
                timm.layers.LayerNorm2d(channels, eps=1e-6),
                torch.nn.GELU(),
            ]
            in_channels = channels
        self.stem = torch.nn.Sequential(*layers)

    def forward(self, x):
        return self.stem(x)


def convstem_logits(request):
    """As `logits`, for a timm ConvNeXt whose stem is replaced by a ConvStem of
    request["stem"] = [[channels, stride], ...]."""
    model = timm.create_model(request["model"], pretrained=False, **request.get("kwargs", {}))
    model.stem = ConvStem(request["stem"])
    return _answer(model, request)


COMMANDS = {"logits": logits, "convstem_logits": convstem_logits}

if __name__ == "__main__":
    torch.set_num_threads(2)
    with open(sys.argv[1]) as f:
        request = json.load(f)
    answer = COMMANDS[request["command"]](request)
    np.savez(sys.argv[2], **answer)
