"""torchvision architectures, built with `weights=None` (nothing is ever downloaded).

- `resnet18`: classifier `fc`; another input channel count replaces the stem conv `conv1`.
- `vgg19_bn`: classifier `classifier.6`; another input channel count replaces `features.0`.
  Its five 2x2 max-pools use ceil_mode=True: identical output for even sizes (32, 64, 224), and
  28x28 inputs work too (28-14-7-4-2-1 instead of failing on the fifth pool of a 1x1 map);
  AdaptiveAvgPool2d(7) then feeds the classifier. No parameter changes, so state dicts are as
  torchvision's.
- `vit_b_16`: BackdoorBench's form `Sequential(Resize((224, 224)), vit_b_16)` with a new head, so
  state-dict keys start with `1.` and the classifier is `1.heads.head`; another input channel count
  replaces the patch embedding `1.conv_proj`.
"""
from __future__ import annotations

import torchvision
from torch import nn

from . import register_model


def _same_conv(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """A fresh conv like `conv` but taking `in_channels` inputs."""
    return nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                     padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                     bias=conv.bias is not None, padding_mode=conv.padding_mode)


@register_model("resnet18", classifier="fc")
def resnet18(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    if in_channels != 3:
        model.conv1 = _same_conv(model.conv1, in_channels)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model


@register_model("vgg19_bn", classifier="classifier.6")
def vgg19_bn(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    model = torchvision.models.vgg19_bn(weights=None, num_classes=num_classes)
    for layer in model.features:
        if isinstance(layer, nn.MaxPool2d):
            layer.ceil_mode = True
    if in_channels != 3:
        conv = _same_conv(model.features[0], in_channels)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(conv.bias)
        model.features[0] = conv
    return model


@register_model("vit_b_16", classifier="1.heads.head")
def vit_b_16(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    vit = torchvision.models.vit_b_16(weights=None)
    vit.heads.head = nn.Linear(vit.hidden_dim, num_classes)
    if in_channels != 3:
        old = vit.conv_proj
        conv = _same_conv(old, in_channels)
        # torchvision's patch-embedding init: truncated normal with std sqrt(1 / fan_in)
        fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        nn.init.trunc_normal_(conv.weight, std=(1.0 / fan_in) ** 0.5)
        nn.init.zeros_(conv.bias)
        vit.conv_proj = conv
    return nn.Sequential(torchvision.transforms.Resize((224, 224), antialias=True), vit)
