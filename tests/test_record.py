"""utils.data.record: BackdoorBench records round-trip, load from anywhere, never run code on load."""
import builtins
import logging
import os
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from models import strip_module_prefix
from utils.core.errors import UserError
from utils.core.io import torch_save
from utils.data.images import ImageSet
from utils.data.record import (load_attack_record, load_defense_result, safe_load,
                               save_attack_record, save_defense_result)
from utils.data.split import dataset_state, parse_split

SHAPES = [(1, 28, 28), (3, 32, 32)]
N = 20
TARGET = 0


def clean_set(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (N, *shape), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (N,), generator=g)
    return ImageSet(images, labels)


def poison(clean, order, poisoned):
    """Items `order` of `clean`; those flagged in `poisoned` get a white corner and label TARGET."""
    order = torch.as_tensor(order, dtype=torch.long)
    poisoned = torch.as_tensor(poisoned, dtype=torch.bool)
    images = clean.images[order].clone()
    images[poisoned, :, -3:, -3:] = 255
    true = clean.labels[order].clone()
    labels = torch.where(poisoned, torch.full_like(true, TARGET), true)
    return ImageSet(images, labels, true, poisoned, order)


def bd_sets(clean_train, clean_test):
    train = poison(clean_train, range(N), [i % 3 == 0 for i in range(N)])  # mix of clean/poisoned
    keep = [i for i in reversed(range(N)) if int(clean_test.labels[i]) != TARGET]  # shuffled subset
    return train, poison(clean_test, keep, [True] * len(keep))


def tiny_state_dict(prefix=""):
    return {f"{prefix}conv.weight": torch.randn(4, 3, 3, 3), f"{prefix}conv.bias": torch.randn(4),
            f"{prefix}bn.num_batches_tracked": torch.tensor(7)}


def save(folder, shape, mode="disk", prefix=""):
    clean_train, clean_test = clean_set(shape, 1), clean_set(shape, 2)
    train, test = bd_sets(clean_train, clean_test)
    sd = tiny_state_dict(prefix)
    path = save_attack_record(folder, model_name="preactresnet18", num_classes=10, state_dict=sd,
                              clean_data="cifar10", img_size=(shape[1], shape[2], shape[0]),
                              bd_train=train, bd_test=test, train_length=N, test_length=N,
                              mode=mode)
    return path, sd, (clean_train, clean_test), (train, test)


