"""utils.data.datasets: each loader on a tiny fake copy of its on-disk layout, plus the error paths."""
from __future__ import annotations

import csv
import gzip
import os
import pickle
import struct
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from utils.core.errors import UserError
import utils.data.datasets as datasets
from utils.data.datasets import (dataset_names, find_dataset_folder, get_dataset, load_clean_dataset,
                            register_dataset)

RNG = np.random.default_rng(0)


def check_set(data, n, shape, labels):
    assert data.images.dtype == torch.uint8 and data.labels.dtype == torch.int64
    assert tuple(data.images.shape) == (n, *shape)
    assert data.labels.tolist() == list(labels)
    assert data.index is None and data.true_labels is None and data.poisoned is None


def test_registry():
    assert set(dataset_names()) >= {"mnist", "fashion_mnist", "cifar10", "cifar100", "gtsrb", "tiny"}
    for name in dataset_names():
        spec = get_dataset(name)
        assert spec.name == name and len(spec.mean) == len(spec.std) == spec.image_size[2]
        assert spec.how_to_get
    assert [n for n in dataset_names() if get_dataset(n).hflip] == ["cifar10"]
    assert get_dataset("tiny").image_size == (64, 64, 3) and get_dataset("gtsrb").num_classes == 43
    assert register_dataset(get_dataset("mnist")) is get_dataset("mnist")  # same spec again: no-op


def test_unknown_name_lists_known_names():
    with pytest.raises(UserError) as e:
        get_dataset("imagenet")
    assert "imagenet" in str(e.value) and "cifar10" in str(e.value) and "fashion_mnist" in str(e.value)
    with pytest.raises(UserError):
        load_clean_dataset("imagenet", "data", train=True)


# ---- MNIST / Fashion-MNIST ---------------------------------------------------------------------

def idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">I", 0x0800 + array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_set(folder: Path, gz: bool, n_train=5, n_test=3):
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        arrays[prefix] = (RNG.integers(0, 256, (n, 28, 28)), RNG.integers(0, 10, n))
        for kind, arr in zip(("images-idx3-ubyte", "labels-idx1-ubyte"), arrays[prefix]):
            data = idx_bytes(arr)
            name = f"{prefix}-{kind}"
            if gz:
                (folder / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (folder / name).write_bytes(data)
    return arrays


@pytest.mark.parametrize("name,sub,gz", [("mnist", "", True), ("mnist", "MNIST/raw", False),
                                         ("fashion_mnist", "FashionMNIST/raw", True)])
def test_idx_datasets(tmp_path, name, sub, gz):
    arrays = write_idx_set(tmp_path / name / sub, gz)
    assert find_dataset_folder(name, tmp_path) == tmp_path / name
    for train, prefix in ((True, "train"), (False, "t10k")):
        images, labels = arrays[prefix]
        data = load_clean_dataset(name, tmp_path, train=train)
        check_set(data, len(labels), (1, 28, 28), labels)
        assert np.array_equal(data.images[:, 0].numpy(), images)


def test_idx_bad_magic_and_truncated(tmp_path):
    write_idx_set(tmp_path / "mnist", gz=False)
    bad = tmp_path / "mnist" / "train-images-idx3-ubyte"
    data = bytearray(bad.read_bytes())
    data[3] = 0x01
    bad.write_bytes(bytes(data))
    with pytest.raises(UserError, match="train-images-idx3-ubyte.*magic"):
        load_clean_dataset("mnist", tmp_path, train=True)
    bad.write_bytes(idx_bytes(RNG.integers(0, 256, (5, 28, 28)))[:-10])
    with pytest.raises(UserError, match="train-images-idx3-ubyte.*truncated"):
        load_clean_dataset("mnist", tmp_path, train=True)
    (tmp_path / "mnist" / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(4)))
    with pytest.raises(UserError, match="3 images but .*4 labels"):
        load_clean_dataset("mnist", tmp_path, train=False)


# ---- CIFAR -------------------------------------------------------------------------------------

def write_pickle(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=4))


def test_cifar10(tmp_path):
    root = tmp_path / "cifar10" / "cifar-10-batches-py"
    batches = {}
    for f in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batches[f] = (RNG.integers(0, 256, (2, 3072), dtype=np.uint8), RNG.integers(0, 10, 2).tolist())
        write_pickle(root / f, {b"batch_label": b"x", b"data": batches[f][0], b"labels": batches[f][1]})
    train = load_clean_dataset("cifar10", tmp_path, train=True)
    check_set(train, 10, (3, 32, 32), sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), []))
    assert np.array_equal(train.images[2].numpy(), batches["data_batch_2"][0][0].reshape(3, 32, 32))
    test = load_clean_dataset("cifar10", tmp_path, train=False)
    check_set(test, 2, (3, 32, 32), batches["test_batch"][1])
    assert np.array_equal(test.images.numpy().reshape(2, -1), batches["test_batch"][0])


