"""smallcnn: a small, fast CNN for CPU runs (Fashion-MNIST 1x28x28 and other small images).

    conv3x3(in->32)-BN-ReLU-maxpool2 -> conv3x3(32->64)-BN-ReLU-maxpool2
    -> conv3x3(64->128)-BN-ReLU -> global average pool -> `linear` (128 -> num_classes)

Any input size >= 4 px and any channel count. Classifier: `linear` (the last layer).
Parameters: THROUGHPUT_PLACEHOLDER
"""
from __future__ import annotations

import torch
from torch import nn

from . import register_model


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.features = nn.Sequential(
            _block(in_channels, 32), nn.MaxPool2d(2),
            _block(32, 64), nn.MaxPool2d(2),
            _block(64, 128),
            nn.AdaptiveAvgPool2d(1),
        )
        self.linear = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.flatten(self.features(x), 1))


@register_model("smallcnn")
def smallcnn(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return SmallCNN(num_classes, in_channels)
