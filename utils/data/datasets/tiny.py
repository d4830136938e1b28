"""Tiny ImageNet (200 classes, 64x64 RGB), as unpacked from tiny-imagenet-200.zip:

    <folder>/tiny-imagenet-200/train/<wnid>/images/*.JPEG
    <folder>/tiny-imagenet-200/val/images/*.JPEG + val/val_annotations.txt   (original layout)
 or <folder>/tiny-imagenet-200/val/<wnid>/images/*.JPEG  (or val/<wnid>/*.JPEG)  (re-foldered by class)

Classes are the sorted train wnids (ImageFolder's convention); images are ordered by class, then by
file name, so both val layouts give the same set.
"""
from __future__ import annotations

from pathlib import Path

from utils.core.errors import UserError
from utils.data.datasets import CleanSplit, DatasetSpec, from_files, register_dataset

ROOT = "tiny-imagenet-200"
SIZE = (64, 64, 3)
SUFFIXES = {".jpeg", ".jpg", ".png"}


def _images_in(folder: Path) -> list[Path]:
    """Image files of one class folder: in its images/ subfolder if there is one, else directly."""
    if (folder / "images").is_dir():
        folder = folder / "images"
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES)


def _classes(root: Path) -> list[str]:
    return sorted(d.name for d in (root / "train").iterdir() if d.is_dir())


def _val_items(root: Path, index: dict[str, int]) -> list[tuple[Path, int]]:
    val = root / "val"
    class_dirs = sorted(d for d in val.iterdir() if d.is_dir() and d.name != "images")
    if class_dirs:  # re-foldered by class
        for d in class_dirs:
            if d.name not in index:
                raise UserError(f"{d} is not a train class of Tiny ImageNet: remove it or re-fold val/")
        return [(p, index[d.name]) for d in class_dirs for p in _images_in(d)]
    annotations = val / "val_annotations.txt"
    try:
        rows = [line.split("\t") for line in annotations.read_text().splitlines() if line.strip()]
        items = [(val / "images" / row[0], index[row[1]]) for row in rows]
    except (OSError, UnicodeDecodeError, IndexError, KeyError) as e:
        raise UserError(f"cannot read {annotations} ({type(e).__name__}: {e}): expected tab-separated "
                        "'file<TAB>wnid' rows naming train classes; unpack the data set again") from None
    return sorted(items, key=lambda item: (item[1], item[0].name))


def _check(folder: Path) -> str | None:
    root = folder / ROOT
    if not (root / "train").is_dir():
        return f"no {ROOT}/train/"
    if not (root / "val").is_dir():
        return f"no {ROOT}/val/"
    return None


def _load(folder: Path, train: bool) -> CleanSplit:
    root = folder / ROOT
    classes = _classes(root)
    index = {wnid: i for i, wnid in enumerate(classes)}
    if train:
        items = [(p, index[w]) for w in classes for p in _images_in(root / "train" / w)]
    else:
        items = _val_items(root, index)
    if not items:
        raise UserError(f"no {'train' if train else 'val'} images found in {root}: unpack the data set again")
    return from_files([p for p, _ in items], [c for _, c in items], SIZE)


TINY = register_dataset(DatasetSpec(
    name="tiny", num_classes=200, image_size=SIZE, mean=(0.4802, 0.4481, 0.3975),
    std=(0.2302, 0.2265, 0.2262), hflip=False, load=_load, check=_check,
    how_to_get="download http://cs231n.stanford.edu/tiny-imagenet-200.zip and unpack it into "
               "<dataset_path>/tiny/"))