def test_cifar100_str_keys(tmp_path):
    root = tmp_path / "cifar100" / "cifar-100-python"
    data = {s: RNG.integers(0, 256, (3, 3072), dtype=np.uint8) for s in ("train", "test")}
    write_pickle(root / "train", {"data": data["train"], "fine_labels": [0, 99, 5], "coarse_labels": [0] * 3})
    write_pickle(root / "test", {"data": data["test"], "fine_labels": [1, 2, 3]})
    check_set(load_clean_dataset("cifar100", tmp_path, train=True), 3, (3, 32, 32), [0, 99, 5])
    test = load_clean_dataset("cifar100", tmp_path, train=False)
    check_set(test, 3, (3, 32, 32), [1, 2, 3])
    assert np.array_equal(test.images.numpy().reshape(3, -1), data["test"])


class Py2Pickler(pickle._Pickler):
    """Writes pickles the way Python 2 wrote the real CIFAR files: byte strings as BINSTRING and
    numpy's reconstructor under its old module name numpy.core.multiarray."""
    dispatch = dict(pickle._Pickler.dispatch)

    def save_bytes(self, obj):
        self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    def save_global(self, obj, name=None):
        module = obj.__module__.replace("numpy._core.", "numpy.core.")
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)

    dispatch[bytes] = save_bytes
    dispatch[type] = save_global
    dispatch[type(np.add.reduce)] = save_global  # builtin functions such as _reconstruct


def test_cifar_python2_pickle(tmp_path):
    root = tmp_path / "cifar10" / "cifar-10-batches-py"
    root.mkdir(parents=True)
    data = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    for f in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(root / f, "wb") as fh:
            Py2Pickler(fh, protocol=2).dump({b"data": data, b"labels": [1, 2], b"batch_label": b"x"})
    assert b"numpy.core.multiarray\n_reconstruct" in (root / "test_batch").read_bytes()
    test = load_clean_dataset("cifar10", tmp_path, train=False)
    check_set(test, 2, (3, 32, 32), [1, 2])
    assert np.array_equal(test.images.numpy().reshape(2, -1), data)


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_cifar_malicious_pickle_refused(tmp_path):
    marker = tmp_path / "pwned"
    root = tmp_path / "cifar100" / "cifar-100-python"
    write_pickle(root / "train", {b"data": Evil(marker), b"fine_labels": [0]})
    write_pickle(root / "test", {b"data": np.zeros((1, 3072), np.uint8), b"fine_labels": [0]})
    with pytest.raises(UserError, match="train.*(posix|nt|os)\\.system"):
        load_clean_dataset("cifar100", tmp_path, train=True)
    assert not marker.exists()
    (root / "train").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="cannot read .*train"):
        load_clean_dataset("cifar100", tmp_path, train=True)


# ---- missing data ------------------------------------------------------------------------------

def test_missing_data_error_lists_folders_and_how_to_get(tmp_path, monkeypatch):
    (tmp_path / "cifar10").mkdir()
    other = tmp_path / "elsewhere"
    monkeypatch.setitem(datasets._REGISTRY, "cifar10",
                        replace(get_dataset("cifar10"), search_dirs=(str(other),)))
    with pytest.raises(UserError) as e:
        load_clean_dataset("cifar10", tmp_path, train=True)
    msg = str(e.value)
    assert f"{tmp_path / 'cifar10'} (no cifar-10-batches-py/data_batch_1)" in msg
    assert f"{other} (no such folder)" in msg
    assert get_dataset("cifar10").how_to_get in msg and "--dataset_path" in msg
    # a search_dirs folder holding the files is used when <dataset_path>/<name> is not
    for f in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [7]}
        write_pickle(other / "cifar-10-batches-py" / f, batch)
    assert find_dataset_folder("cifar10", tmp_path) == other
    check_set(load_clean_dataset("cifar10", tmp_path, train=False), 1, (3, 32, 32), [7])


# ---- GTSRB -------------------------------------------------------------------------------------

