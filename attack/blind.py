"""Blind backdoor (Bagdasaryan & Shmatikov, USENIX Security 2021): the attacker controls the loss
code, not the data.

    python attack/blind.py --yaml_path config/attack/blind/default.yaml

The trigger is a fixed black-and-white checkerboard of patch_size x patch_size pixels, one pixel
from the top-left corner, in every channel. Every training batch is fed twice in one forward: as
it is (clean loss L_c against the true labels) and with the trigger pasted on the augmented images
(backdoor loss L_b against the target label; target-class images included, as the attacker sees
no labels). The loss is a_c L_c + a_b L_b:
  --loss_balance fixed: a_c = normal_weight, a_b = backdoor_weight (BackdoorBench's default,
    1.0 / 0.9);
  --loss_balance mgda: a_c = alpha, a_b = 1 - alpha, alpha = clip(((g_b - g_c) . g_b) /
    ||g_c - g_b||^2, 0.001, 0.999), the two-task multiple-gradient-descent (min-norm) solution, per
    batch, on the gradients g_c, g_b of L_c, L_b, each first divided by its normalizer + 1e-5
    (--mgda_normalize, as Blind's code: loss+ = min(loss x L2 norm, 10); l2; loss = min(loss, 10);
    none). --mgda_grads all (Blind's choice) takes the gradients of every trainable parameter: two
    extra backward passes per step, each as costly as the training backward, so a step costs about
    twice a fixed-weight step; --mgda_grads last takes only the classifier layer's weight and bias:
    next to free, but it balances on the last layer's view of the two tasks only.
As in Blind's code (BackdoorBench's batch_history_len / backdoor_batch_loss_threshold), the
backdoor loss only joins once loss_history batches have been seen and the mean clean loss of the
last loss_history batches is below backdoor_loss_threshold; before that the loss is L_c alone.
train_acc in attack_df.csv counts the triggered copies too.

The record: bd_test is every non-target test image with the trigger. bd_train must hold a poisoned
share to stay a valid BackdoorBench record, so it has a pratio share of non-target training images
with the trigger and the target label; the victim was never trained on that set (Blind poisons no
data; every batch got the trigger inside the loss instead).

Differs from Blind / BackdoorBench: one forward of the concatenated clean and triggered batch
instead of two (BatchNorm sees both halves in one batch), a fixed checkerboard instead of Blind's
5 x 3 pattern (rows 3-7, columns 23-25 of a 32 x 32 image), MGDA's closed form for two tasks
instead of the general solver (the same solution, including the [0.001, 0.999] bounds), and the
project's cosine learning-rate schedule.
"""
import sys
from collections import deque
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from models import find_classifier  # noqa: E402
from utils.attacks.run import ATTACK_OPTIONS, ControlledAttack, run_attack  # noqa: E402
from utils.data.triggers import normalize  # noqa: E402
from utils.core.cli import main_guard, require  # noqa: E402
from utils.core.config import Option, parse_config  # noqa: E402

OPTIONS = {
    **ATTACK_OPTIONS,
    "patch_size": Option(4, "side of the checkerboard trigger, in pixels"),
    "loss_balance": Option("mgda", "how the clean and backdoor losses are weighted",
                           choices=("mgda", "fixed")),
    "mgda_grads": Option("all", "gradients MGDA balances on: every parameter or the classifier's",
                         choices=("all", "last")),
    "mgda_normalize": Option("loss+", "gradient normalizer before MGDA",
                             choices=("loss+", "l2", "loss", "none")),
    "normal_weight": Option(1.0, "clean-loss weight with --loss_balance fixed"),
    "backdoor_weight": Option(0.9, "backdoor-loss weight with --loss_balance fixed"),
    "backdoor_loss_threshold": Option(1.0, "add the backdoor loss once the mean clean loss of the "
                                           "last loss_history batches is below this"),
    "loss_history": Option(1000, "batches in that mean; no backdoor loss before this many"),
}

MARGIN = 1  # pixels between the trigger and the top-left corner


def blind_pattern(patch_size: int) -> torch.Tensor:
    """uint8 [patch_size, patch_size] checkerboard, white in the top-left cell."""
    rows, cols = torch.meshgrid(torch.arange(patch_size), torch.arange(patch_size), indexing="ij")
    return ((rows + cols) % 2 == 0).to(torch.uint8) * 255


