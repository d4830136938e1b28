"""Trigger math shared by the image-space attacks (Blended, SIG, LF, TrojanNN, LC).

Images are uint8 [N, C, H, W]. Patterns and signals are float tensors in pixel units (0..255) that
broadcast against them; results are rounded and clamped back to uint8, as a poisoned PNG would be.
"""
from __future__ import annotations

import torch


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float pixel values (0..255 scale) -> uint8, rounded and clamped."""
    return x.round().clamp_(0, 255).to(torch.uint8)


def add_signal(images: torch.Tensor, signal: torch.Tensor) -> torch.Tensor:
    """images + signal (pixel units, broadcast), clamped: SIG's sinusoid, LF's trigger."""
    return to_uint8(images.float() + signal.to(images.device))


def blend(images: torch.Tensor, pattern: torch.Tensor, alpha) -> torch.Tensor:
    """(1 - alpha) * images + alpha * pattern. alpha is a number (Blended) or a [1|C, H, W] map in
    [0, 1] (TrojanNN's mask: 1 pastes the pattern, 0 keeps the image)."""
    if torch.is_tensor(alpha):
        alpha = alpha.to(images.device)
    x = images.float()
    return to_uint8(x + alpha * (pattern.to(images.device).float() - x))


def normalize(x01: torch.Tensor, preprocess) -> torch.Tensor:
    """Float images in [0, 1] -> the model's normalized input, differentiably (Preprocess works in
    place on uint8 batches, which gradient-based trigger searches cannot use)."""
    return (x01 - preprocess.mean.to(x01.device)) / preprocess.std.to(x01.device)
