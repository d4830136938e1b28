"""Blended, SIG, LF, TrojanNN and LC: their trigger functions on generated tensors (1 and 3
channels, 28/32/64 px), and one small Fashion-MNIST record per attack (5,000 training and 1,000
test images, smallcnn, 3 epochs at lr 0.05) that must load, be poisoned as configured and carry a
working backdoor."""
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from attack import blended, lc, lf, sig, trojannn
from models import build_model
from utils.core.errors import UserError
from utils.data.datasets import find_dataset_folder, load_clean_dataset
from utils.data.images import Preprocess, convert_channels
from utils.data.record import load_attack_record
from tests.helpers import check_bd_train_is_poisoned_like_bd_test
from tests.outcomes import check, seed_args

SHAPES = [(1, 28, 28), (3, 28, 28), (1, 32, 32), (3, 32, 32), (1, 64, 64), (3, 64, 64)]
TARGET = 0
DATA = Path(__file__).resolve().parents[1] / "data"


def random_images(shape, n=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=gen)


def poison_functions(channels, height, width):
    """Each attack's test-time poison for one image shape (LF and TrojanNN with generated triggers
    of the kind their searches return)."""
    gen = torch.Generator().manual_seed(1)
    kh, kw = lf.kept_frequencies(height, 0.25), lf.kept_frequencies(width, 0.25)
    lf_trigger = 255 * lf.low_pass(0.05 * torch.randn(channels, kh, kw, generator=gen),
                                   lf.dct_basis(height, kh), lf.dct_basis(width, kw))
    patch = 255 * torch.rand(channels, height, width, generator=gen)
    mask = trojannn.square_mask(height, width, 0.25)
    pattern = blended.procedural_pattern(channels, height, width)
    return {"blended": lambda x: blended.blended_poison(x, pattern, 0.2),
            "sig": lambda x: sig.sig_poison(x, 40, 6),
            "lf": lambda x: lf.lf_poison(x, lf_trigger),
            "trojannn": lambda x: trojannn.trojannn_poison(x, patch, mask),
            "lc": lambda x: lc.corner_trigger(x, 3)}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", ["blended", "sig", "lf", "trojannn", "lc"])
def test_poison_keeps_shape_dtype_input_and_is_deterministic(name, shape):
    images = random_images(shape)
    before = images.clone()
    poison = poison_functions(*shape)[name]
    out = poison(images)
    assert out.dtype == torch.uint8 and out.shape == images.shape
    assert torch.equal(images, before), "the input batch was modified"
    assert torch.equal(out, poison_functions(*shape)[name](images.clone()))
    assert (out != images).flatten(1).any(1).all(), "some image was left unchanged"


def test_blended_pattern_is_fixed_natural_and_fits_any_shape():
    rgb = blended.procedural_pattern(3, 64, 64)
    assert torch.equal(rgb, blended.procedural_pattern(3, 64, 64))
    # Fixed values (seeded NumPy RandomState): the same pattern on every machine, up to a unit of
    # float rounding in the bicubic upsampling.
    assert abs(rgb.float().mean().item() - 121.21) < 0.1
    assert rgb.amin().item() == 0 and rgb.amax().item() == 255
    # Smooth ("natural"), not noise: neighbouring pixels differ little on average.
    assert (rgb[:, :, 1:].float() - rgb[:, :, :-1].float()).abs().mean() < 8
    grey = blended.procedural_pattern(1, 28, 28)
    assert grey.shape == (1, 28, 28)
    assert torch.equal(grey, convert_channels(blended.procedural_pattern(3, 28, 28)[None], 1)[0])
    zeros = torch.zeros(2, 1, 28, 28, dtype=torch.uint8)
    assert torch.equal(blended.blended_poison(zeros, grey, 0.2)[0], (0.2 * grey.float()).round()
                       .to(torch.uint8))


