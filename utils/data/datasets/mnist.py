"""MNIST and Fashion-MNIST: the four idx files, each plain or gzip'd.

    <folder>/train-images-idx3-ubyte[.gz]  train-labels-idx1-ubyte[.gz]
    <folder>/t10k-images-idx3-ubyte[.gz]   t10k-labels-idx1-ubyte[.gz]

or the same files in torchvision's layout `<folder>/MNIST/raw/` (`<folder>/FashionMNIST/raw/`).
idx format: big-endian magic (0x0801 labels, 0x0803 images), then one uint32 per dimension, then
the uint8 values.
"""
from __future__ import annotations

import gzip
import zlib
from functools import partial
from pathlib import Path

import numpy as np

from utils.core.errors import UserError
from utils.data.datasets import CleanSplit, DatasetSpec, from_arrays, register_dataset

FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
         "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _find(folder: Path, raw_dir: str, stem: str) -> Path | None:
    for base in (folder, folder / raw_dir / "raw"):
        for path in (base / stem, base / f"{stem}.gz"):
            if path.is_file():
                return path
    return None


def _check(raw_dir: str, folder: Path) -> str | None:
    for stem in FILES:
        if _find(folder, raw_dir, stem) is None:
            return f"no {stem}[.gz], here or in {raw_dir}/raw/"
    return None


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """One idx file of unsigned bytes with `ndim` dimensions (1 for labels, 3 for images)."""
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(f"cannot read {path} ({e}): download the file again") from None
    magic = 0x0800 + ndim
    if len(data) < 4 + 4 * ndim or int.from_bytes(data[:4], "big") != magic:
        raise UserError(f"{path} is not an idx file (magic number is not {magic:#06x}): "
                        "download the file again")
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    body = memoryview(data)[4 + 4 * ndim:]  # a view: no second copy of a 47 MB file
    if len(body) != int(np.prod(shape)):
        raise UserError(f"{path} holds {len(body)} values, its header says {shape}: "
                        "the file is truncated or corrupt, download it again")
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)  # read-only: copied where decoded


def _load(raw_dir: str, folder: Path, train: bool) -> CleanSplit:
    prefix = "train" if train else "t10k"
    images_path = _find(folder, raw_dir, f"{prefix}-images-idx3-ubyte")
    labels_path = _find(folder, raw_dir, f"{prefix}-labels-idx1-ubyte")
    if images_path is None or labels_path is None:
        raise UserError(f"{folder} lacks the {prefix} idx files: add them or pass --dataset_path")
    images = read_idx(images_path, 3)
    labels = read_idx(labels_path, 1)
    if len(images) != len(labels):
        raise UserError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} "
                        "labels: download both files again")
    return from_arrays(images[:, None], labels)


def _spec(name: str, raw_dir: str, mean: float, std: float, how_to_get: str,
          search_dirs: tuple[str, ...] = ()) -> DatasetSpec:
    return register_dataset(DatasetSpec(
        name=name, num_classes=10, image_size=(28, 28, 1), mean=(mean,), std=(std,), hflip=False,
        load=partial(_load, raw_dir), search_dirs=search_dirs, how_to_get=how_to_get,
        check=partial(_check, raw_dir)))


MNIST = _spec("mnist", "MNIST", 0.5, 0.5,
              "put the four MNIST idx files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
              "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) in <dataset_path>/mnist/")
FASHION_MNIST = _spec("fashion_mnist", "FashionMNIST", 0.2860, 0.3530,
                      "run `apt-get install dataset-fashion-mnist` (Debian/Ubuntu) or put the four "
                      "Fashion-MNIST idx files in <dataset_path>/fashion_mnist/",
                      search_dirs=("/usr/share/datasets/fashion-mnist",))
