"""Record-free runs: a model file (.pt state dict or .safetensors), class-labelled image folders,
an optional trigger; the same result files as a record run (utils/defenses/sources.py)."""
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from attack.badnet import badnet_poison
from models import build_model, read_state_dict
from tests.conftest import run_script
from tests.helpers import needs_fashion_mnist
from utils.core.errors import UserError
from utils.data.datasets import clean_split, load_clean_dataset
from utils.data.folders import class_index, image_folder
from utils.data.record import load_attack_record
from utils.data.triggers import paste

ROOT = Path(__file__).resolve().parents[1]
QUICK_ULRL = ["--unlearning_epochs", 1, "--relearn_epochs", 1, "--clean_threshold", 0.0,
              "--plots", "false"]


def write_folder(root: Path, images: torch.Tensor, labels, names=None) -> Path:
    """images uint8 [N, C, H, W] as PNGs in root/<class name>/<i>.png."""
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = root / (names[int(label)] if names else str(int(label)))
        folder.mkdir(parents=True, exist_ok=True)
        array = image.permute(1, 2, 0).numpy()
        Image.fromarray(array[..., 0] if array.shape[2] == 1 else array).save(folder / f"{i:05d}.png")
    return root


def random_images(n, channels=1, side=28, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, channels, side, side), dtype=torch.uint8, generator=generator),
            torch.arange(n) % 10)


def smallcnn_file(path: Path, prefix="", seed=0) -> Path:
    torch.manual_seed(seed)
    state = build_model("smallcnn", 10, in_channels=1, image_size=28).state_dict()
    state = {prefix + k: v for k, v in state.items()}
    if path.suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save(state, path)
    return path


def defend(tmp_path, *args, script="defense/ulrl.py"):
    return run_script(script, "--model", "smallcnn", "--output_dir", tmp_path / "out", *args)


# ---------------------------------------------------------------- image folders

def test_integer_class_folders_are_their_classes_and_names_sort(tmp_path):
    assert class_index(["0", "10", "2"], 11, "x") == {"0": 0, "10": 10, "2": 2}
    assert class_index(["dog", "cat"], 2, "x") == {"cat": 0, "dog": 1}
    with pytest.raises(UserError, match="3 class folders but the model has 10 classes"):
        class_index(["a", "b", "c"], 10, "x")
    with pytest.raises(UserError, match="outside the model's 10 classes"):
        class_index(["3", "12"], 10, "x")
    with pytest.raises(UserError, match="name the same class twice"):
        class_index(["1", "01"], 10, "x")


def test_image_folder_reads_what_it_should_and_skips_the_rest(tmp_path):
    images, labels = random_images(6)
    root = write_folder(tmp_path / "clean", images, labels % 3, names=["c", "a", "b"])
    (root / "a" / "notes.txt").write_text("not an image")
    (root / "a" / ".hidden.png").write_bytes(b"")
    (root / ".trash").mkdir()
    (root / "b" / "deeper").mkdir()
    Image.fromarray(np.full((40, 30), 7, np.uint8)).save(root / "b" / "deeper" / "big.png")
    folder = image_folder(root, (28, 28, 1), 3, "--clean_dir")
    assert folder.classes == {"a": 0, "b": 1, "c": 2}
    assert len(folder.split) == 7 and folder.split.labels.tolist() == [0, 0, 1, 1, 1, 2, 2]
    decoded = folder.split.subset()
    assert decoded.images.shape == (7, 1, 28, 28)  # the 40x30 image resized
    assert torch.equal(decoded.images[0], images[1])  # 'a' = class 1 of the names: images 1, 4
    with pytest.raises(UserError, match="not among the clean folder's"):
        write_folder(tmp_path / "test", images[:1], [0], names=["zebra"])
        image_folder(tmp_path / "test", (28, 28, 1), 3, "--test_dir", folder.classes)


