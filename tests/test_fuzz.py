"""Fuzzed records: every mutation of a valid record either loads or raises UserError.

A record comes from the party the defender distrusts, so the loading path of a defense (the record
file, its poisoned PNGs, the model built from it: everything `DefenseRun` does before training) is
fed seeded random mutations of valid records: deleted and extra keys, values of another type,
arrays and tensors of other shapes and dtypes, odd numbers and strings, byte flips, truncations and
zeroed spans of the file, damaged PNGs; and, for half of the object mutations, the same structure
with a hostile layout (stride-0, transposed or oversized views, other dtypes, reshapes) or label
values outside the classes. Each case must end in a load or a UserError, never another
exception, and within a time limit. Three valid bases: disk mode (PNG trees), RAM mode (pickled PIL
images), RAM mode in torch's legacy (non-zip) format.

    python -m pytest -q tests/test_fuzz.py              # 60 cases (FUZZ_CASES=n for n)
    python -m pytest -q -s -m slow tests/test_fuzz.py   # 1,000 other cases, prints a summary
"""
from __future__ import annotations

import faulthandler
import io
import logging
import math
import os
import pickletools
import random
import re
import shutil
import signal
import time
import traceback
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models import build_model
from tests.helpers import write_fashion_mnist
from utils.core.cli import log, setup_console_logging
from utils.core.config import parse_config
from utils.core.errors import UserError
from utils.data.datasets import load_clean_dataset
from utils.data.images import ImageSet
from utils.data.record import RECORD_FILE, save_attack_record
from utils.defenses.run import DEFENSE_OPTIONS, DefenseRun

DEFAULT_CASES = 60
CASE_LIMIT_S = 20  # a case is a hang past this (a normal case takes well under a second)
DELETE = object()


class CaseTimeout(BaseException):
    """Raised by the alarm: a BaseException, so no `except Exception` in the code under test
    can mistake it for a damaged file."""


# ---------------------------------------------------------------- the valid bases

def _bases(root: Path) -> dict[str, Path]:
    """Three valid records of a 32 + 16 image Fashion-MNIST stand-in under root/data."""
    write_fashion_mnist(root / "data", n_train=32, n_test=16)
    train, test = (load_clean_dataset("fashion_mnist", root / "data", t) for t in (True, False))
    torch.manual_seed(0)
    state = build_model("smallcnn", 10, in_channels=1, image_size=28).state_dict()

    def poisoned(clean: ImageSet, every: int) -> ImageSet:
        flags = torch.arange(len(clean)) % every == 0
        images = clean.images.clone()
        images[flags, :, -3:, -3:] = 255
        labels = torch.where(flags, torch.zeros_like(clean.labels), clean.labels)
        return ImageSet(images, labels, clean.labels.clone(), flags, torch.arange(len(clean)))

    bases = {}
    for name, mode in (("disk", "disk"), ("ram", "ram"), ("legacy", "ram")):
        folder = root / "records" / name
        save_attack_record(folder, model_name="smallcnn", num_classes=10, state_dict=state,
                           clean_data="fashion_mnist", img_size=(28, 28, 1),
                           bd_train=poisoned(train, 4), bd_test=poisoned(test, 1),
                           train_length=len(train), test_length=len(test), mode=mode)
        if name == "legacy":
            path = folder / RECORD_FILE
            torch.save(torch.load(path, weights_only=False), path,
                       _use_new_zipfile_serialization=False)
            path.write_bytes(_fixed_storage_keys(path.read_bytes()))
        bases[name] = folder
    return bases


def _fixed_storage_keys(raw: bytes) -> bytes:
    """The legacy format names storages by memory address; renaming them to counters of the same
    length in order of appearance makes its pickles the same on every run (the raw storages after
    them stay in address order), so byte-level cases there reproduce."""
    keys = dict.fromkeys(m.group(2) for m in re.finditer(rb"X(.)\x00\x00\x00(\d{8,20})", raw)
                         if m.group(1)[0] == len(m.group(2)))
    for i, key in enumerate(keys):
        raw = raw.replace(key, str(i).zfill(len(key)).encode())
    return raw


# ---------------------------------------------------------------- mutations of the unpickled record

def _paths(obj, prefix=()):
    """Every path (tuple of keys / positions) to a node inside dicts, lists and tuples."""
    items = obj.items() if isinstance(obj, dict) else \
        enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for key, value in items:
        yield prefix + (key,)
        yield from _paths(value, prefix + (key,))


def _replace(obj, path, fn):
    """A copy of `obj` with the node at `path` replaced by fn(node) (removed if fn returns DELETE);
    tuples are rebuilt, so nodes inside them can be replaced too."""
    key, rest = path[0], path[1:]
    new = fn(obj[key]) if not rest else _replace(obj[key], rest, fn)
    if isinstance(obj, dict):
        out = dict(obj)
        if new is DELETE:
            del out[key]
        else:
            out[key] = new
        return out
    items = list(obj)
    if new is DELETE:
        del items[key]
    else:
        items[key] = new
    return type(obj)(items) if isinstance(obj, tuple) else items


