"""Data set registry: one module per data set family, each calling `register_dataset` at import.

Every module in this folder is imported automatically (below), so adding a data set means adding one
file that registers a `DatasetSpec`. Data are read from disk only, never downloaded: the folders looked
in are `<dataset_path>/<name>` and then the spec's `search_dirs`; the first one whose files are all
there is used.

A split is a `CleanSplit`: its labels and length are known at once, its images are decoded only
where asked (`subset(index)`), so a defense that uses 1 % of an image-folder training set opens 1 %
of its files. Array-backed formats (idx files, CIFAR pickles) read their arrays, which is cheap;
image-folder formats list their files and decode the chosen ones.
"""
from __future__ import annotations

import importlib
import os
import pkgutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from utils.core.errors import UserError, shown
from utils.data.images import ImageSet, open_image


@dataclass(frozen=True)
class DatasetSpec:
    name: str  # 'cifar10'
    num_classes: int
    image_size: tuple[int, int, int]  # (H, W, C), BackdoorBench's img_size convention
    mean: tuple[float, ...]  # per channel, in [0, 1] pixel units
    std: tuple[float, ...]
    hflip: bool  # train augmentation uses RandomHorizontalFlip (cifar10 only)
    load: Callable[[Path, bool], "CleanSplit"]  # (folder found, train) -> from_arrays/from_files
    search_dirs: tuple[str, ...] = ()  # extra absolute folders to look in, after <dataset_path>/<name>
    how_to_get: str = ""  # one sentence: how a user obtains the files
    # (folder) -> None when the folder holds the data set, else what is missing ("no test_batch").
    # Must be cheap (file existence only). Without it, any existing folder is accepted.
    check: Callable[[Path], str | None] | None = None


_REGISTRY: dict[str, DatasetSpec] = {}


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    old = _REGISTRY.get(spec.name)
    if old is not None and old != spec:
        raise ValueError(f"dataset {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def dataset_names() -> list[str]:
    return sorted(_REGISTRY)


def get_dataset(name: str) -> DatasetSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UserError(f"unknown dataset '{shown(name, 60)}': use one of "
                        f"{', '.join(dataset_names())}") from None


def candidate_folders(name: str, dataset_path) -> list[Path]:
    spec = get_dataset(name)
    folders = [] if dataset_path is None else [Path(dataset_path) / name]
    return folders + [Path(d) for d in spec.search_dirs]


def find_dataset_folder(name: str, dataset_path) -> Path:
    """The first candidate folder that holds the data set's files, or a UserError saying where it
    looked, what was missing there, and how to get the data."""
    spec = get_dataset(name)
    looked = []
    for folder in candidate_folders(name, dataset_path):
        if not folder.is_dir():
            looked.append(f"{folder} (no such folder)")
            continue
        missing = spec.check(folder) if spec.check is not None else None
        if missing is None:
            return folder
        looked.append(f"{folder} ({missing})")
    how = spec.how_to_get.rstrip(". ")
    raise UserError(f"dataset {name!r} not found: looked in {', '.join(looked) or 'no folder'}; "
                    f"{how + '; ' if how else ''}or pass --dataset_path")


@dataclass(frozen=True, eq=False)
class CleanSplit:
    """One split of a clean data set: labels now, images when asked for."""

    labels: np.ndarray  # int64 [N]
    image_shape: tuple[int, int, int]  # (C, H, W) of the decoded images
    decode: Callable[[np.ndarray | None], np.ndarray]  # indices (None: all) -> uint8 [k, C, H, W]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index=None) -> ImageSet:
        """Images `index` (default all), in that order, decoded now. Indices are the caller's
        (checked by it against len()); one outside the split is a bug, not bad input."""
        if index is not None:
            index = np.asarray(index, dtype=np.int64).reshape(-1)
            if index.size and not 0 <= index.min() <= index.max() < len(self):
                raise ValueError(f"indices must lie within 0..{len(self) - 1}")
        images = self.decode(index)
        if not images.flags.writeable:  # a view of a read-only buffer: torch needs its own copy
            images = images.copy()
        labels = self.labels if index is None else self.labels[index]
        return ImageSet(torch.from_numpy(images), torch.from_numpy(labels.copy()))


def from_arrays(images: np.ndarray, labels) -> CleanSplit:
    """An array-backed split: uint8 [N, C, H, W] images already in memory."""
    return CleanSplit(np.asarray(labels, dtype=np.int64), tuple(images.shape[1:]),
                      lambda index: images if index is None else images[index])


def from_files(paths: list[Path], labels, size: tuple[int, int, int]) -> CleanSplit:
    """An image-folder split: files decoded (see read_images) only when asked for."""
    h, w, c = size
    return CleanSplit(np.asarray(labels, dtype=np.int64), (c, h, w), lambda index: read_images(
        paths if index is None else [paths[i] for i in index.tolist()], size))


def clean_split(name: str, dataset_path, train: bool) -> CleanSplit:
    """The clean train or test split of `name`, checked (image shape, labels within the classes)
    and not yet decoded."""
    spec = get_dataset(name)
    folder = find_dataset_folder(name, dataset_path)
    data = spec.load(folder, train)
    h, w, c = spec.image_size
    split = "train" if train else "test"
    if tuple(data.image_shape) != (c, h, w):
        raise UserError(f"dataset {name!r} in {folder}: {split} images have shape "
                        f"{tuple(data.image_shape)}, expected {(c, h, w)}; replace the files")
    if len(data) and (int(data.labels.min()) < 0 or int(data.labels.max()) >= spec.num_classes):
        raise UserError(f"dataset {name!r} in {folder}: {split} labels are outside 0..{spec.num_classes - 1}"
                        "; replace the files")
    return data


def load_clean_dataset(name: str, dataset_path, train: bool) -> ImageSet:
    """The whole clean train or test split of `name` as uint8 [N, C, H, W] images and int64
    labels."""
    return clean_split(name, dataset_path, train).subset()


# ---- helpers for the loaders -------------------------------------------------------------------

def first_missing(folder: Path, relative_paths) -> str | None:
    """'no <path>' for the first of `relative_paths` absent under `folder`, else None."""
    for rel in relative_paths:
        if not (folder / rel).exists():
            return f"no {rel}"
    return None


def read_images(paths: list[Path], size: tuple[int, int, int]) -> np.ndarray:
    """Decode image files (IMAGE_FORMATS, size-checked: utils/data/images.py) into uint8
    [N, C, H, W] (RGB or grey as C says), resizing to (H, W) with PIL bilinear where they differ.
    Decoding runs on a thread pool; the output keeps `paths` order."""
    h, w, c = size
    out = np.empty((len(paths), c, h, w), dtype=np.uint8)

    def decode(i: int) -> None:
        with open_image(paths[i], f"image {paths[i]}") as img:
            img = img.convert("RGB" if c == 3 else "L")
            if img.size != (w, h):
                img = img.resize((w, h), Image.Resampling.BILINEAR)
            arr = np.asarray(img, dtype=np.uint8)
        out[i] = arr[None] if c == 1 else arr.transpose(2, 0, 1)

    with ThreadPoolExecutor(max_workers=min(32, (os.cpu_count() or 1) + 4)) as pool:
        list(pool.map(decode, range(len(paths))))
    return out


def _import_all() -> None:
    for module in pkgutil.iter_modules(__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")


_import_all()