@pytest.mark.parametrize("content, message", [
    (b"GIF89a" + b"\0" * 20, "not a readable"),  # a damaged header
    (b"%!PS-Adobe-3.0 EPSF-3.0\n", "not a readable"),  # EPS runs Ghostscript: refused by format
])
def test_bad_image_files_are_one_clear_error(tmp_path, content, message):
    (tmp_path / "clean" / "0").mkdir(parents=True)
    (tmp_path / "clean" / "0" / "x.png").write_bytes(content)
    split = image_folder(tmp_path / "clean", (28, 28, 1), 10, "--clean_dir").split
    with pytest.raises(UserError, match=message):
        split.subset()


def test_a_forged_huge_image_is_refused_before_decoding(tmp_path):
    import struct
    import zlib
    (tmp_path / "clean" / "0").mkdir(parents=True)
    header = struct.pack(">IIBBBBB", 9000, 9000, 8, 0, 0, 0, 0)  # 81 Mpx, no pixel data
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + \
        struct.pack(">I", zlib.crc32(kind + data))  # noqa: E731
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"")
    (tmp_path / "clean" / "0" / "bomb.png").write_bytes(png)
    split = image_folder(tmp_path / "clean", (28, 28, 1), 10, "--clean_dir").split
    with pytest.raises(UserError, match="more than the .* allowed"):
        split.subset()


def test_the_held_out_test_set_is_capped(tmp_path, monkeypatch):
    """Without --test_dir, C-ACC uses the clean images outside the defense subset, at most
    HELD_OUT_MAX of them (a seeded draw): a huge folder is not decoded whole."""
    from types import SimpleNamespace
    from utils.defenses import sources
    monkeypatch.setattr(sources, "HELD_OUT_MAX", 5)
    write_folder(tmp_path / "clean", *random_images(20))
    clean = image_folder(tmp_path / "clean", (28, 28, 1), 10, "--clean_dir")
    cfg = SimpleNamespace(test_dir=None, clean_dir="clean", seed=0)
    test, what = sources._test_images(cfg, None, (28, 28, 1), 10, clean.classes, clean.split,
                                      [0, 1, 2])
    assert len(test) == 5 and what.startswith("5 of the --clean_dir images outside")
    assert not set(test.index.tolist() if test.index is not None else []) & {0, 1, 2}


# ---------------------------------------------------------------- weights files

@pytest.mark.parametrize("suffix, prefix", [(".safetensors", ""), (".safetensors", "module."),
                                            (".pt", "_orig_mod."), (".pt", "model.")])
def test_weights_files_and_their_wrappers_load(tmp_path, suffix, prefix):
    from models import load_aligned
    path = smallcnn_file(tmp_path / f"w{suffix}", prefix)
    model = build_model("smallcnn", 10, in_channels=1, image_size=28)
    load_aligned(model, read_state_dict(path, "--model_file"), "w")
    torch.manual_seed(0)
    expected = build_model("smallcnn", 10, in_channels=1, image_size=28).state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())


def test_a_checkpoint_dict_and_nothing_else_is_read(tmp_path):
    state = build_model("smallcnn", 10, in_channels=1, image_size=28).state_dict()
    torch.save({"epoch": 3, "state_dict": state}, tmp_path / "ckpt.pt")
    assert set(read_state_dict(tmp_path / "ckpt.pt")) == set(state)
    torch.save(build_model("smallcnn", 10, 1, 28), tmp_path / "pickled_module.pt")
    with pytest.raises(UserError, match="cannot read weights file"):  # weights_only refuses it
        read_state_dict(tmp_path / "pickled_module.pt", "--model_file")
    broken = {**state, "linear.weight": torch.full_like(state["linear.weight"], float("nan"))}
    save_file(broken, tmp_path / "nan.safetensors")
    with pytest.raises(UserError, match="'linear.weight' holds NaN"):
        read_state_dict(tmp_path / "nan.safetensors", "--model_file")


