"""Input-aware dynamic backdoor (Nguyen & Tran, NeurIPS 2020): every image gets its own trigger,
drawn by a pattern generator G and placed by a mask generator M.

    python attack/inputaware.py --yaml_path config/attack/inputaware/default.yaml

G and M are small conv encoder-decoders on [0, 1] images (two 2x poolings, 16/32 channels, no
BatchNorm); the triggered image is x + m(x) (G(x) - x), with m(x) = M's output sharpened towards
0/1. Training:
1. M alone for mask_epochs: lambda_div x diversity + lambda_norm x mean(relu(m - mask_density)),
   where diversity = mean over pairs of ||x - x'|| / ||m(x) - m(x')|| (x' = another image of the
   batch; RMS distances with 1e-7 added under the root, where BackdoorBench adds it to the
   denominator: identical outputs otherwise give NaN gradients), so different images get
   different masks that cover about mask_density of the pixels. Adam (betas 0.5, 0.9), lr_M, lr
   divided by 10 after 40 % and 80 % of the epochs.
2. Victim and G jointly, M frozen: in each batch the first int(pratio x batch) images get their own
   trigger and the target label, the next cross_ratio x that many get the trigger (pattern and mask)
   of another image and keep their labels (so a trigger only works on its own image), the rest stay
   clean; loss = cross-entropy + lambda_div x the same diversity term on G's patterns. Victim: the
   project's SGD + cosine; G: Adam (betas 0.5, 0.9), lr_G, constant.
The trigger depends on the trained generators (ControlledAttack.dynamic), so the test set is
re-poisoned at every evaluation and bd_test holds every non-target test image with its final
trigger. The record's bd_train holds a pratio share of non-target training images with the
trigger of the trained generators and the target label (made after training, as for every
training-controlled attack).

Differs from the paper / BackdoorBench: smaller generators (CPU-sized) without BatchNorm (with it,
the eval-mode generators that poison the test set lagged the train-mode ones the victim learnt
from), the partner image x' is the batch rolled by one instead of a batch of a second data loader,
G and M work on [0, 1] pixels instead of normalized inputs, the victim's schedule is cosine
(BackdoorBench's default.yaml: C_lr_scheduler None), no extra random rotation/crop. mask_epochs
defaults to BackdoorBench's clean_train_epochs, 25.
"""
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from utils.attacks.controlled import Stepped, apply_in_chunks, share, to_unit  # noqa: E402
from utils.attacks.run import ATTACK_OPTIONS, ControlledAttack, run_attack  # noqa: E402
from utils.data.triggers import normalize  # noqa: E402
from utils.core.cli import main_guard, require  # noqa: E402
from utils.core.config import Option, parse_config  # noqa: E402

log = logging.getLogger("backdoor")

OPTIONS = {
    **ATTACK_OPTIONS,
    "cross_ratio": Option(1.0, "cross-trigger samples (true labels) per backdoor sample in a "
                               "batch"),
    "lr_G": Option(0.01, "Adam learning rate of the pattern generator"),
    "lr_M": Option(0.01, "Adam learning rate of the mask generator"),
    "mask_epochs": Option(25, "epochs of mask-generator training before the victim is trained"),
    "lambda_div": Option(1.0, "weight of the diversity loss"),
    "lambda_norm": Option(100.0, "weight of the mask-size loss"),
    "mask_density": Option(0.032, "mask values above this are penalized"),
}
EPS = 1e-7


class TriggerNet(nn.Module):
    """[N, C, H, W] in [0, 1] -> [N, out, H, W] in [0, 1]; any size (re-sized after decoding)."""

    def __init__(self, in_channels: int, out_channels: int, width: int = 16):
        super().__init__()

        # No BatchNorm: the trigger must be the same function in training (train mode) and when
        # the test set is poisoned (eval mode); running statistics lag a generator that changes
        # every step and made the two differ.
        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True)]

        self.net = nn.Sequential(
            *block(in_channels, width), nn.MaxPool2d(2),
            *block(width, 2 * width), nn.MaxPool2d(2),
            *block(2 * width, 2 * width),
            nn.Upsample(scale_factor=2, mode="bilinear"), *block(2 * width, width),
            nn.Upsample(scale_factor=2, mode="bilinear"),
            nn.Conv2d(width, out_channels, 3, padding=1))

    def forward(self, x):
        out = self.net(x)
        if out.shape[-2:] != x.shape[-2:]:  # sizes not divisible by 4
            out = F.interpolate(out, size=x.shape[-2:], mode="bilinear")
        return torch.tanh(out) / 2 + 0.5


def sharpen(mask: torch.Tensor) -> torch.Tensor:
    """Push mask values towards 0 / 1 (steep tanh around 0.5), staying differentiable."""
    return torch.tanh((mask - 0.5) * 20) / (2 + EPS) + 0.5


