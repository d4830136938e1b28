"""What every attack shares: options, choosing and poisoning a share of the training set, training
the victim model, and writing a BackdoorBench-format record into record/<save_folder_name>/.

Two kinds of attack. A poisoning attack (`PoisoningAttack`: BadNets, Blended, SIG, LC, LF, SSBA,
TrojanNN, Semantic) only changes data: a share of the training set is poisoned and the victim is
trained on it with the default loop. A training-controlled attack (`ControlledAttack`: WaNet, BPP,
InputAware, Blind) owns the victim's training (`train(ctx, model)`, on the clean data, poisoning
inside its batches or loss); its record's bd_train is poisoned after training, with the trained
trigger, as bd_test is. An attack file builds one of them and calls `run_attack(cfg, name,
make_attack)`. `make_attack(ctx)` receives an `AttackContext` with the clean data, the device and
helpers (a fresh victim model, a cached clean-trained model, the training loop), so attacks that
need a model to build their trigger (LF, LC, TrojanNN) or train with their own loss stay small
files.

Order of work: make_attack -> choose the poisoned training samples -> poisoning attack: poison them,
train on them; training-controlled attack: train, then poison them with the trained trigger ->
poison the backdoor test set with the trained state -> write the record.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from models import build_model, load_weights
from utils.core.cli import environment, log, log_file, require, seed_everything, set_threads, \
    setup_console_logging
from utils.core.config import Option, config_sources
from utils.core.errors import UserError
from utils.core.io import write_csv, write_json
from utils.data.datasets import get_dataset, load_clean_dataset
from utils.data.images import ImageSet, Preprocess
from utils.data.record import safe_load, save_attack_record
from utils.training.train import Batches, backdoor_metrics, eval_batch_size, fit, resolve_device, \
    to_device

ATTACK_OPTIONS = {
    "dataset": Option("cifar10", "clean data set to poison"),
    "dataset_path": Option("./data", "folder holding the clean data sets (<dataset_path>/<name>)"),
    "model": Option("preactresnet18", "victim model"),
    "pretrained": Option(None, "local file of pretrained weights for the victim model", str),
    "record_dir": Option("record", "folder the record is written into"),
    "save_folder_name": Option(None, "record name; default <attack>_<dataset>_<model>", str),
    "force": Option(False, "replace an existing record of the same name"),
    "attack_target": Option(0, "backdoor target label (all-to-one)"),
    "pratio": Option(0.1, "share of the training set that is poisoned"),
    "train_size": Option(0, "train on this many clean training images (0: all of them)"),
    "test_size": Option(0, "evaluate on this many clean test images, a seeded subset (0: all); "
                           "the backdoor test set is made from the same subset"),
    "epochs": Option(100, "training epochs"),
    "batch_size": Option(128, "training batch size"),
    "lr": Option(0.01, "SGD learning rate (CosineAnnealingLR over the epochs)"),
    "momentum": Option(0.9, "SGD momentum"),
    "weight_decay": Option(5e-4, "SGD weight decay"),
    "eval_batch_size": Option(0, "evaluation batch size (0: 1024 on CUDA, 256 on CPU)"),
    "device": Option(None, "cpu, cuda or cuda:N; default cuda when available, else cpu", str),
    "amp": Option(True, "bf16 autocast on CUDA (ignored on CPU)"),
    "seed": Option(0, "seed for the poisoned subset, model initialization and training"),
    "save_mode": Option("disk", "poisoned images as PNG files (disk, as BackdoorBench's attacks) "
                                "or pickled in attack_result.pt (ram)", choices=("disk", "ram")),
}

# For attacks that build their trigger against a clean model (LF, LC, TrojanNN).
CLEAN_MODEL_OPTIONS = {
    "clean_model": Option(None, "local weights file of a clean model of the same architecture "
                                "(default: train one on the clean training data first)", str),
    "clean_epochs": Option(0, "epochs for training that clean model (0: --epochs)"),
}


@dataclass(kw_only=True)
class Attack:
    """What both kinds supply. Images are uint8 [N, C, H, W] on the CPU, in and out."""
    poison: Callable[[torch.Tensor], torch.Tensor]  # the trigger (the trained one, after training)
    clean_label: bool = False  # poison target-class samples and keep their labels (SIG, LC)
    # Indices of the training samples to poison, instead of a pratio share of the eligible ones
    # (Semantic: a natural subgroup). select_train(train_set, generator) -> LongTensor.
    select_train: Callable[[ImageSet, torch.Generator], torch.Tensor] | None = None
    # Indices of the test samples forming the backdoor test set (default: not the target class).
    select_test: Callable[[ImageSet], torch.Tensor] | None = None
    details: dict = field(default_factory=dict)  # extra facts for attack_summary.json

    def poison_samples(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The training samples' poisoning (bd_train)."""
        return self.poison(images)


