"""Training and evaluation loops shared by every attack and defense.

Data are device-resident uint8 tensors (`ImageSet`); a batch is indexed, converted, augmented and
normalized on the device. One forward per training step; evaluation runs under inference_mode with
large batches; bf16 autocast on CUDA only.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
import torch.nn.functional as F

from models import RECORD_ADVICE, build_for_weights, input_channels, strip_module_prefix
from utils.core.cli import progress, require
from utils.core.errors import UserError
from utils.data.images import ImageSet, Preprocess


def resolve_device(name: str | None) -> torch.device:
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"unknown device '{name}': use cpu, cuda or cuda:N") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{name}' requested but CUDA is not available: use --device cpu")
    return device


def to_device(model, device: torch.device):
    """Move a model to `device`; on CUDA in channels_last, the fast layout for tensor-core
    convolutions (Preprocess hands CUDA batches over in the same layout)."""
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    return model


def record_model(record, state_dict, spec, device) -> torch.nn.Module:
    """The record's architecture with `state_dict` loaded (the record's own weights or a defended
    model's), on `device`; the input channel count is read from the record's weights."""
    channels = input_channels(record.state_dict)
    require(channels in (1, 3), f"the record's first convolution takes {channels} input channels; "
                                "images have 1 or 3: the record's weights are damaged")
    model = build_for_weights(record.model_name, record.num_classes, channels,
                              spec.image_size[0], strip_module_prefix(state_dict),
                              "the record's weights", RECORD_ADVICE)
    return to_device(model, device)


def autocast(device: torch.device, enabled: bool = True):
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Batches:
    """Mini-batches of a device-resident ImageSet: a seeded shuffle per epoch, augmentation on
    tensors. Yields (inputs, labels, batch_indices)."""

    def __init__(self, data: ImageSet, preprocess: Preprocess, batch_size: int, *, shuffle: bool,
                 augment: bool, seed: int = 0):
        self.data, self.preprocess = data, preprocess
        self.batch_size, self.shuffle, self.augment = batch_size, shuffle, augment
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(len(self.data) / self.batch_size)

    def __iter__(self):
        n = len(self.data)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        order = order.to(self.data.images.device)
        for start in range(0, n, self.batch_size):
            idx = order[start:start + self.batch_size]
            x = self.preprocess(self.data.images[idx], augment=self.augment, generator=self.generator)
            yield x, self.data.labels[idx], idx


def train_epoch(model, batches: Batches, optimizer, loss_fn: Callable, *, ascent: bool = False,
                clip_norm: float | None = None, amp: bool = True, progress=None,
                transform: Callable | None = None, stop: Callable | None = None) -> dict:
    """One pass over `batches`. loss_fn(logits, labels) -> scalar loss. With ascent=True the loss is
    maximized (gradient ascent). `transform(x, y) -> (x, y)` rewrites each batch before the forward
    (training-time poisoning of training-controlled attacks). Returns the mean loss and the running
    accuracy of the epoch's train-mode predictions (taken from the same forward, so it costs nothing
    extra). `stop(logits, labels) -> bool` is asked after every forward, before the update: True ends
    the epoch without that step and returns that batch's loss and accuracy with `stopped` and
    `stopped_after` (the steps taken)."""
    model.train()
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    for step, (x, y, _) in enumerate(batches):
        if transform is not None:
            x, y = transform(x, y)
        with autocast(device, amp):
            logits = model(x)
            loss = loss_fn(logits.float(), y)
        if stop is not None and stop(logits.detach(), y):
            return {"loss": loss.item(), "train_acc": accuracy(logits.detach().argmax(1), y),
                    "stopped": True, "stopped_after": step}
        if not torch.isfinite(loss):
            raise UserError(f"training loss became {loss.item()} (not finite): lower the learning "
                            "rate or check the record's weights")
        optimizer.zero_grad(set_to_none=True)
        (-loss if ascent else loss).backward()
        if clip_norm:
            torch.nn.utils.clip_grad_norm_(params, clip_norm)
        optimizer.step()
        total_loss += loss.detach() * len(y)
        correct += (logits.detach().argmax(1) == y).sum()
        seen += len(y)
        if progress is not None:
            progress.update(1)
    return {"loss": total_loss.item() / seen, "train_acc": correct.item() / seen}


def fit(model, batches, optimizer, epochs: int, *, loss_fn: Callable | None = None,
        scheduler=None, ascent: bool = False, clip_norm: float | None = None, amp: bool = True,
        transform: Callable | None = None, step_stop: Callable | None = None,
        epoch_stop: Callable[[dict], bool] | None = None,
        on_epoch: Callable[[int, dict, int], None] | None = None, desc: str | None = None) -> dict:
    """The training loop of every phase of every attack and defense: up to `epochs` passes of
    `train_epoch` (loss_fn defaults to cross-entropy; ascent, clip_norm, amp and transform are
    passed on). After each epoch `on_epoch(epoch, stats, steps)` sees the epoch's stats (it may add
    columns, e.g. to log them) and the optimizer steps taken so far; then the scheduler steps.

    Two stop rules end training early, without that scheduler step: `step_stop(logits, labels)`,
    asked before every step (True ends the epoch without taking it), and `epoch_stop(stats)`, asked
    after every epoch. `desc` names a progress bar (none without it). Returns the epochs run, the
    steps taken, whether a stop rule ended training, and the last epoch's stats."""
    loss_fn = cross_entropy if loss_fn is None else loss_fn
    stats, steps, stopped, epochs_run = {}, 0, False, 0
    bar = progress(epochs * len(batches), desc) if desc else contextlib.nullcontext()
    with bar:
        for epoch in range(epochs):
            stats = train_epoch(model, batches, optimizer, loss_fn, ascent=ascent,
                                clip_norm=clip_norm, amp=amp, progress=bar if desc else None,
                                transform=transform, stop=step_stop)
            steps += stats.pop("stopped_after", len(batches))
            stopped = stats.pop("stopped", False) or (epoch_stop is not None and epoch_stop(stats))
            if on_epoch is not None:
                on_epoch(epoch, stats, steps)
            epochs_run = epoch + 1
            if stopped:
                break
            if scheduler is not None:
                scheduler.step()
    return {"epochs": epochs_run, "steps": steps, "stopped": stopped, **stats}


