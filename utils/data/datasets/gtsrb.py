"""GTSRB (German Traffic Sign Recognition Benchmark), 43 classes, resized to 32x32:

    <folder>/Train/00000/GT-00000.csv + 00000_00000.ppm ...   (one folder per class)
    <folder>/Test/GT-final_test.csv + 00000.ppm ...

The csv files are ';'-separated with a header row; column 0 is the file name, column 7 the ClassId.
A train class folder without its csv is read by listing its image files (class = folder name).
"""
from __future__ import annotations

import csv
from pathlib import Path

from utils.core.errors import UserError
from utils.data.datasets import CleanSplit, DatasetSpec, from_files, register_dataset

IMAGE_SUFFIXES = {".ppm", ".png", ".jpg", ".jpeg", ".bmp"}
SIZE = (32, 32, 3)


def read_csv(path: Path) -> list[tuple[Path, int]]:
    """(image path, class) for each row of a GT csv, in file order."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f, delimiter=";"))[1:]
        return [(path.parent / row[0], int(row[7])) for row in rows if row]
    except (OSError, UnicodeDecodeError, IndexError, ValueError) as e:
        raise UserError(f"cannot read {path} ({e}): expected ';'-separated rows with the file name in "
                        "column 0 and ClassId in column 7; download the data set again") from None


def _class_dirs(folder: Path) -> list[Path]:
    train = folder / "Train"
    dirs = [d for d in train.iterdir() if d.is_dir() and d.name.isdigit()] if train.is_dir() else []
    return sorted(dirs, key=lambda d: int(d.name))


def _train_items(folder: Path) -> list[tuple[Path, int]]:
    items = []
    for d in _class_dirs(folder):
        gt = d / f"GT-{d.name}.csv"
        if gt.is_file():
            items += read_csv(gt)
        else:
            files = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            items += [(p, int(d.name)) for p in files]
    return items


def _check(folder: Path) -> str | None:
    if not _class_dirs(folder):
        return "no Train/<class> folders"
    if not (folder / "Test" / "GT-final_test.csv").is_file():
        return "no Test/GT-final_test.csv"
    return None


def _load(folder: Path, train: bool) -> CleanSplit:
    items = _train_items(folder) if train else read_csv(folder / "Test" / "GT-final_test.csv")
    if not items:
        raise UserError(f"no {'train' if train else 'test'} images listed in {folder}: "
                        "download the data set again")
    return from_files([p for p, _ in items], [c for _, c in items], SIZE)


GTSRB = register_dataset(DatasetSpec(
    name="gtsrb", num_classes=43, image_size=SIZE, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
    hflip=False, load=_load, check=_check,
    how_to_get="download the GTSRB final training images, test images and test GT zips from "
               "https://benchmark.ini.rub.de/gtsrb_dataset.html and arrange them as "
               "<dataset_path>/gtsrb/Train/<class>/ (from GTSRB/Final_Training/Images/) and "
               "<dataset_path>/gtsrb/Test/ (GTSRB/Final_Test/Images/ plus GT-final_test.csv)"))
