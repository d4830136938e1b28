"""Where a defense run's model and data come from:

- a BackdoorBench record (`--result_file`): its model, the clean data set it was made on (the
  defense subset from the training split, C-ACC on the test split) and its backdoor test set;
- a model file (`--model_file` with `--model`; no record): the weights of any registered model, a
  state dict `.pt` (read with weights_only) or `.safetensors`; clean images from `--clean_dir` (an
  ImageFolder: utils/data/folders.py) or from a registered data set (`--dataset`); C-ACC on
  `--test_dir`, on the registered set's test split, or on the images of --clean_dir the defense
  subset leaves out; ASR and RA only given a trigger: images that carry it (`--bd_test_dir`, by true
  class) or a trigger picture pasted (`--trigger_patch`, `--trigger_pos`) or blended
  (`--trigger_blend`, `--blend_alpha`) into the clean test images, with `--target_label`.

Both give a `Source`; utils/defenses/run.py runs the defense on it and writes the same files.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from models import build_for_weights, declared_classifier, input_channels, read_state_dict
from utils.core.cli import log, require, seed_everything
from utils.core.config import Option, apply_yaml
from utils.core.errors import UserError, shown
from utils.data.datasets import CleanSplit, clean_split, find_dataset_folder, get_dataset
from utils.data.folders import image_folder
from utils.data.images import ImageSet, backdoor_set
from utils.data.record import AttackRecord, load_attack_record
from utils.data.triggers import blend, fit_pattern, load_image, paste
from utils.training.train import record_model, to_device

MODEL_FILE_OPTIONS = {
    "model_file": Option(None, "defend this model without a record: its weights as a state dict "
                               "(.pt, read with weights_only) or .safetensors; needs --model and "
                               "--output_dir", str, conflicts=("result_file",)),
    "num_classes": Option(None, "--model_file: class count (default: the rows of the model's "
                                "declared classifier in the file, else --dataset's, else the "
                                "class folders of --clean_dir)", int, bounds=">= 2"),
    "clean_dir": Option(None, "--model_file: clean images, one folder per class (default: "
                              "--dataset's training split)", str),
    "test_dir": Option(None, "--model_file: clean test images for C-ACC, one folder per class "
                             "(default: --dataset's test split, else the --clean_dir images "
                             "outside the defense subset)", str),
    "image_size": Option(None, "--model_file: model input side H [W] (default: --dataset's)", int,
                         nargs="+", bounds=">= 1"),
    "mean": Option(None, "--model_file: per-channel normalization mean of [0, 1] pixels "
                         "(default: --dataset's, else 0)", float, nargs="+"),
    "std": Option(None, "--model_file: per-channel normalization std (default: --dataset's, "
                        "else 1)", float, nargs="+", bounds="> 0"),
    "hflip": Option(None, "--model_file: random horizontal flips in training augmentation "
                          "(default: --dataset's rule, else off)", bool),
    "target_label": Option(None, "--model_file: the backdoor's target class, for ASR and RA with "
                                 "--bd_test_dir or a trigger", int, bounds=">= 0"),
    "bd_test_dir": Option(None, "--model_file: images that carry the trigger, one folder per TRUE "
                                "class", str),
    "trigger_patch": Option(None, "--model_file: picture pasted into the clean test images to "
                                  "measure ASR (its alpha channel, if any, blends it)", str,
                            conflicts=("bd_test_dir",)),
    "trigger_pos": Option(None, "--trigger_patch position: top left, in pixels (default: the "
                                "bottom-right corner)", int, nargs="+", bounds=">= 0"),
    "trigger_blend": Option(None, "--model_file: picture blended into the clean test images to "
                                  "measure ASR, resized to the image size", str,
                            conflicts=("bd_test_dir", "trigger_patch")),
    "blend_alpha": Option(0.2, "--trigger_blend weight of the picture", bounds="(0, 1]"),
}


# BackdoorBench's defense yamls also carry these keys; accepted so that its configs load as they
# are. The runtime ones have no counterpart here (data live on the device, nothing is saved per
# epoch); the attack's description is the record's business; the input size is checked.
_NOT_USED = {
    "num_workers": "data live on the device: no loader workers",
    "pin_memory": "data live on the device", "prefetch": "data live on the device",
    "non_blocking": "data live on the device",
    "frequency_save": "no per-epoch checkpoints; the result is written once, whole",
    "poison_rate": "describes the attack; the record holds it",
    "target_type": "describes the attack; the record holds it",
    "trigger_type": "describes the attack; the record holds it",
    "init": "reinitialization is part of the method (the public code's --init parses any value "
            "as true)",
    "lr_scheduler": "each phase's schedule is the method's (see --help)",
    "client_optimizer": "each phase's optimizer is the method's (see --help)",
}
BACKDOORBENCH_KEYS = {
    **{key: Option(None, f"BackdoorBench key, accepted and not used: {why}", ignored=True)
       for key, why in _NOT_USED.items()},
    **{f"input_{name}": Option(None, f"BackdoorBench key, checked: the input {name} of the record "
                                     "or --model_file run", int, bounds=">= 1")
       for name in ("height", "width", "channel")},
}


@dataclass
class Source:
    model: torch.nn.Module  # on the device, weights loaded
    model_name: str
    num_classes: int
    dataset: str  # a registered data set's name, or 'image folder'
    data_folder: str  # where the clean images were read
    channels: int
    mean: tuple
    std: tuple
    hflip: bool
    clean_train: CleanSplit  # the clean images the subset is drawn from
    subset_index: list[int]
    clean_test: ImageSet
    bd_test: ImageSet | None  # None: no trigger given, no ASR / RA
    test_set: str  # what clean_test is
    original: dict  # the weights before the defense
    record: AttackRecord | None = None


def check_given(cfg, what: str, **actual) -> None:
    """Keys a config may state as a check (BackdoorBench's num_classes, input_height, ...)."""
    for key, value in actual.items():
        given = getattr(cfg, key)
        require(given is None or given == value,
                f"--{key} {given} disagrees with {what}, which has {value}: drop it or fix it")


def select_subset(n: int, cfg) -> list[int]:
    """The defense subset: `ratio` of the clean training set (or `defense_samples` images) drawn
    uniformly with a seeded random.sample (as the public code), or the indices listed in --index."""
    if cfg.index:
        path = Path(cfg.index)
        require(path.is_file(), f"index file {path} not found: pass an existing --index file")
        try:
            idx = [int(line) for line in path.read_text().split()]
        except ValueError as e:
            raise UserError(f"index file {path} must hold one integer per line ({e})") from e
        require(len(idx) > 0, f"index file {path} is empty")
        require(len(set(idx)) == len(idx), f"index file {path} repeats indices")
        require(min(idx) >= 0 and max(idx) < n,
                f"index file {path} has indices outside 0..{n - 1} of the clean training set")
        return idx
    k = cfg.defense_samples or int(n * cfg.ratio)
    require(0 < k <= n, f"--ratio {cfg.ratio} selects none of the {n} clean images: raise it, "
            "or pass --defense_samples N" if k == 0 else
            f"--defense_samples {k} exceeds the {n} clean images: lower it")
    return random.Random(cfg.seed).sample(range(n), k)


HELD_OUT_MAX = 10_000  # test images taken from --clean_dir without --test_dir
CONFIG_ROOT = Path(__file__).resolve().parents[2] / "config" / "defense"


def pick_yaml(cfg, method: str, dataset: str | None, model: str | None) -> None:
    """Without --yaml_path, the shipped yaml for the run's data set and model, as sh/sweep.sh
    picks it: config/defense/<method>/<dataset>_<model>.yaml, else <dataset>.yaml, else
    default.yaml; its values fill what the command line left at the defaults. The names were
    checked against the registries, so they name files of ours only."""
    if cfg.yaml_path is not None:
        return
    names = [f"{dataset}_{model}", str(dataset)] if dataset else []
    for name in [n for n in names if re.fullmatch(r"[a-z0-9_]+", n)] + ["default"]:
        path = CONFIG_ROOT / method / f"{name}.yaml"
        if path.is_file():
            apply_yaml(cfg, path, f"picked for {dataset}/{model}")
            seed_everything(cfg.seed)  # the yaml may set it
            log.info("no --yaml_path: using %s (the %s settings; --yaml_path none for the "
                     "option defaults)", path.relative_to(CONFIG_ROOT.parents[1]), dataset)
            return
    log.info("no --yaml_path and no yaml for %s/%s: the option defaults", dataset, model)


def load_source(cfg, device, method: str) -> Source:
    ignored = [k for k, option in BACKDOORBENCH_KEYS.items()
               if option.ignored and getattr(cfg, k) is not None]
    if ignored:
        log.info("ignored BackdoorBench settings that do not apply here: %s (see --help)",
                 ", ".join(ignored))
    if cfg.model_file:
        return from_model_file(cfg, device, method)
    # num_classes and target_label are checks in a record run (BackdoorBench's yamls carry them)
    given = [f"--{k}" for k in MODEL_FILE_OPTIONS if getattr(cfg, k) is not None
             and k not in ("blend_alpha", "num_classes", "target_label")]
    require(not given, f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for runs on a "
                       "--model_file; a record brings its own model and data: drop them")
    return from_record(cfg, device, method)


# ---------------------------------------------------------------- a BackdoorBench record

def from_record(cfg, device, method: str) -> Source:
    require(bool(cfg.result_file), "--result_file is required (the record folder name under "
                                   f"{cfg.record_dir}/), or --model_file for a model without one")
    record = load_attack_record(Path(cfg.record_dir) / cfg.result_file, trust=cfg.trust_record)
    for key, given, actual in (("dataset", cfg.dataset, record.clean_data),
                               ("model", cfg.model, record.model_name)):
        require(given is None or given == actual,
                f"--{key} {given} disagrees with the record, which holds {key} '{actual}': "
                f"drop --{key} or pick the matching record")
    spec = get_dataset(record.clean_data)
    pick_yaml(cfg, method, spec.name, record.model_name.lower())
    require(record.num_classes == spec.num_classes,
            f"record says {record.num_classes} classes but {spec.name} has {spec.num_classes}: "
            "the record was made on another data set; pick the matching record")
    channels = input_channels(record.state_dict)
    check_given(cfg, "the record", num_classes=record.num_classes, input_height=record.img_size[0],
                input_width=record.img_size[1], input_channel=channels)
    model = record_model(record, record.state_dict, spec, device)
    # Only the images the run uses are decoded: the whole test split (evaluated), the defense
    # subset and the retuning set's images of the training split.
    clean_train = clean_split(spec.name, cfg.dataset_path, train=True)
    clean_test = clean_split(spec.name, cfg.dataset_path, train=False).subset()
    subset_index = select_subset(len(clean_train), cfg)
    bd_test = record.bd_test.images(clean_test)
    if cfg.target_label is not None:
        targets = sorted(set(bd_test.labels[bd_test.poisoned].tolist()))
        require(targets == [cfg.target_label], f"--target_label {cfg.target_label} disagrees with "
                f"the record, whose backdoor test set is labelled {targets}: drop it (a record "
                "run takes the target from the record) or pick the matching record")
    return Source(
        model=model, model_name=record.model_name, num_classes=record.num_classes,
        dataset=spec.name, data_folder=str(find_dataset_folder(spec.name, cfg.dataset_path)),
        channels=channels, mean=spec.mean, std=spec.std, hflip=spec.hflip,
        clean_train=clean_train, subset_index=subset_index, clean_test=clean_test,
        bd_test=bd_test, test_set=f"the {spec.name} test split ({len(clean_test)} images)",
        original=record.state_dict, record=record)


# ---------------------------------------------------------------- a model file

def from_model_file(cfg, device, method: str) -> Source:
    require(bool(cfg.model), "--model_file needs --model, the architecture's registered name "
                             "(python -c 'import models; print(models.model_names())')")
    require(bool(cfg.output_dir), "--model_file needs --output_dir, the folder for the results")
    require(not cfg.retune_check, "--retune_check needs a record's poisoned training data: drop it "
                                  "for a --model_file run")
    spec = get_dataset(cfg.dataset) if cfg.dataset else None
    pick_yaml(cfg, method, spec and spec.name, cfg.model.lower())
    weights = read_state_dict(cfg.model_file, "--model_file")
    channels = input_channels(weights)
    height, width = _image_size(cfg, spec)
    size = (height, width, channels)
    check_given(cfg, "--model_file's input", input_height=height, input_width=width,
                input_channel=channels)

    num_classes = cfg.num_classes or _classifier_rows(cfg.model, weights) or \
        (spec.num_classes if spec else None)
    clean, classes, data_folder = _clean_images(cfg, spec, size, num_classes)
    if num_classes is None:
        num_classes = max(classes.values()) + 1
        log.info("%d classes, from the class folders of --clean_dir", num_classes)
    model = build_for_weights(cfg.model, num_classes, channels, height, weights,
                              f"the weights in --model_file {shown(cfg.model_file, 200)}")
    subset_index = select_subset(len(clean), cfg)
    test, test_set = _test_images(cfg, spec, size, num_classes, classes, clean, subset_index)
    require(cfg.target_label is None or cfg.target_label < num_classes,
            f"--target_label {cfg.target_label} is not a class of the model's {num_classes}")
    mean, std = _normalization(cfg, spec, channels)
    return Source(
        model=to_device(model, device), model_name=cfg.model, num_classes=num_classes,
        dataset=spec.name if spec and not cfg.clean_dir else "image folder",
        data_folder=data_folder, channels=channels, mean=mean, std=std,
        hflip=cfg.hflip if cfg.hflip is not None else bool(spec and spec.hflip),
        clean_train=clean, subset_index=subset_index, clean_test=test,
        bd_test=_backdoor_test(cfg, test, size, classes, num_classes), test_set=test_set,
        original={k: v.detach().clone() for k, v in model.state_dict().items()})


def _image_size(cfg, spec) -> tuple[int, int]:
    if cfg.image_size:
        require(len(cfg.image_size) in (1, 2), "--image_size takes H or H W")
        return cfg.image_size[0], cfg.image_size[-1]
    require(spec is not None, "--model_file needs the input size: --image_size H [W], or "
                              "--dataset NAME for that data set's size, mean and std")
    return spec.image_size[0], spec.image_size[1]


def _classifier_rows(model_name: str, weights: dict) -> int | None:
    """The class count the weights give the model's declared classifier, if it declares one."""
    name = declared_classifier(model_name)
    rows = [v.shape[0] for k, v in weights.items() if name and k.endswith(f"{name}.weight")]
    return int(rows[0]) if len(rows) == 1 else None


def _normalization(cfg, spec, channels: int) -> tuple[tuple, tuple]:
    if cfg.mean is None and cfg.std is None and spec is None:
        log.info("no --mean / --std: the model gets pixels in [0, 1] as they are")
    mean = tuple(cfg.mean) if cfg.mean else (spec.mean if spec else (0.0,))
    std = tuple(cfg.std) if cfg.std else (spec.std if spec else (1.0,))
    for key, values in (("mean", mean), ("std", std)):
        require(len(values) in (1, channels) or channels == 1,
                f"--{key} has {len(values)} values; the model takes {channels} channels")
    return mean, std


def _clean_images(cfg, spec, size, num_classes):
    """(clean images, folder name -> class, the folder read)."""
    if cfg.clean_dir:
        folder = image_folder(cfg.clean_dir, size, num_classes, "--clean_dir")
        return folder.split, folder.classes, str(folder.root)
    require(spec is not None, "--model_file needs clean images: --clean_dir DIR (one folder per "
                              "class) or --dataset NAME (that data set's training split)")
    found = find_dataset_folder(spec.name, cfg.dataset_path)
    classes = {str(c): c for c in range(spec.num_classes)}
    return _as_size(clean_split(spec.name, cfg.dataset_path, train=True), size), classes, \
        str(found)


def _as_size(split: CleanSplit, size) -> CleanSplit:
    h, w, _ = size
    require(split.image_shape[1:] == (h, w), f"--image_size {h} {w} differs from the data set's "
            f"{split.image_shape[1]} {split.image_shape[2]}: drop --image_size, or use --clean_dir")
    return split


def _test_images(cfg, spec, size, num_classes, classes, clean, subset_index):
    """(clean test images, what they are)."""
    if cfg.test_dir:
        folder = image_folder(cfg.test_dir, size, num_classes, "--test_dir", classes)
        return folder.split.subset(), f"--test_dir {folder.root} ({len(folder.split)} images)"
    if not cfg.clean_dir:
        test = _as_size(clean_split(spec.name, cfg.dataset_path, train=False), size).subset()
        return test, f"the {spec.name} test split ({len(test)} images)"
    chosen = set(subset_index)
    rest = [i for i in range(len(clean)) if i not in chosen]
    require(len(rest) > 0, "the defense subset takes every --clean_dir image, leaving none to "
                           "measure C-ACC: pass --test_dir, or lower --ratio / --defense_samples")
    if len(rest) > HELD_OUT_MAX:  # decode what a C-ACC estimate needs, not a whole archive
        rest = sorted(random.Random(cfg.seed).sample(rest, HELD_OUT_MAX))
        return clean.subset(rest), (f"{HELD_OUT_MAX} of the --clean_dir images outside the "
                                    "defense subset, drawn with --seed (no --test_dir)")
    return clean.subset(rest), (f"the {len(rest)} --clean_dir images outside the defense subset "
                                "(no --test_dir)")


def _backdoor_test(cfg, test: ImageSet, size, classes, num_classes) -> ImageSet | None:
    """Images with the trigger labelled as the target, their true classes kept for RA; those of
    the target class itself are left out (as BackdoorBench's bd_test)."""
    trigger = cfg.bd_test_dir or cfg.trigger_patch or cfg.trigger_blend
    target = cfg.target_label
    if (trigger is None) != (target is None):
        raise UserError("--target_label needs a trigger to measure ASR: --bd_test_dir, "
                        "--trigger_patch or --trigger_blend" if trigger is None else
                        "a trigger needs --target_label, the class it makes the model predict")
    require(cfg.trigger_pos is None or cfg.trigger_patch,
            "--trigger_pos places a --trigger_patch: give one, or drop --trigger_pos")
    if trigger is None:
        return None
    if cfg.bd_test_dir:
        folder = image_folder(cfg.bd_test_dir, size, num_classes, "--bd_test_dir", classes)
        return backdoor_set(folder.split.subset(), target)
    if cfg.trigger_patch:
        return backdoor_set(test, target, lambda images: _pasted(cfg, images))
    pattern, _ = load_image(cfg.trigger_blend, f"--trigger_blend {cfg.trigger_blend}")
    return backdoor_set(test, target, lambda images: blend(
        images, fit_pattern(pattern, images.shape[1], *images.shape[2:]), cfg.blend_alpha))


def _pasted(cfg, images: torch.Tensor) -> torch.Tensor:
    patch, alpha = load_image(cfg.trigger_patch, f"--trigger_patch {cfg.trigger_patch}")
    patch = fit_pattern(patch, images.shape[1], *patch.shape[1:])  # channels only
    (h, w), (height, width) = patch.shape[1:], images.shape[2:]
    require(len(cfg.trigger_pos or ()) in (0, 2), "--trigger_pos takes two numbers: top left")
    top, left = cfg.trigger_pos or (height - h, width - w)
    require(0 <= top and top + h <= height and 0 <= left and left + w <= width,
            f"the {h} x {w} --trigger_patch at top {top}, left {left} does not fit the "
            f"{height} x {width} images: move it (--trigger_pos) or make it smaller")
    return paste(images, patch, top, left, alpha)
