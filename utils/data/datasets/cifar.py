"""CIFAR-10 and CIFAR-100, "python version" archives as unpacked:

    <folder>/cifar-10-batches-py/data_batch_1 .. data_batch_5, test_batch
    <folder>/cifar-100-python/train, test

Each file is a pickled dict with b"data" (uint8 [N, 3072], channel-major 3x32x32) and b"labels"
(CIFAR-10) or b"fine_labels" (CIFAR-100). The pickles are read with an unpickler that can only
rebuild numpy arrays, so a tampered file cannot run code.
"""
from __future__ import annotations

import importlib
import pickle
from functools import partial
from pathlib import Path

import numpy as np

from utils.core.errors import UserError
from utils.data.datasets import CleanSplit, DatasetSpec, first_missing, from_arrays, register_dataset

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
}


def _multiarray():
    try:
        return importlib.import_module("numpy._core.multiarray")  # numpy >= 2
    except ImportError:
        return importlib.import_module("numpy.core.multiarray")


class SafeUnpickler(pickle.Unpickler):
    """Unpickler that only resolves the globals a CIFAR batch file contains."""

    def find_class(self, module, name):
        if (module, name) not in _ALLOWED:
            raise UserError(f"{self.path} refers to {module}.{name}, which a CIFAR file never does: "
                            "it was not made by the CIFAR authors; download the data set again")
        if module == "numpy":
            return getattr(np, name)
        return getattr(_multiarray(), name)

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="bytes")
        self.path = path


def read_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 3, 32, 32], labels int64 [N]) from one pickled CIFAR batch."""
    try:
        with open(path, "rb") as f:
            batch = SafeUnpickler(f, path).load()
    except UserError:
        raise
    except Exception as e:  # truncated or garbage pickle: any unpickling error
        raise UserError(f"cannot read {path} ({type(e).__name__}: {e}): download the data set again") \
            from None
    if not isinstance(batch, dict):
        raise UserError(f"{path} is not a CIFAR batch (not a dict): download the data set again")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or label_key not in batch:
        raise UserError(f"{path} lacks the 'data' or '{label_key}' entry: download the data set again")
    data, labels = np.asarray(batch["data"]), np.asarray(batch[label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 \
            or labels.shape != (data.shape[0],):
        raise UserError(f"{path} holds data {data.dtype} {data.shape} and {labels.shape} labels, expected "
                        "uint8 [N, 3072] and N labels: download the data set again")
    return data.reshape(-1, 3, 32, 32), labels


def _load(subdir: str, train_files: tuple[str, ...], test_files: tuple[str, ...], label_key: str,
          folder: Path, train: bool) -> CleanSplit:
    parts = [read_batch(folder / subdir / f, label_key) for f in (train_files if train else test_files)]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return from_arrays(images, labels)


def _spec(name, num_classes, mean, std, hflip, subdir, train_files, test_files, label_key, url):
    paths = [f"{subdir}/{f}" for f in train_files + test_files]
    return register_dataset(DatasetSpec(
        name=name, num_classes=num_classes, image_size=(32, 32, 3), mean=mean, std=std, hflip=hflip,
        load=partial(_load, subdir, train_files, test_files, label_key),
        how_to_get=f"download {url} and unpack it into <dataset_path>/{name}/",
        check=lambda folder: first_missing(folder, paths)))


CIFAR10 = _spec("cifar10", 10, (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261), True,
                "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",),
                "labels", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz")
CIFAR100 = _spec("cifar100", 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), False,
                 "cifar-100-python", ("train",), ("test",),
                 "fine_labels", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz")
