"""LC, Label-Consistent (Turner et al. 2019): clean-label. Target-class training images are first
made hard to classify by an untargeted PGD attack on a clean model, then stamped with a 3x3
black-and-white checkerboard in each of the four corners; their labels are kept. Test-time poison:
the corner checkerboards only, on images of the other classes.

    python attack/lc.py --yaml_path config/attack/lc/default.yaml

PGD (ULRL paper's setup, BackdoorBench-like): L_inf eps 8, step 1.5, 100 steps (pixel units of
0..255), maximizing the clean model's cross-entropy of the true label, from the clean image (no
random start, so runs are deterministic), in chunks of 512 images on --device; the perturbed image
is rounded to uint8 before the trigger goes on. As for SIG, --pratio is a share of the whole
training set drawn from the target class (yaml files lower it for data sets with many classes).

Differs from BackdoorBench: BackdoorBench loads adversarial images precomputed offline; here they
are computed against ctx.clean_model() for whatever data set and model are chosen. The
full-amplitude trigger is used (Turner et al. also study reduced-amplitude versions).
attack_summary.json records the clean model's test accuracy, and its accuracy on the poisoned
training images before and after PGD.
"""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.attacks.run import ATTACK_OPTIONS, CLEAN_MODEL_OPTIONS, PoisoningAttack, \
    run_attack  # noqa: E402
from utils.data.triggers import normalize, to_uint8  # noqa: E402
from utils.core.cli import log, main_guard, require  # noqa: E402
from utils.core.config import Option, parse_config  # noqa: E402
from utils.data.images import ImageSet  # noqa: E402
from utils.training.train import accuracy, predict  # noqa: E402

OPTIONS = {**ATTACK_OPTIONS, **CLEAN_MODEL_OPTIONS,
           "pgd_eps": Option(8.0, "L_inf bound of the PGD perturbation, pixel units (0..255)"),
           "pgd_step_size": Option(1.5, "PGD step, pixel units"),
           "pgd_steps": Option(100, "PGD steps"),
           "checker_size": Option(3, "side of each corner checkerboard, in pixels")}

PGD_CHUNK = 512


def checkerboard(size: int) -> torch.Tensor:
    """uint8 [size, size]: 255 where row + column is even, else 0."""
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return ((rows + cols) % 2 == 0).to(torch.uint8) * 255


def corner_trigger(images: torch.Tensor, size: int) -> torch.Tensor:
    """The checkerboard pasted, mirrored, into all four corners of every channel."""
    require(2 * size <= min(images.shape[-2:]),
            f"--checker_size {size} does not fit twice into {tuple(images.shape[-2:])} images")
    board = checkerboard(size).to(images.device)
    out = images.clone()
    out[..., :size, :size] = board
    out[..., :size, -size:] = board.flip(-1)
    out[..., -size:, :size] = board.flip(-2)
    out[..., -size:, -size:] = board.flip(-2, -1)
    return out


def pgd_hard(model, images: torch.Tensor, labels: torch.Tensor, preprocess, device, eps: float,
             step_size: float, steps: int) -> torch.Tensor:
    """uint8 images perturbed (L_inf <= eps, pixel units) to maximize `model`'s loss on `labels`."""
    out = torch.empty_like(images)
    eps, step_size = eps / 255, step_size / 255
    for start in range(0, len(images), PGD_CHUNK):
        part = slice(start, start + PGD_CHUNK)
        clean = images[part].to(device).float() / 255
        y = labels[part].to(device)
        x = clean.clone()
        for _ in range(steps):
            x.requires_grad_(True)
            loss = F.cross_entropy(model(normalize(x, preprocess)), y, reduction="sum")
            # Only the images move: the clean model's weights get no gradients.
            grad, = torch.autograd.grad(loss, x)
            x = torch.min(torch.max(x.detach() + step_size * grad.sign(), clean - eps),
                          clean + eps).clamp(0, 1)
        out[part] = to_uint8(255 * x).cpu()
    return out


def make_attack(ctx) -> PoisoningAttack:
    cfg = ctx.cfg
    require(cfg.pgd_eps >= 0 and cfg.pgd_step_size >= 0 and cfg.pgd_steps >= 0,
            "--pgd_eps, --pgd_step_size and --pgd_steps must be >= 0")
    require(cfg.checker_size >= 1, f"--checker_size must be >= 1, got {cfg.checker_size}")
    model = ctx.clean_model()
    details = {"pgd_eps": cfg.pgd_eps, "pgd_step_size": cfg.pgd_step_size,
               "pgd_steps": cfg.pgd_steps, "checker_size": cfg.checker_size,
               "clean_model_test_acc": accuracy(predict(model, ctx.test, ctx.preprocess),
                                                ctx.test.labels)}

    def clean_model_acc(images, labels):
        return accuracy(predict(model, ImageSet(images, labels), ctx.preprocess), labels)

    def poison_train(images, labels):
        hard = pgd_hard(model, images, labels, ctx.preprocess, ctx.device, cfg.pgd_eps,
                        cfg.pgd_step_size, cfg.pgd_steps)
        details["clean_model_acc_before_pgd"] = clean_model_acc(images, labels)
        details["clean_model_acc_after_pgd"] = clean_model_acc(hard, labels)
        log.info("LC: PGD on %d target-class images; the clean model classifies %.1f %% of them "
                 "correctly before, %.1f %% after", len(labels),
                 100 * details["clean_model_acc_before_pgd"],
                 100 * details["clean_model_acc_after_pgd"])
        return corner_trigger(hard, cfg.checker_size)

    return PoisoningAttack(poison=lambda images: corner_trigger(images, cfg.checker_size),
                           poison_train=poison_train, clean_label=True, details=details)


def main(argv=None):
    cfg = parse_config(OPTIONS, "Label-Consistent (LC) attack: writes a BackdoorBench-format "
                                "record", argv)
    return run_attack(cfg, "lc", make_attack)


if __name__ == "__main__":
    main_guard(main)