# ---------------------------------------------------------------- triggers

def test_a_white_patch_at_the_corner_is_badnets():
    images, _ = random_images(4)
    patch = torch.full((1, 3, 3), 255, dtype=torch.uint8)
    assert torch.equal(paste(images, patch, 25, 25), badnet_poison(images, 3))
    half = paste(images, patch, 0, 0, torch.full((1, 3, 3), 0.5))
    expected = ((images[..., :3, :3].float() + 255) / 2).round().to(torch.uint8)
    assert torch.equal(half[..., :3, :3], expected) and torch.equal(half[..., 3:, :], images[..., 3:, :])


# ---------------------------------------------------------------- the command line

def test_record_free_run_writes_the_same_files_as_a_record_run(tmp_path):
    """smallcnn weights, 120 clean PNGs, no test folder (the images outside the defense subset),
    a blended trigger for ASR."""
    images, labels = random_images(120)
    write_folder(tmp_path / "clean", images, labels)
    Image.fromarray(np.tile(np.arange(28, dtype=np.uint8) * 9, (28, 1))).save(tmp_path / "ramp.png")
    done = defend(tmp_path, "--model_file", smallcnn_file(tmp_path / "m.safetensors", "module."),
                  "--clean_dir", tmp_path / "clean", "--image_size", 28, "--mean", 0.5,
                  "--std", 0.5, "--defense_samples", 40, "--trigger_blend", tmp_path / "ramp.png",
                  "--blend_alpha", 0.3, "--target_label", 3, *QUICK_ULRL[:-2])  # with plots
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out" / "ulrl"
    assert {p.name for p in out.iterdir()} == {"defense_result.pt", "index.txt", "summary.json",
                                              "ulrl.log", "ulrl_df.csv", "ulrl_df_summary.csv",
                                              "ulrl_before_after.csv", "neuron_changes.png"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["record"] is None and summary["model_file"].endswith("m.safetensors")
    assert summary["defense_samples"] == 40 and summary["dataset"] == "image folder"
    assert summary["test_set"].startswith("the 80 --clean_dir images outside the defense subset")
    # The folder lists class by class: image i (class i % 10) is listed at 12 * (i % 10) + i // 10
    chosen = set(map(int, (out / "index.txt").read_text().split()))
    held_out = [position // 12 for position in range(120) if position not in chosen]
    assert len(chosen) == 40 and len(held_out) == 80
    assert summary["test_samples"] == 80 + sum(c != 3 for c in held_out)  # triggered: not class 3
    assert set(summary["before"]) == {"test_acc", "test_asr", "test_ra"}


def test_without_a_trigger_there_is_no_asr(tmp_path, capsys):
    images, labels = random_images(60)
    write_folder(tmp_path / "clean", images, labels)
    write_folder(tmp_path / "test", *random_images(30, seed=1))
    done = defend(tmp_path, "--model_file", smallcnn_file(tmp_path / "m.pt"), "--clean_dir",
                  tmp_path / "clean", "--test_dir", tmp_path / "test", "--dataset",
                  "fashion_mnist", "--ratio", 1, "--epochs", 1, "--plots", "false",
                  script="defense/ft.py")
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "out" / "ft" / "summary.json").read_text())
    assert set(summary["before"]) == {"test_acc"} and summary["defense_samples"] == 60
    assert summary["test_set"].startswith("--test_dir") and "n/a" in done.stdout
    from utils.analysis.report import main as report
    assert report([str(tmp_path / "out" / "ft" / "summary.json")]) == 0  # one line, C-ACC only
    line = capsys.readouterr().out
    assert line.startswith("m.pt") and "C-ACC" in line and "ASR" not in line


