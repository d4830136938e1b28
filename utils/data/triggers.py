"""Trigger math shared by the image-space attacks (BadNets-style patches, Blended, SIG, LF, TrojanNN,
LC) and by record-free defense runs that measure ASR with a user's trigger.

Images are uint8 [N, C, H, W]. Patterns and signals are float tensors in pixel units (0..255) that
broadcast against them; results are rounded and clamped back to uint8, as a poisoned PNG would be.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from utils.data.images import convert_channels, open_image


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


def paste(images: torch.Tensor, patch: torch.Tensor, top: int, left: int,
          mask: torch.Tensor | None = None) -> torch.Tensor:
    """A [C, h, w] patch pasted with its top-left corner at (top, left) (BadNets' square is a
    white 3 x 3 patch at the bottom-right); `mask` [1, h, w] in [0, 1] (a PNG's alpha) blends it."""
    h, w = patch.shape[-2:]
    out = images.clone()
    region = out[..., top:top + h, left:left + w]
    out[..., top:top + h, left:left + w] = blend(region, patch, 1.0 if mask is None else mask)
    return out


def normalize(x01: torch.Tensor, preprocess) -> torch.Tensor:
    """Float images in [0, 1] -> the model's normalized input, differentiably (Preprocess works in
    place on uint8 batches, which gradient-based trigger searches cannot use)."""
    return (x01 - preprocess.mean.to(x01.device)) / preprocess.std.to(x01.device)


def load_image(path, what: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(uint8 RGB [3, h, w], alpha as float [1, h, w] in [0, 1] or None when opaque)."""
    with open_image(path, what) as image:
        rgba = np.array(image.convert("RGBA"))
        has_alpha = "A" in image.getbands() or "transparency" in image.info
    pixels = torch.from_numpy(rgba).permute(2, 0, 1).contiguous()
    return pixels[:3], (pixels[3:] / 255.0 if has_alpha else None)


def fit_pattern(pattern: torch.Tensor, channels: int, height: int, width: int) -> torch.Tensor:
    """uint8 [C, h, w] -> uint8 [channels, height, width]: bilinear antialiased resize, then the
    project's channel rule (grey repeated into RGB, RGB to grey by luma)."""
    if pattern.shape[1:] != (height, width):
        resized = F.interpolate(pattern[None].float(), size=(height, width), mode="bilinear",
                                align_corners=False, antialias=True)[0]
        pattern = to_uint8(resized)
    return convert_channels(pattern[None], channels)[0]
