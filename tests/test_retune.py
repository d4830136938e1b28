"""The retuning check: the mixed set it builds, that fine-tuning a copy on it re-teaches a backdoor
(and leaves the defended model alone), and its plumbing through a defense run."""
import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from defense.ulrl import main
from models import build_model
from utils.core.errors import UserError
from utils.data.images import ImageSet, Preprocess
from utils.data.record import save_attack_record
from utils.data.split import dataset_state, parse_split
from utils.defenses.retune import RETUNE_OPTIONS, retune_check, retune_set
from utils.defenses.run import DefenseRun
from utils.training.train import Batches, backdoor_metrics, cross_entropy, train_epoch
from tests.helpers import tiny_record


def striped(labels, gen):
    """4 classes of 1x8x8 images: class c has rows 2c and 2c+1 bright, over noise."""
    x = torch.randint(0, 60, (len(labels), 1, 8, 8), generator=gen)
    for i, c in enumerate(labels.tolist()):
        x[i, 0, 2 * c:2 * c + 2, 1:7] += 180
    return x.to(torch.uint8)


def with_trigger(x):
    x = x.clone()
    x[:, 0, :, 7] = 255  # the last column white
    return x


@pytest.fixture()
def world(tmp_path):
    """A clean model, its test sets, a 400-image training set whose bd_train poisons 15 % of the
    non-target images (label 0), and a 100-image defense subset."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (400,), generator=gen)
    clean_train = ImageSet(striped(labels, gen), labels)
    poison = (labels != 0) & (torch.rand(400, generator=gen) < 0.15)
    images = clean_train.images.clone()
    images[poison] = with_trigger(images[poison])
    bd_train = ImageSet(images, torch.where(poison, 0, labels), labels.clone(), poison,
                        torch.arange(400))
    state = dataset_state(bd_train, 400, "r", "bd_train", tmp_path, mode="ram")
    record = SimpleNamespace(bd_train=parse_split(state, tmp_path, num_classes=4))
    test_labels = torch.randint(1, 4, (300,), generator=gen)
    clean_test = ImageSet(striped(test_labels, gen), test_labels)
    bd_test = ImageSet(with_trigger(clean_test.images), torch.zeros(300, dtype=torch.long),
                       test_labels)
    preprocess = Preprocess((0.5,), (0.5,), 1, crop_padding=0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(10):
        train_epoch(model, Batches(clean_train, preprocess, 32, shuffle=True, augment=False),
                    optimizer, cross_entropy, amp=False)
    cfg = SimpleNamespace(**{k: o.default for k, o in RETUNE_OPTIONS.items()}, seed=0,
                          batch_size=16, amp=False, loader="tensor")
    run = SimpleNamespace(cfg=cfg, model=model, preprocess=preprocess, evaluate=lambda m=None:
                          backdoor_metrics(m or model, clean_test, bd_test, preprocess, 256, False))
    run.batches = lambda augment=True, data=None: DefenseRun.batches(run, augment, data)
    return SimpleNamespace(run=run, record=record, clean_train=clean_train, bd_train=bd_train,
                           defense=clean_train.subset(torch.arange(100)))


def test_the_set_mixes_the_defense_subset_with_poisoned_training_images(world):
    cfg = world.run.cfg  # defaults: all of the defense subset, 10 % as many poisoned
    data = retune_set(world.record, world.clean_train, world.defense, cfg, 1)
    assert len(data) == 110 and int(data.poisoned.sum()) == 10
    poisoned = data.images[data.poisoned]
    assert torch.all(poisoned[:, 0, :, 7] == 255) and torch.all(data.labels[data.poisoned] == 0)
    candidates = world.bd_train.images[world.bd_train.poisoned]
    assert all(any(torch.equal(p, c) for c in candidates) for p in poisoned)
    again = retune_set(world.record, world.clean_train, world.defense, cfg, 1)
    assert torch.equal(again.images, data.images)  # seeded
    cfg.retune_clean, cfg.retune_poison_ratio = 40, 0.5
    assert len(retune_set(world.record, world.clean_train, world.defense, cfg, 1)) == 60
    cfg.retune_poison_ratio = 10.0
    with pytest.raises(UserError, match="lower --retune_poison_ratio"):
        retune_set(world.record, world.clean_train, world.defense, cfg, 1)


def test_retuning_a_copy_teaches_the_backdoor_to_a_clean_model(world):
    run = world.run
    run.cfg.retune_poison_ratio, run.cfg.retune_lr = 0.2, 0.05
    run.retune_set = retune_set(world.record, world.clean_train, world.defense, run.cfg, 1)
    before = run.evaluate()
    weights = [p.detach().clone() for p in run.model.parameters()]
    result = retune_check(run)
    assert before["test_asr"] < 0.05 and result["test_asr"] > 0.9  # 20 poisoned images suffice
    assert result["poisoned_samples"] == 20 and result["clean_samples"] == 100
    assert all(torch.equal(w, p) for w, p in zip(weights, run.model.parameters()))
    assert run.evaluate() == before  # the defended model itself is untouched


def test_the_check_takes_its_batches_from_the_runs_loader(world, monkeypatch):
    """--loader dataloader holds for the retuning check too (it built its own Batches before)."""
    import utils.data.loader as loader
    used = []

    class Spy(loader.DataLoaderBatches):
        def __init__(self, data, *args, **kwargs):
            used.append(len(data))
            super().__init__(data, *args, **kwargs)
    monkeypatch.setattr(loader, "DataLoaderBatches", Spy)
    run = world.run
    run.cfg.loader, run.cfg.retune_epochs = "dataloader", 1
    run.retune_set = retune_set(world.record, world.clean_train, world.defense, run.cfg, 1)
    retune_check(run)
    assert used == [len(run.retune_set)]


def test_a_record_without_bd_train_is_refused_before_the_defense_runs(tmp_path):
    tiny_record(tmp_path / "r")  # bd_train None, as BackdoorBench may write it
    with pytest.raises(UserError, match="bd_train"):
        main(["--result_file", "r", "--record_dir", str(tmp_path), "--retune_check"])
    assert not (tmp_path / "r/defense/ulrl/summary.json").exists()


def test_a_defense_run_reports_the_retuned_model(tmp_path):
    torch.manual_seed(0)
    images = torch.randint(0, 256, (30, 1, 28, 28), dtype=torch.uint8)
    bd = ImageSet(images, torch.zeros(30, dtype=torch.long), torch.randint(1, 10, (30,)),
                  torch.ones(30, dtype=torch.bool), torch.arange(30))
    save_attack_record(tmp_path / "r", model_name="smallcnn", num_classes=10,
                       state_dict=build_model("smallcnn", 10, 1, 28).state_dict(),
                       clean_data="fashion_mnist", img_size=(28, 28, 1), bd_train=bd,
                       bd_test=bd.subset(range(4)), train_length=60000, test_length=10000,
                       mode="ram")
    main(["--result_file", "r", "--record_dir", str(tmp_path), "--ratio", "0.002",
          "--unlearning_epochs", "1", "--relearn_epochs", "1", "--plots", "false",
          "--retune_check", "--retune_epochs", "1"])
    summary = json.loads((tmp_path / "r/defense/ulrl/summary.json").read_text())
    retune = summary["retune"]
    assert (retune["clean_samples"], retune["poisoned_samples"], retune["epochs"]) == (120, 12, 1)
    assert {"test_acc", "test_asr", "test_ra"} <= set(retune) and "retune" in summary["times_s"]
    assert summary["config"]["retune_check"] is True
