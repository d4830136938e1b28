"""A small StegaStamp-style encoder-decoder for SSBA's sample-specific invisible triggers.

The encoder maps (image, secret bits) to a residual bounded by `max_residual` (tanh-scaled) that is
added to the image; the decoder reads the bits back from the encoded image. Training uses random bit
strings per sample (so the encoder learns a code, not one pattern), a bit-recovery BCE loss and an
image-fidelity MSE loss whose weight ramps up over the first half of training (bits first, then
invisibility, as StegaStamp does). Uniform noise of half a grey level stands in for the uint8
rounding that every poisoned image goes through, so decoding survives it.

Images are [0, 1] floats inside the networks and uint8 [N, C, H, W] outside (`embed`); any channel
count and image size >= 4 px works.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

_SECRET_CHANNELS = 4  # channels of the upsampled secret map the encoder sees beside the image


def _conv_bn(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True)]


class StegaEncoder(nn.Module):
    def __init__(self, channels: int, image_size: tuple[int, int], bits: int, max_residual: float,
                 width: int = 16):
        super().__init__()
        self.image_size = tuple(image_size)
        # A buffer, so a saved encoder carries the bound it was trained with.
        self.register_buffer("max_residual", torch.tensor(float(max_residual)))
        # The secret becomes a coarse spatial map (a quarter of the resolution), upsampled to the
        # image, so the code can be spread over the whole image.
        self.coarse = (max(1, image_size[0] // 4), max(1, image_size[1] // 4))
        self.secret = nn.Linear(bits, _SECRET_CHANNELS * self.coarse[0] * self.coarse[1])
        self.body = nn.Sequential(
            nn.Conv2d(channels + _SECRET_CHANNELS, width, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(width, channels, 1))
        # A direct path from the secret map to the residual, so the decoder has a code to read from
        # the first step rather than only after the image path has learned to pass it on.
        self.direct = nn.Conv2d(_SECRET_CHANNELS, channels, 1)

    def forward(self, images: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        """Residual for `images` ([0, 1]) carrying `bits` ({0, 1} floats, [N, bits])."""
        secret = self.secret(2 * bits - 1).view(len(bits), _SECRET_CHANNELS, *self.coarse)
        secret = F.interpolate(secret, size=self.image_size, mode="bilinear", align_corners=False)
        mixed = self.body(torch.cat([images, secret], 1)) + self.direct(secret)
        return torch.tanh(mixed) * self.max_residual


class StegaDecoder(nn.Module):
    def __init__(self, channels: int, bits: int, width: int = 32):
        super().__init__()
        self.body = nn.Sequential(
            *_conv_bn(channels, width, 2), *_conv_bn(width, 2 * width, 2),
            *_conv_bn(2 * width, 2 * width, 1),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(2 * width * 16, bits))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)  # bit logits


class Stega(nn.Module):
    """Encoder and decoder in one module, so one plain state dict holds both."""

    def __init__(self, channels: int, image_size: tuple[int, int], bits: int,
                 max_residual: float):
        super().__init__()
        self.bits = bits
        self.encoder = StegaEncoder(channels, image_size, bits, max_residual)
        self.decoder = StegaDecoder(channels, bits)

    def encode(self, images: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        return (images + self.encoder(images, bits)).clamp(0, 1)


def secret_bits(bits: int, seed: int) -> torch.Tensor:
    """The attack's fixed secret: `bits` fair coin flips from `seed`."""
    return torch.randint(0, 2, (bits,), generator=torch.Generator().manual_seed(seed)).float()


def train_stega(model: Stega, images: torch.Tensor, steps: int, batch_size: int, lr: float,
                image_weight: float, generator: torch.Generator, progress=None) -> dict:
    """Fit `model` on uint8 `images` (already on the model's device) for `steps` >= 1 steps.
    Returns the means of the bit loss and the image MSE over the last 100 steps."""
    device = next(model.parameters()).device
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    recent: list[tuple[torch.Tensor, torch.Tensor]] = []
    for step in range(steps):
        idx = torch.randint(0, len(images), (batch_size,), generator=generator).to(device)
        bits = torch.randint(0, 2, (batch_size, model.bits), generator=generator).float().to(device)
        noise = (torch.rand(batch_size, *images.shape[1:], generator=generator) - 0.5) / 255
        x = images[idx].float() / 255
        encoded = model.encode(x, bits)
        bit_loss = F.binary_cross_entropy_with_logits(model.decoder(encoded + noise.to(device)),
                                                      bits)
        image_loss = F.mse_loss(encoded, x)
        ramp = min(1.0, 2 * step / max(1, steps))
        optimizer.zero_grad(set_to_none=True)
        (bit_loss + ramp * image_weight * image_loss).backward()
        optimizer.step()
        recent = (recent + [(bit_loss.detach(), image_loss.detach())])[-100:]
        if progress is not None:
            progress.update(1)
    model.eval()
    bit_losses, image_losses = zip(*recent)
    return {"bit_loss": torch.stack(bit_losses).mean().item(),
            "image_mse": torch.stack(image_losses).mean().item()}


@torch.inference_mode()
def embed(model: Stega, images: torch.Tensor, secret: torch.Tensor,
          chunk: int = 1024) -> torch.Tensor:
    """uint8 CPU images -> uint8 CPU images carrying `secret`, encoded on the model's device in
    chunks."""
    device = next(model.parameters()).device
    out = torch.empty_like(images)
    for start in range(0, len(images), chunk):
        x = images[start:start + chunk].to(device).float() / 255
        bits = secret.to(device).expand(len(x), -1)
        out[start:start + chunk] = model.encode(x, bits).mul(255).round().to(torch.uint8).cpu()
    return out


@torch.inference_mode()
def embedding_quality(model: Stega, clean: torch.Tensor, encoded: torch.Tensor,
                      secret: torch.Tensor, chunk: int = 1024) -> dict:
    """Bit accuracy of the decoder on uint8 `encoded` images and their mean per-image PSNR (dB)
    against `clean`."""
    device = next(model.parameters()).device
    correct, psnr = 0.0, 0.0
    for start in range(0, len(encoded), chunk):
        x = encoded[start:start + chunk].to(device).float() / 255
        bits = model.decoder(x) > 0
        correct += (bits == secret.to(device).bool()).float().mean(1).sum().item()
        mse = (x - clean[start:start + chunk].to(device).float() / 255).pow(2).flatten(1).mean(1)
        psnr += (10 * torch.log10(1 / mse.clamp_min(1e-10))).sum().item()
    n = max(1, len(encoded))
    return {"bit_accuracy": correct / n, "psnr_db": psnr / n,
            "max_residual_levels": int((encoded.int() - clean.int()).abs().max()) if len(encoded)
            else 0}
