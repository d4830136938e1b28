"""LF, Low Frequency (Zeng et al. 2021, "Rethinking the backdoor attacks' triggers: a frequency
perspective"): a smooth universal trigger found against a clean model, then a poison-label,
all-to-one attack that adds it to a pratio share of the non-target training images.

    python attack/lf.py --yaml_path config/attack/lf/default.yaml

The trigger is one additive perturbation of the whole image, built against ctx.clean_model():
- low-pass: it lives in the span of the lowest 2-D DCT-II frequencies, `cutoff` of them per axis
  (default 0.25: 8x8 of 32x32, 7x7 of 28x28, 16x16 of 64x64 per channel), so it has no
  high-frequency content by construction;
- bounded: L_inf <= `eps` pixel units (default 20 of 255): after each step the perturbation is
  clipped to the bound and projected back onto the low frequencies (the paper's "low-pass filter
  after each iteration"); the final one is scaled down where that projection overshot the bound;
- targeted and universal: Adam (lr `trigger_lr`) minimizes the cross-entropy toward the target label
  over `trigger_samples` non-target training images in batches of --batch_size, for at most
  `trigger_epochs` passes (default 50), stopping after the first pass in which the share of those
  images sent to the target reaches 1 - `fooling_rate` (default 0.2, so 80 %).

Differs from the paper and BackdoorBench: they search the universal perturbation with the
DeepFool-based UAP algorithm and low-pass filter it after each iteration, and BackdoorBench ships
precomputed triggers per data set and model; here it is a direct gradient search in a low-frequency
basis (the same two constraints, simpler and deterministic), computed for whatever model and data
set are chosen. The trigger's achieved fooling rate on the clean model goes into
attack_summary.json (trigger_target_rate), with the clean model's test accuracy.
"""
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.attacks.run import ATTACK_OPTIONS, CLEAN_MODEL_OPTIONS, PoisoningAttack, \
    run_attack  # noqa: E402
from utils.data.triggers import add_signal, normalize  # noqa: E402
from utils.core.cli import log, main_guard, require  # noqa: E402
from utils.core.config import Option, parse_config  # noqa: E402
from utils.training.train import accuracy, predict  # noqa: E402

OPTIONS = {**ATTACK_OPTIONS, **CLEAN_MODEL_OPTIONS,
           "eps": Option(20.0, "L_inf bound of the trigger, in pixel units (0..255)"),
           "cutoff": Option(0.25, "share of the lowest DCT frequencies kept along each axis"),
           "trigger_epochs": Option(50, "most passes over the trigger images"),
           "fooling_rate": Option(0.2, "stop once all but this share of the trigger images go to "
                                       "the target (UAP's delta)"),
           "trigger_samples": Option(2000, "non-target training images the trigger is fitted on"),
           "trigger_lr": Option(0.01, "Adam learning rate of the trigger, in [0, 1] pixel units")}


def dct_basis(size: int, kept: int) -> torch.Tensor:
    """[size, kept]: the `kept` lowest-frequency DCT-II cosines, scaled to peak 1 so that
    coefficients are in pixel units."""
    n = torch.arange(size, dtype=torch.float32)[:, None]
    k = torch.arange(kept, dtype=torch.float32)[None, :]
    return torch.cos(math.pi * (n + 0.5) * k / size)


def low_pass(coefficients: torch.Tensor, basis_h: torch.Tensor, basis_w: torch.Tensor):
    """[C, kh, kw] DCT coefficients -> [C, H, W] image-space perturbation."""
    return basis_h @ coefficients @ basis_w.T


def analysis(signal: torch.Tensor, basis_h: torch.Tensor, basis_w: torch.Tensor):
    """[C, H, W] -> the coefficients of its projection onto the low-frequency span (the cosines
    are orthogonal, so this is a scaled transpose)."""
    norms = torch.outer(basis_h.pow(2).sum(0), basis_w.pow(2).sum(0))
    return (basis_h.T @ signal @ basis_w) / norms


def kept_frequencies(size: int, cutoff: float) -> int:
    return max(1, min(size, round(size * cutoff)))


