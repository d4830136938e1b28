"""The retuning check, beyond the paper: does a purified model re-learn its backdoor from a few
poisoned samples? Low ASR right after a defense is a weak guarantee on its own: superficially
purified models regain the backdoor after brief fine-tuning on a handful of poisoned samples (the
retuning attack of Min et al., "Uncovering, Explaining, and Mitigating the Superficial Safety of
Backdoor Defense", NeurIPS 2024), while a model whose backdoor is gone behaves like a clean one.

Every defense has it (utils/defenses/run.py builds the set while loading and runs the check in finish):

    python defense/<method>.py --result_file R --retune_check [--retune_clean N] [--retune_poison_ratio P]
                               [--retune_epochs E] [--retune_lr LR]

A COPY of the defended model is fine-tuned (defense_result.pt stays the purified model) on
  - `retune_clean` clean images drawn from the defense subset (default 0 = all of it), plus
  - round(`retune_poison_ratio` x that count) poisoned images drawn uniformly from the record's
    bd_train with their backdoor labels (default 0.1: 10 % as many as the clean ones),
for `retune_epochs` epochs of SGD lr `retune_lr`, momentum 0.9, no weight decay, constant rate,
batch --batch_size, the defense's augmentation, seeded with --seed. summary.json gets "retune":
C-ACC, ASR and RA of the retuned copy and the set's sizes; the report shows its ASR per defense.
Records without bd_train (BackdoorBench may drop it) cannot be checked: that is an error at load time.
"""
from __future__ import annotations

import copy

import torch

from utils.core.cli import log, require
from utils.core.config import Option
from utils.data.datasets import CleanSplit
from utils.data.images import ImageSet
from utils.training.train import fit

RETUNE_OPTIONS = {
    "retune_check": Option(False, "after the defense, fine-tune a copy of the purified model on "
                                  "clean + poisoned training samples and report its ASR "
                                  "(utils/defenses/retune.py)"),
    "retune_clean": Option(0, "retuning check: clean images taken from the defense subset "
                              "(0: all of it)"),
    "retune_poison_ratio": Option(0.1, "retuning check: poisoned training images, as a share of "
                                       "the clean ones"),
    "retune_epochs": Option(5, "retuning check: epochs"),
    "retune_lr": Option(0.01, "retuning check: SGD learning rate (momentum 0.9, constant)"),
}


def retune_set(record, clean_train: CleanSplit | ImageSet, defense_data: ImageSet, cfg,
               channels: int) -> ImageSet:
    """The mixed retuning set, on defense_data's device. Only the chosen poisoned images are
    decoded from the record, and no image of clean_train (the defense subset holds the clean
    ones; clean_train's length checks the record's indices)."""
    require(record.bd_train is not None,
            "--retune_check needs the record's poisoned training set (bd_train), which this record "
            "does not keep: rerun without --retune_check")
    require(cfg.retune_clean >= 0 and cfg.retune_poison_ratio > 0 and cfg.retune_epochs >= 1
            and cfg.retune_lr > 0, "the retuning check needs --retune_clean >= 0, "
            "--retune_poison_ratio > 0, --retune_epochs >= 1 and --retune_lr > 0")
    n_clean = cfg.retune_clean or len(defense_data)
    require(n_clean <= len(defense_data), f"--retune_clean {n_clean} exceeds the "
            f"{len(defense_data)} defense images: lower it or raise --ratio")
    split = record.bd_train
    n_candidates = len(split.poisoned_positions())
    n_poison = max(1, round(cfg.retune_poison_ratio * n_clean))
    require(n_poison <= n_candidates, f"the retuning check wants {n_poison} poisoned images "
            f"but the record's bd_train has {n_candidates}: lower --retune_poison_ratio")
    generator = torch.Generator().manual_seed(cfg.seed)
    clean = defense_data.subset(torch.randperm(len(defense_data), generator=generator)[:n_clean]
                                .to(defense_data.images.device))
    poisoned = split.images(clean_train, split.sample_poisoned(n_poison, generator))
    poisoned = poisoned.with_channels(channels).to(defense_data.images.device)
    return ImageSet(torch.cat([clean.images, poisoned.images]),
                    torch.cat([clean.labels, poisoned.labels]),
                    poisoned=torch.cat([torch.zeros_like(clean.labels, dtype=torch.bool),
                                        torch.ones_like(poisoned.labels, dtype=torch.bool)]))


def retune_check(run) -> dict:
    """Fine-tune a copy of run.model on run.retune_set, with batches from the run's own source
    (so --loader holds here too); C-ACC, ASR and RA of the copy."""
    cfg, data = run.cfg, run.retune_set
    model = copy.deepcopy(run.model)
    batches = run.batches(data=data)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.retune_lr, momentum=0.9)
    done = fit(model, batches, optimizer, cfg.retune_epochs, amp=cfg.amp)
    metrics = run.evaluate(model)
    n_poison = int(data.poisoned.sum())
    log.info("retuning check (%d clean + %d poisoned images, %d epochs, lr %g): C-ACC %.2f%%, "
             "ASR %.2f%%", len(data) - n_poison, n_poison, cfg.retune_epochs, cfg.retune_lr,
             100 * metrics["test_acc"], 100 * metrics["test_asr"])
    return {**metrics, "clean_samples": len(data) - n_poison, "poisoned_samples": n_poison,
            "epochs": cfg.retune_epochs, "lr": cfg.retune_lr,
            "final_train_acc": done["train_acc"]}
