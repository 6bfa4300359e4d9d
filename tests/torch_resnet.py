"""A PyTorch torchvision-layout ResNet and robustness-library checkpoints, as a test reference.

The Keras ResNets of `twins_tf.models` must reproduce torchvision's ResNet (v1.5) exactly, and
the robust checkpoints they load are written by the robustness library (Salman et al. 2020).
torchvision has no CPU build in this environment, so the reference network is written here, in
plain PyTorch, from the architecture's definition (He et al. 2016; v1.5: the stride of a
downsampling bottleneck sits on its 3x3 conv).  State-dict keys are torchvision's, so a state
dict of this module is a drop-in stand-in for a torchvision one.

Public helpers (other test modules import them; keep the API stable):
  * `torch_resnet(arch, num_classes, seed=0)`: a `TorchResNet` with torchvision's
    initialisation and random BN statistics, in eval mode.
  * `TorchPixelResNet(net, upsample=1)`: takes [0, 1] NCHW images and does what the Keras model
    does inside (nearest upsampling, clamp to [0, 1], ImageNet normalisation) before `net`, so
    logits compare directly with `build_resnet(..., upsample=...)`.
  * `randomize_bn_statistics(module, seed)`: random gamma/beta/running mean/running variance in
    every BatchNorm2d, so BN loading is actually tested (the defaults 1/0/0/1 hide mistakes).
  * `save_robustness_checkpoint(module, path, prefix_style="robustness", ...)`: `torch.save`
    the state dict the way the robustness library (or torchvision, or DataParallel) does.
  * `torch_logits(module, images_nhwc, upsample=1)`: numpy NHWC [0, 1] images in, numpy logits
    out, through `TorchPixelResNet` in eval mode.
"""

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# arch -> (block type, blocks per stage, width of the bottleneck's 3x3 relative to 64*2^i)
ARCH_SPECS = {
    "resnet18": ("basic", (2, 2, 2, 2), 1),
    "resnet34": ("basic", (3, 4, 6, 3), 1),
    "resnet50": ("bottleneck", (3, 4, 6, 3), 1),
    "resnet101": ("bottleneck", (3, 4, 23, 3), 1),
    "resnet152": ("bottleneck", (3, 8, 36, 3), 1),
    "wide_resnet50_2": ("bottleneck", (3, 4, 6, 3), 2),
}


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_channels, planes, stride, width_factor=1):
        super().__init__()
        del width_factor  # basic blocks have no wide variant in torchvision
        self.conv1 = nn.Conv2d(in_channels, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(in_channels, planes * self.expansion, stride)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_channels, planes, stride, width_factor=1):
        super().__init__()
        width = planes * width_factor
        self.conv1 = nn.Conv2d(in_channels, width, 1, 1, 0, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)  # v1.5: stride here
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, 1, 0, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(in_channels, planes * self.expansion, stride)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _downsample(in_channels, out_channels, stride):
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride, 0, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class TorchResNet(nn.Module):
    """torchvision's ResNet layout: conv1, bn1, relu, maxpool, layer1-4, avgpool, fc.

    Takes ImageNet-normalised NCHW input, as torchvision's ResNet does.
    """

    def __init__(self, arch, num_classes=1000):
        super().__init__()
        if arch not in ARCH_SPECS:
            raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(ARCH_SPECS)}")
        kind, depths, width_factor = ARCH_SPECS[arch]
        block = BasicBlock if kind == "basic" else Bottleneck
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        in_channels = 64
        for stage, depth in enumerate(depths):
            planes = 64 * 2**stage
            blocks = []
            for index in range(depth):
                stride = 2 if (stage > 0 and index == 0) else 1
                blocks.append(block(in_channels, planes, stride, width_factor))
                in_channels = planes * block.expansion
            setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(in_channels, num_classes)
        self._init_like_torchvision()

    def _init_like_torchvision(self):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


class TorchPixelResNet(nn.Module):
    """[0, 1] NCHW images -> nearest upsample -> clamp -> ImageNet normalisation -> `net`."""

    def __init__(self, net, upsample=1):
        super().__init__()
        self.net = net
        self.upsample = int(upsample)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, x):
        if self.upsample != 1:
            x = F.interpolate(x, scale_factor=self.upsample, mode="nearest")
        x = torch.clamp(x, 0.0, 1.0)
        return self.net((x - self.mean) / self.std)