def assert_same(a: ImageSet, b: ImageSet):
    assert torch.equal(a.images, b.images)
    for name in ("labels", "true_labels", "poisoned", "index"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and torch.equal(x, y), name


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", ["disk", "ram"])
def test_round_trip(tmp_path, shape, mode):
    folder = tmp_path / "rec"
    path, sd, (clean_train, clean_test), (train, test) = save(folder, shape, mode)
    assert path == folder / "attack_result.pt"
    rec = load_attack_record(folder)
    if mode == "ram":  # the numpy/PIL allowlist is scoped to safe_load, not left switched on
        with pytest.raises(Exception, match="Weights only load failed"):
            torch.load(path, weights_only=True)
    assert (rec.model_name, rec.num_classes, rec.clean_data) == ("preactresnet18", 10, "cifar10")
    assert rec.data_path == "./data/cifar10" and rec.img_size == (shape[1], shape[2], shape[0])
    assert rec.state_dict.keys() == sd.keys()
    assert all(torch.equal(rec.state_dict[k], sd[k]) for k in sd)
    assert_same(rec.bd_train.images(clean_train), train)
    assert_same(rec.bd_test.images(clean_test), test)


@pytest.mark.parametrize("mode", ["disk", "ram"])
def test_record_is_plain_backdoorbench_data(tmp_path, mode):
    """What BackdoorBench's bare torch.load sees: plain types, numpy int64 keys, exact paths."""
    path, *_ = save(tmp_path / "rec", (3, 32, 32), mode)
    raw = torch.load(path, weights_only=False)
    assert type(raw) is dict and list(raw) == ["model_name", "num_classes", "model", "data_path",
                                               "img_size", "clean_data", "bd_train", "bd_test"]
    assert isinstance(raw["img_size"], tuple)
    allowed = {"numpy._core.multiarray._reconstruct", "numpy._core.multiarray.scalar",
               "numpy.ndarray", "numpy.dtype", "PIL.Image.Image"}
    assert set(torch.serialization.get_unsafe_globals_in_checkpoint(path)) <= allowed
    state = raw["bd_test"]
    assert state["getitem_all"] is True and state["getitem_all_switch"] is False
    assert state["original_index_array"].dtype == np.int64
    assert state["poison_indicator"].dtype == np.float64 and len(state["poison_indicator"]) == N
    data = state["bd_data_container"]["data_dict"]
    assert data and all(type(k) is np.int64 for k in data)
    key, value = next(iter(data.items()))
    if mode == "ram":
        assert state["save_folder_path"] is None
        assert isinstance(value[0], Image.Image) and type(value[1]) is int
    else:
        assert state["save_folder_path"] == "./record/rec/bd_test_dataset"
        assert state["bd_data_container"]["save_folder_path"] == "./record/rec/bd_test_dataset"
        bd_label, true_label = value["other_info"]
        assert type(bd_label) is int and type(true_label) is int
        assert value["path"] == f"./record/rec/bd_test_dataset/{true_label}/{int(key)}.png"
        png = tmp_path / "rec" / "bd_test_dataset" / str(true_label) / f"{int(key)}.png"
        assert png.is_file()


def test_module_prefix_is_stripped(tmp_path):
    save(tmp_path / "rec", (3, 32, 32), prefix="module.")
    rec = load_attack_record(tmp_path / "rec" / "attack_result.pt")  # the .pt path works too
    assert set(rec.state_dict) == set(tiny_state_dict())
    assert strip_module_prefix({"module.a": 1, "b": 2}) == {"a": 1, "b": 2}


def test_moved_renamed_record_loads_from_elsewhere(tmp_path, monkeypatch):
    _, _, (clean_train, clean_test), (train, test) = save(tmp_path / "a" / "rec", (1, 28, 28))
    moved = tmp_path / "b" / "renamed"
    moved.parent.mkdir()
    shutil.move(tmp_path / "a" / "rec", moved)
    monkeypatch.chdir(tmp_path / "a")
    rec = load_attack_record(moved)
    assert_same(rec.bd_train.images(clean_train), train)
    assert_same(rec.bd_test.images(clean_test), test)


def test_absolute_and_folder_relative_paths(tmp_path):
    folder = tmp_path / "rec"
    _, _, (_, clean_test), (_, test) = save(folder, (3, 32, 32))
    split = load_attack_record(folder).bd_test
    for i, value in enumerate(split.entries.values()):
        rel = value["path"].split("/", 3)[3]  # drop './record/rec/'
        value["path"] = str(folder / rel) if i % 2 else rel
    assert_same(split.images(clean_test), test)


@pytest.mark.parametrize("key_type", [np.int64, int])
def test_int64_and_int_keys(tmp_path, key_type):
    folder = tmp_path / "rec"
    _, _, (clean_train, _), (train, _) = save(folder, (3, 32, 32), "ram")
    raw = torch.load(folder / "attack_result.pt", weights_only=False)
    container = raw["bd_train"]["bd_data_container"]
    container["data_dict"] = {key_type(int(k)): v for k, v in container["data_dict"].items()}
    torch_save(folder / "attack_result.pt", raw)
    rec = load_attack_record(folder)
    assert all(type(k) is key_type for k in rec.bd_train.entries)
    assert_same(rec.bd_train.images(clean_train), train)


@pytest.mark.parametrize("mode", ["disk", "ram"])
def test_numpy1_pickle_loads(tmp_path, mode):
    folder = tmp_path / "rec"
    path, _, (clean_train, clean_test), (train, test) = save(folder, (3, 32, 32), mode)
    obj = torch.load(path, weights_only=False)
    torch.save(obj, path, _use_new_zipfile_serialization=False)
    raw = path.read_bytes()
    assert b"numpy._core.multiarray" in raw  # protocol-2 GLOBALs are text: rename to numpy 1.x
    path.write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    raw = path.read_bytes()
    assert b"numpy.core.multiarray" in raw and b"numpy._core" not in raw
    rec = load_attack_record(folder)
    assert_same(rec.bd_train.images(clean_train), train)
    assert_same(rec.bd_test.images(clean_test), test)


class Evil:
    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def evil_cases(tmp_path):
    target = tmp_path / "pwned"
    system = r"nt\.system" if os.name == "nt" else r"posix\.system"
    return target, [(Evil(os.system, (f"touch {target}",)), system),
                    (Evil(builtins.open, (str(target), "w")), r"\b(builtins|io)\.open")]


def test_malicious_record_is_refused(tmp_path):
    target, cases = evil_cases(tmp_path)
    for evil, name in cases:
        folder = tmp_path / "rec"
        torch_save(folder / "attack_result.pt", {"model_name": "x", "bd_test": {"a": [1, evil]}})
        for load in (lambda: safe_load(folder / "attack_result.pt"),
                     lambda: load_attack_record(folder)):
            with pytest.raises(UserError) as err:
                load()
            message = str(err.value)
            assert re.search(name, message) and "--trust_record" in message, message
            assert "\n" not in message
        assert not target.exists()


def test_trust_runs_the_unpickler(tmp_path, caplog, monkeypatch):
    # the console setup of an earlier test in this process turns propagation off; caplog needs it
    monkeypatch.setattr(logging.getLogger("backdoor"), "propagate", True)
    target, cases = evil_cases(tmp_path)
    torch_save(tmp_path / "x.pt", {"f": cases[1][0]})
    with caplog.at_level(logging.WARNING):
        loaded = safe_load(tmp_path / "x.pt", trust=True)
    loaded["f"].close()
    assert target.exists() and "trust_record" in caplog.text


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="nope.pt"):
        safe_load(tmp_path / "nope.pt")
    with pytest.raises(UserError, match=re.escape(str(tmp_path / "gone" / "attack_result.pt"))):
        load_attack_record(tmp_path / "gone")


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("cut", ["half", "empty", "junk"])
def test_corrupt_file(tmp_path, legacy, cut):
    path, *_ = save(tmp_path / "rec", (1, 28, 28), "ram")
    obj = torch.load(path, weights_only=False)
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    raw = path.read_bytes()
    bad = {"half": raw[: len(raw) // 2], "empty": b"", "junk": b"not a torch file" * 9}
    path.write_bytes(bad[cut])
    with pytest.raises(UserError, match=re.escape(str(path))) as err:
        load_attack_record(tmp_path / "rec")
    assert "corrupt" in str(err.value)


@pytest.mark.parametrize("key, value, pattern", [
    ("bd_test", None, "'bd_test' is missing"),
    ("model_name", None, "'model_name' is missing"),
    ("num_classes", "10", "'num_classes'"),
    ("img_size", (32, 32), "'img_size'"),
    ("model", {"w": [1.0]}, "'model'"),
    ("bd_test", {"original_index_array": np.arange(3)}, r"'bd_test\.poison_indicator' is missing"),
])
def test_bad_record_names_key_and_file(tmp_path, key, value, pattern):
    path, *_ = save(tmp_path / "rec", (1, 28, 28), "ram")
    rec = torch.load(path, weights_only=False)
    if value is None:
        del rec[key]
    else:
        rec[key] = value
    torch_save(path, rec)
    with pytest.raises(UserError, match=pattern) as err:
        load_attack_record(tmp_path / "rec")
    assert str(path) in str(err.value)


def test_path_escaping_record_folder_is_refused(tmp_path):
    folder = tmp_path / "rec"
    _, _, (_, clean_test), _ = save(folder, (3, 32, 32))
    Image.new("RGB", (32, 32)).save(tmp_path / "outside.png")  # exists, so only the check stops it
    for bad in ("./record/rec/../../../outside.png", "../outside.png",
                str(folder / ".." / "outside.png")):
        split = load_attack_record(folder).bd_test
        value = next(iter(split.entries.values()))
        value["path"] = bad
        with pytest.raises(UserError, match=r"outside the record folder|contains '\.\.'"):
            split.images(clean_test)


def test_missing_png_and_size_mismatch(tmp_path):
    folder = tmp_path / "rec"
    _, _, (_, clean_test), _ = save(folder, (3, 32, 32))
    split = load_attack_record(folder).bd_test
    with pytest.raises(UserError, match="28x28"):
        split.images(ImageSet(torch.zeros(N, 3, 28, 28, dtype=torch.uint8), clean_test.labels))
    victim = next(iter(split.entries.values()))["path"]
    png = folder / victim.split("/", 3)[3]
    png.unlink()
    with pytest.raises(UserError, match=re.escape(str(png))):
        split.images(clean_test)


@pytest.mark.parametrize("pil_mode", ["L", "RGBA", "P"])
def test_ram_images_in_other_modes_are_converted(tmp_path, pil_mode):
    clean = clean_set((3, 32, 32))
    bd = poison(clean, range(N), [True] * N)
    state = dataset_state(bd, N, "rec", "bd_test", tmp_path, mode="ram")
    for key, (img, *labels) in state["bd_data_container"]["data_dict"].items():
        state["bd_data_container"]["data_dict"][key] = (img.convert(pil_mode), *labels)
    out = parse_split(state, tmp_path).images(clean)
    assert out.images.shape == bd.images.shape and torch.equal(out.labels, bd.labels)
    if pil_mode == "RGBA":
        assert torch.equal(out.images, bd.images)
    elif pil_mode == "L":  # grey repeated to RGB; PIL's integer luma may differ by 1 from ours
        assert torch.equal(out.images[:, :1].expand(-1, 3, -1, -1), out.images)
        grey = bd.with_channels(1).images.int()
        assert (out.images[:, :1].int() - grey).abs().max() <= 1
    # 'P' quantizes colours, so only shapes and labels can be compared


def test_defense_result_round_trip(tmp_path):
    sd = tiny_state_dict("module.")
    path = tmp_path / "defense" / "ulrl" / "defense_result.pt"
    save_defense_result(path, model_name="preactresnet18", num_classes=10, state_dict=sd)
    assert set(torch.load(path, weights_only=True)) == {"model_name", "num_classes", "model"}
    out = load_defense_result(path)
    assert out["model_name"] == "preactresnet18" and out["num_classes"] == 10
    assert all(torch.equal(out["model"][k], sd["module." + k]) for k in tiny_state_dict())
