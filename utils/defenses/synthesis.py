"""Trigger synthesis guided by unlearning (robust ULRL; not in the paper).

Unlearning a backdoored model on clean images drives them into the backdoor's target, and it does
so by moving their features (the classifier's inputs) along the direction the trigger moves them:
on the Fashion-MNIST PreAct-ResNet LF record the mean shift has cosine 0.94 with the trigger's
(results/fashion_mnist_preactresnet18_w16/README.md, "Robust mode version 5"). A universal input
perturbation that pushes the *original* model's features along that direction is then a stand-in
for the trigger, found without it: relearning on perturbed copies of the clean images, labelled
with their true classes, removes backdoors that reinitializing classifier rows leaves in the
features (LF, SSBA, TrojanNN there). Only the defense images are read."""
from __future__ import annotations

import math

import torch

from utils.core.cli import log
from utils.core.config import Option
from utils.defenses.session import DefenseSession
from utils.training.train import eval_batch_size

SYNTHESIS_OPTIONS = {
    "synth_rms": Option(0.1, "robust mode: root-mean-square size, in pixel units (0-1), of the "
                        "synthesized trigger: its L2 norm is this x sqrt(pixels x channels); 0 "
                        "turns synthesis off (robust mode version 4)", bounds=">= 0"),
    "synth_steps": Option(100, "robust mode: Adam steps that synthesize the trigger", bounds=">= 1"),
    "synth_lr": Option(0.05, "robust mode: Adam learning rate of the synthesis", bounds="> 0"),
    "synth_gate": Option(0.5, "robust mode: relearn against the synthesized trigger only if, "
                         "after plain relearning, it still sends at least this share of the "
                         "defense images to the class it sent most of them to on the original "
                         "model (the backdoor survived); 0 always does", bounds="[0, 1]"),
}


def classifier_inputs(model, linear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(features entering `linear`, logits) of one forward of `model` on the batch x."""
    seen = []
    handle = linear.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    try:
        logits = model(x)
    finally:
        handle.remove()
    return seen[0].flatten(1).float(), logits


@torch.inference_mode()
def mean_features(model, linear, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The mean classifier input over x (eval mode)."""
    model.eval()
    total = sum(classifier_inputs(model, linear, x[i:i + batch_size])[0].sum(0)
                for i in range(0, len(x), batch_size))
    return total / len(x)


def synthesize_trigger(model, linear, x: torch.Tensor, direction: torch.Tensor, std: torch.Tensor,
                       cfg) -> torch.Tensor:
    """A universal perturbation delta (pixel units, shape [1, C, H, W]) maximizing the mean
    projection of the model's features of x + delta on `direction`, with ||delta||_2 <=
    synth_rms x sqrt(C H W): Adam on seeded mini-batches of x (normalized inputs), projected onto
    the ball after each step. Returns delta / std, ready to add to normalized inputs."""
    model.eval()
    budget = cfg.synth_rms * math.sqrt(x[0].numel())
    std = std.to(x.device)
    delta = torch.zeros_like(x[:1], requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=cfg.synth_lr)
    generator = torch.Generator().manual_seed(cfg.seed)
    unit = (direction / direction.norm().clamp_min(1e-12)).to(x.device)  # 0 if nothing moved
    for _ in range(cfg.synth_steps):
        idx = torch.randint(0, len(x), (min(cfg.batch_size, len(x)),), generator=generator)
        features, _ = classifier_inputs(model, linear, x[idx.to(x.device)] + delta / std)
        loss = -(features @ unit).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward(inputs=[delta])  # the weights' gradients are neither needed nor kept
        optimizer.step()
        with torch.no_grad():
            delta.mul_(torch.clamp(budget / (delta.norm() + 1e-12), max=1.0))
    return delta.detach() / std


def with_perturbed_copies(delta: torch.Tensor):
    """A batch transform for utils.training.train.fit: each batch plus its copy with delta added,
    both with the true labels (one forward over the doubled batch)."""
    def transform(x, y):
        return torch.cat([x, x + delta]), torch.cat([y, y])
    return transform


@torch.inference_mode()
def flip_rate(model, x: torch.Tensor, delta: torch.Tensor, batch_size: int) -> dict:
    """How the perturbation moves the model's predictions on x: the share whose prediction
    changes, the class most perturbed images go to with its share, and every class's share."""
    model.eval()
    clean = torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
    moved = torch.cat([model(x[i:i + batch_size] + delta).argmax(1)
                       for i in range(0, len(x), batch_size)])
    shares = torch.bincount(moved, minlength=clean.shape[1]) / len(x)
    top = int(shares.argmax())
    return {"changed": (clean.argmax(1) != moved).float().mean().item(), "top_class": top,
            "top_share": shares[top].item(), "class_shares": shares.tolist()}


def synthesized_trigger(run: DefenseSession, inputs: torch.Tensor, shift: torch.Tensor):
    """(the trigger synthesized on the original model along `shift`, to add to normalized
    inputs; its summary), or (None, {"rms": 0}) with synthesis off."""
    cfg = run.cfg
    if cfg.synth_rms == 0:
        return None, {"rms": 0}
    delta = run.timed("synthesis", synthesize_trigger, run.model, run.linear, inputs, shift,
                      run.preprocess.std, cfg)
    before = flip_rate(run.model, inputs, delta, eval_batch_size(cfg.eval_batch_size, run.device))
    log.info("synthesized trigger (rms %g): changes %.1f %% of the defense predictions, %.1f %% "
             "go to class %d", cfg.synth_rms, 100 * before["changed"], 100 * before["top_share"],
             before["top_class"])
    return delta, {"rms": cfg.synth_rms, "feature_shift_norm": shift.norm().item(),
                   "before": before}


def trigger_survived(run: DefenseSession, inputs: torch.Tensor, delta: torch.Tensor,
                     synthesis: dict) -> bool:
    """The gate (--synth_gate): does the synthesized trigger, on the plainly relearned model,
    still send at least that share of the defense images to the class it sent most of them to on
    the original one? On the PreAct-ResNet LF record after plain relearning 97.8 % still went to
    the target; on BadNets, whose backdoor relearning removes, they scatter."""
    cfg = run.cfg
    plain = flip_rate(run.model, inputs, delta, eval_batch_size(cfg.eval_batch_size, run.device))
    share = plain["class_shares"][synthesis["before"]["top_class"]]
    survived = share >= cfg.synth_gate
    synthesis.update(after_plain=plain, gate={"threshold": cfg.synth_gate, "share": share,
                                              "relearned_against_trigger": survived})
    log.info("synthesized trigger after plain relearning: %.1f %% of the defense images still go "
             "to class %d (gate %.2f): %s", 100 * share, synthesis["before"]["top_class"],
             cfg.synth_gate, "relearning against it" if survived else "kept")
    return survived
