"""Blended (Chen et al. 2017): every poisoned image becomes (1 - alpha) * image + alpha * pattern,
with one fixed full-size pattern, alpha 0.2, all-to-one.

    python attack/blended.py --yaml_path config/attack/blended/default.yaml
    python attack/blended.py --yaml_path config/attack/blended/default.yaml --pattern kitty.png

Differs from BackdoorBench: BackdoorBench blends a downloaded 'Hello Kitty' picture. Here the
default pattern is made procedurally, identical on every run and machine: a coloured fractal cloud
texture (five octaves of uniform noise on 3x3 to 33x33 grids drawn from NumPy's RandomState(2017),
whose stream NumPy keeps stable across versions, upsampled bicubically to 64x64, amplitude halved
per octave, each channel min-max scaled to 0..255), resized (bilinear, antialiased) to the data
set's H x W and made grey by ITU-R 601 luma for 1-channel data. `--pattern` blends a picture of your
own instead (e.g. the original one), loaded with PIL and resized the same way.
"""
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.attacks.run import ATTACK_OPTIONS, PoisoningAttack, run_attack  # noqa: E402
from utils.core.cli import main_guard, require  # noqa: E402
from utils.core.config import Option, parse_config  # noqa: E402
from utils.data.triggers import blend, fit_pattern, load_image, to_uint8  # noqa: E402

OPTIONS = {**ATTACK_OPTIONS,
           "alpha": Option(0.2, "blend weight of the pattern"),
           "pattern": Option(None, "image file to blend (default: the built-in procedural pattern)",
                             str)}

PATTERN_SEED = 2017
PATTERN_SIZE = 64


def procedural_pattern(channels: int, height: int, width: int) -> torch.Tensor:
    """The built-in blend pattern (see the module docstring), uint8 [channels, height, width]."""
    rng = np.random.RandomState(PATTERN_SEED)
    field = torch.zeros(1, 3, PATTERN_SIZE, PATTERN_SIZE)
    for octave, cells in enumerate((2, 4, 8, 16, 32)):
        grid = torch.from_numpy(rng.rand(1, 3, cells + 1, cells + 1)).float()
        field += 0.5 ** octave * F.interpolate(grid, size=(PATTERN_SIZE, PATTERN_SIZE),
                                               mode="bicubic", align_corners=True)
    low = field.amin(dim=(2, 3), keepdim=True)
    high = field.amax(dim=(2, 3), keepdim=True)
    return fit_pattern(to_uint8(255 * (field - low) / (high - low))[0], channels, height, width)


def load_pattern(path: str, channels: int, height: int, width: int) -> torch.Tensor:
    require(Path(path).is_file(), f"--pattern {path} not found: pass an existing image file")
    return fit_pattern(load_image(path, f"--pattern {path}")[0], channels, height, width)


def blended_poison(images: torch.Tensor, pattern: torch.Tensor, alpha: float) -> torch.Tensor:
    return blend(images, pattern, alpha)


def make_attack(ctx) -> PoisoningAttack:
    cfg = ctx.cfg
    require(0 < cfg.alpha <= 1, f"--alpha must be in (0, 1], got {cfg.alpha}")
    height, width, _ = ctx.spec.image_size
    pattern = load_pattern(cfg.pattern, ctx.channels, height, width) if cfg.pattern \
        else procedural_pattern(ctx.channels, height, width)
    return PoisoningAttack(poison=lambda images: blended_poison(images, pattern, cfg.alpha),
                           details={"alpha": cfg.alpha,
                                    "pattern": cfg.pattern or f"procedural (seed {PATTERN_SEED})"})


def main(argv=None):
    cfg = parse_config(OPTIONS, "Blended attack: writes a BackdoorBench-format record", argv)
    return run_attack(cfg, "blended", make_attack)


if __name__ == "__main__":
    main_guard(main)
