"""Read and write BackdoorBench attack records (`record/<name>/attack_result.pt`) safely.

Records are loaded with the allowlisted unpickler of utils/data/unpickle.py; everything read from them
is then checked before use: types and shapes, index arrays within the clean data and without
repeats, labels within the classes, finite weights and BatchNorm variances >= 0, poisoned images
decoded as PNG only and size-checked before decoding. What we write is plain data (dicts, numpy
arrays, numpy int64 keys, str/int/list/tuple, CPU tensors) so BackdoorBench and the ULRL code load
it as is.
See shared/reference/backdoorbench.md for the format.
"""
from __future__ import annotations

import logging
import os
import posixpath
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models import strip_module_prefix
from utils.core.cli import available_cores
from utils.core.errors import UserError, shown
from utils.core.io import torch_save
from utils.data.images import ImageSet
from utils.data.unpickle import safe_load

__all__ = ["RECORD_FILE", "AttackRecord", "safe_load", "load_attack_record",
           "backdoor_set", "dataset_state", "save_attack_record", "save_defense_result",
           "load_defense_result"]

log = logging.getLogger("backdoor")

RECORD_FILE = "attack_result.pt"
_CORES = available_cores()


def _decode_threads(height: int, width: int) -> int:
    """Threads for PNG decoding. zlib drops the GIL, but for images up to 32x32 PIL's per-image
    Python overhead dominates and threads only add contention (2 cores, 4,000 PNGs: 28x28 grey
    0.47 s with 1 thread, 0.67 s with 2; 32x32 RGB 0.62 s vs 0.61 s; 64x64 RGB, 2,000 PNGs:
    0.54 s vs 0.37 s). Encoding compresses, which is heavier, so it always uses the cores
    (9,000 28x28 PNGs: 7.2 s with 1 thread, 4.3 s with 2)."""
    return min(_CORES, 8) if height * width >= 64 * 64 else 1


@dataclass
class AttackRecord:
    folder: Path  # record folder (where attack_result.pt is)
    model_name: str
    num_classes: int
    state_dict: dict[str, torch.Tensor]  # 'module.' prefixes stripped
    data_path: str
    img_size: tuple[int, int, int]  # (H, W, C)
    clean_data: str
    bd_train: dict | None  # raw dataset state, see backdoor_set
    bd_test: dict


def _need(ok: bool, where, key: str, what: str) -> None:
    if not ok:
        raise UserError(f"{where}: '{key}' {what}; the record is damaged or not a BackdoorBench "
                        "attack record")


def _as_int(value):
    is_int = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    return int(value) if is_int else None


def _check_state_dict(sd, where, key: str) -> dict:
    _need(isinstance(sd, Mapping) and len(sd) > 0, where, key, "must be a non-empty state dict")
    bad = [k for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)
           or v.layout != torch.strided or v.is_complex() or v.is_quantized]
    _need(not bad, where, key, f"must map names to dense real tensors (bad entry "
                               f"'{shown(bad[0]) if bad else ''}')")
    broken = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    _need(not broken, where, f"{key}.{shown(broken[0]) if broken else ''}",
          "holds NaN or inf values (not finite): the weights are broken")
    negative = [k for k, v in sd.items() if k.endswith("running_var") and bool((v < 0).any())]
    _need(not negative, where, f"{key}.{shown(negative[0]) if negative else ''}",
          "holds a negative BatchNorm variance: the weights are broken")
    return strip_module_prefix(sd)


def _check_state(state, where, key: str) -> None:
    """A dataset state must have the fields backdoor_set reads, with usable types, and its
    original_index_array must be distinct indices into its poison_indicator."""
    _need(isinstance(state, Mapping), where, key, "must be a dataset state dict")
    for field in ("original_index_array", "poison_indicator", "bd_data_container"):
        _need(field in state, where, f"{key}.{field}", "is missing")
    for field, kinds in (("original_index_array", "iu"), ("poison_indicator", "iubf")):
        arr = np.asarray(state[field])
        _need(arr.ndim == 1 and (arr.dtype.kind in kinds or arr.size == 0), where,
              f"{key}.{field}", "must be a 1-D numeric array")
    order = np.asarray(state["original_index_array"]).astype(np.int64)
    n_flags = len(state["poison_indicator"])
    _need(order.size == 0 or (order.min() >= 0 and order.max() < n_flags), where,
          f"{key}.original_index_array", f"must index its poison_indicator (0..{n_flags - 1})")
    _need(np.unique(order).size == order.size, where, f"{key}.original_index_array",
          "repeats indices")
    container = state["bd_data_container"]
    _need(isinstance(container, Mapping) and isinstance(container.get("data_dict"), Mapping),
          where, f"{key}.bd_data_container.data_dict", "must be a dict")