@dataclass(kw_only=True)
class PoisoningAttack(Attack):
    """Poisons data only; the victim is trained on the poisoned training set by the default loop.
    Training samples get poison_train(images, labels) when given (e.g. LC's adversarial step),
    else poison(images)."""
    poison_train: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def poison_samples(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.poison(images) if self.poison_train is None else self.poison_train(images,
                                                                                      labels)


@dataclass(kw_only=True)
class ControlledAttack(Attack):
    """Trains the victim itself: train(ctx, model) on ctx.train (clean), calling ctx.fit so every
    epoch gets its evaluated row. The record's bd_train is poisoned after it, with the trained
    trigger."""
    train: Callable
    dynamic: bool = False  # the trigger changes while training: re-poison the test set per epoch


def poison_split(data: ImageSet, chosen: torch.Tensor, target: int, poison: Callable,
                 relabel: bool = True) -> ImageSet:
    """Copy of `data` whose `chosen` items are poisoned (`poison(images, labels)`) and, unless
    clean-label, relabelled to `target`."""
    images, labels = data.images.clone(), data.labels.clone()
    if len(chosen):
        poisoned = poison(images[chosen], labels[chosen])
        if poisoned.shape != images[chosen].shape or poisoned.dtype != torch.uint8:
            raise UserError(f"poison function returned {poisoned.dtype} {tuple(poisoned.shape)}, "
                            f"expected uint8 {tuple(images[chosen].shape)}")
        images[chosen] = poisoned
        if relabel:
            labels[chosen] = target
    flags = torch.zeros(len(data), dtype=torch.bool)
    flags[chosen] = True
    index = data.index if data.index is not None else torch.arange(len(data))
    return ImageSet(images, labels, data.labels.clone(), flags, index)


class AttackContext:
    """The clean data, device and helpers an attack builds on."""

    def __init__(self, cfg, name: str, spec, device: torch.device, train: ImageSet,
                 test: ImageSet):
        self.cfg, self.name, self.spec, self.device = cfg, name, spec, device
        self.train, self.test = train, test  # clean, CPU; `index` = position in the full set
        self.channels = spec.image_size[2]
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.preprocess = Preprocess(spec.mean, spec.std, self.channels, hflip=spec.hflip)
        self.rows: list[dict] = []  # per-epoch rows of the victim's training (attack_df.csv)
        self.attack: Attack | None = None
        self._clean_model = None
        self._eval = None

    def new_model(self, weights_path: str | None = None):
        """A fresh victim model on the device (cfg.pretrained weights unless others are given)."""
        model = build_model(self.cfg.model, self.spec.num_classes, in_channels=self.channels,
                            image_size=self.spec.image_size[0],
                            weights_path=weights_path or self.cfg.pretrained)
        return to_device(model, self.device)

    def clean_model(self):
        """A model trained on the clean training data (or loaded from --clean_model), cached.
        Only attacks whose options include CLEAN_MODEL_OPTIONS call it."""
        if self._clean_model is None:
            cfg = self.cfg
            if cfg.clean_model:
                model = self.new_model()
                path = Path(cfg.clean_model)
                require(path.is_file(), f"--clean_model {path} not found: pass a weights file")
                state = safe_load(path)
                state = state.get("model", state) if isinstance(state, dict) else state
                load_weights(model, state)
            else:
                model = self.new_model()
                epochs = cfg.clean_epochs or cfg.epochs
                log.info("training a clean %s for %d epochs (the trigger is built against it)",
                         cfg.model, epochs)
                self.fit(model, self.batches(self.train.to(self.device)), epochs,
                         desc="clean model", log_rows=False)
            model.eval()
            self._clean_model = model
        return self._clean_model

    def optimizer(self, params, epochs: int):
        """SGD + CosineAnnealingLR over `epochs`, the training recipe of every attack."""
        cfg = self.cfg
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                              weight_decay=cfg.weight_decay)
        return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)

    def batches(self, data: ImageSet, augment: bool = True) -> Batches:
        return Batches(data, self.preprocess, self.cfg.batch_size, shuffle=True, augment=augment,
                       seed=self.cfg.seed)

    def fit(self, model, batches, epochs: int, *, loss_fn: Callable | None = None,
            transform: Callable | None = None, optimizer=None, scheduler=None,
            desc: str = "training", log_rows: bool = True) -> None:
        """The victim's training, for every attack: `batches` yields (normalized x, y, index);
        optimizer and scheduler default to the SGD + cosine recipe; one evaluated row per epoch
        (end_epoch) unless log_rows is False (the clean model a trigger is built against)."""
        if optimizer is None:
            optimizer, scheduler = self.optimizer(model.parameters(), epochs)

        def log_row(epoch, stats, steps):
            self.end_epoch(model, epoch, epochs, stats, optimizer)

        fit(model, batches, optimizer, epochs, loss_fn=loss_fn, scheduler=scheduler,
            amp=self.cfg.amp, transform=transform, on_epoch=log_row if log_rows else None,
            desc=desc)

    def bd_test(self) -> ImageSet:
        """The backdoor test set: the attack's test selection (default: every test image not of the
        target class), poisoned and labelled with the target."""
        attack, cfg = self.attack, self.cfg
        if attack.select_test is not None:
            keep = attack.select_test(self.test)
        else:
            keep = (self.test.labels != cfg.attack_target).nonzero().flatten()
        part = self.test.subset(keep)
        return poison_split(part, torch.arange(len(keep)), cfg.attack_target,
                            lambda images, labels: attack.poison(images))

    def evaluate(self, model) -> dict:
        if self._eval is None or isinstance(self.attack, ControlledAttack) and self.attack.dynamic:
            self._eval = (self.test.to(self.device), self.bd_test().to(self.device))
        return backdoor_metrics(model, *self._eval, self.preprocess,
                                eval_batch_size(self.cfg.eval_batch_size, self.device),
                                self.cfg.amp)

    def end_epoch(self, model, epoch: int, epochs: int, stats: dict, optimizer) -> None:
        """Evaluate and log one row of the victim's training (attack_df.csv)."""
        metrics = self.evaluate(model)
        row = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"],
               "train_epoch_loss_avg_over_batch": stats["loss"],
               "train_acc": stats["train_acc"], **metrics}
        self.rows.append(row)
        log.info("epoch %d/%d  loss %.4f  train_acc %.4f  test_acc %.4f  test_asr %.4f  "
                 "test_ra %.4f", epoch + 1, epochs, stats["loss"], stats["train_acc"],
                 metrics["test_acc"], metrics["test_asr"], metrics["test_ra"])


