"""I-BAU: Implicit Backdoor Adversarial Unlearning (Zeng et al., ICLR 2022), on the shared core.

    python defense/ibau.py --result_file badnet_0_1 --yaml_path config/defense/ibau/cifar10.yaml

The minimax problem min_theta max_delta (1/n) sum_i CE(f_theta(x_i + delta), y_i) over the defense
subset, with ONE universal perturbation delta (shape [1, C, H, W], in normalized input space),
solved in `rounds` (5) rounds of:
1. inner maximization: delta = 0, then `perturbation_epochs` (1) passes over the defense subset,
   one gradient step (lr 10) per batch on -CE(f(x + delta), y) + perturbation_penalty * ||delta||^2
   (0.001), each step projected onto the L2 ball ||delta|| <= `perturbation_radius` (0: none);
2. one Adam step (lr 1e-4) per defense batch along the hypergradient of the outer loss
   L = CE(f(x + delta), y) through the fixed point of Phi(delta) = delta - 0.1 grad_delta(inner loss):
   dL/dtheta = dL/dtheta|_delta + (dPhi/dtheta)^T v, v = sum_{k<K} ((dPhi/ddelta)^T)^k dL/ddelta,
   K = `fixed_point_steps` (5), the public code's fixed-point iteration.
The model stays in eval mode throughout (as the public code: BatchNorm uses its running statistics
and is not updated). summary.json records each round's perturbation norm, the perturbation's CE
(perturbation_loss), the outer loss and the running accuracy on the (partly) perturbed batches.

Differences from the public code (YiZeng623/I-BAU, BackdoorBench's i-bau.py) and why:
- the outer loss perturbs a share `perturbed_share` of each batch; the paper's objective perturbs
  every sample (1.0, the default here); the public code perturbs int(0.01 x batch) random images
  (`--perturbed_share 0.01` reproduces that);
- the inner loss of the fixed point uses the current batch; the public code always uses the first
  batch of the subset;
- the inner maximization uses the true labels (the paper's objective); the public code uses the
  model's predictions on the clean images;
- `perturbation_radius` > 0 enforces the paper's ||delta|| <= C on every step (the public code
  has the projection commented out and relies on the penalty); `perturbation_epochs` > 1 allows
  more than the public code's single pass, which with 1 % data is only 2-3 steps;
- batch 256 and Adam lr 1e-4 as BackdoorBench's yaml and ULRL's appendix; the original repository
  used lr 1e-3 and batch 100 (on 5,000 images); with 1 % data this is 2-3 outer steps a round;
- shared-core behaviour: tensor augmentation, no test evaluation inside the loop, bf16 on CUDA.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from utils.core.cli import main_guard, progress  # noqa: E402
from utils.core.config import Option, parse_config  # noqa: E402
from utils.defenses.run import DEFENSE_OPTIONS, run_defense  # noqa: E402
from utils.defenses.session import DefenseSession, python_api  # noqa: E402
from utils.training.train import autocast, cross_entropy  # noqa: E402

OPTIONS = {
    **DEFENSE_OPTIONS,
    "batch_size": Option(256, "training batch size", bounds=">= 1"),
    "rounds": Option(5, "rounds of (perturbation search, model update)", bounds=">= 1"),
    "lr": Option(1e-4, "Adam learning rate of the model (outer problem)", bounds="> 0"),
    "fixed_point_steps": Option(5, "K: terms of the fixed-point (Neumann) hypergradient series",
                                bounds=">= 1"),
    "inner_lr": Option(0.1, "step size of the fixed-point map delta - inner_lr * grad(inner loss)",
                       bounds="> 0"),
    "perturbation_lr": Option(10.0, "gradient step size of the perturbation search", bounds="> 0"),
    "perturbation_epochs": Option(1, "passes over the defense subset of the perturbation search",
                                  bounds=">= 1"),
    "perturbation_penalty": Option(0.001, "weight of ||delta||^2 in the inner loss", bounds=">= 0"),
    "perturbation_radius": Option(0.0, "project delta onto this L2 ball after every step (0: off)",
                                  bounds=">= 0"),
    "perturbed_share": Option(1.0, "share of each batch that carries delta in the outer loss "
                                   "(1: the paper's objective; 0.01: the public code)", bounds="(0, 1]"),
}


def inner_loss(model, x, y, delta, penalty: float, amp: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The perturbation's objective, minimized: -CE(f(x + delta), y) + penalty * ||delta||^2;
    returns it and the CE."""
    with autocast(x.device, amp):
        logits = model(x + delta).float()
    ce = cross_entropy(logits, y)
    return -ce + penalty * delta.float().pow(2).sum(), ce


