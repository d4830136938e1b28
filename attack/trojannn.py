"""TrojanNN (Liu et al. 2018): a trigger patch optimized to excite chosen neurons of a clean model,
then a poison-label, all-to-one attack that pastes it on a pratio share of the non-target images.

    python attack/trojannn.py --yaml_path config/attack/trojannn/default.yaml

Trigger search, against ctx.clean_model():
- region: a square mask at the bottom-right corner, side `mask_fraction` of the image's shorter side
  (default 0.25: 7 px of 28, 8 of 32, 16 of 64);
- layer and neurons: the classifier's input features (smallcnn: the 128 hidden units;
  PreAct-ResNet18: the 512 pooled features), and the `neurons` of them (default 2, as in the ULRL
  paper's setup) with the largest summed absolute outgoing weight into the classifier (Liu et al.'s
  selection rule);
- objective: mean squared distance of those neurons to `target_activation_scale` (default 10) times
  the largest activation of the layer on clean images, minimized by Adam (lr `trigger_lr`) over
  `trigger_steps` (default 1000, as in the ULRL paper) on the mask's pixels only, kept in [0, 255],
  each step on a batch of --batch_size clean training images with the patch pasted.

Differs from the paper and BackdoorBench: the mask is a square, not the 'apple' logo or watermark
picture BackdoorBench loads; the patch is optimized pasted on clean training images (universal over
their content) rather than alone on a blank input; the paper then retrains the clean model on
reverse-engineered data, while here (as in BackdoorBench) a fresh victim is trained on the poisoned
training set. attack_summary.json records the chosen neurons, their mean activation on patched
images against the target, and the clean model's test accuracy.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import find_classifier  # noqa: E402
from utils.attacks.run import ATTACK_OPTIONS, CLEAN_MODEL_OPTIONS, PoisoningAttack, \
    run_attack  # noqa: E402
from utils.data.triggers import blend, normalize  # noqa: E402
from utils.core.cli import log, main_guard, require  # noqa: E402
from utils.core.config import Option, parse_config  # noqa: E402
from utils.training.train import accuracy, predict  # noqa: E402

OPTIONS = {**ATTACK_OPTIONS, **CLEAN_MODEL_OPTIONS,
           "mask_fraction": Option(0.25, "side of the square trigger region, as a share of the "
                                         "image's shorter side"),
           "neurons": Option(2, "classifier-input neurons the trigger is optimized to excite"),
           "target_activation_scale": Option(10.0, "their target value, in multiples of the "
                                                   "layer's largest activation on clean images"),
           "trigger_steps": Option(1000, "optimization steps of the trigger"),
           "trigger_lr": Option(0.05, "Adam learning rate of the trigger, in [0, 1] pixel units")}


def square_mask(height: int, width: int, fraction: float) -> torch.Tensor:
    """float [1, H, W]: 1 on the bottom-right square of side fraction * min(H, W), at least 1 px."""
    side = max(1, round(fraction * min(height, width)))
    mask = torch.zeros(1, height, width)
    mask[:, -side:, -side:] = 1
    return mask


def strongest_neurons(classifier: torch.nn.Linear, count: int) -> torch.Tensor:
    """Indices of the `count` classifier inputs with the largest summed |outgoing weight|."""
    return classifier.weight.detach().abs().sum(0).topk(count).indices.sort().values


class FeatureTap:
    """Keeps the input of `layer` from the latest forward pass (the features it classifies)."""

    def __init__(self, layer: torch.nn.Module):
        self.features = None
        self.handle = layer.register_forward_hook(self._keep)

    def _keep(self, module, inputs, output):
        self.features = inputs[0]

    def close(self):
        self.handle.remove()


def fit_trigger(model, classifier, images: torch.Tensor, mask: torch.Tensor, neurons, preprocess,
                cfg, device, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
    """The patch for `model` (eval mode) on uint8 `images` (CPU). Returns (pattern in pixel units
    [C, H, W], only meaningful under the mask, and facts for the summary)."""
    mask = mask.to(device)
    neurons = neurons.to(device)
    tap = FeatureTap(classifier)
    try:
        with torch.no_grad():
            sample = images[torch.randperm(len(images), generator=generator)[:1024]]
            model(normalize(sample.to(device).float() / 255, preprocess))
            goal = cfg.target_activation_scale * tap.features.max().clamp(min=1e-3)
        pattern = torch.rand(images.shape[1:], generator=generator).to(device).requires_grad_()
        optimizer = torch.optim.Adam([pattern], lr=cfg.trigger_lr)
        for _ in range(cfg.trigger_steps):
            idx = torch.randint(len(images), (cfg.batch_size,), generator=generator)
            x = images[idx].to(device).float() / 255
            model(normalize(x + mask * (pattern - x), preprocess))
            loss = (tap.features[:, neurons] - goal).pow(2).mean()
            # Only the patch is optimized: the clean model's weights get no gradients.
            pattern.grad, = torch.autograd.grad(loss, pattern)
            optimizer.step()
            with torch.no_grad():
                pattern.clamp_(0, 1)
        reached = tap.features[:, neurons].mean().item()
    finally:
        tap.close()
    return 255 * pattern.detach().cpu(), {"trigger_neuron_activation": round(reached, 4),
                                          "trigger_neuron_target": round(goal.item(), 4)}


def trojannn_poison(images: torch.Tensor, pattern: torch.Tensor, mask: torch.Tensor):
    return blend(images, pattern, mask)


def make_attack(ctx) -> PoisoningAttack:
    cfg = ctx.cfg
    require(0 < cfg.mask_fraction <= 1,
            f"--mask_fraction must be in (0, 1], got {cfg.mask_fraction}")
    model = ctx.clean_model()
    _, classifier = find_classifier(model, ctx.spec.num_classes, model_name=cfg.model)
    require(1 <= cfg.neurons <= classifier.in_features,
            f"--neurons must be in 1..{classifier.in_features} (the classifier's inputs), "
            f"got {cfg.neurons}")
    height, width, _ = ctx.spec.image_size
    mask = square_mask(height, width, cfg.mask_fraction)
    neurons = strongest_neurons(classifier, cfg.neurons)
    generator = torch.Generator().manual_seed(cfg.seed)
    pattern, facts = fit_trigger(model, classifier, ctx.train.images, mask, neurons,
                                 ctx.preprocess, cfg, ctx.device, generator)
    clean_acc = accuracy(predict(model, ctx.test, ctx.preprocess), ctx.test.labels)
    log.info("TrojanNN trigger: neurons %s, mean activation %.3f (target %.3f); clean model test "
             "accuracy %.2f %%", neurons.tolist(), facts["trigger_neuron_activation"],
             facts["trigger_neuron_target"], 100 * clean_acc)
    return PoisoningAttack(poison=lambda images: trojannn_poison(images, pattern, mask),
                           details={"mask_side": int(mask[0, -1].sum().item()),
                                    "neurons": neurons.tolist(), **facts,
                                    "clean_model_test_acc": clean_acc})


def main(argv=None):
    cfg = parse_config(OPTIONS, "TrojanNN attack: writes a BackdoorBench-format record", argv)
    return run_attack(cfg, "trojannn", make_attack)


if __name__ == "__main__":
    main_guard(main)
