"""The fine-tuning loop that FT, FP's final stage and FST share: SGD with momentum and weight decay,
CosineAnnealingLR over the epochs (stepped per epoch), cross-entropy on the defense subset, one
forward per step. A defense adds its own pieces through two hooks instead of writing the loop again:
`penalty()` is added to the loss of every step (FST's inner product with the original head), and
`after_step()` runs after every optimizer step (FP keeps pruned weights at zero, FST rescales the
head to its original norm)."""
from __future__ import annotations

from typing import Callable

import torch

from utils.core.config import Option
from utils.training.train import cross_entropy, fit

# BackdoorBench's FT and FP settings (config/defense/{ft,fp}/*.yaml there); the appendix of the
# ULRL paper uses batch 256 for every defense.
FINETUNE_OPTIONS = {
    "lr": Option(0.01, "fine-tuning learning rate (SGD, CosineAnnealingLR over the epochs)", bounds="> 0"),
    "epochs": Option(100, "fine-tuning epochs", bounds=">= 0"),
    "momentum": Option(0.9, "SGD momentum", bounds=">= 0", aliases=("sgd_momentum",)),
    "weight_decay": Option(5e-4, "SGD weight decay", bounds=">= 0", aliases=("wd",)),
    "batch_size": Option(256, "training batch size", bounds=">= 1"),
}



def finetune(run, model, batches, *, phase: str = "finetune",
             penalty: Callable[[], torch.Tensor] | None = None,
             after_step: Callable[[], None] | None = None,
             epoch_stats: Callable[[], dict] | None = None) -> dict:
    """Train all parameters of `model` for cfg.epochs on `batches` (run = the DefenseSession, whose
    cfg holds lr, epochs, momentum, weight_decay, amp). `epoch_stats()` adds columns to each
    epoch's row of <method>_df.csv. Returns the epoch count and the last epoch's loss and
    running train accuracy."""
    cfg = run.cfg
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    if after_step is not None:
        optimizer.register_step_post_hook(lambda *_: after_step())
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(cfg.epochs, 1))
    loss_fn = cross_entropy
    if penalty is not None:
        def loss_fn(logits, labels):
            return cross_entropy(logits, labels) + penalty()

    def on_epoch(epoch, stats, steps):
        if epoch_stats is not None:
            stats.update(epoch_stats())
        run.log_epoch(phase, epoch, stats, optimizer, model)

    done = fit(model, batches, optimizer, cfg.epochs, loss_fn=loss_fn, scheduler=scheduler,
               amp=cfg.amp, on_epoch=on_epoch, desc=phase)
    return {"epochs": cfg.epochs, "final_loss": done.get("loss"),
            "final_train_acc": done.get("train_acc")}