@pytest.mark.parametrize("model", ["resnet18", "timm/resnet18"])
def test_a_torchvision_and_a_timm_model_go_through_the_whole_path(tmp_path, model):
    """Randomly initialized RGB models saved as .safetensors, 32 x 32 PNGs in named class folders,
    a patch trigger with an alpha channel: the run finds the classifier, purifies and measures."""
    if model.startswith("timm/"):
        pytest.importorskip("timm")  # an optional dependency; sh/test.sh installs it
    torch.manual_seed(0)
    save_file(build_model(model, 4, in_channels=3, image_size=32).state_dict(),
              tmp_path / "m.safetensors")
    images, labels = random_images(48, channels=3, side=32)
    write_folder(tmp_path / "clean", images, labels % 4, names=["cat", "dog", "emu", "fox"])
    patch = np.zeros((5, 5, 4), np.uint8)
    patch[..., 0], patch[..., 3] = 255, 200  # red, 78 % opaque
    Image.fromarray(patch, "RGBA").save(tmp_path / "patch.png")
    done = run_script("defense/ulrl.py", "--model", model, "--model_file", tmp_path / "m.safetensors",
                      "--clean_dir", tmp_path / "clean", "--image_size", 32, "--mean", 0.5, 0.5,
                      0.5, "--std", 0.25, "--ratio", 0.5, "--trigger_patch", tmp_path / "patch.png",
                      "--trigger_pos", 2, 3, "--target_label", 1, "--batch_size", 8,
                      "--output_dir", tmp_path / "out", *QUICK_ULRL)
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "out" / "ulrl" / "summary.json").read_text())
    assert summary["classifier"] == "fc" and len(summary["identification"]["scores"]) == 4
    assert summary["model"] == model and summary["defense_samples"] == 24
    assert summary["test_samples"] == 24 + 18  # 24 held out, the 18 of them not of class 1
    assert 0 <= summary["after"]["test_asr"] <= 1


@pytest.mark.parametrize("args, message", [
    (["--model_file", "MODEL"], "needs the input size: --image_size"),
    (["--model_file", "MODEL", "--image_size", 28], "needs clean images: --clean_dir"),
    (["--model_file", "MODEL", "--dataset", "fashion_mnist", "--target_label", 1],
     "--target_label needs a trigger"),
    (["--model_file", "MODEL", "--dataset", "fashion_mnist", "--trigger_patch", "x.png"],
     "a trigger needs --target_label"),
    (["--model_file", "MODEL", "--clean_dir", "CLEAN", "--image_size", 28, "--ratio", 1],
     "leaving none to measure C-ACC: pass --test_dir"),
    (["--model_file", "MODEL", "--clean_dir", "CLEAN", "--image_size", 28, "--num_classes", 7],
     "class folder 9 is outside the model's 7 classes"),
    (["--model_file", "MODEL", "--clean_dir", "CLEAN", "--image_size", 28, "--num_classes", 12],
     "do not fit the SmallCNN model .*shape mismatches: linear.weight"),
    (["--model_file", "MODEL", "--clean_dir", "CLEAN", "--image_size", 28, "--model",
      "preactresnet18"], "do not fit the \\w+ model .*missing keys"),
    (["--model_file", "MODEL", "--clean_dir", "CLEAN", "--image_size", 28, "--ratio", 0.5,
      "--trigger_patch", "BIG", "--target_label", 0], "does not fit the 28 x 28 images"),
    (["--model_file", "MODEL", "--clean_dir", "CLEAN", "--image_size", 28, "--ratio", 0.5,
      "--trigger_patch", "BIG", "--trigger_pos", 1, 2, 3, "--target_label", 0],
     "--trigger_pos takes two numbers"),
    (["--model_file", "MODEL", "--result_file", "r", "--dataset", "fashion_mnist"],
     "'model_file' and 'result_file' cannot be used together"),
    (["--result_file", "r", "--clean_dir", "CLEAN"], "--clean_dir is for runs on a --model_file"),
], ids=["size", "data", "target", "trigger", "no_test", "classes", "shapes", "architecture",
        "patch_size", "pos", "both", "record"])
