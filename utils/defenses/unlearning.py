"""Unlearning by gradient ascent on the defense subset, the first step of ULRL (Algorithm 2) and of
RNP: the defenses differ in what they read from the unlearned model (ULRL the classifier rows that
moved, RNP the BatchNorm channels that recover), not in how it is unlearned."""
from __future__ import annotations

from typing import Callable

import torch

from utils.core.cli import log
from utils.core.config import Option
from utils.training.train import accuracy, fit

# The public ULRL code's recipe, which is the public RNP code's too (kappa = unlearning_lr,
# CA_min = clean_threshold).
UNLEARNING_OPTIONS = {
    "unlearning_lr": Option(0.01, "gradient-ascent learning rate (kappa)", bounds="> 0"),
    "unlearning_epochs": Option(20, "at most this many unlearning epochs", bounds=">= 1"),
    "clean_threshold": Option(0.2, "stop unlearning once defense-subset accuracy <= this (CA_min); "
                              "negative: never stop early (fixed-length runs for benchmarks)", bounds="<= 1"),
    "stop_rule": Option("epoch", "when CA_min is checked: 'epoch' (running accuracy of each epoch, "
                        "the public code) or 'step' (before every step, on its mini-batch)",
                        choices=("epoch", "step")),
    "unlearning_momentum": Option(0.9, "SGD momentum while unlearning",
                                  aliases=("sgd_momentum",)),
    "unlearning_weight_decay": Option(5e-4, "SGD weight decay while unlearning", aliases=("wd",)),
    "unlearning_milestones": Option([10, 20], "MultiStepLR milestones (epochs) while unlearning",
                                    nargs="+", bounds=">= 0", aliases=("steplr_milestones",)),
    "unlearning_gamma": Option(0.1, "MultiStepLR factor at each milestone", bounds="> 0",
                               aliases=("steplr_gamma",)),
    "clip_norm": Option(20.0, "gradient-norm clipping while unlearning (0: off)", bounds=">= 0"),
}


def unlearn(model, batches, cfg, log_epoch: Callable | None = None) -> dict:
    """Gradient ascent on `batches` until their accuracy <= CA_min (cfg holds UNLEARNING_OPTIONS and
    amp). stop_rule 'epoch': the running accuracy of each epoch's train-mode predictions, checked
    after the epoch (the public code's rule). 'step': before every ascent step, the accuracy of the
    current model on that step's mini-batch (the same train-mode forward, so no extra pass);
    <= CA_min ends unlearning without taking the step. Both stop after unlearning_epochs at the
    latest. `log_epoch(phase, epoch, stats, optimizer, model)` receives every epoch's row."""
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.unlearning_lr,
                                momentum=cfg.unlearning_momentum,
                                weight_decay=cfg.unlearning_weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, cfg.unlearning_milestones,
                                                     cfg.unlearning_gamma)
    step_stop = None
    if cfg.stop_rule == "step":
        def step_stop(logits, labels):
            return accuracy(logits.argmax(1), labels) <= cfg.clean_threshold

    def epoch_stop(stats):
        return cfg.stop_rule == "epoch" and stats["train_acc"] <= cfg.clean_threshold

    def on_epoch(epoch, stats, steps):
        if log_epoch is not None:
            log_epoch("unlearning", epoch, {**stats, "steps": steps}, optimizer, model)

    done = fit(model, batches, optimizer, cfg.unlearning_epochs, scheduler=scheduler, ascent=True,
               clip_norm=cfg.clip_norm, amp=cfg.amp, step_stop=step_stop, epoch_stop=epoch_stop,
               on_epoch=on_epoch, desc="unlearning")
    if not done["stopped"]:
        log.warning("unlearning never brought defense accuracy to <= %.2f in %d epochs (last "
                    "%.3f); scoring the weights as they are", cfg.clean_threshold, done["epochs"],
                    done["train_acc"])
    return {"epochs": done["epochs"], "steps": done["steps"], "stop_rule": cfg.stop_rule,
            "reached_threshold": done["stopped"], "final_train_acc": done["train_acc"]}


def masked_classes(linear: torch.nn.Module, classes: list[int]):
    """Pin `classes`' logits at -1e4 (a forward hook on the classifier; .remove() undoes it), so
    unlearning must collapse into another class (robust ULRL's sink rounds)."""
    def hook(module, inputs, output):
        output = output.clone()
        output[:, classes] = -1e4
        return output
    return linear.register_forward_hook(hook)
