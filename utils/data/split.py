"""A record's backdoor sets (bd_train, bd_test) as typed, lazily decoded data, and the writer of
BackdoorBench's dataset-state dicts they are read from.

This module and utils/data/record.py are the only places that know BackdoorBench's keys
(`original_index_array`, `poison_indicator`, `bd_data_container`; tests/test_layers.py checks it).
`parse_split` checks a state's structure when the record is loaded and keeps its data_dict entries
as stored; `BackdoorSplit.images` decodes only the positions asked for, so a retuning check that
uses 60 of 6,000 poisoned training images decodes 60 PNGs. Everything decoded is checked: PNG only,
whatever the name says; the size before decoding; labels within the classes; paths inside the
record folder.
See shared/reference/backdoorbench.md for the format.
"""
from __future__ import annotations

import os
import posixpath
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from utils.core.cli import available_cores
from utils.core.errors import UserError, shown
from utils.data.images import ImageSet

__all__ = ["BackdoorSplit", "CleanImages", "parse_split", "dataset_state", "need", "as_int"]

_CORES = available_cores()


def need(ok: bool, where, key: str, what: str) -> None:
    if not ok:
        raise UserError(f"{where}: '{key}' {what}; the record is damaged or not a BackdoorBench "
                        "attack record")


def as_int(value):
    is_int = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    return int(value) if is_int else None


class CleanImages(Protocol):
    """The clean split a backdoor set indexes: an ImageSet or a lazy utils.data.datasets.CleanSplit."""

    image_shape: tuple[int, int, int]  # (C, H, W)

    def __len__(self) -> int: ...

    def subset(self, index) -> ImageSet: ...


def parse_split(state, folder, key: str = "dataset state", num_classes: int = 2**31,
                where=None) -> "BackdoorSplit":
    """A dataset state dict of the record in `folder` as a BackdoorSplit: its fields present with
    usable types, and its original_index_array distinct indices into its poison_indicator.
    Nothing is decoded. Labels must be below num_classes (a record passes its own; without it any
    int32 label is read). Errors name `where` (default the folder) and `key`."""
    where = folder if where is None else where
    need(isinstance(state, Mapping), where, key, "must be a dataset state dict")
    for field in ("original_index_array", "poison_indicator", "bd_data_container"):
        need(field in state, where, f"{key}.{field}", "is missing")
    for field, kinds in (("original_index_array", "iu"), ("poison_indicator", "iubf")):
        arr = np.asarray(state[field])
        need(arr.ndim == 1 and (arr.dtype.kind in kinds or arr.size == 0), where,
             f"{key}.{field}", "must be a 1-D numeric array")
    order = np.asarray(state["original_index_array"]).astype(np.int64)
    n_flags = len(state["poison_indicator"])
    need(order.size == 0 or (order.min() >= 0 and order.max() < n_flags), where,
         f"{key}.original_index_array", f"must index its poison_indicator (0..{n_flags - 1})")
    need(np.unique(order).size == order.size, where, f"{key}.original_index_array",
         "repeats indices")
    container = state["bd_data_container"]
    need(isinstance(container, Mapping) and isinstance(container.get("data_dict"), Mapping),
         where, f"{key}.bd_data_container.data_dict", "must be a dict")
    poisoned = np.asarray(state["poison_indicator"])[order] == 1
    for arr in (order, poisoned):
        arr.setflags(write=False)  # shared by every decode: nobody may edit them in place
    return BackdoorSplit(Path(folder), order, poisoned, num_classes, container["data_dict"])