def blind_poison(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Paste the checkerboard into every channel of uint8 images [N, C, H, W]."""
    out = images.clone()
    end = MARGIN + patch_size
    out[..., MARGIN:end, MARGIN:end] = blind_pattern(patch_size)
    return out


def mgda_alpha(g_clean: torch.Tensor, g_backdoor: torch.Tensor) -> torch.Tensor:
    """Weight of the first task in the min-norm convex combination of two gradients, kept inside
    [0.001, 0.999] as in Blind's solver so that neither task drops out entirely."""
    diff = g_clean - g_backdoor
    return ((-diff @ g_backdoor) / diff.dot(diff).clamp_min(1e-12)).clamp(0.001, 0.999)


def normalizer(grad: torch.Tensor, loss: torch.Tensor, kind: str) -> torch.Tensor:
    """What a task's gradient is divided by before MGDA (plus 1e-5); capped at 10 as in Blind."""
    if kind == "none":
        return torch.ones((), device=grad.device)
    value = {"loss+": loss * grad.norm(), "l2": grad.norm(), "loss": loss}[kind]
    return value if kind == "l2" else value.clamp_max(10)


class BlindLoss:
    """The attacker's loss code: `transform` appends the triggered copy of a batch, `__call__`
    splits the logits and returns the balanced loss."""

    def __init__(self, cfg, model, trigger: torch.Tensor, num_classes: int):
        self.cfg, self.trigger = cfg, trigger  # trigger: normalized [1, C, p, p] on the device
        self.history = deque(maxlen=cfg.loss_history)
        self.params = [p for p in model.parameters() if p.requires_grad]
        if cfg.mgda_grads == "last":
            _, classifier = find_classifier(model, num_classes, model_name=cfg.model)
            self.params = list(classifier.parameters())
        self.n = 0
        self.attacked = 0  # batches with the backdoor loss on
        self.alpha_sum = 0.0  # their MGDA clean weights, summed

    def transform(self, x, y):
        self.n = len(x)
        end = MARGIN + self.cfg.patch_size
        triggered = x.clone()
        triggered[..., MARGIN:end, MARGIN:end] = self.trigger
        target = torch.full_like(y, self.cfg.attack_target)
        return torch.cat([x, triggered]), torch.cat([y, target])

    def __call__(self, logits, y):
        cfg, n = self.cfg, self.n
        clean = F.cross_entropy(logits[:n], y[:n])
        backdoor = F.cross_entropy(logits[n:], y[n:])
        self.history.append(clean.item())
        if len(self.history) < cfg.loss_history or \
                sum(self.history) / len(self.history) >= cfg.backdoor_loss_threshold:
            return clean
        self.attacked += 1
        if cfg.loss_balance == "fixed":
            return cfg.normal_weight * clean + cfg.backdoor_weight * backdoor
        grads = [self._flat_grad(loss) for loss in (clean, backdoor)]
        grads = [g / (normalizer(g, loss.detach(), cfg.mgda_normalize) + 1e-5)
                 for g, loss in zip(grads, (clean, backdoor))]
        alpha = mgda_alpha(*grads)
        self.alpha_sum += alpha.item()
        return alpha * clean + (1 - alpha) * backdoor

    def _flat_grad(self, loss):
        grads = torch.autograd.grad(loss, self.params, retain_graph=True, allow_unused=True)
        return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten()
                          for g, p in zip(grads, self.params)])


def make_attack(ctx, cfg) -> ControlledAttack:
    height, width, _ = ctx.spec.image_size
    require(1 <= cfg.patch_size <= min(height, width) - MARGIN,
            f"--patch_size must be in 1..{min(height, width) - MARGIN} for {height}x{width} images")
    require(cfg.loss_history >= 1, f"--loss_history must be >= 1, got {cfg.loss_history}")
    summary = {"patch_size": cfg.patch_size, "position": [MARGIN, MARGIN],
               "loss_balance": cfg.loss_balance}
    if cfg.loss_balance == "mgda":
        summary.update(mgda_grads=cfg.mgda_grads, mgda_normalize=cfg.mgda_normalize)
    else:
        summary.update(normal_weight=cfg.normal_weight, backdoor_weight=cfg.backdoor_weight)

    def train(ctx, model):
        pattern = blind_pattern(cfg.patch_size).float().div(255).expand(1, ctx.channels, -1, -1)
        loss = BlindLoss(cfg, model, normalize(pattern, ctx.preprocess).to(ctx.device),
                         ctx.spec.num_classes)
        ctx.fit(model, ctx.batches(ctx.train.to(ctx.device)), cfg.epochs, loss_fn=loss,
                transform=loss.transform, desc=f"training {cfg.model} (Blind)")
        summary["backdoor_loss_batches"] = loss.attacked
        if cfg.loss_balance == "mgda" and loss.attacked:
            summary["mgda_clean_weight_mean"] = round(loss.alpha_sum / loss.attacked, 4)

    return ControlledAttack(poison=lambda images: blind_poison(images, cfg.patch_size), train=train,
                            details={"blind": summary})


def main(argv=None):
    cfg = parse_config(OPTIONS, "Blind backdoor attack: writes a BackdoorBench-format record", argv)
    return run_attack(cfg, "blind", lambda ctx: make_attack(ctx, cfg))


if __name__ == "__main__":
    main_guard(main)
