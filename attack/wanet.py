"""WaNet (Nguyen & Tran, ICLR 2021): the trigger is a fixed, smooth, random warp of the whole image.

    python attack/wanet.py --yaml_path config/attack/wanet/default.yaml

A k x k grid of random offsets in [-1, 1] (scaled to mean magnitude 1) is upsampled bicubically to
H x W, multiplied by s / H (s / W for the x offsets), added to the identity sampling grid, scaled by
grid_rescale, clamped to the image and applied with bilinear grid_sample (align_corners). The field
comes from --seed alone and its k x k control values are stored in attack_summary.json. Training
is controlled by the attacker: in every batch the first int(pratio x batch) samples are warped and
relabelled to the target, the next cross_ratio x that many are warped with the field plus per-sample
random noise (noise mode, true labels kept) so that only the exact field triggers, the rest stay
clean. The record's bd_train holds a pratio share of non-target training images warped by the field
and labelled with the target (the samples the attack produces; the victim itself was trained on
per-batch poisoning of the clean set); bd_test is every non-target test image, warped.

Differs from BackdoorBench: the field is drawn from a seeded generator (BackdoorBench: the global
torch RNG); the warp is applied to batches after the data set's own augmentation (random crop with
4 px padding, flip on CIFAR-10) and no extra random rotation/crop follows; learning rate schedule
is the project's cosine (BackdoorBench: MultiStepLR with milestones past the last epoch, i.e. a
constant rate); the grid is clamped, so grid_sample never samples outside the image and padding
plays no role.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from utils.attacks.controlled import share, sub_generator, unit_to_uint8  # noqa: E402
from utils.attacks.run import ATTACK_OPTIONS, ControlledAttack, run_attack  # noqa: E402
from utils.core.cli import main_guard, require  # noqa: E402
from utils.core.config import Option, parse_config  # noqa: E402

OPTIONS = {
    **ATTACK_OPTIONS,
    "k": Option(4, "side of the random control grid of the warping field"),
    "s": Option(0.5, "warping strength"),
    "grid_rescale": Option(1.0, "scale of the warped sampling grid"),
    "cross_ratio": Option(2.0, "noise-mode samples per backdoor sample in a batch (true labels)"),
}


def control_grid(k: int, generator: torch.Generator) -> torch.Tensor:
    """[1, 2, k, k] random offsets in [-1, 1], scaled to mean absolute value 1."""
    grid = torch.rand(1, 2, k, k, generator=generator) * 2 - 1
    return grid / grid.abs().mean()


def warp_grid(control: torch.Tensor, height: int, width: int, s: float,
              grid_rescale: float) -> torch.Tensor:
    """The sampling grid [1, H, W, 2] (x, y in [-1, 1]) of the warp defined by `control`."""
    offsets = F.interpolate(control, size=(height, width), mode="bicubic", align_corners=True)
    offsets = offsets.permute(0, 2, 3, 1) * s / torch.tensor([width, height])
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width),
                            indexing="ij")
    identity = torch.stack((xs, ys), dim=-1)[None]
    return ((identity + offsets) * grid_rescale).clamp(-1, 1)


def warp(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Warp a float batch [N, C, H, W] (any value range: bilinear sampling is affine-invariant)."""
    grid = grid.to(x.device, x.dtype).expand(len(x), -1, -1, -1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)


def wanet_poison(images: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Warp uint8 images [N, C, H, W] with `grid`; uint8 out."""
    return unit_to_uint8(warp(images.float() / 255, grid))


def noisy_grid(grid: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """Noise mode: the field plus per-sample uniform noise in [-1/W, 1/W] x [-1/H, 1/H] (grid units,
    about half a pixel), [n, H, W, 2]."""
    _, height, width, _ = grid.shape
    noise = torch.rand(n, height, width, 2, generator=generator) * 2 - 1
    return (grid + noise / torch.tensor([width, height])).clamp(-1, 1)


def make_attack(ctx, cfg) -> ControlledAttack:
    require(cfg.k >= 2, f"--k must be at least 2 (a k x k control grid), got {cfg.k}")
    require(cfg.cross_ratio >= 0, f"--cross_ratio must be >= 0, got {cfg.cross_ratio}")
    height, width, _ = ctx.spec.image_size
    require(cfg.k <= min(height, width), f"--k {cfg.k} exceeds the image size {height}x{width}")
    control = control_grid(cfg.k, torch.Generator().manual_seed(cfg.seed))
    grid = warp_grid(control, height, width, cfg.s, cfg.grid_rescale)
    noise_gen = sub_generator(cfg.seed, 1)
    device_grid = grid.to(ctx.device)

    def transform(x, y):
        n_bd = share(len(x), cfg.pratio)
        n_cross = min(len(x) - n_bd, int(n_bd * cfg.cross_ratio))
        x, y = x.clone(), y.clone()
        x[:n_bd] = warp(x[:n_bd], device_grid)
        y[:n_bd] = cfg.attack_target
        if n_cross:
            cross = slice(n_bd, n_bd + n_cross)
            x[cross] = warp(x[cross], noisy_grid(grid, n_cross, noise_gen).to(x.device))
        return x, y

    def train(ctx, model):
        ctx.fit(model, ctx.batches(ctx.train.to(ctx.device)), cfg.epochs, transform=transform,
                desc=f"training {cfg.model} (WaNet)")

    details = {"warp": {"k": cfg.k, "s": cfg.s, "grid_rescale": cfg.grid_rescale,
                        "cross_ratio": cfg.cross_ratio, "seed": cfg.seed,
                        "control_grid": control[0].tolist()}}
    return ControlledAttack(poison=lambda images: wanet_poison(images, grid), train=train,
                            details=details)


def main(argv=None):
    cfg = parse_config(OPTIONS, "WaNet attack: writes a BackdoorBench-format record", argv)
    return run_attack(cfg, "wanet", lambda ctx: make_attack(ctx, cfg))


if __name__ == "__main__":
    main_guard(main)