def test_blended_pattern_file_is_resized_and_bad_files_are_refused(tmp_path):
    red = tmp_path / "red.png"
    Image.fromarray(np.full((10, 20, 3), (255, 0, 0), dtype=np.uint8)).save(red)
    rgb = blended.load_pattern(str(red), 3, 32, 32)
    assert rgb.shape == (3, 32, 32) and rgb[0].eq(255).all() and rgb[1:].eq(0).all()
    assert blended.load_pattern(str(red), 1, 28, 28).eq(76).all()  # luma of pure red
    with pytest.raises(UserError, match="not found"):
        blended.load_pattern(str(tmp_path / "missing.png"), 3, 32, 32)
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(UserError, match="not a readable .* image"):
        blended.load_pattern(str(tmp_path / "text.png"), 3, 32, 32)


def test_sig_adds_the_horizontal_sinusoid_and_clamps():
    flat = torch.full((1, 3, 5, 28), 100, dtype=torch.uint8)
    out = sig.sig_poison(flat, 40, 6)
    expected = [round(100 + 40 * math.sin(2 * math.pi * j * 6 / 28)) for j in range(28)]
    assert (out == torch.tensor(expected, dtype=torch.uint8)).all()
    bright = sig.sig_poison(torch.full((1, 1, 4, 32), 250, dtype=torch.uint8), 40, 6)
    assert bright.max() == 255 and bright.min() == 210


def small_model(channels, size):
    torch.manual_seed(0)
    return build_model("smallcnn", 10, in_channels=channels, image_size=size).eval()


def test_lf_trigger_is_low_pass_bounded_and_deterministic():
    images = random_images((3, 32, 32), n=64)
    cfg = SimpleNamespace(eps=10.0, cutoff=0.25, trigger_epochs=2, fooling_rate=0.0,
                          trigger_lr=0.01, batch_size=32)
    preprocess = Preprocess((0.5,), (0.5,), 3)
    model = small_model(3, 32)

    def fit():
        return lf.fit_trigger(model, images, TARGET, preprocess, cfg, torch.device("cpu"),
                              torch.Generator().manual_seed(0))

    trigger, rate, passes = fit()
    assert trigger.shape == (3, 32, 32) and passes == 2 and 0 <= rate <= 1
    assert trigger.abs().max() <= 10 + 1e-3 and trigger.abs().max() > 5
    full = lf.dct_basis(32, 32)
    spectrum = lf.analysis(trigger, full, full)
    assert spectrum[:, 8:, :].abs().max() < 1e-3 and spectrum[:, :, 8:].abs().max() < 1e-3
    assert torch.equal(trigger, fit()[0])


def test_trojannn_mask_neuron_choice_and_trigger_search():
    assert [int(trojannn.square_mask(s, s, 0.25).sum().sqrt()) for s in (28, 32, 64)] == [7, 8, 16]
    layer = torch.nn.Linear(6, 3)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.1, -3, 0, 1, 0, 0], [0, 2, 0, -1, 0.5, 0],
                                         [0, 0, 0, 1.5, 0, 0.1]]))
    assert trojannn.strongest_neurons(layer, 2).tolist() == [1, 3]

    model = small_model(1, 28)
    classifier = model.linear
    neurons = trojannn.strongest_neurons(classifier, 2)
    images = random_images((1, 28, 28), n=64)
    mask = trojannn.square_mask(28, 28, 0.25)
    preprocess = Preprocess((0.5,), (0.5,), 1)
    cfg = SimpleNamespace(target_activation_scale=10.0, trigger_steps=30, trigger_lr=0.05,
                          batch_size=32)

    def fit():
        return trojannn.fit_trigger(model, classifier, images, mask, neurons, preprocess, cfg,
                                    torch.device("cpu"), torch.Generator().manual_seed(0))

    pattern, facts = fit()
    assert pattern.shape == (1, 28, 28) and 0 <= pattern.min() and pattern.max() <= 255
    assert torch.equal(pattern, fit()[0])
    tap = trojannn.FeatureTap(classifier)
    with torch.no_grad():
        model(preprocess(images))
        clean = tap.features[:, neurons].mean()
        model(preprocess(trojannn.trojannn_poison(images, pattern, mask)))
        triggered = tap.features[:, neurons].mean()
    tap.close()
    assert triggered > 1.2 * clean, (clean, triggered)  # a random model: weak but clear


