"""PreAct-ResNet18 with BackdoorBench's layer names, so BackdoorBench state dicts load by name.

Parameter groups: `conv1`, `layer1`..`layer4` (two pre-activation blocks each), `linear`. As in
BackdoorBench there is no BatchNorm after the stem conv and none (nor a ReLU) after `layer4`: the
last block's sum goes straight into the adaptive average pool, which makes any input size work.
11,171,146 parameters for 10 classes and 3 input channels.

`preactresnet18_w16` and `preactresnet18_w32` are the same topology and layer names at a quarter and
a half of the width (16/32/64/128 and 32/64/128/256 channels): sizes that train on a laptop CPU, for
checking results of the paper's architecture without a GPU (the quarter width has 1/16 of the
convolution work).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from . import register_model


class PreActBlock(nn.Module):
    """BN-ReLU before each 3x3 conv; a 1x1 conv `shortcut` on the activated input when the shape
    changes, otherwise the identity on the raw input."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        skip = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + skip


class PreActResNet(nn.Module):
    def __init__(self, blocks_per_layer=(2, 2, 2, 2), num_classes: int = 10, in_channels: int = 3,
                 width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        planes_in = width
        widths = (width, 2 * width, 4 * width, 8 * width)
        for i, (planes, stride, n) in enumerate(zip(widths, (1, 2, 2, 2), blocks_per_layer),
                                                start=1):
            blocks = []
            for s in [stride] + [1] * (n - 1):
                blocks.append(PreActBlock(planes_in, planes, s))
                planes_in = planes
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(8 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = torch.flatten(self.avgpool(out), 1)
        return self.linear(out)


@register_model("preactresnet18", classifier="linear")
def preactresnet18(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return PreActResNet((2, 2, 2, 2), num_classes, in_channels)


@register_model("preactresnet18_w32", classifier="linear")
def preactresnet18_w32(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return PreActResNet((2, 2, 2, 2), num_classes, in_channels, width=32)


@register_model("preactresnet18_w16", classifier="linear")
def preactresnet18_w16(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return PreActResNet((2, 2, 2, 2), num_classes, in_channels, width=16)