def search_perturbation(model, batches, shape, cfg, device) -> tuple[torch.Tensor, float]:
    """`perturbation_epochs` passes of gradient steps on a universal perturbation (from zero);
    returns it and its mean CE over the last pass."""
    delta = torch.zeros(shape, device=device, requires_grad=True)
    for _ in range(cfg.perturbation_epochs):
        total, seen = 0.0, 0
        for x, y, _ in batches:
            objective, ce = inner_loss(model, x, y, delta, cfg.perturbation_penalty, cfg.amp)
            (grad,) = torch.autograd.grad(objective, delta)
            with torch.no_grad():
                delta -= cfg.perturbation_lr * grad
                if cfg.perturbation_radius > 0:  # projected: back onto the L2 ball
                    delta *= min(1.0, cfg.perturbation_radius / max(delta.norm().item(), 1e-12))
            total, seen = total + ce.item() * len(y), seen + len(y)
    return delta.detach(), total / seen


def hypergradient_step(model, params, delta, x, y, carrier, cfg) -> tuple[float, int]:
    """Set p.grad of every parameter to the implicit hypergradient of the outer loss; returns the
    outer loss and the number of correct predictions."""
    delta = delta.detach().requires_grad_(True)
    with autocast(x.device, cfg.amp):
        logits = model(x + carrier * delta).float()
    outer = cross_entropy(logits, y)
    grad_delta, *grad_params = torch.autograd.grad(outer, [delta, *params], materialize_grads=True)
    # Fixed-point map Phi(delta, theta) = delta - inner_lr * grad_delta(inner loss), kept
    # differentiable in both arguments.
    objective, _ = inner_loss(model, x, y, delta, cfg.perturbation_penalty, cfg.amp)
    (inner_grad,) = torch.autograd.grad(objective, delta, create_graph=True)
    mapped = delta - cfg.inner_lr * inner_grad
    v = grad_delta
    for _ in range(cfg.fixed_point_steps - 1):
        (jv,) = torch.autograd.grad(mapped, delta, grad_outputs=v, retain_graph=True)
        v = jv + grad_delta
    implicit = torch.autograd.grad(mapped, params, grad_outputs=v, materialize_grads=True)
    for p, direct, indirect in zip(params, grad_params, implicit):
        p.grad = direct + indirect
    return outer.item(), (logits.detach().argmax(1) == y).sum().item()


def unlearn(run: DefenseSession) -> list[dict]:
    cfg, model, device = run.cfg, run.model, run.device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.lr)
    batches = run.batches()
    shape = (1, *run.defense_data.images.shape[1:])
    generator = torch.Generator().manual_seed(cfg.seed)  # which images carry delta
    model.eval()
    rounds = []
    with progress(cfg.rounds * (cfg.perturbation_epochs + 1) * len(batches), "rounds") as bar:
        for r in range(cfg.rounds):
            delta, perturbation_loss = search_perturbation(model, batches, shape, cfg, device)
            bar.update(cfg.perturbation_epochs * len(batches))
            total, correct, seen = 0.0, 0, 0
            for x, y, _ in batches:
                n = len(y)
                carrier = torch.zeros(n, 1, 1, 1, device=device)
                carrier[torch.randperm(n, generator=generator)[:int(n * cfg.perturbed_share)]] = 1
                optimizer.zero_grad(set_to_none=True)
                loss, hits = hypergradient_step(model, params, delta, x, y, carrier, cfg)
                optimizer.step()
                total, correct, seen = total + loss * n, correct + hits, seen + n
                bar.update(1)
            stats = {"perturbation_norm": delta.norm().item(),
                     "perturbation_loss": perturbation_loss,
                     "loss": total / seen, "train_acc": correct / seen}
            run.log_epoch("unlearning", r, stats, optimizer, model)
            rounds.append({"round": r + 1, **stats})
    return rounds



def defend(run: DefenseSession) -> dict:
    """The rounds of implicit-hypergradient unlearning."""
    return {"rounds": run.timed("unlearning", unlearn, run)}


purify = python_api(OPTIONS, defend, "ibau")  # the Python API


def main(argv=None):
    cfg = parse_config(OPTIONS, "I-BAU backdoor removal on a BackdoorBench attack record", argv)
    return run_defense(cfg, "ibau", defend)


if __name__ == "__main__":
    main_guard(main)
