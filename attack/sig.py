"""SIG (Barni et al. 2019): clean-label; a horizontal sinusoid
x[..., j] += delta * sin(2 pi j f / W) (delta 40, f 6, every row and channel, clamped to [0, 255])
is added to target-class training images, whose labels are kept, and at test time to images of the
other classes.

    python attack/sig.py --yaml_path config/attack/sig/default.yaml

As BackdoorBench, --pratio is a share of the whole training set, drawn from the target class; the
default 0.1 is every target-class image of a balanced 10-class set (CIFAR-10, Fashion-MNIST). Data
sets with more classes have fewer target-class images, so their yaml files lower it (cifar100 0.01,
gtsrb and tiny 0.005); a larger value is refused with one line saying how many are eligible.
"""
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.attacks.run import ATTACK_OPTIONS, PoisoningAttack, run_attack  # noqa: E402
from utils.data.triggers import add_signal  # noqa: E402
from utils.core.cli import main_guard  # noqa: E402
from utils.core.config import Option, parse_config  # noqa: E402

OPTIONS = {**ATTACK_OPTIONS,
           "delta": Option(40.0, "amplitude of the sinusoid, in pixel units (0..255)"),
           "frequency": Option(6.0, "periods of the sinusoid across the image width")}


def sig_poison(images: torch.Tensor, delta: float, frequency: float) -> torch.Tensor:
    width = images.shape[-1]
    columns = torch.arange(width, dtype=torch.float32)
    return add_signal(images, delta * torch.sin(2 * math.pi * columns * frequency / width))


def main(argv=None):
    cfg = parse_config(OPTIONS, "SIG clean-label attack: writes a BackdoorBench-format record",
                       argv)
    return run_attack(cfg, "sig", lambda ctx: PoisoningAttack(
        poison=lambda images: sig_poison(images, cfg.delta, cfg.frequency), clean_label=True,
        details={"delta": cfg.delta, "frequency": cfg.frequency}))


if __name__ == "__main__":
    main_guard(main)
