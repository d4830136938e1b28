"""ANP: Adversarial Neuron Pruning (Wu and Wang, NeurIPS 2021), on the shared defense core.

    python defense/anp.py --result_file badnet_0_1 --yaml_path config/defense/anp/cifar10.yaml

On a copy of the backdoored model every BatchNorm2d channel k gets a mask m_k (init 1) and, while
perturbed, multiplicative noise: BN(x; gamma * (m + delta), beta * (1 + xi)), |delta|, |xi| <= eps.
Each iteration on a defense batch (train mode, as the public code):
1. delta, xi ~ U(-eps, eps), then `anp_steps` signed-gradient ascent steps of size eps / anp_steps on
   CE of the perturbed model, clipped back to [-eps, eps];
2. one SGD step on the masks (lr 0.2, momentum 0.9) for anp_alpha * CE(clean) + (1 - anp_alpha) *
   CE(perturbed), masks clamped to [0, 1].
After `iterations` (2000) the ORIGINAL model is pruned: gamma = 0 for every channel with m <= t.

Choosing t (BackdoorBench scores every t on the TEST sets and keeps the best): among the candidate
`thresholds` (default 0.40-0.90 in steps of 0.05, the range ULRL's appendix tried) take the LARGEST
whose pruned model keeps defense-subset accuracy >= (1 - acc_drop) x the unpruned model's
(default 10 % relative); if none does, the candidate with the highest defense accuracy, with a
warning. Only the defense subset is used; one value in `thresholds` is a fixed threshold.
summary.json records every mask (per BatchNorm2d layer), the candidate table, the chosen threshold
and the pruned channels; defense_result.pt holds the pruned model.

Differences from the public code (csdongxian/ANP_backdoor, BackdoorBench):
- the threshold is chosen on defense data (above);
- pruning zeroes gamma only, as the public code and the paper (the mask multiplies the neuron's
  weight, its bias is kept); `--zero_beta` also zeroes beta, silencing the channel;
- the noise is clipped to [-eps, eps] after its ascent step (the public code lets the random start
  plus one step of size eps reach 2 eps);
- the defense subset is cycled in seeded shuffled epochs rather than sampled with replacement;
- batch 256 (BackdoorBench's yaml and ULRL's appendix; the ANP paper used 128);
- shared-core behaviour: tensor augmentation, no test evaluation inside the loop, bf16 on CUDA.
"""
from __future__ import annotations

import copy
import functools
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from utils.core.cli import main_guard, progress  # noqa: E402
from utils.core.config import Option, parse_config  # noqa: E402
from utils.defenses.bn_mask import choose_threshold, clamp_masks, defense_accuracy, \
    mask_batchnorms, mask_parameters, mask_values, noise_parameters, rounded, \
    set_perturbed  # noqa: E402
from utils.defenses.run import DEFENSE_OPTIONS, run_defense  # noqa: E402
from utils.defenses.session import DefenseSession, python_api  # noqa: E402
from utils.training.train import autocast, cross_entropy  # noqa: E402

OPTIONS = {
    **DEFENSE_OPTIONS,
    "batch_size": Option(256, "training batch size", bounds=">= 1"),
    "anp_eps": Option(0.4, "perturbation budget eps on the masks' multiplicative noise", bounds=">= 0"),
    "anp_steps": Option(1, "signed-gradient ascent steps of the noise per iteration", bounds=">= 1"),
    "anp_alpha": Option(0.2, "mask loss = anp_alpha x natural CE + (1 - anp_alpha) x perturbed CE",
                        bounds="[0, 1]"),
    "mask_lr": Option(0.2, "SGD learning rate of the masks", bounds="> 0"),
    "mask_momentum": Option(0.9, "SGD momentum of the masks"),
    "iterations": Option(2000, "mask-optimization iterations (one defense batch each)", bounds=">= 1"),
    "log_every": Option(200, "one row in anp_df.csv per this many iterations", bounds=">= 1"),
    "thresholds": Option([round(0.4 + 0.05 * i, 2) for i in range(11)],
                         "candidate thresholds: prune channels with mask <= t at the largest t that "
                         "keeps defense accuracy within acc_drop; one value = fixed threshold",
                         nargs="+", bounds="[0, 1]"),
    "acc_drop": Option(0.1, "largest allowed relative drop of defense-subset accuracy", bounds="[0, 1]"),
    "zero_beta": Option(False, "also set beta of pruned channels to 0 (silence them)"),
}


