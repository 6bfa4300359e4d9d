"""Runs timm, the reference for the ConvNeXt and ViT backbones, in its own virtualenv.

Executed by `.venv-timm/bin/python` (tests/timm_requirements.txt says why it is a separate
environment); the tests call it through `timm_testlib.run`.  One request, one `.npz` answer:

    python tests/timm_reference.py request.json answer.npz

request.json: {"command": "logits", "model": timm name, "kwargs": create_model kwargs,
"seed": int, "images": path of an NHWC float32 .npy in [0, 1], "mean": [...], "std": [...]};
"convstem_logits" takes the same plus "stem": [[channels, stride], ...] (Singh et al.'s
ConvNeXt stem).  The ViT commands (`vit_logits`, `vit_resample`, `vit_at_steps`) take the same
fields plus their own, said in their docstrings.  The answer holds the model's state dict
(`state/<key>`), its eval-mode `logits` for the normalised images and its normalisation
modules' epsilons (`eps/<module name>`).  Every parameter and BN statistic is redrawn at a
scale where it matters (timm initialises LayerScale to 1e-6, which would hide any error in the
blocks behind it).
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
    with torch.no_grad():
        out = model(_normalised(request, images)).numpy()
    eps = {
        f"eps/{name}": np.float64(module.eps)
        for name, module in model.named_modules()
        if isinstance(getattr(module, "eps", None), float)
    }
    return {"logits": out, **_state(model), **eps}


VIT_CONVSTEM = [[48, 2], [96, 2], [192, 2], [384, 2]]


class ConvStem(torch.nn.Module):
    """Singh et al. 2023's ConvNeXt stem, from its published layout: per (channels, stride),
    Conv2d 3x3 (padding 1) -> LayerNorm over channels (eps 1e-6) -> GELU, in one Sequential
    `stem` (keys stem.stem.0, stem.stem.1, stem.stem.3, ...)."""

    def __init__(self, convs, width=None):
        super().__init__()
        layers, in_channels = [], 3
        for channels, stride in convs:
            layers += [
                torch.nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1),
                timm.layers.LayerNorm2d(channels, eps=1e-6),
                torch.nn.GELU(),
            ]
            in_channels = channels
        if width:  # the ViT's stem ends in a 1x1 conv to the embedding width
            layers.append(torch.nn.Conv2d(in_channels, width, 1))
        self.stem = torch.nn.Sequential(*layers)

    def forward(self, x):
        return self.stem(x)


def _create(request):
    """timm.create_model(model, **kwargs), with the ConvStem in place of the patch
    projection when request["convstem"], every parameter redrawn (`randomise`), then the
    parameters whose names start with a key of request["scale"] multiplied by its value
    (e.g. to feed a LayerNorm inputs of tiny variance, where its epsilon matters)."""
    model = timm.create_model(request["model"], pretrained=False, **request.get("kwargs", {}))
    if request.get("convstem"):
        # four stride-2 stages 48/96/192/384 wide, then the 1x1 conv (keys proj.stem.0 ... 12)
        model.patch_embed.proj = ConvStem(VIT_CONVSTEM, width=model.embed_dim)
    randomise(model, int(request["seed"]))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            for prefix, factor in request.get("scale", {}).items():
                if name.startswith(prefix):
                    parameter.mul_(factor)
    return model.eval()


def _normalised(request, images):
    mean = np.asarray(request["mean"], np.float32)
    std = np.asarray(request["std"], np.float32)
    return torch.from_numpy(((images - mean) / std).transpose(0, 3, 1, 2).copy())


def _state(model, prefix="state/"):
    return {f"{prefix}{k}": v.detach().numpy().copy() for k, v in model.state_dict().items()}


def vit_logits(request):
    """`logits` for a ViT, optionally with the ConvStem (request["convstem"])."""
    model = _create(request)
    images = np.load(request["images"]).astype(np.float32)
    with torch.no_grad():
        out = model(_normalised(request, images)).numpy()
    return {"logits": out, **_state(model)}


def vit_resample(request):
    """A ViT at its kwargs' img_size (224) loaded, the way timm loads a checkpoint into a model
    of another img_size (`checkpoint_filter_fn`, which resamples pos_embed), into one model
    per entry of request["targets"] ({"img_size": [rows, cols], "images": .npy path}).
    Returns the source state, and per target i timm's `resample_abs_pos_embed` of the
    source's pos_embed to that grid (`pos_embed_<i>`) and the target model's logits
    (`logits_<i>`)."""
    from timm.layers import resample_abs_pos_embed
    from timm.models.vision_transformer import checkpoint_filter_fn

    source = _create(request)
    state = source.state_dict()
    answer = _state(source)
    for index, target_request in enumerate(request["targets"]):
        rows, cols = target_request["img_size"]
        kwargs = {**request.get("kwargs", {}), "img_size": [rows, cols]}
        target = timm.create_model(request["model"], pretrained=False, **kwargs)
        target.load_state_dict(checkpoint_filter_fn(dict(state), target))
        target.eval()
        grid = [rows // 16, cols // 16]
        resampled = resample_abs_pos_embed(state["pos_embed"], new_size=grid, num_prefix_tokens=1)
        images = np.load(target_request["images"]).astype(np.float32)
        with torch.no_grad():
            answer[f"logits_{index}"] = target(_normalised(request, images)).numpy()
        answer[f"pos_embed_{index}"] = resampled.numpy()
    return answer


def vit_at_steps(request):
    """Adversarial training steps of a randomised ViT, a plain PyTorch loop written here:
    per batch, L-inf PGD from the clean images (no random start; mean cross-entropy, sign
    step, projection on the eps-ball and [0, 1]), then cross-entropy at x_adv and
    `torch.optim.SGD(lr, momentum, weight_decay)` (coupled decay on every parameter).  The
    network sees (x - mean) / std.  Returns the initial state (`state/`), each step's
    x_adv (`x_adv_<step>`, NHWC) and loss, and the state after each step (`after_<step>/`)."""
    model = _create(request)
    mean = torch.tensor(request["mean"], dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(request["std"], dtype=torch.float32).view(1, 3, 1, 1)

    def net(x):
        return model((x - mean) / std)

    eps, alpha, steps = request["eps"], request["alpha"], int(request["pgd_steps"])
    answer = _state(model)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=request["lr"],
        momentum=request["momentum"],
        weight_decay=request["weight_decay"],
    )
    with np.load(request["batches"]) as batches:
        images, labels = batches["images"], batches["labels"]
    for step, (x_nhwc, y_np) in enumerate(zip(images, labels)):
        x = torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy())
        y = torch.from_numpy(y_np.astype(np.int64))
        x_adv = x.clone()
        for _ in range(steps):
            x_adv.requires_grad_(True)
            loss = torch.nn.functional.cross_entropy(net(x_adv), y)
            (grad,) = torch.autograd.grad(loss, x_adv)
            x_adv = x_adv.detach() + alpha * grad.sign()
            x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0.0, 1.0)
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(x_adv), y)
        loss.backward()
        optimizer.step()
        answer[f"x_adv_{step}"] = x_adv.numpy().transpose(0, 2, 3, 1)
        answer[f"loss_{step}"] = np.float32(loss.item())
        answer.update(_state(model, f"after_{step}/"))
    return answer


def convstem_logits(request):
    """As `logits`, for a timm ConvNeXt whose stem is replaced by a ConvStem of
    request["stem"] = [[channels, stride], ...]."""
    model = timm.create_model(request["model"], pretrained=False, **request.get("kwargs", {}))
    model.stem = ConvStem(request["stem"])
    return _answer(model, request)


COMMANDS = {
    "logits": logits,
    "convstem_logits": convstem_logits,
    "vit_logits": vit_logits,
    "vit_resample": vit_resample,
    "vit_at_steps": vit_at_steps,
}

if __name__ == "__main__":
    torch.set_num_threads(2)
    with open(sys.argv[1]) as f:
        request = json.load(f)
    answer = COMMANDS[request["command"]](request)
    np.savez(sys.argv[2], **answer)
