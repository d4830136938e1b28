"""What every data-poisoning attack shares: options, poisoning a share of the training set,
training the victim model, and writing a BackdoorBench-format record.

An attack file only says how to poison an image batch (`poison(images) -> images`, uint8 in and out)
and calls `run_attack`; the record lands in record/<save_folder_name>/.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from models import build_model
from utils.cli import environment, log, log_file, progress, require, seed_everything, \
    set_threads, setup_console_logging
from utils.config import Option
from utils.data import ImageSet, Preprocess
from utils.datasets import get_dataset, load_clean_dataset
from utils.errors import UserError
from utils.io import write_csv, write_json
from utils.record import save_attack_record
from utils.train import Batches, backdoor_metrics, cross_entropy, eval_batch_size, \
    resolve_device, to_device, train_epoch

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


def poison_split(data: ImageSet, chosen: torch.Tensor, target: int, poison: Callable) -> ImageSet:
    """Copy of `data` whose `chosen` items are poisoned and relabelled to `target`."""
    images, labels = data.images.clone(), data.labels.clone()
    if len(chosen):
        poisoned = poison(images[chosen])
        if poisoned.shape != images[chosen].shape or poisoned.dtype != torch.uint8:
            raise UserError(f"poison function returned {poisoned.dtype} {tuple(poisoned.shape)}, "
                            f"expected uint8 {tuple(images[chosen].shape)}")
        images[chosen] = poisoned
        labels[chosen] = target
    flags = torch.zeros(len(data), dtype=torch.bool)
    flags[chosen] = True
    index = data.index if data.index is not None else torch.arange(len(data))
    return ImageSet(images, labels, data.labels.clone(), flags, index)


def run_attack(cfg, attack: str, poison: Callable[[torch.Tensor], torch.Tensor]) -> dict:
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
            summary = _attack(cfg, attack, poison, spec, device, name, work)
        if final.exists():
            shutil.rmtree(final)
        work.rename(final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("record written to %s", final)
    return summary


def _attack(cfg, attack, poison, spec, device, name, work: Path) -> dict:
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(cfg.seed)
    train = load_clean_dataset(spec.name, cfg.dataset_path, train=True)
    test = load_clean_dataset(spec.name, cfg.dataset_path, train=False)
    train_index = torch.arange(len(train))
    if cfg.train_size:
        train_index = torch.randperm(len(train), generator=gen)[:cfg.train_size].sort().values
    train_part = train.subset(train_index)
    train_part.index = train_index
    # All-to-one: poison only samples whose label is not already the target.
    candidates = (train_part.labels != cfg.attack_target).nonzero().flatten()
    n_poison = round(cfg.pratio * len(train_part))
    require(n_poison <= len(candidates), f"--pratio {cfg.pratio} asks for {n_poison} poisoned "
                                         f"samples but only {len(candidates)} are not the target")
    chosen = candidates[torch.randperm(len(candidates), generator=gen)[:n_poison]].sort().values
    bd_train = poison_split(train_part, chosen, cfg.attack_target, poison)
    keep = (test.labels != cfg.attack_target).nonzero().flatten()
    test_part = test.subset(keep)
    test_part.index = keep
    bd_test = poison_split(test_part, torch.arange(len(keep)), cfg.attack_target, poison)
    log.info("%s on %s/%s: %d of %d training images poisoned, %d backdoor test images",
             attack, spec.name, cfg.model, n_poison, len(train_part), len(bd_test))

    model = build_model(cfg.model, spec.num_classes, in_channels=spec.image_size[2],
                        image_size=spec.image_size[0], weights_path=cfg.pretrained)
    to_device(model, device)
    preprocess = Preprocess(spec.mean, spec.std, spec.image_size[2], hflip=spec.hflip)
    batches = Batches(bd_train.to(device), preprocess, cfg.batch_size, shuffle=True, augment=True,
                      seed=cfg.seed)
    clean_test, bd_test_dev = test.to(device), bd_test.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg.epochs)
    rows = []
    with progress(cfg.epochs * len(batches), f"training {cfg.model}") as bar:
        for epoch in range(cfg.epochs):
            stats = train_epoch(model, batches, optimizer, cross_entropy, amp=cfg.amp,
                                progress=bar)
            metrics = backdoor_metrics(model, clean_test, bd_test_dev, preprocess,
                                       eval_batch_size(cfg.eval_batch_size, device), cfg.amp)
            rows.append({"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"],
                         "train_epoch_loss_avg_over_batch": stats["loss"],
                         "train_acc": stats["train_acc"], **metrics})
            scheduler.step()
            log.info("epoch %d/%d  loss %.4f  train_acc %.4f  test_acc %.4f  test_asr %.4f  "
                     "test_ra %.4f", epoch + 1, cfg.epochs, stats["loss"], stats["train_acc"],
                     metrics["test_acc"], metrics["test_asr"], metrics["test_ra"])
    train_time = time.perf_counter() - start

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_attack_record(work, record_name=name, model_name=cfg.model,
                       num_classes=spec.num_classes, state_dict=state, clean_data=spec.name,
                       img_size=spec.image_size, bd_train=bd_train, bd_test=bd_test,
                       train_length=len(train), test_length=len(test), mode=cfg.save_mode)
    final = rows[-1] if rows else {}
    write_csv(work / "attack_df.csv", rows)
    write_csv(work / "attack_df_summary.csv", [final])
    summary = {"attack": attack, "record": name, "dataset": spec.name, "model": cfg.model,
               "poisoned_train": n_poison, "train_size": len(train_part),
               "bd_test_size": len(bd_test), "final": final, "time_s": round(train_time, 2),
               "config": vars(cfg), "environment": environment(device)}
    write_json(work / "attack_summary.json", summary)
    if final:
        print(f"{attack} {spec.name}/{cfg.model}: C-ACC {100 * final['test_acc']:.2f}%  "
              f"ASR {100 * final['test_asr']:.2f}%  RA {100 * final['test_ra']:.2f}%  "
              f"({train_time:.0f} s)")
    return summary