def apply_trigger(u: torch.Tensor, pattern: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return u + mask * (pattern - u)


def diversity(u: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Mean of ||u_i - u_j|| / ||out_i - out_j|| over the pairs (i, i - 1) of the batch (RMS
    distances). EPS sits inside the square root: two identical (saturated) outputs have distance
    0, where the root's gradient is infinite and turned the generator's weights into NaN."""
    def dist(t):
        return (t - t.roll(1, 0)).pow(2).mean(dim=(1, 2, 3)).add(EPS).sqrt()
    return (dist(u) / dist(out)).mean()


def inputaware_poison(u: torch.Tensor, pattern_net: nn.Module, mask_net: nn.Module) -> torch.Tensor:
    """Each [0, 1] image with its own trigger."""
    return apply_trigger(u, pattern_net(u), sharpen(mask_net(u)))


def train_mask(ctx, cfg, mask_net: nn.Module, data) -> dict:
    """Phase 1: the mask generator alone. Returns the last epoch's mean losses and mask coverage."""
    optimizer = torch.optim.Adam(mask_net.parameters(), cfg.lr_M, betas=(0.5, 0.9))
    milestones = [round(0.4 * cfg.mask_epochs), round(0.8 * cfg.mask_epochs)]
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)
    batches = ctx.batches(data)
    stats = {}
    for epoch in range(cfg.mask_epochs):
        sums = torch.zeros(3, device=ctx.device)
        for x, _, _ in batches:
            u = to_unit(x, ctx.preprocess)
            mask = sharpen(mask_net(u))
            div, norm = diversity(u, mask), F.relu(mask - cfg.mask_density).mean()
            loss = cfg.lambda_div * div + cfg.lambda_norm * norm
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sums += torch.stack([div.detach(), norm.detach(), (mask > 0.5).float().mean()])
        scheduler.step()
        div, norm, coverage = (sums / len(batches)).tolist()
        stats = {"diversity": div, "norm": norm, "coverage": coverage}
        log.info("mask generator epoch %d/%d  diversity %.4f  norm %.4f  coverage %.4f",
                 epoch + 1, cfg.mask_epochs, div, norm, coverage)
    mask_net.requires_grad_(False)
    return stats


class TriggerMix:
    """The victim's batch transform and loss: own triggers (target label) and cross triggers (true
    label) on the first rows, G's diversity term added to the cross-entropy."""

    def __init__(self, ctx, cfg, pattern_net, mask_net):
        self.ctx, self.cfg, self.pattern_net, self.mask_net = ctx, cfg, pattern_net, mask_net
        self.div = 0.0

    def transform(self, x, y):
        cfg, pre = self.cfg, self.ctx.preprocess
        n_bd = share(len(x), cfg.pratio)
        n_cross = min(len(x) - n_bd, int(n_bd * cfg.cross_ratio))
        k = n_bd + n_cross
        if k < 2:  # no partner image for the diversity term: this batch stays clean
            self.div = 0.0
            return x, y
        u = to_unit(x[:k], pre)
        own = self.pattern_net(u)
        self.div = diversity(u, own)
        with torch.no_grad():
            mask = sharpen(self.mask_net(u))
        # Cross rows take the pattern and mask of their neighbour (row i - 1), another image.
        pattern = torch.cat([own[:n_bd], own.roll(1, 0)[n_bd:]])
        mask = torch.cat([mask[:n_bd], mask.roll(1, 0)[n_bd:]])
        x, y = x.clone(), y.clone()
        x[:k] = normalize(apply_trigger(u, pattern, mask), pre)
        y[:n_bd] = cfg.attack_target
        return x, y

    def loss(self, logits, y):
        return F.cross_entropy(logits, y) + self.cfg.lambda_div * self.div


def make_attack(ctx, cfg) -> ControlledAttack:
    require(cfg.mask_epochs >= 0, f"--mask_epochs must be >= 0, got {cfg.mask_epochs}")
    require(cfg.cross_ratio >= 0, f"--cross_ratio must be >= 0, got {cfg.cross_ratio}")
    height, width, _ = ctx.spec.image_size
    require(min(height, width) >= 4,
            f"InputAware needs images of at least 4x4, not {height}x{width}")
    pattern_net = TriggerNet(ctx.channels, ctx.channels).to(ctx.device)
    mask_net = TriggerNet(ctx.channels, 1).to(ctx.device)
    details = {"inputaware": {"cross_ratio": cfg.cross_ratio, "mask_epochs": cfg.mask_epochs,
                              "lambda_div": cfg.lambda_div, "lambda_norm": cfg.lambda_norm,
                              "mask_density": cfg.mask_density}}

    def poison(images):
        return apply_in_chunks(lambda u: inputaware_poison(u, pattern_net, mask_net), images,
                               ctx.device, cfg.eval_batch_size)

    def train(ctx, model):
        data = ctx.train.to(ctx.device)
        details["inputaware"]["mask_training"] = train_mask(ctx, cfg, mask_net, data)
        mix = TriggerMix(ctx, cfg, pattern_net, mask_net)
        opt_victim, schedule = ctx.optimizer(model.parameters(), cfg.epochs)
        opt_pattern = torch.optim.Adam(pattern_net.parameters(), cfg.lr_G, betas=(0.5, 0.9))
        ctx.fit(model, ctx.batches(data), cfg.epochs, loss_fn=mix.loss, transform=mix.transform,
                optimizer=Stepped(opt_victim, opt_pattern), scheduler=schedule,
                desc=f"training {cfg.model} (InputAware)")

    return ControlledAttack(poison=poison, train=train, dynamic=True, details=details)


def main(argv=None):
    cfg = parse_config(OPTIONS, "Input-aware dynamic backdoor: writes a BackdoorBench-format "
                                "record", argv)
    return run_attack(cfg, "inputaware", lambda ctx: make_attack(ctx, cfg))


if __name__ == "__main__":
    main_guard(main)