def test_record_free_mistakes_are_one_line_and_leave_nothing(tmp_path, args, message):
    images, labels = random_images(20)
    write_folder(tmp_path / "clean", images, labels)
    Image.new("L", (40, 3), 255).save(tmp_path / "big.png")
    (tmp_path / "record" / "r").mkdir(parents=True)
    torch.save({}, tmp_path / "record" / "r" / "attack_result.pt")
    names = {"MODEL": smallcnn_file(tmp_path / "m.pt"), "CLEAN": tmp_path / "clean",
             "BIG": tmp_path / "big.png"}
    done = run_script("defense/ulrl.py", "--model", "smallcnn", "--record_dir", tmp_path / "record",
                      "--output_dir", tmp_path / "out",
                      *[names.get(a, a) if isinstance(a, str) else a for a in args])
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) <= 2 and "Traceback" not in done.stderr, done.stderr
    assert any(re.search(message, line) for line in lines), done.stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- the demonstration

@needs_fashion_mnist
def test_a_record_exported_to_files_defends_alike(small_badnet_record, tmp_path):
    """A BadNets record's model as .safetensors, its defense subset, the test set and its backdoor
    test set as PNG folders: the record-free run flags the same neurons with the same scores and
    gives the same C-ACC, ASR and RA before and after as the record run on that subset."""
    records, name = small_badnet_record
    record = load_attack_record(records / name)
    save_file({f"module.{k}": v.contiguous() for k, v in record.state_dict.items()},
              tmp_path / "model.safetensors")
    train = load_clean_dataset("fashion_mnist", ROOT / "data", train=True)
    test = clean_split("fashion_mnist", ROOT / "data", train=False)
    index = random.Random(0).sample(range(len(train)), 600)
    subset = train.subset(index)
    write_folder(tmp_path / "clean", subset.images, subset.labels)
    write_folder(tmp_path / "test", *(lambda t: (t.images, t.labels))(test.subset()))
    bd_test = record.bd_test.images(test)
    write_folder(tmp_path / "bd", bd_test.images, bd_test.true_labels)
    # The folder lists the subset class by class; --ratio 1 then shuffles it with the seed. The
    # record run gets the same images in the same order through --index.
    listed = sorted(range(600), key=lambda i: (int(subset.labels[i]), i))
    order = [index[listed[p]] for p in random.Random(0).sample(range(600), 600)]
    (tmp_path / "index.txt").write_text("".join(f"{i}\n" for i in order))
    options = ["--yaml_path", "config/defense/ulrl/fashion_mnist.yaml", "--unlearning_epochs", 3,
               "--relearn_epochs", 2, "--seed", 0, "--plots", "false"]
    from tests.test_defense_anp_rnp_ibau import run_defense
    from defense import ulrl
    expected, _ = run_defense(ulrl, "ulrl_files", small_badnet_record, *options, "--tag", "files",
                              "--index", tmp_path / "index.txt")
    done = defend(tmp_path, "--model_file", tmp_path / "model.safetensors", "--clean_dir",
                  tmp_path / "clean", "--test_dir", tmp_path / "test", "--bd_test_dir",
                  tmp_path / "bd", "--target_label", 0, "--dataset", "fashion_mnist", "--ratio", 1,
                  *options)
    assert done.returncode == 0, done.stderr
    got = json.loads((tmp_path / "out" / "ulrl" / "summary.json").read_text())
    assert [f["neuron"] for f in got["flagged_neurons"]] == \
        [f["neuron"] for f in expected["flagged_neurons"]]
    assert [f["score"] for f in got["flagged_neurons"]] == \
        pytest.approx([f["score"] for f in expected["flagged_neurons"]], abs=1e-4)
    for phase in ("before", "after"):
        assert got[phase] == pytest.approx(expected[phase], abs=2e-4), phase
    assert got["test_samples"] == expected["test_samples"]