def _odd_value(rng: random.Random):
    return rng.choice([
        None, True, False, 0, -1, 7, 2**31, 2**63 - 1, 2**64, -2**70, 1.5, math.nan, math.inf,
        -math.inf, "", "smallcnn", "x" * 3000, "a\x00b", b"\x00\xff", [], [1, "a"], {}, {"a": 1},
        {1: 2}, (), (28, 28), (28, 28, 1, 1), np.int64(3), np.float64(2.5), np.bool_(True),
        np.zeros(0), np.arange(5), np.zeros((2, 3), np.float32), np.array(["a", "b"]),
        np.full(3, np.nan), torch.zeros(0), torch.ones(3), torch.full((2, 2), math.nan),
        torch.ones(2, dtype=torch.int8), torch.ones(2, dtype=torch.complex64),
        torch.ones(2).to_sparse(), Image.new("L", (3, 5)), Image.new("RGB", (28, 28)),
        Image.new("I;16", (28, 28)), Image.new("F", (28, 28)),
    ])


def _odd_array(node, rng: random.Random):
    """Another shape, dtype or content for a numpy array or a tensor."""
    arr = node.numpy() if isinstance(node, torch.Tensor) and node.layout == torch.strided \
        else np.asarray(node)
    choice = rng.randrange(7)
    if choice == 0:
        arr = arr.reshape(-1)[: rng.randrange(arr.size + 1)]
    elif choice == 1:
        arr = np.concatenate([arr.reshape(-1)] * 2)
    elif choice == 2:
        arr = arr.reshape(1, -1) if arr.ndim == 1 else arr.reshape(-1)
    elif choice == 3:
        kind = rng.choice([np.float16, np.float32, np.int8, np.uint8, np.int32, np.uint64,
                           np.bool_, np.complex64, np.str_])
        arr = arr.astype(kind)
    elif choice == 4:
        arr = arr.astype(np.float64) * rng.choice([-1, math.nan, math.inf, 1e12])
    elif choice == 5:
        arr = np.zeros((0,) + arr.shape[1:], arr.dtype)
    else:
        arr = arr.reshape(-1)[::-1].copy() if arr.size else arr
    if isinstance(node, torch.Tensor) and arr.dtype.kind != "U":
        return torch.from_numpy(np.ascontiguousarray(arr))
    return arr


def _odd_number(node, rng: random.Random):
    return rng.choice([-1, 0, 1, 2**40, 2**63 - 1, 2**64, math.nan, math.inf, 1.5, True,
                       type(node)(node) + 1 if not isinstance(node, bool) else 2])


