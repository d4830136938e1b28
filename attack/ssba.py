"""SSBA (Li et al. 2021, "Invisible backdoor attack with sample-specific triggers"), all-to-one.

A steganographic encoder hides one fixed secret bit string (drawn from --seed) in each poisoned
image as a bounded, image-dependent residual: every poisoned image carries its own invisible
trigger. The encoder-decoder (utils/attacks/stega.py) is trained here on clean training images before the
victim, with a bit-recovery loss and an image-fidelity loss; its bit accuracy and PSNR on clean
test images go into attack_summary.json.

    python attack/ssba.py --yaml_path config/attack/ssba/default.yaml --dataset cifar10
    python attack/ssba.py --yaml_path config/attack/ssba/fashion_mnist.yaml --encoder enc.pt

--encoder PATH loads the encoder-decoder from PATH when the file exists, else trains it and saves
it there (a plain state dict), so several records can share one encoder.

Differences from the original and from BackdoorBench: BackdoorBench ships residuals pre-computed
with the authors' StegaStamp (a U-Net encoder trained ~140,000 steps on ImageNet with an L2 + LPIPS
perceptual loss, a GAN critic and a spatial-transformer / noise layer stack, 100-bit secrets). Here
the encoder is a few-layer CNN trained per run for hundreds of steps on the attacked data set
itself, with an MSE fidelity loss only (no LPIPS, no critic, no geometric or colour noise; only
half-grey-level noise for uint8 rounding), a hard bound on the residual (--max_residual) instead of
StegaStamp's unbounded one, and a short secret (--secret_bits). The poison ratio, target and victim
training are BackdoorBench's.

Measured on Fashion-MNIST, full data, smallcnn (`python attack/ssba.py --yaml_path
config/attack/ssba/fashion_mnist.yaml --record_dir /tmp/records_h3 --encoder /tmp/enc.pt`): bit
accuracy 0.998 and PSNR 29.1 dB on 1,000 clean test images (residual at most 25 grey levels);
C-ACC 87.95 %, ASR 99.88 %, RA 0.12 %.
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from utils.attacks.run import ATTACK_OPTIONS, AttackContext, PoisoningAttack, \
    run_attack  # noqa: E402
from utils.attacks.stega import Stega, embed, embedding_quality, secret_bits, \
    train_stega  # noqa: E402
from utils.core.cli import log, main_guard, progress, require  # noqa: E402
from utils.core.config import Option, parse_config  # noqa: E402
from utils.core.errors import UserError  # noqa: E402
from utils.core.io import torch_save  # noqa: E402
from utils.data.record import safe_load  # noqa: E402

OPTIONS = {
    **ATTACK_OPTIONS,
    "secret_bits": Option(8, "length of the secret bit string hidden in every poisoned image"),
    "max_residual": Option(0.1, "bound on each pixel's change, in [0, 1] units (0.1 = 25.5 "
                                 "grey levels)"),
    "encoder_images": Option(4000, "clean training images the encoder-decoder is trained on"),
    "encoder_steps": Option(600, "training steps of the encoder-decoder"),
    "encoder_batch_size": Option(64, "batch size of the encoder-decoder"),
    "encoder_lr": Option(3e-3, "Adam learning rate of the encoder-decoder"),
    "image_weight": Option(5.0, "weight of the image-fidelity (MSE) loss against the bit loss"),
    "quality_images": Option(1000, "clean test images the bit accuracy and PSNR are measured on"),
    "encoder": Option(None, "encoder-decoder state dict: loaded when the file exists, else "
                            "trained and saved there", str),
}


def build_stega(ctx: AttackContext) -> tuple[Stega, dict]:
    """The encoder-decoder for this data set, loaded from --encoder or trained; plus how."""
    cfg = ctx.cfg
    require(cfg.secret_bits >= 1, f"--secret_bits must be >= 1, got {cfg.secret_bits}")
    require(0 < cfg.max_residual <= 1, f"--max_residual must be in (0, 1], got {cfg.max_residual}")
    height, width, channels = ctx.spec.image_size
    with torch.random.fork_rng():  # seeded initialization that leaves the global RNG alone
        torch.manual_seed(cfg.seed)
        stega = Stega(channels, (height, width), cfg.secret_bits, cfg.max_residual)
    path = Path(cfg.encoder) if cfg.encoder else None
    if path is not None and path.is_file():
        _load(stega, path, cfg)
        log.info("ssba: encoder-decoder loaded from %s", path)
        return stega.to(ctx.device), {"encoder_source": str(path)}
    require(cfg.encoder_steps >= 1 and cfg.encoder_images >= 1 and cfg.encoder_batch_size >= 1,
            "--encoder_steps, --encoder_images and --encoder_batch_size must be >= 1")
    stega.to(ctx.device)
    gen = torch.Generator().manual_seed(cfg.seed)
    pick = torch.randperm(len(ctx.train), generator=gen)[:cfg.encoder_images]
    start = time.perf_counter()
    with progress(cfg.encoder_steps, "encoder-decoder") as bar:
        losses = train_stega(stega, ctx.train.images[pick].to(ctx.device), cfg.encoder_steps,
                             cfg.encoder_batch_size, cfg.encoder_lr, cfg.image_weight, gen, bar)
    how = {"encoder_source": "trained", "encoder_train_images": len(pick),
           "encoder_train_s": round(time.perf_counter() - start, 2), **losses}
    if path is not None:
        torch_save(path, {k: v.cpu() for k, v in stega.state_dict().items()})
        how["encoder_saved_to"] = str(path)
    return stega, how


def _load(stega: Stega, path: Path, cfg) -> None:
    state = safe_load(path)
    ours = stega.state_dict()
    fits = isinstance(state, dict) and state.keys() == ours.keys() and all(
        isinstance(v, torch.Tensor) and v.shape == ours[k].shape for k, v in state.items())
    require(fits, f"--encoder {path} is not an encoder-decoder for {cfg.dataset} with "
                  f"--secret_bits {cfg.secret_bits}: pass the settings it was trained with or a "
                  "new path")
    stega.load_state_dict(state)
    bound = float(stega.encoder.max_residual)
    if abs(bound - cfg.max_residual) > 1e-6:
        raise UserError(f"--encoder {path} was trained with --max_residual {bound:g}, not "
                        f"{cfg.max_residual:g}: pass that value or a new path")


def make_ssba(ctx: AttackContext) -> PoisoningAttack:
    cfg = ctx.cfg
    stega, how = build_stega(ctx)
    stega.eval()
    secret = secret_bits(cfg.secret_bits, cfg.seed)
    sample = ctx.test.images[:cfg.quality_images]
    quality = embedding_quality(stega, sample, embed(stega, sample, secret), secret)
    log.info("ssba: secret %s, bit accuracy %.4f, PSNR %.2f dB on %d clean test images",
             "".join(str(int(b)) for b in secret), quality["bit_accuracy"], quality["psnr_db"],
             len(sample))
    details = {"secret": "".join(str(int(b)) for b in secret), "max_residual": cfg.max_residual,
               **how, **quality, "quality_images": len(sample)}
    return PoisoningAttack(poison=lambda images: embed(stega, images, secret), details=details)


def main(argv=None):
    cfg = parse_config(OPTIONS, "SSBA attack: writes a BackdoorBench-format record", argv)
    return run_attack(cfg, "ssba", make_ssba)


if __name__ == "__main__":
    main_guard(main)