def randomize_bn_statistics(module, seed=0):
    """Random affine and running statistics in every BatchNorm2d of `module` (in place).

    gamma ~ U(0.5, 1.5), beta ~ N(0, 0.1^2), running_mean ~ N(0, 0.1^2),
    running_var ~ U(0.5, 2.0): far enough from the defaults that a swapped or skipped tensor
    changes the logits, close enough that a deep net's activations stay finite.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(0.5 + torch.rand(c, generator=generator))
                m.bias.copy_(0.1 * torch.randn(c, generator=generator))
                m.running_mean.copy_(0.1 * torch.randn(c, generator=generator))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=generator))
                m.num_batches_tracked.fill_(
                    int(torch.randint(1, 10_000, (1,), generator=generator))
                )
    return module


def torch_resnet(arch, num_classes=1000, seed=0):
    """A seeded `TorchResNet` with torchvision's init, random BN statistics, in eval mode."""
    torch.manual_seed(seed)
    net = TorchResNet(arch, num_classes)
    randomize_bn_statistics(net, seed)
    return net.eval()


PREFIX_STYLES = ("robustness", "robustness_state_dict", "dataparallel", "torchvision")


def robustness_state_dict(module, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """The state dict of a robustness-library `AttackerModel` wrapping `module` in DataParallel.

    Keys: `module.normalizer.new_mean/new_std` (shape (3, 1, 1)), `module.model.<key>`,
    `module.attacker.normalize.new_mean/new_std`, `module.attacker.model.<key>` (duplicates).
    """
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    out = {"module.normalizer.new_mean": mean_t, "module.normalizer.new_std": std_t}
    inner = module.state_dict()
    out.update({f"module.model.{k}": v.clone() for k, v in inner.items()})
    out["module.attacker.normalize.new_mean"] = mean_t.clone()
    out["module.attacker.normalize.new_std"] = std_t.clone()
    out.update({f"module.attacker.model.{k}": v.clone() for k, v in inner.items()})
    return out


def save_robustness_checkpoint(
    module,
    path,
    prefix_style="robustness",
    *,
    epoch=89,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    extra=None,
):
    """`torch.save` the weights of `module` (a TorchResNet) as one of the common layouts.

    Args:
      module: the network (a `TorchResNet`, not the pixel wrapper).
      path: output file.
      prefix_style: "robustness" (dict with 'model', 'optimizer', 'schedule', 'epoch', keys as
        in `robustness_state_dict`), "robustness_state_dict" (same under 'state_dict', as
        older robustness files), "dataparallel" (a bare state dict with `module.` prefixes),
        "torchvision" (a bare torchvision state dict).
      epoch: the 'epoch' entry of the robustness layouts.
      mean, std: the normaliser entries of the robustness layouts.
      extra: more top-level entries for the robustness layouts (e.g. {"eps": 4/255}).
    Returns:
      `path`.
    """
    if prefix_style in ("robustness", "robustness_state_dict"):
        key = "model" if prefix_style == "robustness" else "state_dict"
        payload = {
            key: robustness_state_dict(module, mean, std),
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "momentum": 0.9}]},
            "schedule": None,
            "epoch": epoch,
        }
        payload.update(extra or {})
    elif prefix_style == "dataparallel":
        payload = {f"module.{k}": v for k, v in module.state_dict().items()}
    elif prefix_style == "torchvision":
        payload = module.state_dict()
    else:
        raise ValueError(f"prefix_style must be one of {PREFIX_STYLES}, got {prefix_style!r}")
    torch.save(payload, path)
    return path


def torch_logits(module, images_nhwc, upsample=1):
    """Logits of `module` (a TorchResNet) for numpy [0, 1] NHWC images, in eval mode."""
    wrapper = TorchPixelResNet(module, upsample).eval()
    x = torch.from_numpy(np.ascontiguousarray(np.transpose(images_nhwc, (0, 3, 1, 2))))
    with torch.no_grad():
        return wrapper(x.float()).numpy()


def torch_pgd(net, x, y, eps, alpha, steps):
    """Spec §4 L-inf PGD without random start, in PyTorch: `net` in eval mode, mean CE, a
    sign step, projection on the eps-ball and [0, 1] after every step (NCHW tensors)."""
    net.eval()
    x_adv = x.clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(net(x_adv), y), x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + alpha * grad.sign(), x - eps), x + eps)
        x_adv = x_adv.clamp(0.0, 1.0)
    return x_adv