@dataclass(frozen=True, eq=False)
class BackdoorSplit:
    """One backdoor set of a record, checked but not decoded. Item i is the clean sample
    order[i]; where poisoned[i], its image and labels come from the record instead."""

    folder: Path  # the record folder its PNG paths are resolved against
    order: np.ndarray  # int64 [N], read-only: each item's index into the clean split
    poisoned: np.ndarray  # bool [N], read-only
    num_classes: int  # labels read from the record must be below it
    entries: Mapping  # BackdoorBench's data_dict as stored; checked when decoded

    def __len__(self) -> int:
        return len(self.order)

    def poisoned_positions(self) -> np.ndarray:
        return np.flatnonzero(self.poisoned)

    def sample_poisoned(self, count: int, generator: torch.Generator) -> np.ndarray:
        """Positions of `count` poisoned items drawn uniformly (one torch.randperm on generator),
        in clean-index order."""
        candidates = self.poisoned_positions()
        chosen = candidates[torch.randperm(len(candidates), generator=generator)[:count].numpy()]
        return chosen[np.argsort(self.order[chosen], kind="stable")]

    @cached_property
    def _by_index(self) -> dict:
        data = {as_int(k): v for k, v in self.entries.items()}
        need(None not in data, self.folder, "data_dict", "keys must be sample indices (ints)")
        return data

    def images(self, clean: CleanImages, positions=None) -> ImageSet:
        """Items `positions` (default all, in order) as an ImageSet with true labels, poison
        flags and clean indices. Only those items are decoded: the unpoisoned ones from `clean`,
        the poisoned ones from the record."""
        folder, n_clean = self.folder, len(clean)
        if self.order.size and self.order.max() >= n_clean:
            raise UserError(f"record {folder}: original_index_array points outside the clean data "
                            f"({n_clean} samples): the record was made on a different data set")
        channels, height, width = clean.image_shape
        if channels not in (1, 3):
            raise UserError(f"clean images have {channels} channels; records need 1 or 3")
        data = self._by_index
        positions = np.arange(len(self)) if positions is None else np.asarray(positions, np.int64)
        if positions.ndim != 1 or (positions.size and not 0 <= positions.min() <= positions.max()
                                   < len(self)):
            raise ValueError(f"positions must be a 1-D array within 0..{len(self) - 1}")
        order, flags = self.order[positions], self.poisoned[positions]
        n = len(positions)
        images = torch.empty((n, channels, height, width), dtype=torch.uint8)
        labels = torch.empty(n, dtype=torch.int64)
        true_labels = torch.empty(n, dtype=torch.int64)
        unpoisoned = torch.from_numpy(~flags)
        if unpoisoned.any():
            plain = clean.subset(order[~flags])
            images[unpoisoned], labels[unpoisoned] = plain.images, plain.labels
            true_labels[unpoisoned] = plain.labels
        decoded = _decode_all(order[flags].tolist(), data, folder, (channels, height, width),
                              self.num_classes)
        if decoded:
            where = torch.from_numpy(flags)
            arrays, bd_labels, originals = zip(*decoded)
            stacked = np.stack([a[:, :, None] if a.ndim == 2 else a for a in arrays])
            images[where] = torch.from_numpy(stacked).permute(0, 3, 1, 2)
            labels[where] = torch.tensor(bd_labels)
            true_labels[where] = torch.tensor(originals)
        return ImageSet(images, labels, true_labels, torch.from_numpy(flags.copy()),
                        torch.from_numpy(order.copy()))


def _decode_threads(height: int, width: int) -> int:
    """Threads for PNG decoding. zlib drops the GIL, but for images up to 32x32 PIL's per-image
    Python overhead dominates and threads only add contention (2 cores, 4,000 PNGs: 28x28 grey
    0.47 s with 1 thread, 0.67 s with 2; 32x32 RGB 0.62 s vs 0.61 s; 64x64 RGB, 2,000 PNGs:
    0.54 s vs 0.37 s). Encoding compresses, which is heavier, so it always uses the cores
    (9,000 28x28 PNGs: 7.2 s with 1 thread, 4.3 s with 2)."""
    return min(_CORES, 8) if height * width >= 64 * 64 else 1


def _decode_all(keys: list[int], data: dict, folder: Path, shape, num_classes: int) -> list:
    """(pixels HxW[xC], backdoor label, original label) of each data_dict entry in `keys`."""
    channels, height, width = shape
    mode = "L" if channels == 1 else "RGB"

    def pixels(img: Image.Image, where) -> np.ndarray:
        # The size before decoding: a damaged header must not make us decode a huge image.
        if img.size != (width, height):
            raise UserError(f"record {folder}: image {where} is {img.size[0]}x{img.size[1]} but "
                            f"the clean data are {width}x{height}: pick the data set the record "
                            "was made on")
        return np.array(_decoded(lambda: img.convert(mode), where))  # writable, for torch

    def decode(index: int):
        need(index in data, folder, f"data_dict[{index}]", "is missing for a poisoned sample")
        item = data[index]
        if isinstance(item, Mapping) and "path" in item:  # disk mode
            where = _resolve_png(item["path"], folder)
            info = item.get("other_info")
            # PNG only, whatever the name says: other PIL plugins (EPS runs Ghostscript) are
            # more attack surface than records need.
            with _decoded(lambda: Image.open(where, formats=["PNG"]), where) as img:
                array = pixels(img, where)
        elif isinstance(item, (tuple, list)) and len(item) >= 3:  # RAM mode
            where, info, img = f"data_dict[{index}]", item[1:3], item[0]
            if isinstance(img, np.ndarray):
                img = _decoded(lambda: Image.fromarray(item[0]), where)
            need(isinstance(img, Image.Image), folder, where, "must hold a PIL image")
            array = pixels(img, where)
        else:
            raise UserError(f"record {folder}: data_dict[{index}] is neither (image, label, label) "
                            "nor {'path', 'other_info'}; the record is damaged")
        need(isinstance(info, (tuple, list)) and len(info) >= 2, folder, f"{where} labels",
             "must be [backdoor_label, original_label]")
        return (array, _label(info[0], folder, where, num_classes),
                _label(info[1], folder, where, num_classes))

    # Decode in chunks (a task per image costs more than decoding a small PNG); the caller writes
    # the results with one indexed assignment per tensor rather than one per image.
    chunks = [keys[i:i + 256] for i in range(0, len(keys), 256)]
    with ThreadPoolExecutor(_decode_threads(height, width)) as pool:
        return [item for part in pool.map(lambda c: [decode(k) for k in c], chunks)
                for item in part]


