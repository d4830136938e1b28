"""Choosing a defense's strength from its own defense subset (robust ULRL's alpha): k-fold
cross-validation over class-stratified folds, walked up a grid. Only the defense images are read."""
from __future__ import annotations

from typing import Callable

from utils.core.cli import log
from utils.data.images import class_folds
from utils.defenses.session import DefenseSession
from utils.training.train import eval_batch_size, predict


def cross_validated_accuracy(run: DefenseSession, folds: int,
                             train: Callable[[object], None]) -> float:
    """The share of defense images classified correctly by a model trained without them: for
    each of `folds` class-stratified folds (seeded by --seed), the session's model is reset to
    its original weights, `train(batches)` fits it on the other folds, and the fold is predicted,
    so every image is held out once."""
    cfg, model, data = run.cfg, run.model, run.defense_data
    batch = eval_batch_size(cfg.eval_batch_size, run.device)
    fold = class_folds(data.labels, folds, cfg.seed).to(data.labels.device)
    correct = 0
    for k in range(folds):
        model.load_state_dict(run.original_state())
        train(run.batches(data=data.subset((fold != k).nonzero().flatten())))
        held = data.subset((fold == k).nonzero().flatten())
        correct += (predict(model, held, run.preprocess, batch, cfg.amp) == held.labels).sum().item()
    return correct / len(data)


def walk_up(grid: list[float], accuracy_of: Callable[[float], float], tolerance: float,
            name: str) -> dict:
    """Walk the grid (ascending) while accuracy_of(value) stays within `tolerance` of the best so
    far, stopping at the first value that falls out; {"tried": [{name, "cv_acc"}...], name: the
    last value within it}. A stronger defense setting costs clean accuracy, so this takes the
    strongest one the held-out data do not object to."""
    tried: list[dict] = []
    for value in sorted(set(grid)):
        tried.append({name: value, "cv_acc": accuracy_of(value)})
        log.info("%s %g: cross-validated accuracy %.4f", name, value, tried[-1]["cv_acc"])
        if last_within(tried, tolerance, name) != value:
            break
    return {"tried": tried, name: last_within(tried, tolerance, name)}


def last_within(tried: list[dict], tolerance: float, name: str) -> float:
    """The value of the walk (`tried`, ascending) before the first whose accuracy falls more than
    `tolerance` below the best up to it."""
    chosen = tried[0][name]
    for i, t in enumerate(tried):
        if t["cv_acc"] < max(u["cv_acc"] for u in tried[:i + 1]) - tolerance:
            break
        chosen = t[name]
    return chosen
