"""Read and write BackdoorBench attack records (`record/<name>/attack_result.pt`) safely.

Records are loaded with the allowlisted unpickler of utils/data/unpickle.py; everything read from them
is then checked before use: types and shapes, index arrays within the clean data and without
repeats, labels within the classes, finite weights and BatchNorm variances >= 0, poisoned images
decoded as PNG only and size-checked before decoding. A loaded record is typed: its backdoor sets
are utils/data/split.py's BackdoorSplit, decoded only where a caller asks, so nothing outside the
data layer reads BackdoorBench's dicts. What we write is plain data (dicts, numpy arrays, numpy
int64 keys, str/int/list/tuple, CPU tensors) so BackdoorBench and the ULRL code load it as is.
See shared/reference/backdoorbench.md for the format.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from models import state_dict_problem, strip_module_prefix
from utils.core.io import torch_save
from utils.data.images import ImageSet
from utils.data.split import BackdoorSplit, as_int, dataset_state, need, parse_split
from utils.data.unpickle import safe_load

__all__ = ["RECORD_FILE", "AttackRecord", "BackdoorSplit", "safe_load", "load_attack_record",
           "save_attack_record", "save_defense_result", "load_defense_result"]

log = logging.getLogger("backdoor")

RECORD_FILE = "attack_result.pt"


@dataclass
class AttackRecord:
    folder: Path  # record folder (where attack_result.pt is)
    model_name: str
    num_classes: int
    state_dict: dict[str, torch.Tensor]  # 'module.' prefixes stripped
    data_path: str
    img_size: tuple[int, int, int]  # (H, W, C)
    clean_data: str
    bd_train: BackdoorSplit | None  # None where BackdoorBench did not keep it
    bd_test: BackdoorSplit


def _check_state_dict(sd, where, key: str) -> dict:
    need(isinstance(sd, Mapping) and len(sd) > 0, where, key, "must be a non-empty state dict")
    problem = state_dict_problem(sd)
    need(problem is None, where, key, f"entry '{problem[0]}' {problem[1]}" if problem else "")
    return strip_module_prefix(sd)


def load_attack_record(folder, trust: bool = False) -> AttackRecord:
    folder = Path(folder)
    if folder.name == RECORD_FILE and folder.is_file():  # also accept the .pt path itself
        folder = folder.parent
    file = folder / RECORD_FILE
    rec = safe_load(file, trust=trust)
    need(isinstance(rec, Mapping), file, "attack_result", "must be a dict")
    for key in ("model_name", "num_classes", "model", "data_path", "img_size", "clean_data",
                "bd_test"):
        need(key in rec, file, key, "is missing")
    for key in ("model_name", "data_path", "clean_data"):
        need(isinstance(rec[key], str) and rec[key] != "", file, key, "must be a non-empty string")
    num_classes = as_int(rec["num_classes"])
    need(num_classes is not None and num_classes > 1, file, "num_classes", "must be an int > 1")
    size = rec["img_size"]
    size = tuple(as_int(s) for s in size) if isinstance(size, (tuple, list)) else ()
    need(len(size) == 3 and all(s is not None and s > 0 for s in size), file, "img_size",
         "must be (H, W, C) positive ints")
    bd_test = parse_split(rec["bd_test"], folder, "bd_test", num_classes, where=file)
    bd_train = rec.get("bd_train")  # BackdoorBench writes None when it did not keep it
    if bd_train is not None:
        bd_train = parse_split(bd_train, folder, "bd_train", num_classes, where=file)
    return AttackRecord(folder=folder, model_name=rec["model_name"], num_classes=num_classes,
                        state_dict=_check_state_dict(rec["model"], file, "model"),
                        data_path=rec["data_path"], img_size=size, clean_data=rec["clean_data"],
                        bd_train=bd_train, bd_test=bd_test)


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
    need(isinstance(result, Mapping), path, "defense_result", "must be a dict")
    for key in ("model_name", "num_classes", "model"):
        need(key in result, path, key, "is missing")
    num_classes = as_int(result["num_classes"])
    need(num_classes is not None and num_classes > 1, path, "num_classes", "must be an int > 1")
    return {**result, "num_classes": num_classes,
            "model": _check_state_dict(result["model"], path, "model")}
