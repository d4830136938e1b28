"""What a defense's algorithm runs on, and the Python API built on it.

A defense file holds `defend(session) -> details`: it changes `session.model` in place and returns
what it found. The session supplies the model, its classifier layer (`linear`), the defense data
(`defense_data`, uint8 on the device, with `preprocess`), the options (`cfg`) and what every phase
uses: `batches()`, `timed()`, `log_epoch()`, `original_state()`, `evaluate()`. A record run
(utils/defenses/run.py, `DefenseRun`) is a session loaded from a BackdoorBench record; the Python
API below makes one from a model and images in memory:

    from defense.ulrl import purify
    purified, report = purify(model, images, labels, alpha=0.3, mean=(0.5,), std=(0.5,))
    purified, report = purify(model, images, labels, test=(x, y), backdoor_test=(x_bd, y_true),
                              target_label=0)  # report["before"] / ["after"]: C-ACC, ASR, RA

`images` are uint8 [N, C, H, W] (or floats in [0, 1]) with int labels [N], or a torch Dataset of
(image, label) pairs; every option of the defense's command line is a keyword with the same default
and checks. `mean` / `std` are the normalization the model expects (default none: pixels in
[0, 1]); `hflip` adds random horizontal flips to the random-crop augmentation; `test` (a Dataset
or (images, labels)) adds C-ACC before and after, `backdoor_test` (images carrying the trigger,
labelled by their true class) with `target_label` ASR and RA. The model given is left as it was: a
purified copy is returned, with the report (the details summary.json would hold, the options used
and the phase times). Nothing is written.
"""
from __future__ import annotations

import copy
import time

import torch

from models import find_classifier
from utils.core.cli import log, require, seed_everything, set_threads
from utils.core.config import config_from
from utils.data.images import ImageSet, Preprocess, backdoor_set
from utils.defenses.sources import MODEL_FILE_OPTIONS
from utils.training.train import Batches, backdoor_metrics, eval_batch_size, resolve_device, \
    to_device