def _odd_string(node: str, rng: random.Random):
    return rng.choice(["", "..", "/etc/passwd", "../" * 8 + "outside.png", "x" * 5000,
                       "a\x00b", node + "\u00e9\u4e2d", node[: len(node) // 2], node.upper(),
                       "./record/other/bd_test_dataset/0/1.png", "cifar10", "vit_b_16",
                       "preactresnet18", "mnist"])


def _odd_layout(node, rng: random.Random):
    """The same values or shape in a layout a hostile writer could choose: a stride-0 or
    transposed view, a larger view of the same storage, another dtype, a reshaped copy."""
    tensor = node if isinstance(node, torch.Tensor) else torch.from_numpy(np.asarray(node).copy())
    if tensor.numel() == 0 or tensor.layout != torch.strided:
        return node
    flat = tensor.reshape(-1)
    choice = rng.randrange(5)
    if choice == 0:
        return flat[:1].expand(rng.choice([2, flat.numel() * 3, 10**6]))
    if choice == 1:
        return tensor.t() if tensor.dim() == 2 else flat[::2]
    if choice == 2:  # the shape stays, the storage behind it shrinks
        out = flat.clone()
        out.untyped_storage().resize_(out.untyped_storage().nbytes() // 2)
        return out
    if choice == 3:
        kind = rng.choice([torch.float16, torch.int8, torch.int16, torch.uint8, torch.bool,
                           torch.float64])
        return flat.to(kind).reshape(tensor.shape)
    return flat.reshape(-1, 1) if tensor.dim() == 1 else flat.clone()


def _odd_label(node, rng: random.Random):
    """other_info [backdoor_label, original_label] with one label outside the classes."""
    labels = list(node)
    labels[rng.randrange(2)] = rng.choice([-1, 10, 11, 255, 2**31, np.int64(-5), np.uint8(200)])
    return labels


def mutate_object(rec, rng: random.Random) -> tuple[str, object]:
    """One structural mutation of the unpickled record: (kind, new record). Half keep the
    structure and change only layouts or label values."""
    paths = list(_paths(rec))
    if rng.random() < 0.5:
        return _mutate_keeping_structure(rec, paths, rng)
    kind = rng.choice(["delete", "extra", "type", "array", "number", "string"])
    leaves = {
        "array": [p for p in paths if isinstance(_get(rec, p), (np.ndarray, torch.Tensor))],
        "number": [p for p in paths if isinstance(_get(rec, p), (int, float, np.number))],
        "string": [p for p in paths if isinstance(_get(rec, p), str)],
    }
    if kind in leaves:
        fix = {"array": _odd_array, "number": _odd_number, "string": _odd_string}[kind]
        path = rng.choice(leaves[kind])
        return kind, _replace(rec, path, lambda node: fix(node, rng))
    if kind == "delete":
        return kind, _replace(rec, rng.choice(paths), lambda node: DELETE)
    if kind == "type":
        return kind, _replace(rec, rng.choice(paths), lambda node: _odd_value(rng))
    dicts = [()] + [p for p in paths if isinstance(_get(rec, p), dict)]
    where = rng.choice(dicts)
    key = rng.choice(["extra", "model_name", 5, np.int64(99), "module.x", ""])

    def add(node):
        return {**node, key: _odd_value(rng)}
    return kind, add(rec) if where == () else _replace(rec, where, add)


def _mutate_keeping_structure(rec, paths, rng: random.Random) -> tuple[str, object]:
    arrays = [p for p in paths if isinstance(_get(rec, p), (np.ndarray, torch.Tensor))]
    labels = [p for p in paths if p[-1] == "other_info" or (
        len(p) > 1 and isinstance(_get(rec, p[:-1]), tuple) and p[-1] in (1, 2))]
    if labels and rng.random() < 0.3:
        path = rng.choice(labels)
        if path[-1] == "other_info":
            return "label_value", _replace(rec, path, lambda node: _odd_label(node, rng))
        return "label_value", _replace(rec, path, lambda node: _odd_label([node, 0], rng)[0])
    return "layout", _replace(rec, rng.choice(arrays), lambda node: _odd_layout(node, rng))


def _get(obj, path):
    for key in path:
        obj = obj[key]
    return obj


def pickle_region(raw: bytes) -> tuple[int, int]:
    """Where the record's object pickle lies in a torch file (flips there change structure; flips
    elsewhere mostly change tensor values): the data.pkl member of the zip format, or the header
    and object pickles of the legacy format (its raw storages follow in address order, so flips
    there would not reproduce)."""
    if raw[:2] == b"PK":
        with zipfile.ZipFile(io.BytesIO(raw)) as archive:
            info = next(i for i in archive.infolist() if i.filename.endswith("/data.pkl"))
        head = info.header_offset  # local header: 30 bytes, then name and extra field
        start = head + 30 + int.from_bytes(raw[head + 26:head + 28], "little") \
            + int.from_bytes(raw[head + 28:head + 30], "little")
        return start, start + info.compress_size
    stream = io.BytesIO(raw)
    for _ in range(4):  # magic number, protocol version, system info, the object itself
        for _ in pickletools.genops(stream):
            pass
    return 0, stream.tell()


def mutate_bytes(raw: bytes, rng: random.Random, region: tuple[int, int] | None = None
                 ) -> tuple[str, bytes]:
    """Flip bits, truncate, zero or duplicate a span, at offsets inside `region` (default: all)."""
    data = bytearray(raw)
    low, high = region or (0, len(data))
    choice = rng.randrange(4)
    if choice == 0:
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(low, high)] ^= 1 << rng.randrange(8)
        return "byte_flip", bytes(data)
    if choice == 1:
        return "truncate", bytes(data[: rng.randrange(low, high)])
    start = rng.randrange(low, high)
    span = slice(start, min(start + rng.randint(1, 64), high))
    if choice == 2:
        data[span] = bytes(len(data[span]))
        return "zero_span", bytes(data)
    return "duplicate_span", bytes(data[: span.stop] + data[span] + data[span.stop:])


# ---------------------------------------------------------------- running the cases

def _load_like_the_defense(folder: Path, data_root: Path) -> None:
    cfg = parse_config(DEFENSE_OPTIONS, "fuzz", [
        "--result_file", folder.name, "--record_dir", str(folder.parent), "--dataset_path",
        str(data_root), "--device", "cpu", "--ratio", "1", "--threads", "1"])
    with DefenseRun(cfg, "fuzz"):
        pass


def _on_alarm(signum, frame):
    raise CaseTimeout()


def run_cases(root: Path, count: int, seed: int = 0) -> dict:
    """Run `count` cases; returns outcome counts, failures and timing."""
    bases = _bases(root)
    raw = {name: (folder / RECORD_FILE).read_bytes() for name, folder in bases.items()}
    objects = {name: torch.load(folder / RECORD_FILE, weights_only=False)
               for name, folder in bases.items()}
    regions = {name: pickle_region(data) for name, data in raw.items()}
    pngs = sorted((bases["disk"]).rglob("*.png"))
    outcomes, failures, slowest = Counter(), [], 0.0
    setup_console_logging()
    level = log.level
    log.setLevel(logging.CRITICAL)  # a thousand "loading record ..." lines help nobody
    old_handler = signal.signal(signal.SIGALRM, _on_alarm)
    try:
        for case in range(count):
            rng = random.Random(f"{seed}-{case}")
            base = rng.choice(sorted(bases))
            folder, path = bases[base], bases[base] / RECORD_FILE
            restore = None
            what = rng.random()
            if what < 0.55:
                kind, obj = mutate_object(objects[base], rng)
                torch.save(obj, path, _use_new_zipfile_serialization=base != "legacy")
            elif what < 0.9 or base != "disk":
                in_pickle = base == "legacy" or rng.random() < 0.5
                kind, data = mutate_bytes(raw[base], rng, regions[base] if in_pickle else None)
                kind += "_pickle" if in_pickle else "_file"
                path.write_bytes(data)
            else:
                restore = rng.choice(pngs)
                original = restore.read_bytes()
                kind, data = mutate_bytes(original, rng)
                kind = "png_" + kind
                restore.write_bytes(data)
            start = time.perf_counter()
            faulthandler.dump_traceback_later(3 * CASE_LIMIT_S, exit=True)  # a hang in C code
            signal.setitimer(signal.ITIMER_REAL, CASE_LIMIT_S)
            try:
                _load_like_the_defense(folder, root / "data")
                outcome = "loaded"
            except UserError as e:
                outcome = "UserError"
                if "\n" in str(e):
                    failures.append((case, base, kind, f"multi-line message: {e!r}"))
            except CaseTimeout:
                outcome = "timeout"
                failures.append((case, base, kind, f"no result within {CASE_LIMIT_S} s"))
            except Exception as e:  # noqa: BLE001 - exactly what this test looks for
                outcome = type(e).__name__
                failures.append((case, base, kind, traceback.format_exc(limit=-3)))
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
                faulthandler.cancel_dump_traceback_later()
            slowest = max(slowest, time.perf_counter() - start)
            outcomes[(kind, outcome)] += 1
            path.write_bytes(raw[base])
            if restore is not None:
                restore.write_bytes(original)
            shutil.rmtree(folder / "defense", ignore_errors=True)
    finally:
        signal.signal(signal.SIGALRM, old_handler)
        log.setLevel(level)
    return {"outcomes": outcomes, "failures": failures, "slowest_s": slowest}


def _report(result: dict, count: int, seconds: float) -> str:
    by_outcome = Counter()
    for (kind, outcome), n in result["outcomes"].items():
        by_outcome[outcome] += n
    lines = [f"{count} cases in {seconds:.1f} s (slowest {result['slowest_s']:.2f} s): "
             + ", ".join(f"{k} {v}" for k, v in by_outcome.most_common())]
    kinds = sorted({kind for kind, _ in result["outcomes"]})
    for kind in kinds:
        parts = [f"{o} {n}" for (k, o), n in sorted(result["outcomes"].items()) if k == kind]
        lines.append(f"  {kind:20s} " + ", ".join(parts))
    seen = set()  # one traceback per distinct failure (its last two lines)
    for case, base, kind, detail in result["failures"]:
        where = tuple(detail.strip().splitlines()[-2:])
        if where not in seen:
            seen.add(where)
            lines.append(f"FAIL case {case} ({base}, {kind}):\n"
                         + "\n".join(line[:300] for line in detail.splitlines()))
    return "\n".join(lines)


def _check(tmp_path, count: int, seed: int) -> None:
    start = time.perf_counter()
    result = run_cases(tmp_path, count, seed)
    report = _report(result, count, time.perf_counter() - start)
    print(report)
    assert not result["failures"], report
    loaded = sum(n for (_, outcome), n in result["outcomes"].items() if outcome == "loaded")
    assert 0 < loaded < count, report  # both outcomes occur: the mutations are neither all
    # harmless nor all fatal


# torch warns about every sparse tensor that weights_only loads, which some mutations insert
NO_SPARSE_WARNING = pytest.mark.filterwarnings("ignore:Validating sparse tensor invariants")


@NO_SPARSE_WARNING
def test_fuzzed_records_load_or_raise_user_error(tmp_path):
    _check(tmp_path, int(os.environ.get("FUZZ_CASES", DEFAULT_CASES)), seed=0)


@pytest.mark.slow
@NO_SPARSE_WARNING
def test_fuzzed_records_1000_cases(tmp_path):
    _check(tmp_path, 1000, seed=1)