def test_lc_corner_checkerboard_and_pgd():
    images = torch.full((2, 3, 32, 32), 128, dtype=torch.uint8)
    out = lc.corner_trigger(images, 3)
    board = torch.tensor([[255, 0, 255], [0, 255, 0], [255, 0, 255]], dtype=torch.uint8)
    for rows, cols in ((slice(0, 3), slice(0, 3)), (slice(0, 3), slice(29, 32)),
                       (slice(29, 32), slice(0, 3)), (slice(29, 32), slice(29, 32))):
        assert (out[:, :, rows, cols] == board).all()
    assert out[:, :, 3:29, :].eq(128).all() and out[:, :, :, 3:29].eq(128).all()
    with pytest.raises(UserError, match="checker_size"):
        lc.corner_trigger(torch.zeros(1, 1, 5, 5, dtype=torch.uint8), 3)

    model = small_model(1, 28)
    clean = random_images((1, 28, 28), n=16)
    labels = torch.arange(16) % 10
    preprocess = Preprocess((0.5,), (0.5,), 1)

    def attack():
        return lc.pgd_hard(model, clean, labels, preprocess, torch.device("cpu"), eps=8,
                           step_size=2, steps=5)

    hard = attack()
    assert hard.dtype == torch.uint8 and torch.equal(hard, attack())
    assert (hard.int() - clean.int()).abs().max() == 8  # reaches the bound, never beyond
    with torch.no_grad():
        loss = [torch.nn.functional.cross_entropy(model(preprocess(x)), labels).item()
                for x in (clean, hard)]
    assert loss[1] > loss[0], loss  # a random model: small but real


# ------------------------------------------------------------------ records on Fashion-MNIST

@pytest.fixture(scope="module")
def fashion():
    try:
        find_dataset_folder("fashion_mnist", DATA)
    except UserError:
        pytest.skip("Fashion-MNIST not installed (bash sh/install.sh)")
    return (load_clean_dataset("fashion_mnist", DATA, train=True),
            load_clean_dataset("fashion_mnist", DATA, train=False))


def make_record(module, tmp_path, *args):
    module.main(["--dataset", "fashion_mnist", "--model", "smallcnn", "--train_size", "5000",
                 "--test_size", "1000", "--epochs", "3", "--lr", "0.05", "--save_mode", "ram",
                 "--dataset_path", str(DATA), "--record_dir", str(tmp_path),
                 "--save_folder_name", "record", *seed_args(), *map(str, args)])
    folder = tmp_path / "record"
    summary = json.loads((folder / "attack_summary.json").read_text())
    assert summary["config_sources"]["epochs"] == "command line"
    assert summary["config_sources"]["attack_target"] == "default"
    return folder, summary


def check_record(folder, summary, fashion, *, poisoned: int, clean_label: bool, min_asr: float):
    """The record loads, is poisoned as configured, and its backdoor works. Returns the rebuilt
    backdoor test set and the clean test images it was made from."""
    train, test = fashion
    record = load_attack_record(folder)
    bd_train = record.bd_train.images(train)
    bd_test = record.bd_test.images(test)
    flagged = bd_train.poisoned
    assert len(bd_train) == 5000
    assert summary["poisoned_train"] == poisoned == int(flagged.sum())
    assert summary["clean_label"] is clean_label
    assert (bd_train.labels[flagged] == TARGET).all()
    # Clean-label attacks poison target-class images and keep their labels; the others relabel.
    assert ((bd_train.true_labels[flagged] == TARGET) == clean_label).all()
    assert torch.equal(bd_train.labels[~flagged], bd_train.true_labels[~flagged])
    changed = bd_train.images[flagged] != train.images[bd_train.index[flagged]]
    assert changed.flatten(1).any(1).all(), "a poisoned training image is unchanged"
    assert len(bd_test) == summary["bd_test_size"] > 800 and bd_test.poisoned.all()
    assert (bd_test.labels == TARGET).all() and (bd_test.true_labels != TARGET).all()
    check("ASR", summary["final"]["test_asr"], ">=", min_asr)
    check_bd_train_is_poisoned_like_bd_test(folder, bd_train, bd_test)
    return bd_test, test.images[bd_test.index]