class DefenseSession:
    """The shared machinery; a subclass sets cfg, model, linear_name, linear, device,
    defense_data, preprocess, original, and test_sets ((clean, backdoor) or None)."""
    times: dict
    epochs: list

    def batches(self, augment: bool = True, data: ImageSet | None = None):
        """Shuffled, augmented mini-batches of the defense subset (or of `data`), the same source
        for every phase: device-resident tensors, or a per-sample DataLoader with --loader
        dataloader."""
        data = self.defense_data if data is None else data
        cfg = self.cfg
        if cfg.loader == "dataloader":
            from utils.data.loader import DataLoaderBatches
            return DataLoaderBatches(data, self.preprocess, cfg.batch_size, shuffle=True,
                                     augment=augment, seed=cfg.seed)
        return Batches(data, self.preprocess, cfg.batch_size, shuffle=True, augment=augment,
                       seed=cfg.seed)

    def evaluate(self, model=None, test_sets=None) -> dict:
        """C-ACC, ASR, RA on the test sets (or on `test_sets` = (clean, backdoor)); {} without."""
        clean_test, bd_test = test_sets or self.test_sets or (None, None)
        if clean_test is None:
            return {}
        return backdoor_metrics(model or self.model, clean_test, bd_test, self.preprocess,
                                eval_batch_size(self.cfg.eval_batch_size, self.device),
                                self.cfg.amp)

    def timed(self, phase: str, fn, *args):
        """Call fn(*args), adding its wall time to the phase's total."""
        t0 = time.perf_counter()
        result = fn(*args)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times[phase] = self.times.get(phase, 0.0) + time.perf_counter() - t0
        return result

    def log_epoch(self, phase: str, epoch: int, stats: dict, optimizer, model) -> None:
        row = {"phase": phase, "epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], **stats}
        if self.cfg.eval_every_epoch:
            row.update(self.evaluate(model))
        elif self.cfg.curve_samples > 0 and self.curve_sets is not None:
            row.update({f"curve_{k}": v for k, v in self.evaluate(model, self.curve_sets).items()})
        self.epochs.append(row)
        log.info("%s", "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                 for k, v in row.items()))

    def original_state(self) -> dict:
        """The model's weights before the defense, on the device."""
        return {k: v.to(self.device) for k, v in self.original.items()}


def as_image_set(images, labels) -> ImageSet:
    """uint8 or [0, 1] float images [N, C, H, W] with labels [N], or a Dataset of (image, label)."""
    if isinstance(images, torch.utils.data.Dataset):
        require(labels is None, "pass labels only with an image tensor (a Dataset yields them)")
        pairs = [images[i] for i in range(len(images))]
        require(len(pairs) > 0, "the defense Dataset is empty")
        images = torch.stack([torch.as_tensor(image) for image, _ in pairs])
        labels = torch.tensor([int(label) for _, label in pairs])
    require(isinstance(images, torch.Tensor) and images.dim() == 4,
            "defense images must be a tensor [N, C, H, W] or a Dataset of (image, label)")
    require(labels is not None and len(labels) == len(images),
            f"give one label per image ({len(images)} images)")
    if images.is_floating_point():
        require(bool(((images >= 0) & (images <= 1)).all()),
                "float images must hold pixels in [0, 1] (normalization is the mean / std "
                "options)")
        images = (images * 255).round().to(torch.uint8)
    require(images.dtype == torch.uint8, f"images must be uint8 or float, not {images.dtype}")
    return ImageSet(images.cpu().contiguous(), torch.as_tensor(labels).long().cpu())


class ModelSession(DefenseSession):
    """A session on a model and defense images held in memory (the Python API)."""

    def __init__(self, cfg, model, data: ImageSet, mean, std, hflip: bool):
        self.cfg, self.times, self.epochs = cfg, {}, []
        self.device = resolve_device(cfg.device)
        set_threads(cfg.threads)
        seed_everything(cfg.seed)
        self.model = to_device(copy.deepcopy(model), self.device)
        self.original = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        channels = data.channels
        self.preprocess = Preprocess(mean if mean is not None else (0.0,) * channels,
                                     std if std is not None else (1.0,) * channels, channels,
                                     hflip=hflip)
        self.defense_data = data.to(self.device)
        self.test_sets = self.curve_sets = None
        with torch.inference_mode():
            outputs = self.model.eval()(self.preprocess(self.defense_data.images[:1]))
        self.model.train()
        require(outputs.dim() == 2, f"the model must output class scores [N, K], not "
                                    f"{tuple(outputs.shape)}")
        num_classes = outputs.shape[1]
        require(int(data.labels.max()) < num_classes and int(data.labels.min()) >= 0,
                f"labels must be classes 0..{num_classes - 1} of the model's {num_classes} outputs")
        self.linear_name, self.linear = find_classifier(self.model, num_classes, cfg.linear_name)


# Options about records, model files, their data and output folders: a call from Python brings its
# own model and images and writes nothing, so they are not its keywords.
RECORD_OPTIONS = ("result_file", "record_dir", "dataset", "model", "dataset_path", "ratio",
                  "defense_samples", "index", "tag", "plots", "output_dir", "trust_record",
                  "retune_check", "retune_clean", "retune_poison_ratio", "retune_epochs",
                  "retune_lr", *MODEL_FILE_OPTIONS)


def python_api(options: dict, defend, method: str):
    """The defense's `purify(model, images, labels=None, *, mean=None, std=None, hflip=False,
    test=None, backdoor_test=None, target_label=None, **options) -> (purified model, report)`
    (see the module docstring)."""
    options = {k: v for k, v in options.items() if k not in RECORD_OPTIONS}

    def purify(model: torch.nn.Module, images, labels=None, /, *, mean=None, std=None,
               hflip: bool = False, test=None, backdoor_test=None, target_label=None, **values):
        cfg = config_from(options, values, f"{method}.purify()")
        session = ModelSession(cfg, model, as_image_set(images, labels), mean, std, hflip)
        session.test_sets = test_sets(session, test, backdoor_test, target_label)
        t0 = time.perf_counter()
        before = session.evaluate()
        details = defend(session)
        session.times["total"] = time.perf_counter() - t0
        session.model.eval()
        report = {"method": method, "classifier": session.linear_name,
                  "defense_samples": len(session.defense_data),
                  **({"before": before, "after": session.evaluate()} if before else {}),
                  **details, "epochs": session.epochs,
                  "times_s": {k: round(v, 3) for k, v in session.times.items()},
                  "config": vars(cfg)}
        return session.model, report

    purify.__doc__ = (f"{method.upper()} on a model in memory: (purified copy, report). Options "
                      f"as the command line's (python defense/{method}.py --help); see "
                      "utils/defenses/session.py.")
    return purify


def test_sets(session: ModelSession, test, backdoor_test, target_label):
    """(clean test set, backdoor test set or None) on the session's device, or None without a
    test set. Each is a Dataset or an (images, labels) pair; the backdoor images carry the
    trigger and are labelled by their true class, with `target_label` the backdoor's target."""
    require(backdoor_test is None or test is not None,
            "backdoor_test needs test too (C-ACC is measured alongside ASR)")
    require((backdoor_test is None) == (target_label is None),
            "backdoor_test and target_label go together: the triggered images and the class "
            "they make the model predict")
    if test is None:
        return None
    sets = [as_image_set(*(test if isinstance(test, (tuple, list)) else (test, None)))]
    if backdoor_test is not None:
        pairs = backdoor_test if isinstance(backdoor_test, (tuple, list)) else (backdoor_test, None)
        sets.append(backdoor_set(as_image_set(*pairs), int(target_label)))
    channels = session.defense_data.channels
    for data in sets:
        require(data.image_shape == session.defense_data.image_shape,
                f"test images are {data.image_shape}, the defense images "
                f"{session.defense_data.image_shape}: give them the same shape")
    sets = [data.with_channels(channels).to(session.device) for data in sets]
    return sets[0], (sets[1] if len(sets) > 1 else None)
