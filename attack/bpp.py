"""BppAttack (Wang, Zhai & Ma, CVPR 2022): the trigger is colour-depth squeezing, optionally with
Floyd-Steinberg dithering.

    python attack/bpp.py --yaml_path config/attack/bpp/default.yaml

Every channel is quantized to squeeze_num levels (round(v / 255 x (n - 1)) / (n - 1) x 255); with
--dithering the rounding error of each pixel is diffused to its right (7/16), lower-left (3/16),
lower (5/16) and lower-right (1/16) neighbours in raster order. Training is controlled by the
attacker: in every batch the first int(pratio x batch) samples are replaced by their squeezed
versions with the target label, and the next int(neg_ratio x batch) become negative samples: the
image plus the squeezing residual (squeezed minus original) of another, random training image,
clamped, with its true label, so the model keys on a residual that fits the image, not on
squeezing-like noise (BackdoorBench's negatives). The record's bd_train holds a pratio share of
non-target training images squeezed and labelled with the target; bd_test is every non-target test
image, squeezed. The defaults are BackdoorBench's (squeeze_num 8, neg_ratio 0.1, dithering off);
the BppAttack paper dithers.

Differs from BackdoorBench / the paper: squeezed training images are computed once for the whole
training set and then augmented (random crop with zero padding commutes with plain squeezing,
as black stays black; with dithering the diffusion near the crop border differs slightly), where
BackdoorBench squeezes every augmented batch; negatives take the residual of a random image, as in
BackdoorBench, not the paper's adversarial perturbation against the current model; no extra random
rotation/crop; cosine learning-rate schedule (BackdoorBench: MultiStepLR with milestones past the
last epoch, i.e. constant). BackdoorBench's record keeps the last epoch's poisoned and negative
batch rows as bd_train; here it is a fixed pratio share, squeezed.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from utils.attacks.controlled import share, sub_generator  # noqa: E402
from utils.attacks.run import ATTACK_OPTIONS, ControlledAttack, run_attack  # noqa: E402
from utils.core.cli import main_guard, require  # noqa: E402
from utils.core.config import Option, parse_config  # noqa: E402

OPTIONS = {
    **ATTACK_OPTIONS,
    "squeeze_num": Option(8, "colour levels per channel after squeezing (2..255)"),
    "dithering": Option(False, "Floyd-Steinberg error diffusion while squeezing"),
    "neg_ratio": Option(0.1, "share of each batch made negative samples (another image's squeezing "
                             "residual, true label)"),
}


def _quantize(values: torch.Tensor, levels: int) -> torch.Tensor:
    step = 255 / (levels - 1)
    return (values / step).round() * step


def bpp_poison(images: torch.Tensor, levels: int, dithering: bool = False) -> torch.Tensor:
    """Squeeze uint8 images [N, C, H, W] to `levels` values per channel; uint8 out."""
    if not dithering:
        return _quantize(images.float(), levels).round().clamp(0, 255).to(torch.uint8)
    n, c, h, w = images.shape
    # Raster-order error diffusion is sequential over pixels; each step works on every image and
    # channel at once, on a [H, W, N*C] layout so a pixel's values are one contiguous row.
    img = images.permute(2, 3, 0, 1).reshape(h, w, n * c).float()
    for y in range(h):
        for x in range(w):
            old = img[y, x].clone()  # a view would change with the assignment below
            new = _quantize(old.clamp(0, 255), levels)  # diffused error can leave [0, 255]
            img[y, x] = new
            err = old - new
            if x + 1 < w:
                img[y, x + 1] += err * (7 / 16)
            if y + 1 < h:
                if x > 0:
                    img[y + 1, x - 1] += err * (3 / 16)
                img[y + 1, x] += err * (5 / 16)
                if x + 1 < w:
                    img[y + 1, x + 1] += err * (1 / 16)
    out = img.round().clamp(0, 255).to(torch.uint8)
    return out.reshape(h, w, n, c).permute(2, 3, 0, 1).contiguous()


def negatives(images: torch.Tensor, others: torch.Tensor, others_squeezed: torch.Tensor
              ) -> torch.Tensor:
    """uint8 images plus the squeezing residual of other images (squeezed - original), clamped."""
    residual = others_squeezed.to(torch.int16) - others.to(torch.int16)
    return (images.to(torch.int16) + residual).clamp(0, 255).to(torch.uint8)


class MixedBatches:
    """ctx.batches over the clean set, with each batch's first rows swapped for their squeezed
    (target label) and negative (true label) versions, augmented like the rest."""

    def __init__(self, ctx, squeezed: torch.Tensor, cfg):
        data = ctx.train.to(ctx.device)
        self.images, self.clean = data.images, ctx.batches(data)
        self.squeezed, self.cfg, self.preprocess = squeezed, cfg, ctx.preprocess
        self.generator = sub_generator(cfg.seed, 1)

    def __len__(self):
        return len(self.clean)

    def __iter__(self):
        cfg, gen = self.cfg, self.generator
        for x, y, idx in self.clean:
            n_bd = share(len(x), cfg.pratio)
            n_neg = min(len(x) - n_bd, share(len(x), cfg.neg_ratio))
            if n_bd:
                bd = self.squeezed[idx[:n_bd]]
                x[:n_bd] = self.preprocess(bd, augment=True, generator=gen)
                y[:n_bd] = cfg.attack_target
            if n_neg:
                others = torch.randint(len(self.images), (n_neg,), generator=gen).to(idx.device)
                neg = negatives(self.images[idx[n_bd:n_bd + n_neg]], self.images[others],
                                self.squeezed[others])
                x[n_bd:n_bd + n_neg] = self.preprocess(neg, augment=True, generator=gen)
            yield x, y, idx


def make_attack(ctx, cfg) -> ControlledAttack:
    require(2 <= cfg.squeeze_num <= 255, f"--squeeze_num must be in 2..255, got {cfg.squeeze_num}")
    require(cfg.neg_ratio >= 0, f"--neg_ratio must be >= 0, got {cfg.neg_ratio}")

    def poison(images):
        return bpp_poison(images, cfg.squeeze_num, cfg.dithering)

    def train(ctx, model):
        squeezed = poison(ctx.train.images).to(ctx.device)
        ctx.fit(model, MixedBatches(ctx, squeezed, cfg), cfg.epochs,
                desc=f"training {cfg.model} (BPP)")

    details = {"bpp": {"squeeze_num": cfg.squeeze_num, "dithering": cfg.dithering,
                       "neg_ratio": cfg.neg_ratio}}
    return ControlledAttack(poison=poison, train=train, details=details)


def main(argv=None):
    cfg = parse_config(OPTIONS, "BppAttack: writes a BackdoorBench-format record", argv)
    return run_attack(cfg, "bpp", lambda ctx: make_attack(ctx, cfg))


if __name__ == "__main__":
    main_guard(main)