def poisoned_order(state, n_clean: int, folder) -> tuple[np.ndarray, np.ndarray]:
    """A dataset state's original_index_array, checked against the clean data it indexes, and
    which of its entries are poisoned."""
    _check_state(state, folder, "dataset state")
    order = np.asarray(state["original_index_array"]).astype(np.int64)
    if order.size and order.max() >= n_clean:
        raise UserError(f"record {folder}: original_index_array points outside the clean data "
                        f"({n_clean} samples): the record was made on a different data set")
    return order, np.asarray(state["poison_indicator"])[order] == 1


def load_attack_record(folder, trust: bool = False) -> AttackRecord:
    folder = Path(folder)
    if folder.name == RECORD_FILE and folder.is_file():  # also accept the .pt path itself
        folder = folder.parent
    file = folder / RECORD_FILE
    rec = safe_load(file, trust=trust)
    _need(isinstance(rec, Mapping), file, "attack_result", "must be a dict")
    for key in ("model_name", "num_classes", "model", "data_path", "img_size", "clean_data",
                "bd_test"):
        _need(key in rec, file, key, "is missing")
    for key in ("model_name", "data_path", "clean_data"):
        _need(isinstance(rec[key], str) and rec[key] != "", file, key, "must be a non-empty string")
    num_classes = _as_int(rec["num_classes"])
    _need(num_classes is not None and num_classes > 1, file, "num_classes", "must be an int > 1")
    size = rec["img_size"]
    size = tuple(_as_int(s) for s in size) if isinstance(size, (tuple, list)) else ()
    _need(len(size) == 3 and all(s is not None and s > 0 for s in size), file, "img_size",
          "must be (H, W, C) positive ints")
    _check_state(rec["bd_test"], file, "bd_test")
    bd_train = rec.get("bd_train")  # BackdoorBench writes None when it did not keep it
    if bd_train is not None:
        _check_state(bd_train, file, "bd_train")
    return AttackRecord(folder=folder, model_name=rec["model_name"], num_classes=num_classes,
                        state_dict=_check_state_dict(rec["model"], file, "model"),
                        data_path=rec["data_path"], img_size=size, clean_data=rec["clean_data"],
                        bd_train=bd_train, bd_test=rec["bd_test"])


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


def _label(value, folder, where: str, num_classes: int) -> int:
    label = _as_int(value)
    _need(label is not None and 0 <= label < num_classes, folder, f"{where} labels",
          f"must be class indices 0..{num_classes - 1}, got {shown(value, 40)}")
    return label