def test_one_function_call_on_a_safetensors_file_and_a_png_folder(tmp_path):
    """The notebook path: the user's own model and image folder, torchvision's ImageFolder as the
    Dataset, one purify call."""
    from torchvision import datasets, transforms
    from defense import ulrl
    from models import load_aligned
    torch.manual_seed(0)
    save_file(build_model("resnet18", 3, in_channels=3, image_size=32).state_dict(),
              tmp_path / "m.safetensors")
    write_folder(tmp_path / "clean", *(lambda x, y: (x, y % 3))(*random_images(30, 3, 32)),
                 names=["ant", "bee", "cow"])
    model = build_model("resnet18", 3, in_channels=3, image_size=32)
    load_aligned(model, read_state_dict(tmp_path / "m.safetensors"), "m.safetensors")
    folder = datasets.ImageFolder(tmp_path / "clean", transform=transforms.PILToTensor())
    test_images, test_labels = random_images(12, 3, 32, seed=1)
    triggered = paste(test_images, torch.full((3, 4, 4), 255, dtype=torch.uint8), 28, 28)
    purified, report = ulrl.purify(
        model, folder, mean=(0.5,) * 3, std=(0.25,) * 3, test=(test_images, test_labels % 3),
        backdoor_test=(triggered, test_labels % 3), target_label=1, batch_size=10,
        unlearning_epochs=1, relearn_epochs=1, clean_threshold=0.0)
    assert report["classifier"] == "fc" and report["defense_samples"] == 30
    assert set(report["before"]) == set(report["after"]) == {"test_acc", "test_asr", "test_ra"}
    assert len(report["identification"]["scores"]) == 3
    assert any(not torch.equal(v, model.state_dict()[k]) for k, v in purified.state_dict().items())


def test_api_test_sets_are_checked():
    from defense import ft
    model = build_model("smallcnn", 10, in_channels=1, image_size=28)
    images, labels = random_images(20)
    with pytest.raises(UserError, match="backdoor_test and target_label go together"):
        ft.purify(model, images, labels, test=(images, labels), backdoor_test=(images, labels))
    with pytest.raises(UserError, match="test images are \\(1, 14, 14\\)"):
        ft.purify(model, images, labels, test=(images[..., :14, :14], labels))
    _, report = ft.purify(model, images, labels, test=(images, labels), epochs=1)
    assert set(report["before"]) == {"test_acc"}


def test_small_weights_naming_a_huge_model_are_refused_without_building_it():
    """A record or file that names vit_h_14 (632 M parameters, 2.5 GB) or regnet_y_128gf over a
    small state dict: the fit is checked on a storage-free build, so the refusal costs no memory
    (measured: peak RSS 687-692 MiB against 684 MiB for the fitting smallcnn; a real vit_h_14
    build alone takes 2.5 GB)."""
    import subprocess
    import sys
    script = ("import resource, sys; from models import build_model, build_for_weights\n"
              "from utils.core.errors import UserError\n"
              "sd = build_model('smallcnn', 10, 1, 28).state_dict()\n"
              "try:\n    build_for_weights(sys.argv[1], 10, 1, 28, sd, 'the weights')\n"
              "except UserError as e:\n    print(e)\n"
              "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)\n")
    peak = {}
    for name in ("smallcnn", "vit_h_14", "regnet_y_128gf"):
        done = subprocess.run([sys.executable, "-c", script, name], cwd=ROOT, capture_output=True,
                              text=True, timeout=600)
        lines = done.stdout.splitlines()
        assert done.returncode == 0 and (name == "smallcnn") == (len(lines) == 1), done.stderr
        assert name == "smallcnn" or "do not fit the" in lines[0]
        peak[name] = int(lines[-1])
    assert max(peak["vit_h_14"], peak["regnet_y_128gf"]) < peak["smallcnn"] + 400