def _label(value, folder, where: str, num_classes: int) -> int:
    label = as_int(value)
    need(label is not None and 0 <= label < num_classes, folder, f"{where} labels",
         f"must be class indices 0..{num_classes - 1}, got {shown(value, 40)}")
    return label


def _decoded(make_image, where) -> Image.Image:
    """make_image(), with whatever PIL raises on damaged image data as one UserError."""
    try:
        return make_image()
    except (OSError, ValueError, TypeError, SyntaxError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot decode image {where} ({type(e).__name__}: "
                        f"{shown(e)}): the record is damaged") from None


def _resolve_png(path: str, folder: Path) -> Path:
    """A data_dict path -> the file inside this record folder. BackdoorBench stores paths relative
    to its own root ('./record/<name>/bd_test_dataset/0/7.png'); the record may since have been
    renamed or moved, so the 'record/<name>/' head is dropped and the rest joined to the folder.
    Every candidate is the folder joined with a '..'-free path, so nothing outside it is read
    (except an absolute path that exists, which the record's author may have written)."""
    p = str(path).replace("\\", "/")
    if os.path.isabs(p):
        if ".." in p.split("/"):
            raise UserError(f"record {folder}: image path {shown(path)} contains '..'; the record "
                            "is damaged or malicious")
        if _is_file(Path(p)):
            return Path(p)
    rel = posixpath.normpath(p.lstrip("/"))
    if rel == ".." or rel.startswith("../"):
        raise UserError(f"record {folder}: image path {shown(path)} points outside the record "
                        "folder; the record is damaged or malicious")
    parts = rel.split("/")
    tails = [parts[2:]] if parts[0] == "record" and len(parts) > 2 else []
    tails.append(parts)
    # Nested record names ('./record/a/b/bd_test_dataset/...'): anchor at the split folder.
    tails += [parts[i:] for i, part in enumerate(parts) if part.endswith("_dataset")][:1]
    for tail in tails:
        candidate = folder.joinpath(*tail)
        if _is_file(candidate):
            return candidate
    raise UserError(f"image {shown(folder.joinpath(*tails[0]), 300)} (stored as {shown(path)}) is "
                    "missing: copy the record's bd_*_dataset folders along with attack_result.pt")


def _is_file(path: Path) -> bool:
    """Path.is_file, but a name the OS refuses (too long, NUL byte) is simply not a file."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def dataset_state(bd: ImageSet, full_length: int, record_name: str, split: str,
                  record_folder, mode: str = "disk") -> dict:
    """BackdoorBench's retrieve_state() for `bd` (what parse_split reads back). Disk mode writes
    each poisoned image to <record_folder>/<split>_dataset/<true_label>/<index>.png."""
    if split not in ("bd_train", "bd_test") or mode not in ("disk", "ram"):
        raise ValueError(f"split must be bd_train/bd_test and mode disk/ram, got {split}, {mode}")
    if bd.index is None or bd.poisoned is None or bd.channels not in (1, 3):
        raise ValueError("dataset_state needs index and poisoned, and 1- or 3-channel images")
    order = bd.index.cpu().numpy().astype(np.int64)
    flags = bd.poisoned.cpu().numpy().astype(bool)
    indicator = np.zeros(full_length, dtype=np.float64)
    indicator[order[flags]] = 1.0
    true_labels = bd.true_labels if bd.true_labels is not None else bd.labels
    save_path = f"./record/{record_name}/{split}_dataset" if mode == "disk" else None

    def entry(i: int):
        index, bd_label, true_label = int(order[i]), int(bd.labels[i]), int(true_labels[i])
        arr = bd.images[i].cpu().permute(1, 2, 0).numpy()
        img = Image.fromarray(np.ascontiguousarray(arr[:, :, 0] if arr.shape[2] == 1 else arr))
        if mode == "ram":
            return np.int64(index), (img, bd_label, true_label)
        rel = f"{split}_dataset/{true_label}/{index}.png"
        # No temp-file dance per image: attack_result.pt, written last and atomically, is what
        # makes a record exist, so an interrupted save leaves no usable half-record.
        img.save(Path(record_folder) / rel, format="PNG")
        return np.int64(index), {"path": f"./record/{record_name}/{rel}",
                                 "other_info": [bd_label, true_label]}

    for label in set(true_labels[bd.poisoned].tolist()) if mode == "disk" else ():
        (Path(record_folder) / f"{split}_dataset" / str(label)).mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(min(_CORES, 8)) as pool:
        data_dict = dict(pool.map(entry, np.flatnonzero(flags).tolist()))
    return {"bd_data_container": {"save_folder_path": save_path, "data_dict": data_dict,
                                  "save_file_format": ".png"},
            "getitem_all": True, "getitem_all_switch": False,
            "original_index_array": order, "poison_indicator": indicator,
            "save_folder_path": save_path}