def backdoor_set(state: dict, clean: ImageSet, record_folder,
                 num_classes: int | None = None) -> ImageSet:
    """A BackdoorBench dataset state as an ImageSet, in original_index_array order: poisoned items
    come from the record's container, the others from `clean` at the same index. Labels must be
    below num_classes (a defense passes the record's; without it, any int32 label is read)."""
    folder = Path(record_folder)
    n_clean, channels, height, width = clean.images.shape
    order, flags = poisoned_order(state, n_clean, folder)
    num_classes = 2**31 if num_classes is None else num_classes
    if channels not in (1, 3):
        raise UserError(f"clean images have {channels} channels; records need 1 or 3")
    mode = "L" if channels == 1 else "RGB"
    data = {_as_int(k): v for k, v in state["bd_data_container"]["data_dict"].items()}
    _need(None not in data, folder, "data_dict", "keys must be sample indices (ints)")

    idx = torch.from_numpy(order)
    images = clean.images[idx].clone()
    labels = clean.labels[idx].clone()
    true_labels = labels.clone()
    poisoned = torch.from_numpy(flags)

    def pixels(img: Image.Image, where) -> np.ndarray:
        # The size before decoding: a damaged header must not make us decode a huge image.
        if img.size != (width, height):
            raise UserError(f"record {folder}: image {where} is {img.size[0]}x{img.size[1]} but "
                            f"the clean data are {width}x{height}: pick the data set the record "
                            "was made on")
        return np.array(_decoded(lambda: img.convert(mode), where))  # writable, for torch

    def decode(index: int):
        _need(index in data, folder, f"data_dict[{index}]", "is missing for a poisoned sample")
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
            _need(isinstance(img, Image.Image), folder, where, "must hold a PIL image")
            array = pixels(img, where)
        else:
            raise UserError(f"record {folder}: data_dict[{index}] is neither (image, label, label) "
                            "nor {'path', 'other_info'}; the record is damaged")
        _need(isinstance(info, (tuple, list)) and len(info) >= 2, folder, f"{where} labels",
              "must be [backdoor_label, original_label]")
        return (array, _label(info[0], folder, where, num_classes),
                _label(info[1], folder, where, num_classes))

    where_poisoned = torch.nonzero(poisoned).flatten()
    keys = order[where_poisoned.numpy()].tolist()
    # Decode in chunks (a task per image costs more than decoding a small PNG) and write the
    # results with one indexed assignment per tensor rather than one per image.
    chunks = [keys[i:i + 256] for i in range(0, len(keys), 256)]
    with ThreadPoolExecutor(_decode_threads(height, width)) as pool:
        decoded = [item for part in pool.map(lambda c: [decode(k) for k in c], chunks)
                   for item in part]
    if decoded:
        arrays, bd_labels, originals = zip(*decoded)
        stacked = np.stack([a[:, :, None] if a.ndim == 2 else a for a in arrays])
        images[where_poisoned] = torch.from_numpy(stacked).permute(0, 3, 1, 2)
        labels[where_poisoned] = torch.tensor(bd_labels)
        true_labels[where_poisoned] = torch.tensor(originals)
    return ImageSet(images, labels, true_labels, poisoned, idx.clone())


def _decoded(make_image, where) -> Image.Image:
    """make_image(), with whatever PIL raises on damaged image data as one UserError."""
    try:
        return make_image()
    except (OSError, ValueError, TypeError, SyntaxError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot decode image {where} ({type(e).__name__}: "
                        f"{shown(e)}): the record is damaged") from None


def dataset_state(bd: ImageSet, full_length: int, record_name: str, split: str,
                  record_folder, mode: str = "disk") -> dict:
    """BackdoorBench's retrieve_state() for `bd` (inverse of backdoor_set). Disk mode writes each
    poisoned image to <record_folder>/<split>_dataset/<true_label>/<index>.png."""
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


def _cpu_state(state_dict) -> dict:
    return {k: v.detach().cpu() for k, v in state_dict.items()}


def save_attack_record(folder, *, model_name, num_classes, state_dict, clean_data, img_size,
                       bd_train: ImageSet | None, bd_test: ImageSet, train_length: int,
                       test_length: int, mode: str = "disk", record_name: str | None = None) -> Path:
    """Write a record BackdoorBench can load: PNG trees first, then attack_result.pt atomically.
    record_name (default: the folder's name) is the name the PNG paths carry, for a record built in
    a temporary folder and renamed into place."""
    folder = Path(folder)
    name = record_name or folder.name
    train = None if bd_train is None else dataset_state(bd_train, train_length, name, "bd_train",
                                                        folder, mode)
    test = dataset_state(bd_test, test_length, name, "bd_test", folder, mode)
    path = folder / RECORD_FILE
    torch_save(path, {"model_name": str(model_name), "num_classes": int(num_classes),
                      "model": _cpu_state(state_dict), "data_path": f"./data/{clean_data}",
                      "img_size": tuple(int(s) for s in img_size), "clean_data": str(clean_data),
                      "bd_train": train, "bd_test": test})
    return path


def save_defense_result(path, *, model_name, num_classes, state_dict) -> None:
    torch_save(path, {"model_name": str(model_name), "num_classes": int(num_classes),
                      "model": _cpu_state(state_dict)})


def load_defense_result(path, trust: bool = False) -> dict:
    """{model_name, num_classes, model} with the model's 'module.' prefixes stripped."""
    result = safe_load(path, trust=trust)
    _need(isinstance(result, Mapping), path, "defense_result", "must be a dict")
    for key in ("model_name", "num_classes", "model"):
        _need(key in result, path, key, "is missing")
    num_classes = _as_int(result["num_classes"])
    _need(num_classes is not None and num_classes > 1, path, "num_classes", "must be an int > 1")
    return {**result, "num_classes": num_classes,
            "model": _check_state_dict(result["model"], path, "model")}