def run_attack(cfg, attack: str, make_attack: Callable[[AttackContext], Attack]) -> dict:
    setup_console_logging()
    seed_everything(cfg.seed)
    set_threads()
    device = resolve_device(cfg.device)
    name = cfg.save_folder_name or f"{attack}_{cfg.dataset}_{cfg.model}"
    final = Path(cfg.record_dir) / name
    require(cfg.force or not final.exists(),
            f"record {final} already exists: pick another --save_folder_name or pass --force")
    require(0 <= cfg.pratio <= 1, f"--pratio must be in [0, 1], got {cfg.pratio}")
    spec = get_dataset(cfg.dataset)
    require(0 <= cfg.attack_target < spec.num_classes,
            f"--attack_target must be a class of {spec.name} (0..{spec.num_classes - 1})")
    Path(cfg.record_dir).mkdir(parents=True, exist_ok=True)
    # The record is built in a temporary folder and renamed into place: never half-written.
    work = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=cfg.record_dir))
    try:
        with log_file(work / "attack.log"):
            summary = _attack(cfg, attack, make_attack, spec, device, name, work)
        if final.exists():
            shutil.rmtree(final)
        work.rename(final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("record written to %s", final)
    return summary


def _seeded_part(data: ImageSet, size: int, gen: torch.Generator) -> ImageSet:
    """`size` items drawn with `gen` (all when size is 0), in order, remembering their indices."""
    index = torch.arange(len(data))
    if size:
        index = torch.randperm(len(data), generator=gen)[:size].sort().values
    part = data.subset(index)
    part.index = index
    return part


def _choose(ctx: AttackContext, attack: Attack) -> torch.Tensor:
    cfg, train = ctx.cfg, ctx.train
    if attack.select_train is not None:
        return attack.select_train(train, ctx.generator).sort().values
    # All-to-one: poison samples not of the target class; clean-label: only the target class.
    eligible = (train.labels == cfg.attack_target) if attack.clean_label \
        else (train.labels != cfg.attack_target)
    candidates = eligible.nonzero().flatten()
    n_poison = round(cfg.pratio * len(train))
    require(n_poison <= len(candidates),
            f"--pratio {cfg.pratio} asks for {n_poison} poisoned samples but only "
            f"{len(candidates)} are eligible" + (" (clean-label attacks poison target-class "
                                                 "samples only)" if attack.clean_label else ""))
    return candidates[torch.randperm(len(candidates), generator=ctx.generator)[:n_poison]] \
        .sort().values


def _attack(cfg, name: str, make_attack, spec, device, record_name: str, work: Path) -> dict:
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(cfg.seed)
    train = load_clean_dataset(spec.name, cfg.dataset_path, train=True)
    test = load_clean_dataset(spec.name, cfg.dataset_path, train=False)
    ctx = AttackContext(cfg, name, spec, device, _seeded_part(train, cfg.train_size, gen),
                        _seeded_part(test, cfg.test_size, gen))
    attack = ctx.attack = make_attack(ctx)
    chosen = _choose(ctx, attack)
    if isinstance(attack, PoisoningAttack):
        bd_train = poison_split(ctx.train, chosen, cfg.attack_target, attack.poison_samples,
                                relabel=not attack.clean_label)
        model = ctx.new_model()
        ctx.fit(model, ctx.batches(bd_train.to(device)), cfg.epochs, desc=f"training {cfg.model}")
    else:  # the attacker's own training on the clean data, then bd_train with the trained trigger
        model = ctx.new_model()
        attack.train(ctx, model)
        bd_train = poison_split(ctx.train, chosen, cfg.attack_target, attack.poison_samples,
                                relabel=not attack.clean_label)
    log.info("%s on %s/%s: %d of %d training images poisoned%s", name, spec.name, cfg.model,
             len(chosen), len(ctx.train), " (clean-label)" if attack.clean_label else "")
    train_time = time.perf_counter() - start

    bd_test = ctx.bd_test()  # with the final state of a dynamic trigger
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_attack_record(work, record_name=record_name, model_name=cfg.model,
                       num_classes=spec.num_classes, state_dict=state, clean_data=spec.name,
                       img_size=spec.image_size, bd_train=bd_train, bd_test=bd_test,
                       train_length=len(train), test_length=len(test), mode=cfg.save_mode)
    final = ctx.rows[-1] if ctx.rows else {}
    test_set = f"the {spec.name} test split ({len(test)} images)"
    if len(ctx.test) < len(test):  # a defense measures on the whole split: say both
        test_set = f"{len(ctx.test)} of the {len(test)} {spec.name} test images (--test_size)"
        final = {**final, "test_acc_full_split": backdoor_metrics(
            model, test.to(device), None, ctx.preprocess,
            eval_batch_size(cfg.eval_batch_size, device), cfg.amp)["test_acc"]}
    write_csv(work / "attack_df.csv", ctx.rows)
    write_csv(work / "attack_df_summary.csv", [final])
    summary = {"attack": name, "record": record_name, "dataset": spec.name, "model": cfg.model,
               "poisoned_train": len(chosen), "train_size": len(ctx.train),
               "clean_label": attack.clean_label, "test_set": test_set,
               "bd_test_size": len(bd_test), "final": final,
               "time_s": round(train_time, 2), **attack.details, "config": dict(vars(cfg)),
               "config_sources": config_sources(cfg), "environment": environment(device)}
    write_json(work / "attack_summary.json", summary)
    if final:
        full = final.get("test_acc_full_split")
        print(f"{name} {spec.name}/{cfg.model}: C-ACC {100 * final['test_acc']:.2f}%"
              + (f" (whole test split {100 * full:.2f}%)" if full is not None else "")
              + f"  ASR {100 * final['test_asr']:.2f}%  RA {100 * final['test_ra']:.2f}%  "
              f"({train_time:.0f} s)")
    return summary
