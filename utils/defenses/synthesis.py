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
    "synth_gate": Option(0.5, "robust mode: relearn against a synthesized trigger only if, "
                         "after plain relearning, it still sends at least this share of the "
                         "defense images to the class it sent most of them to on the original "
                         "model (the backdoor survived); 0 always does", bounds="[0, 1]"),
    "synth_rounds": Option("all", "robust mode: synthesize a trigger along every sink round's "
                           "feature shift, each with its own gate ('all', version 7), or along "
                           "round 0's only ('first', version 6)", choices=("all", "first")),
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


def with_perturbed_copies(*deltas: torch.Tensor):
    """A batch transform for utils.training.train.fit: each batch plus one copy per delta with it
    added, all with the true labels (one forward over the enlarged batch)."""
    def transform(x, y):
        return torch.cat([x, *(x + delta for delta in deltas)]), y.repeat(1 + len(deltas))
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


def synthesized_triggers(run: DefenseSession, inputs: torch.Tensor, rounds: list[dict],
                         shifts: list[torch.Tensor]):
    """(the triggers synthesized on the original model along the sink rounds' feature shifts,
    each to add to normalized inputs; their summary), both empty of triggers with synthesis off.
    Why every round (--synth_rounds all): where a confusable class is round 0's sink, round 0's
    shift points at that class's features, and the backdoor's direction is a later round's (the
    PreAct-ResNet LF record of attack seed 1: round 0's trigger went to class 9 and was too weak
    after plain relearning to pass the gate, round 1's passed it, and relearning against it took
    the ASR from 99.80 to 3.18 %)."""
    cfg = run.cfg
    if cfg.synth_rms == 0:
        return [], {"rms": 0}
    batch = eval_batch_size(cfg.eval_batch_size, run.device)
    deltas, triggers = [], []
    count = len(shifts) if cfg.synth_rounds == "all" else 1
    for row, shift in zip(rounds[:count], shifts[:count]):
        delta = run.timed("synthesis", synthesize_trigger, run.model, run.linear, inputs, shift,
                          run.preprocess.std, cfg)
        before = flip_rate(run.model, inputs, delta, batch)
        log.info("synthesized trigger of sink round %d (rms %g): changes %.1f %% of the defense "
                 "predictions, %.1f %% go to class %d", row["round"], cfg.synth_rms,
                 100 * before["changed"], 100 * before["top_share"], before["top_class"])
        deltas.append(delta)
        triggers.append({"round": row["round"], "sink": row["sink"],
                         "feature_shift_norm": shift.norm().item(), "before": before})
    return deltas, {"rms": cfg.synth_rms, "rounds": cfg.synth_rounds, "triggers": triggers}


def surviving_triggers(run: DefenseSession, inputs: torch.Tensor, deltas: list[torch.Tensor],
                       synthesis: dict) -> list[torch.Tensor]:
    """The gate (--synth_gate), per trigger: those that, on the plainly relearned model, still
    send at least that share of the defense images to the class they sent most of them to on the
    original one. On the PreAct-ResNet LF record after plain relearning 97.8 % still went to the
    target; on BadNets, whose backdoor relearning removes, they scatter."""
    cfg = run.cfg
    if not deltas:  # synthesis off
        return []
    batch = eval_batch_size(cfg.eval_batch_size, run.device)
    kept = []
    for delta, trigger in zip(deltas, synthesis["triggers"]):
        plain = flip_rate(run.model, inputs, delta, batch)
        share = plain["class_shares"][trigger["before"]["top_class"]]
        survived = share >= cfg.synth_gate
        trigger.update(after_plain=plain, gate={"threshold": cfg.synth_gate, "share": share,
                                                "survived": survived})
        log.info("round %d's trigger after plain relearning: %.1f %% of the defense images still "
                 "go to class %d (gate %.2f): %s", trigger["round"], 100 * share,
                 trigger["before"]["top_class"], cfg.synth_gate,
                 "relearning against it" if survived else "dead")
        if survived:
            kept.append(delta)
    synthesis["relearned_against_rounds"] = [t["round"] for t in synthesis["triggers"]
                                             if t["gate"]["survived"]]
    return kept