def perturb_neurons(masked, layers, x, y, cfg, generator: torch.Generator) -> None:
    """Set the noise to a random start in [-eps, eps] and take `anp_steps` signed ascent steps on
    the perturbed model's CE (the inner maximization)."""
    noise = noise_parameters(layers)
    eps, device = cfg.anp_eps, x.device
    with torch.no_grad():
        for p in noise:
            p.copy_((torch.rand(p.shape, generator=generator) * 2 - 1).mul_(eps).to(device))
    set_perturbed(layers, True)
    for _ in range(cfg.anp_steps):
        with autocast(device, cfg.amp):
            loss = cross_entropy(masked(x).float(), y)
        grads = torch.autograd.grad(loss, noise)
        with torch.no_grad():
            for p, g in zip(noise, grads):
                p.add_(g.sign(), alpha=eps / cfg.anp_steps).clamp_(-eps, eps)


def optimize_masks(run: DefenseSession) -> dict:
    cfg = run.cfg
    masked = copy.deepcopy(run.model)
    layers = mask_batchnorms(masked, "anp")
    masks = mask_parameters(layers)
    optimizer = torch.optim.SGD(masks, lr=cfg.mask_lr, momentum=cfg.mask_momentum)
    generator = torch.Generator().manual_seed(cfg.seed)
    device = run.device
    batches = run.batches()
    stream = itertools.chain.from_iterable(itertools.repeat(batches))  # epoch after epoch
    masked.train()
    names = ("loss", "loss_nat", "loss_rob", "train_acc")
    window, seen = torch.zeros(len(names), device=device), 0  # sums since the last csv row
    with progress(cfg.iterations, "masks") as bar:
        for it in range(cfg.iterations):
            x, y, _ = next(stream)
            loss_rob = torch.zeros((), device=device)
            if cfg.anp_eps > 0:
                perturb_neurons(masked, layers, x, y, cfg, generator)
                with autocast(device, cfg.amp):
                    loss_rob = cross_entropy(masked(x).float(), y)
            set_perturbed(layers, False)
            with autocast(device, cfg.amp):
                logits = masked(x).float()
            loss_nat = cross_entropy(logits, y)
            loss = cfg.anp_alpha * loss_nat + (1 - cfg.anp_alpha) * loss_rob
            optimizer.zero_grad(set_to_none=True)
            loss.backward(inputs=masks)  # the noise keeps no gradient from this step
            optimizer.step()
            clamp_masks(layers)
            hits = (logits.argmax(1) == y).float().mean()
            window += torch.stack([loss, loss_nat, loss_rob, hits]).detach() * len(y)
            seen += len(y)
            bar.update(1)
            if (it + 1) % cfg.log_every == 0 or it + 1 == cfg.iterations:
                stats = dict(zip(names, (window / seen).tolist()))
                run.log_epoch("masks", it // cfg.log_every, {**stats, "iterations": it + 1},
                              optimizer, masked)
                window, seen = torch.zeros_like(window), 0
    return mask_values(layers)



def defend(run: DefenseSession) -> dict:
    """Optimize the masks under adversarial neuron perturbation, prune the original model."""
    cfg = run.cfg
    masks = run.timed("mask_optimization", optimize_masks, run)
    pruning = run.timed("pruning", choose_threshold, run.model, run.original_state(), masks,
                        cfg.thresholds, functools.partial(defense_accuracy, run), cfg.acc_drop,
                        cfg.zero_beta)
    return {"mask_optimization": {"iterations": cfg.iterations}, "pruning": pruning,
            "masks": rounded(masks)}


purify = python_api(OPTIONS, defend, "anp")  # the Python API


def main(argv=None):
    cfg = parse_config(OPTIONS, "ANP backdoor removal on a BackdoorBench attack record", argv)
    return run_defense(cfg, "anp", defend)


if __name__ == "__main__":
    main_guard(main)
