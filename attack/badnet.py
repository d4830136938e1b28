"""BadNets (Gu et al.): a 3x3 white square pasted at the bottom-right corner, all-to-one.

    python attack/badnet.py --yaml_path config/attack/badnet/default.yaml --dataset cifar10
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.attacks.run import ATTACK_OPTIONS, PoisoningAttack, run_attack  # noqa: E402
from utils.core.cli import main_guard  # noqa: E402
from utils.core.config import Option, parse_config  # noqa: E402

OPTIONS = {**ATTACK_OPTIONS, "patch_size": Option(3, "side of the white square, in pixels")}


def badnet_poison(images, patch_size: int):
    """White (255) patch over the last `patch_size` rows and columns of every channel."""
    out = images.clone()
    out[..., -patch_size:, -patch_size:] = 255
    return out


def main(argv=None):
    cfg = parse_config(OPTIONS, "BadNets attack: writes a BackdoorBench-format record", argv)
    return run_attack(cfg, "badnet",
                      lambda ctx: PoisoningAttack(
                          poison=lambda images: badnet_poison(images, cfg.patch_size)))


if __name__ == "__main__":
    main_guard(main)