def fit_trigger(model, images: torch.Tensor, target: int, preprocess, cfg, device,
                generator: torch.Generator) -> tuple[torch.Tensor, float, int]:
    """The low-frequency universal trigger for `model` (eval mode) on uint8 `images` (CPU).
    Returns (trigger in pixel units [C, H, W] on the CPU, last pass's target rate, passes run)."""
    channels, height, width = images.shape[1:]
    basis_h = dct_basis(height, kept_frequencies(height, cfg.cutoff)).to(device)
    basis_w = dct_basis(width, kept_frequencies(width, cfg.cutoff)).to(device)
    coefficients = torch.zeros(channels, basis_h.shape[1], basis_w.shape[1], device=device,
                               requires_grad=True)
    optimizer = torch.optim.Adam([coefficients], lr=cfg.trigger_lr)
    bound = cfg.eps / 255
    rate, passes = 0.0, 0
    for passes in range(1, cfg.trigger_epochs + 1):
        hits = 0
        for idx in torch.randperm(len(images), generator=generator).split(cfg.batch_size):
            x = images[idx].to(device).float() / 255
            logits = model(normalize((x + low_pass(coefficients, basis_h, basis_w)).clamp(0, 1),
                                     preprocess))
            goal = torch.full((len(idx),), target, device=device)
            # Only the trigger is optimized: the clean model's weights get no gradients.
            coefficients.grad, = torch.autograd.grad(F.cross_entropy(logits, goal), coefficients)
            optimizer.step()
            with torch.no_grad():  # clip to the bound, then low-pass again
                clipped = low_pass(coefficients, basis_h, basis_w).clamp(-bound, bound)
                coefficients.copy_(analysis(clipped, basis_h, basis_w))
            hits += (logits.argmax(1) == target).sum().item()
        rate = hits / len(images)
        if rate >= 1 - cfg.fooling_rate:
            break
    with torch.no_grad():  # the low-pass of a clipped signal can overshoot a little: scale back
        trigger = low_pass(coefficients, basis_h, basis_w)
        trigger = 255 * (trigger * bound / max(bound, trigger.abs().max().item())).cpu()
    return trigger, rate, passes


def lf_poison(images: torch.Tensor, trigger: torch.Tensor) -> torch.Tensor:
    return add_signal(images, trigger)


def make_attack(ctx) -> PoisoningAttack:
    cfg = ctx.cfg
    require(0 < cfg.eps <= 255, f"--eps must be in (0, 255] pixel units, got {cfg.eps}")
    require(0 < cfg.cutoff <= 1, f"--cutoff must be in (0, 1], got {cfg.cutoff}")
    require(0 <= cfg.fooling_rate < 1, f"--fooling_rate must be in [0, 1), got {cfg.fooling_rate}")
    model = ctx.clean_model()
    generator = torch.Generator().manual_seed(cfg.seed)
    others = (ctx.train.labels != cfg.attack_target).nonzero().flatten()
    require(len(others) > 0, "the training set has no image outside the target class")
    chosen = others[torch.randperm(len(others), generator=generator)[:cfg.trigger_samples]]
    trigger, rate, passes = fit_trigger(model, ctx.train.images[chosen], cfg.attack_target,
                                        ctx.preprocess, cfg, ctx.device, generator)
    clean_acc = accuracy(predict(model, ctx.test, ctx.preprocess), ctx.test.labels)
    log.info("LF trigger: %d passes, %.1f %% of %d images sent to the target by the clean model "
             "(test accuracy %.2f %%); L_inf %.1f", passes, 100 * rate, len(chosen),
             100 * clean_acc, trigger.abs().max())
    return PoisoningAttack(poison=lambda images: lf_poison(images, trigger),
                           details={"eps": cfg.eps, "cutoff": cfg.cutoff, "trigger_passes": passes,
                                    "trigger_target_rate": rate, "clean_model_test_acc": clean_acc,
                                    "trigger_linf": round(trigger.abs().max().item(), 3)})


def main(argv=None):
    cfg = parse_config(OPTIONS, "Low Frequency (LF) attack: writes a BackdoorBench-format record",
                       argv)
    return run_attack(cfg, "lf", make_attack)


if __name__ == "__main__":
    main_guard(main)
