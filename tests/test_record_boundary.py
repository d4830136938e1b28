"""The record boundary: a record's backdoor sets are typed splits decoded only where asked, clean
splits decode only chosen indices, and a defense run on an image-folder data set opens only the
files it uses (a damaged image it does not use cannot fail it)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import utils.data.datasets as datasets
from defense.ulrl import main
from models import build_model
from utils.core.errors import UserError
from utils.data.datasets import clean_split
from utils.data.images import ImageSet
from utils.data.record import load_attack_record, save_attack_record
from tests.test_datasets import write_gt_csv

N = 12


@pytest.fixture()
def toy(tmp_path):
    """A record whose bd_train is 12 items, the odd positions poisoned (white corner, label 0),
    in a shuffled order over a 20-image clean set; PNGs on disk."""
    gen = torch.Generator().manual_seed(0)
    clean = ImageSet(torch.randint(0, 200, (20, 1, 8, 8), generator=gen, dtype=torch.uint8),
                     torch.randint(1, 4, (20,), generator=gen))
    order = torch.randperm(20, generator=gen)[:N]
    flags = torch.arange(N) % 2 == 1
    images = clean.images[order].clone()
    images[flags, :, -2:, -2:] = 255
    bd = ImageSet(images, torch.where(flags, 0, clean.labels[order]), clean.labels[order].clone(),
                  flags, order)
    save_attack_record(tmp_path / "r", model_name="smallcnn", num_classes=4,
                       state_dict=build_model("smallcnn", 4, 1, 8).state_dict(),
                       clean_data="fashion_mnist", img_size=(8, 8, 1), bd_train=bd,
                       bd_test=bd.subset(flags.nonzero().flatten()), train_length=20,
                       test_length=20)
    return load_attack_record(tmp_path / "r"), clean, bd


def test_a_split_is_typed_and_decodes_only_the_positions_asked_for(toy):
    record, clean, bd = toy
    split = record.bd_train
    assert len(split) == N and split.num_classes == 4
    assert split.order.tolist() == bd.index.tolist()
    assert split.poisoned_positions().tolist() == [1, 3, 5, 7, 9, 11]
    with pytest.raises(ValueError):
        split.order[0] = 5  # read-only: every decode shares them
    whole = split.images(clean)
    assert torch.equal(whole.images, bd.images) and torch.equal(whole.labels, bd.labels)
    assert torch.equal(whole.true_labels, bd.true_labels) and torch.equal(whole.poisoned, bd.poisoned)
    part = split.images(clean, [3, 0, 4])  # in the order asked
    assert torch.equal(part.images, bd.images[[3, 0, 4]])
    assert part.index.tolist() == bd.index[[3, 0, 4]].tolist()
    # A PNG the positions do not reach is never opened: deleting it changes nothing.
    png = record.folder / split.entries[int(split.order[5])]["path"].split("/", 3)[3]
    png.unlink()
    assert torch.equal(split.images(clean, [0, 1, 2]).images, bd.images[:3])
    with pytest.raises(UserError, match="is missing"):
        split.images(clean, [5])
    with pytest.raises(ValueError, match="positions"):
        split.images(clean, [N])


def test_sample_poisoned_draws_poisoned_items_in_clean_index_order(toy):
    split = toy[0].bd_train
    first = split.sample_poisoned(4, torch.Generator().manual_seed(3))
    again = split.sample_poisoned(4, torch.Generator().manual_seed(3))
    assert first.tolist() == again.tolist() and len(set(first.tolist())) == 4
    assert split.poisoned[first].all()
    assert np.all(np.diff(split.order[first]) > 0)


def test_unpoisoned_items_need_only_the_clean_images_they_index(toy):
    """Clean images come from clean.subset of exactly the unpoisoned items' indices."""
    record, clean, bd = toy
    asked = []

    class Watching:
        image_shape = clean.image_shape

        def __len__(self):
            return len(clean)

        def subset(self, index):
            asked.append(sorted(np.asarray(index).tolist()))
            return clean.subset(index)
    out = record.bd_train.images(Watching(), [0, 1, 2])
    assert asked == [sorted(bd.index[[0, 2]].tolist())]
    assert torch.equal(out.images, bd.images[:3])


# ---- image-folder data sets: only the chosen files are opened -------------------------------------

CLASSES = 43  # GTSRB's


