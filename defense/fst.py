"""FST: Feature Shift Tuning (Min, Qin, Shen and Cheng, "Towards stable backdoor purification
through feature shift tuning", NeurIPS 2023), as its official code runs it.

    python defense/fst.py --result_file badnet_0_1 --yaml_path config/defense/fst/cifar10.yaml

1. Reinitialize the WHOLE classifier (weight and bias ~ U(-1/sqrt(fan_in), +1/sqrt(fan_in))).
2. Train all parameters on the defense subset with SGD (momentum 0.9, no weight decay) and
   CosineAnnealingLR; loss = CE + alpha * sum(W * W_ori), the inner product of the classifier
   weight with the original (backdoored) one, which pushes the features away from the old head.
3. After every optimizer step rescale W to the Frobenius norm of W_ori (the bias is left alone).
Settings (ULRL paper, Appendix A-B): lr 0.01 (CIFAR-10, GTSRB) or 1e-3 (CIFAR-100, Tiny-ImageNet);
10 epochs on CIFAR-10, 15 otherwise; alpha 0.2 / 0.1 (GTSRB) / 0.001 (CIFAR-100, Tiny); batch 256.

Differences from the official code: the classifier is the one the model registry declares (or
--linear_name as a dotted path) instead of a substring match on parameter names, which could
reinitialize unrelated layers (and, for VGG19-BN with `classifier`, reinitialized all three Linear
layers: the paper's "all final linear layers"; here only the classifier is); the reinitialization
draws from a generator seeded with --seed; no test evaluation inside the loop.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from utils.core.cli import main_guard  # noqa: E402
from utils.core.config import Option, parse_config  # noqa: E402
from utils.defenses.finetune import FINETUNE_OPTIONS, finetune  # noqa: E402
from utils.defenses.run import DEFENSE_OPTIONS, run_defense  # noqa: E402
from utils.defenses.session import DefenseSession, python_api  # noqa: E402

OPTIONS = {
    **DEFENSE_OPTIONS, **FINETUNE_OPTIONS,
    "epochs": Option(10, "fine-tuning epochs", bounds=">= 0"),
    "weight_decay": Option(0.0, "SGD weight decay (the official code uses none)", bounds=">= 0",
                           aliases=("wd",)),
    "alpha": Option(0.2, "weight of the inner-product penalty sum(W * W_ori)", bounds=">= 0"),
}


def reinitialize_head(linear: torch.nn.Linear, generator: torch.Generator) -> None:
    """Weight and bias ~ U(-1/sqrt(fan_in), +1/sqrt(fan_in)), as the official code."""
    bound = 1.0 / math.sqrt(linear.weight.shape[1])
    with torch.no_grad():
        for param in (linear.weight, linear.bias):
            if param is not None:
                fresh = torch.empty(param.shape).uniform_(-bound, bound, generator=generator)
                param.copy_(fresh.to(param))


def project_to_norm(weight: torch.Tensor, norm: torch.Tensor) -> None:
    """Rescale `weight` in place to Frobenius norm `norm`."""
    with torch.no_grad():
        weight.mul_(norm / weight.norm())


def defend(run: DefenseSession) -> dict:
    """Reinitialize the head, then fine-tune with the inner-product penalty against the original
    head and the head held at its original norm."""
    cfg = run.cfg
    model, linear = run.model, run.linear
    w_ori = linear.weight.detach().clone()
    norm_ori = w_ori.norm()
    reinitialize_head(linear, torch.Generator().manual_seed(cfg.seed))

    def inner_product():
        return (linear.weight * w_ori).sum()

    def epoch_stats():
        with torch.no_grad():
            return {"inner_product": inner_product().item(),
                    "weight_norm": linear.weight.norm().item()}

    tuning = run.timed("finetune", lambda: finetune(
        run, model, run.batches(), penalty=lambda: cfg.alpha * inner_product(),
        after_step=lambda: project_to_norm(linear.weight, norm_ori),
        epoch_stats=epoch_stats))
    return {"finetune": {**tuning, **epoch_stats()}, "original_weight_norm": norm_ori.item()}


purify = python_api(OPTIONS, defend, "fst")  # the Python API


def main(argv=None):
    cfg = parse_config(OPTIONS, "FST: feature shift tuning of a BackdoorBench attack record", argv)
    return run_defense(cfg, "fst", defend)


if __name__ == "__main__":
    main_guard(main)
