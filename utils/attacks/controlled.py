"""What the training-controlled attacks (WaNet, BPP, InputAware, Blind) share: moving a batch
between normalized and [0, 1] pixel space, the per-batch poisoned share, running a trigger network
over uint8 images in chunks. The victim's training, with the attack's own batches, loss, batch
transform and optimizers, is `AttackContext.fit` (utils/attacks/run.py), as for every attack.
"""
from __future__ import annotations

from typing import Callable

import torch

from utils.data.triggers import to_uint8 as _pixels_to_uint8
from utils.training.train import eval_batch_size


def to_unit(x: torch.Tensor, preprocess) -> torch.Tensor:
    """Normalized batch -> [0, 1] pixel values (the inverse of utils.data.triggers.normalize)."""
    return x * preprocess.std.to(x.device) + preprocess.mean.to(x.device)


def unit_to_uint8(u: torch.Tensor) -> torch.Tensor:
    """[0, 1] values -> uint8 pixels, rounded and clamped."""
    return _pixels_to_uint8(u * 255)


def share(n: int, ratio: float) -> int:
    """Samples of an n-sample batch that get a treatment; int() as BackdoorBench (128 x 0.1 is
    12)."""
    return min(n, int(n * ratio))


def sub_generator(seed: int, stream: int) -> torch.Generator:
    """A CPU generator for one of an attack's random streams, apart from the batch order's (which
    Batches seeds with `seed` itself), so the same seed gives the same run on any device."""
    return torch.Generator().manual_seed(seed * 1_000_003 + stream)


@torch.no_grad()
def apply_in_chunks(fn: Callable, images: torch.Tensor, device, batch_size: int = 0
                    ) -> torch.Tensor:
    """fn([0, 1] float batch on `device`) -> [0, 1] batch, over uint8 CPU images in chunks;
    uint8 out."""
    device = torch.device(device)
    size = eval_batch_size(batch_size, device)
    out = [unit_to_uint8(fn(images[i:i + size].to(device).float().div_(255))).cpu()
           for i in range(0, len(images), size)]
    return torch.cat(out) if out else images.clone()


class Stepped:
    """Several optimizers (or LR schedulers) stepped as one; `param_groups` are the first one's,
    which is the victim's, so the per-epoch lr column shows the victim's rate."""

    def __init__(self, *items):
        self.items = items
        self.param_groups = getattr(items[0], "param_groups", None)

    def zero_grad(self, set_to_none: bool = True):
        for item in self.items:
            item.zero_grad(set_to_none=set_to_none)

    def step(self):
        for item in self.items:
            item.step()