def make_gtsrb(root, per_class: int = 2, n_test: int = 50):
    """GTSRB's layout with 32x32 PNG-in-.ppm-name files: per_class images in every class."""
    rng = np.random.default_rng(0)
    for c in range(CLASSES):
        d = root / "Train" / f"{c:05d}"
        d.mkdir(parents=True)
        names = [f"{c:05d}_{i:05d}.ppm" for i in range(per_class)]
        for name in names:
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / name)
        write_gt_csv(d / f"GT-{c:05d}.csv", [(name, c) for name in names])
    test = root / "Test"
    test.mkdir()
    rows = [(f"{i:05d}.ppm", i % CLASSES) for i in range(n_test)]
    for name, _ in rows:
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(test / name)
    write_gt_csv(test / "GT-final_test.csv", rows)


def test_a_clean_split_decodes_only_the_chosen_files(tmp_path):
    make_gtsrb(tmp_path / "gtsrb")
    (tmp_path / "gtsrb/Train/00005/00005_00001.ppm").write_bytes(b"damaged")
    split = clean_split("gtsrb", tmp_path, train=True)
    assert len(split) == 2 * CLASSES and split.labels[:4].tolist() == [0, 0, 1, 1]
    assert split.subset([0, 3, 85]).labels.tolist() == [0, 1, 42]  # the damaged file untouched
    with pytest.raises(UserError, match="00005_00001.ppm"):
        split.subset([11])


def test_a_defense_run_opens_only_the_images_it_uses(tmp_path, monkeypatch):
    """ULRL with the retuning check on a GTSRB folder: of the training files it opens only the
    defense subset's (a damaged training image outside it does not fail the run), and the
    retuning set's poisoned images come from the record, not from the clean data."""
    make_gtsrb(tmp_path / "data" / "gtsrb")
    train = clean_split("gtsrb", tmp_path / "data", train=True)
    test = clean_split("gtsrb", tmp_path / "data", train=False).subset()
    subset = list(range(0, 2 * CLASSES, 2))  # one image per class
    (tmp_path / "index.txt").write_text("".join(f"{i}\n" for i in subset))
    damaged = tmp_path / "data/gtsrb/Train/00007/00007_00001.ppm"  # index 15: outside the subset
    damaged.write_bytes(b"not an image")
    poisoned_train = torch.tensor([1, 3, 5, 7, 9])  # odd indices: none in the subset
    bd_train = ImageSet(torch.full((5, 3, 32, 32), 255, dtype=torch.uint8),
                        torch.zeros(5, dtype=torch.long), torch.tensor(train.labels[[1, 3, 5, 7, 9]]),
                        torch.ones(5, dtype=torch.bool), poisoned_train)
    keep = (test.labels != 0).nonzero().flatten()[:10]
    bd_test = ImageSet(torch.full((10, 3, 32, 32), 255, dtype=torch.uint8),
                       torch.zeros(10, dtype=torch.long), test.labels[keep],
                       torch.ones(10, dtype=torch.bool), keep)
    torch.manual_seed(0)
    save_attack_record(tmp_path / "record" / "r", model_name="smallcnn", num_classes=CLASSES,
                       state_dict=build_model("smallcnn", CLASSES, 3, 32).state_dict(),
                       clean_data="gtsrb", img_size=(32, 32, 3), bd_train=bd_train,
                       bd_test=bd_test, train_length=len(train), test_length=len(test))
    opened = []
    real_open = Image.open

    def counting_open(fp, *args, **kwargs):
        opened.append(str(fp))
        return real_open(fp, *args, **kwargs)
    monkeypatch.setattr(datasets.Image, "open", counting_open)
    main(["--result_file", "r", "--record_dir", str(tmp_path / "record"), "--dataset_path",
          str(tmp_path / "data"), "--device", "cpu", "--threads", "1", "--index",
          str(tmp_path / "index.txt"), "--unlearning_epochs", "1", "--relearn_epochs", "1",
          "--plots", "false", "--retune_check", "--retune_epochs", "1"])
    summary = json.loads((tmp_path / "record/r/defense/ulrl/summary.json").read_text())
    assert summary["defense_samples"] == CLASSES and summary["retune"]["poisoned_samples"] == 4
    train_files = sorted(p for p in opened if "/Train/" in p)
    expected = sorted(str(tmp_path / f"data/gtsrb/Train/{c:05d}/{c:05d}_00000.ppm")
                      for c in range(CLASSES))
    assert train_files == expected
    assert len([p for p in opened if "/Test/" in p]) == 50  # the whole test split is evaluated
    assert len([p for p in opened if "bd_train_dataset" in p]) == 4