def write_gt_csv(path: Path, rows) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter=";")
        w.writerow(["Filename", "Width", "Height", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId"])
        for name, cls in rows:
            w.writerow([name, 40, 35, 5, 5, 35, 30, cls])


def test_gtsrb(tmp_path):
    root = tmp_path / "gtsrb"
    exact = RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8)  # already 32x32: kept as is
    c0 = root / "Train" / "00000"
    c0.mkdir(parents=True)
    Image.fromarray(exact).save(c0 / "00000_00000.ppm")
    Image.new("RGB", (40, 35), (10, 20, 30)).save(c0 / "00000_00001.ppm")
    write_gt_csv(c0 / "GT-00000.csv", [("00000_00000.ppm", 0), ("00000_00001.ppm", 0)])
    c42 = root / "Train" / "00042"  # no csv: images listed, class from folder name
    c42.mkdir()
    for i in (1, 0):
        Image.new("RGB", (50, 60), (i, 100, 200)).save(c42 / f"00000_0000{i}.ppm")
    test_dir = root / "Test"
    test_dir.mkdir()
    Image.new("L", (29, 31), 77).save(test_dir / "00000.ppm")
    Image.new("RGB", (32, 32), (1, 2, 3)).save(test_dir / "00001.ppm")
    write_gt_csv(test_dir / "GT-final_test.csv", [("00001.ppm", 42), ("00000.ppm", 3)])

    train = load_clean_dataset("gtsrb", tmp_path, train=True)
    check_set(train, 4, (3, 32, 32), [0, 0, 42, 42])
    assert np.array_equal(train.images[0].numpy(), exact.transpose(2, 0, 1))
    assert train.images[1, :, 0, 0].tolist() == [10, 20, 30]
    assert train.images[2, :, 5, 5].tolist() == [0, 100, 200]  # sorted: 00000_00000 first
    test = load_clean_dataset("gtsrb", tmp_path, train=False)
    check_set(test, 2, (3, 32, 32), [42, 3])
    assert (test.images[0] == torch.tensor([1, 2, 3]).view(3, 1, 1)).all()
    assert (test.images[1] == 77).all()

    (test_dir / "00000.ppm").write_bytes(b"garbage")
    with pytest.raises(UserError, match="00000.ppm"):
        load_clean_dataset("gtsrb", tmp_path, train=False)


# ---- Tiny ImageNet -----------------------------------------------------------------------------

WNIDS = ["n02", "n01", "n03"]  # sorted: n01 -> 0, n02 -> 1, n03 -> 2
COLORS = {"n01": (200, 0, 0), "n02": (0, 200, 0), "n03": (0, 0, 200)}


def make_tiny(root: Path, val_layout: str) -> None:
    for w in WNIDS:
        d = root / "train" / w / "images"
        d.mkdir(parents=True)
        (root / "train" / w / f"{w}_boxes.txt").write_text("")
        for i in range(2):
            Image.new("RGB", (64, 64), COLORS[w]).save(d / f"{w}_{i}.JPEG")
    Image.new("L", (64, 64), 90).save(root / "train" / "n03" / "images" / "n03_2.JPEG")  # grey
    Image.new("RGB", (80, 70), COLORS["n01"]).save(root / "train" / "n01" / "images" / "n01_2.JPEG")
    val_rows = [("val_1.JPEG", "n03"), ("val_0.JPEG", "n02"), ("val_2.JPEG", "n02"), ("val_3.JPEG", "n01")]
    for name, w in val_rows:
        folder = {"original": root / "val" / "images", "wnid": root / "val" / w,
                  "wnid_images": root / "val" / w / "images"}[val_layout]
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (64, 64), COLORS[w]).save(folder / name)
    if val_layout == "original":
        (root / "val" / "val_annotations.txt").write_text(
            "".join(f"{n}\t{w}\t0\t0\t63\t63\n" for n, w in val_rows))


@pytest.mark.parametrize("val_layout", ["original", "wnid", "wnid_images"])
def test_tiny(tmp_path, val_layout):
    make_tiny(tmp_path / "tiny" / "tiny-imagenet-200", val_layout)
    train = load_clean_dataset("tiny", tmp_path, train=True)
    check_set(train, 8, (3, 64, 64), [0, 0, 0, 1, 1, 2, 2, 2])
    colors = train.images.float().mean((2, 3))
    expected = [COLORS["n01"]] * 3 + [COLORS["n02"]] * 2 + [COLORS["n03"]] * 2 + [(90, 90, 90)]
    assert torch.allclose(colors, torch.tensor(expected, dtype=torch.float), atol=3)
    val = load_clean_dataset("tiny", tmp_path, train=False)
    check_set(val, 4, (3, 64, 64), [0, 1, 1, 2])  # by class, then file name
    assert torch.allclose(val.images[1].float().mean((1, 2)), torch.tensor(COLORS["n02"], dtype=torch.float),
                          atol=3)


def test_tiny_bad_annotation(tmp_path):
    root = tmp_path / "tiny" / "tiny-imagenet-200"
    make_tiny(root, "original")
    (root / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn99\n")
    with pytest.raises(UserError, match="val_annotations.txt"):
        load_clean_dataset("tiny", tmp_path, train=False)


# ---- the real Fashion-MNIST (Debian package dataset-fashion-mnist) ------------------------------

REAL_FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


@pytest.mark.skipif(not REAL_FASHION.exists(),
                    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist(tmp_path):
    assert find_dataset_folder("fashion_mnist", tmp_path) == REAL_FASHION.parent
    for train, n in ((True, 60000), (False, 10000)):
        data = load_clean_dataset("fashion_mnist", tmp_path, train=train)
        assert tuple(data.images.shape) == (n, 1, 28, 28) and data.images.dtype == torch.uint8
        assert sorted(data.labels.unique().tolist()) == list(range(10))
        assert torch.bincount(data.labels).tolist() == [n // 10] * 10
