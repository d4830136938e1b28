"""Class-labelled image folders (the ImageFolder layout, DIR/<class>/<image>), for defending a model
without a BackdoorBench record: the clean images (--clean_dir), a test set (--test_dir) and images
that carry a trigger (--bd_test_dir, by their true class).

Class folders named by integers ('0', '1', ... '10') are those classes; otherwise the folder names,
sorted, are classes 0..K-1 (as torchvision's ImageFolder), so every class needs a folder. Other
folders of the same model reuse the clean folder's names. Images are found in each class folder and
below it (links to folders are not followed; hidden names and non-image files are skipped, their
count logged), listed in sorted order, and decoded only where a run uses them (IMAGE_FORMATS, size
checked first, resized to the model's input: utils/data/images.py and datasets.read_images).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from utils.core.cli import log, require
from utils.core.errors import shown
from utils.data.datasets import CleanSplit, from_files

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".webp", ".gif")


@dataclass(frozen=True)
class ImageFolder:
    root: Path
    classes: dict[str, int]  # folder name -> class index
    split: CleanSplit  # labels now, images decoded when asked for


def class_index(names: list[str], num_classes: int | None, where: str) -> dict[str, int]:
    """Folder name -> class: integers as they are, other names in sorted order."""
    require(len(names) > 0, f"{where} has no class folders: lay it out as {where}/<class>/<image>")
    if all(name.isascii() and name.isdigit() and len(name) < 10 for name in names):
        classes = {name: int(name) for name in names}
        require(len(set(classes.values())) == len(names),
                f"{where}: folders {', '.join(names)} name the same class twice")
        top = max(classes.values())
        require(num_classes is None or top < num_classes,
                f"{where}: class folder {top} is outside the model's {num_classes} classes "
                f"(0..{num_classes - 1})")
        return classes
    require(num_classes is None or len(names) == num_classes,
            f"{where} has {len(names)} class folders but the model has {num_classes} classes: "
            "give every class a folder, or name the folders by class index (0, 1, ...)")
    return {name: i for i, name in enumerate(sorted(names))}


def _images_below(folder: Path) -> tuple[list[Path], int]:
    """(image files under folder, sorted; how many other files were skipped)."""
    found, skipped = [], 0
    for parent, dirs, files in os.walk(folder):  # does not follow links to folders
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES):
                found.append(Path(parent) / name)
            else:
                skipped += 1
    return found, skipped


def image_folder(root, size: tuple[int, int, int], num_classes: int | None, option: str,
                 classes: dict[str, int] | None = None) -> ImageFolder:
    """The images of `root` (ImageFolder layout) as a CleanSplit of `size` (H, W, C), labelled
    by class_index, or by `classes` (another folder's names) when given."""
    root = Path(root)
    where = f"{option} {shown(str(root), 200)}"
    require(root.is_dir(), f"{where} is not a folder: pass a folder laid out as <class>/<image>")
    names = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if classes is None:
        classes = class_index(names, num_classes, where)
    else:
        unknown = [n for n in names if n not in classes]
        require(not unknown, f"{where}: class folders {', '.join(map(shown, unknown[:5]))} are not "
                             f"among the clean folder's ({', '.join(list(classes)[:10])})")
    paths, labels, skipped = [], [], 0
    for name in names:
        found, other = _images_below(root / name)
        paths += found
        labels += [classes[name]] * len(found)
        skipped += other
    require(len(paths) > 0, f"{where} holds no images ({', '.join(IMAGE_SUFFIXES)}) in its "
                            "class folders")
    if skipped:
        log.info("%s: skipped %d files that are hidden or not images", where, skipped)
    return ImageFolder(root, classes, from_files(paths, labels, size))