@pytest.mark.outcome
def test_blended_record(fashion, tmp_path):
    folder, summary = make_record(blended, tmp_path)
    bd_test, clean = check_record(folder, summary, fashion, poisoned=500, clean_label=False,
                                  min_asr=0.8)  # seeds 0-2 x 1-2 threads: 99.8-100 %
    assert torch.equal(bd_test.images, blended.blended_poison(
        clean, blended.procedural_pattern(1, 28, 28), 0.2))


@pytest.mark.outcome
def test_sig_record(fashion, tmp_path):
    # 5,000 random images hold fewer than 500 of the target class: pratio 0.08 (400) fits.
    folder, summary = make_record(sig, tmp_path, "--pratio", 0.08)
    bd_test, clean = check_record(folder, summary, fashion, poisoned=400, clean_label=True,
                                  min_asr=0.15)  # seeds 0-2 x 1-2 threads: 25-59 %
    assert torch.equal(bd_test.images, sig.sig_poison(clean, 40, 6))


def test_sig_refuses_more_poison_than_target_images(fashion, tmp_path):
    with pytest.raises(UserError, match="eligible"):
        make_record(sig, tmp_path, "--train_size", 1000, "--pratio", 0.5)


@pytest.mark.outcome
def test_lf_record(fashion, tmp_path):
    folder, summary = make_record(lf, tmp_path, "--clean_epochs", 1, "--trigger_epochs", 5,
                                  "--trigger_samples", 500, "--eps", 40)
    bd_test, clean = check_record(folder, summary, fashion, poisoned=500, clean_label=False,
                                  min_asr=0.5)  # seeds 0-2 x 1-2 threads: 93-98 %
    assert summary["trigger_linf"] <= 40 and 0 < summary["clean_model_test_acc"] <= 1
    diff = bd_test.images.int() - clean.int()
    assert diff.abs().max() <= 41  # the bound, plus rounding


@pytest.mark.outcome
def test_trojannn_record(fashion, tmp_path):
    folder, summary = make_record(trojannn, tmp_path, "--clean_epochs", 1, "--trigger_steps", 50)
    bd_test, clean = check_record(folder, summary, fashion, poisoned=500, clean_label=False,
                                  min_asr=0.8)  # seeds 0-2 x 1-2 threads: 100 %
    assert summary["mask_side"] == 7 and len(summary["neurons"]) == 2
    # Only the bottom-right 7x7 square changes, and it holds the same patch in every image.
    outside = trojannn.square_mask(28, 28, 0.25) == 0
    assert torch.equal(bd_test.images[:, outside], clean[:, outside])
    patch = bd_test.images[:, :, -7:, -7:]
    assert (patch == patch[:1]).all()


@pytest.mark.outcome
def test_lc_record(fashion, tmp_path):
    folder, summary = make_record(lc, tmp_path, "--pratio", 0.08, "--clean_epochs", 1,
                                  "--pgd_steps", 5, "--pgd_step_size", 2)
    bd_test, clean = check_record(folder, summary, fashion, poisoned=400, clean_label=True,
                                  min_asr=0.3)  # seeds 0-2 x 1-2 threads: 56-96 %
    assert torch.equal(bd_test.images, lc.corner_trigger(clean, 3))
    check("clean model's accuracy drop by PGD", summary["clean_model_acc_before_pgd"] -
          summary["clean_model_acc_after_pgd"], ">", 0)


@pytest.mark.outcome
def test_badnet_record_bd_train_carries_the_learnt_trigger(small_badnet_record, fashion):
    records, name = small_badnet_record
    folder = records / name
    record = load_attack_record(folder)
    train, test = fashion
    check_bd_train_is_poisoned_like_bd_test(folder, record.bd_train.images(train),
                                            record.bd_test.images(test))