def cross_entropy(logits, labels):
    return F.cross_entropy(logits, labels)


def eval_batch_size(requested: int, device: torch.device) -> int:
    """`requested`, or by device: large batches feed a GPU; on a CPU, 256 keeps activations in
    cache (smallcnn on 2 cores: 9,800 images/s at 256, 6,600 at 1024; bench/ulrl_bench.py)."""
    return requested if requested > 0 else (1024 if device.type == "cuda" else 256)


@torch.inference_mode()
def predict(model, data: ImageSet, preprocess: Preprocess, batch_size: int = 256,
            amp: bool = True) -> torch.Tensor:
    """Predicted class of every image, in eval mode. An output that is NaN or inf is an error:
    argmax would turn it into a class and a meaningless metric."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    preds = []
    finite = torch.ones((), dtype=torch.bool, device=device)  # checked once, not per batch
    for start in range(0, len(data), batch_size):
        x = preprocess(data.images[start:start + batch_size].to(device))
        with autocast(device, amp):
            logits = model(x)
        finite &= torch.isfinite(logits).all()
        preds.append(logits.argmax(1))
    model.train(was_training)
    if not finite:
        raise UserError("the model outputs NaN or inf (not finite): its weights are broken (e.g. "
                        "a BatchNorm running_var below 0 or weights too large); check the record "
                        "or lower the learning rate")
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long, device=device)


def accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    return (pred == labels.to(pred.device)).float().mean().item() if len(labels) else float("nan")


def backdoor_metrics(model, clean_test: ImageSet, bd_test: ImageSet | None,
                     preprocess: Preprocess, batch_size: int = 256, amp: bool = True) -> dict:
    """BackdoorBench's metrics: C-ACC on the clean test set, ASR = share of backdoor test samples
    predicted as the backdoor label, RA = share predicted as their true class (C-ACC only
    without a backdoor test set)."""
    clean_pred = predict(model, clean_test, preprocess, batch_size, amp)
    if bd_test is None:
        return {"test_acc": accuracy(clean_pred, clean_test.labels)}
    bd_pred = predict(model, bd_test, preprocess, batch_size, amp)
    return {"test_acc": accuracy(clean_pred, clean_test.labels),
            "test_asr": accuracy(bd_pred, bd_test.labels),
            "test_ra": accuracy(bd_pred, bd_test.true_labels)}
