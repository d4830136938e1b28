"""SSBA and Semantic: the pure poison / subgroup functions on generated tensors (1 and 3 channels,
28/32/64 px), the attacks' setup on generated data sets of other shapes, and one small
Fashion-MNIST record each that loads, has the configured poisoned samples and a working backdoor."""
import json
from pathlib import Path

import pytest
import torch

from attack import semantic, ssba
from utils.attacks.run import AttackContext
from utils.core.config import parse_config
from utils.data.images import ImageSet
from tests.helpers import check_bd_train_is_poisoned_like_bd_test, needs_fashion_mnist
from tests.outcomes import SEED, check, seed_args
from utils.attacks.stega import Stega, embed, embedding_quality, secret_bits, train_stega
from utils.core.errors import UserError
from utils.data.datasets import get_dataset, load_clean_dataset
from utils.data.record import load_attack_record, safe_load

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(1, 28), (3, 32), (3, 64)]


needs_data = needs_fashion_mnist


def random_images(n, channels, size, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, size, size), generator=gen, dtype=torch.uint8)


def context(module, dataset, images, labels, *argv):
    """An AttackContext on generated data of `dataset`'s shape (no files read)."""
    cfg = parse_config(module.OPTIONS, "test", ["--dataset", dataset, "--device", "cpu", *argv])
    data = ImageSet(images, labels, index=torch.arange(len(labels)))
    return AttackContext(cfg, "test", get_dataset(dataset), torch.device("cpu"), data, data)


# ---- SSBA: the encoder-decoder ----------------------------------------------------------------

@pytest.mark.parametrize("channels,size", SHAPES)
def test_stega_embed_keeps_shape_dtype_and_bound_and_is_sample_specific(channels, size):
    torch.manual_seed(0)
    stega = Stega(channels, (size, size), bits=8, max_residual=0.1).eval()
    images = random_images(6, channels, size)
    secret = secret_bits(8, seed=3)
    out = embed(stega, images, secret, chunk=4)  # two chunks
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert torch.equal(out, embed(stega, images, secret))  # deterministic
    residual = out.int() - images.int()
    assert residual.abs().max() <= round(0.1 * 255)
    assert residual.abs().sum() > 0
    assert not torch.equal(residual[0], residual[1])  # each image gets its own residual


def test_secret_bits_follow_the_seed():
    assert torch.equal(secret_bits(16, 1), secret_bits(16, 1))
    assert not torch.equal(secret_bits(16, 1), secret_bits(16, 2))
    assert set(secret_bits(16, 1).tolist()) <= {0.0, 1.0}


@pytest.mark.outcome
def test_stega_training_is_deterministic_and_learns_bits():
    images = random_images(64, 3, 16).div(4).add(96)  # low-contrast images: bits visible early

    def trained(seed):
        torch.manual_seed(seed)
        stega = Stega(3, (16, 16), bits=4, max_residual=0.1)
        stats = train_stega(stega, images, steps=40, batch_size=16, lr=3e-3, image_weight=1.0,
                            generator=torch.Generator().manual_seed(seed))
        return stega, stats

    first, stats = trained(SEED)
    second, _ = trained(SEED)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(),
                                                 second.state_dict().values()))
    secret = secret_bits(4, SEED)
    quality = embedding_quality(first, images, embed(first, images, secret), secret)
    check("bit accuracy", quality["bit_accuracy"], ">", 0.9)
    check("bit loss", stats["bit_loss"], "<", 0.5)
    check("PSNR (dB)", quality["psnr_db"], ">", 20)


@pytest.mark.parametrize("dataset,channels,size", [("gtsrb", 3, 32), ("tiny", 3, 64),
                                                   ("mnist", 1, 28)])
def test_ssba_setup_on_other_shapes(dataset, channels, size, tmp_path):
    images = random_images(40, channels, size)
    labels = torch.arange(40) % 2
    encoder = tmp_path / "enc.pt"
    ctx = context(ssba, dataset, images, labels, "--encoder_steps", "2", "--encoder_batch_size",
                  "8", "--quality_images", "10", "--encoder", str(encoder))
    attack = ssba.make_ssba(ctx)
    assert attack.poison(images[:5]).shape == (5, channels, size, size)
    assert attack.details["encoder_source"] == "trained" and encoder.is_file()
    again = ssba.make_ssba(ctx)  # now loads the saved encoder: the same trigger
    assert again.details["encoder_source"] == str(encoder)
    assert torch.equal(again.poison(images[:5]), attack.poison(images[:5]))


def test_ssba_refuses_an_encoder_of_other_settings(tmp_path):
    images, labels = random_images(20, 3, 32), torch.arange(20) % 2
    encoder = tmp_path / "enc.pt"
    ssba.make_ssba(context(ssba, "cifar10", images, labels, "--encoder_steps", "1",
                           "--quality_images", "4", "--encoder", str(encoder)))
    with pytest.raises(UserError, match="secret_bits"):
        ssba.make_ssba(context(ssba, "cifar10", images, labels, "--secret_bits", "4",
                               "--encoder", str(encoder)))
    with pytest.raises(UserError, match="max_residual 0.1"):
        ssba.make_ssba(context(ssba, "cifar10", images, labels, "--max_residual", "0.05",
                               "--encoder", str(encoder)))


# ---- Semantic: the subgroup rules ---------------------------------------------------------------

def coloured(n, size, rgb):
    return torch.tensor(rgb, dtype=torch.uint8).view(1, 3, 1, 1).expand(n, 3, size, size).clone()


@pytest.mark.parametrize("size", [32, 64])
def test_green_share_counts_clearly_green_pixels(size):
    images = coloured(3, size, (60, 60, 60))  # grey
    images[1, :, : size // 2] = torch.tensor([40, 180, 50], dtype=torch.uint8).view(3, 1, 1)
    images[2] = coloured(1, size, (100, 115, 100))[0]  # greenish, but below the margin
    share = semantic.rule_statistic("green", images, margin=20)
    assert share.tolist() == [0.0, 0.5, 0.0]
    assert semantic.rule_statistic("green", images, margin=10)[2] == 1.0


@pytest.mark.parametrize("channels,size", SHAPES)
def test_grey_rules_on_any_shape(channels, size):
    images = torch.zeros(2, channels, size, size, dtype=torch.uint8)
    images[1, :, : size // 4] = 255  # a quarter of the image white
    assert semantic.rule_statistic("bright", images, 20).tolist() == [0.0, 0.25]
    assert semantic.rule_statistic("ink", images, 20).tolist() == [0.0, 0.25]


def test_green_rule_refuses_grey_images():
    with pytest.raises(UserError, match="--rule green needs colour"):
        semantic.rule_statistic("green", torch.zeros(2, 1, 28, 28, dtype=torch.uint8), 20)


def test_semantic_selects_the_green_cars_of_a_generated_set():
    # 20 images: class 1 (cars) at even positions; cars 0, 2, 4 green, other images grey.
    images, labels = coloured(20, 32, (90, 90, 90)), (torch.arange(20) + 1) % 2
    green = torch.tensor([0, 2, 4])
    images[green] = coloured(3, 32, (30, 160, 40))
    images[1] = coloured(1, 32, (30, 160, 40))[0]  # a green non-car stays out
    ctx = context(semantic, "cifar10", images, labels, "--source_class", "1", "--attack_target",
                  "6", "--rule", "green", "--threshold", "0.3")
    ctx.attack = attack = semantic.make_semantic(ctx)
    assert torch.equal(attack.select_train(ctx.train, ctx.generator), green)
    assert attack.details["subgroup_train"] == 3 and attack.details["source_train"] == 10
    bd_test = ctx.bd_test()
    assert torch.equal(bd_test.images, images[green])  # no trigger: the images themselves
    assert bd_test.labels.tolist() == [6, 6, 6] and bd_test.true_labels.tolist() == [1, 1, 1]

    capped = context(semantic, "cifar10", images, labels, "--source_class", "1", "--threshold",
                     "0.3", "--max_poison", "2")
    chosen = semantic.make_semantic(capped).select_train(capped.train, capped.generator)
    assert len(chosen) == 2 and set(chosen.tolist()) <= set(green.tolist())


def test_semantic_quantile_cutoff_and_errors():
    images = torch.arange(20, dtype=torch.uint8).mul(12).view(20, 1, 1, 1).expand(20, 1, 28, 28)
    labels = torch.full((20,), 8)
    ctx = context(semantic, "fashion_mnist", images.clone(), labels, "--source_class", "8",
                  "--rule", "bright", "--quantile", "0.9")
    chosen = semantic.make_semantic(ctx).select_train(ctx.train, ctx.generator)
    assert chosen.tolist() == [18, 19]  # the brightest tenth
    for argv, message in [(["--rule", "green"], "needs colour"),
                          (["--attack_target", "8"], "--attack_target are the same"),
                          (["--threshold", "2"], "selects no training images")]:
        with pytest.raises(UserError, match=message):
            semantic.make_semantic(context(semantic, "fashion_mnist", images.clone(), labels,
                                           "--source_class", "8", "--rule", "bright", *argv))


# ---- small Fashion-MNIST records ----------------------------------------------------------------

SMALL = ["--train_size", "5000", "--test_size", "1000", "--save_mode", "ram", "--lr", "0.05",
         *seed_args()]


def load(record_dir: Path, name: str):
    folder = record_dir / name
    record = load_attack_record(folder)
    train = load_clean_dataset("fashion_mnist", ROOT / "data", train=True)
    test = load_clean_dataset("fashion_mnist", ROOT / "data", train=False)
    summary = json.loads((folder / "attack_summary.json").read_text())
    bd_train, bd_test = record.bd_train.images(train), record.bd_test.images(test)
    check_bd_train_is_poisoned_like_bd_test(folder, bd_train, bd_test)
    return summary, bd_train, bd_test, train, test


@needs_data
@pytest.mark.outcome
def test_ssba_record(tmp_path):
    encoder = tmp_path / "encoder.pt"
    ssba.main(["--yaml_path", str(ROOT / "config/attack/ssba/fashion_mnist.yaml"), *SMALL,
               "--epochs", "4", "--encoder_steps", "120", "--encoder_batch_size", "32",
               "--encoder_images", "2000", "--max_residual", "0.15", "--image_weight", "3",
               "--encoder", str(encoder), "--record_dir", str(tmp_path),
               "--save_folder_name", "ssba"])
    summary, bd_train, bd_test, train, test = load(tmp_path, "ssba")
    assert summary["poisoned_train"] == 500 and int(bd_train.poisoned.sum()) == 500
    # A stronger, shorter-trained trigger than the yaml's (measured: bit accuracy 0.99, PSNR
    # 20.0 dB, ASR 1.00) so that 4 epochs on 5,000 images learn it.
    check("bit accuracy", summary["bit_accuracy"], ">", 0.9)
    check("PSNR (dB)", summary["psnr_db"], ">", 18)
    poisoned = bd_train.poisoned.nonzero().flatten()
    assert (bd_train.labels[poisoned] == 0).all() and (bd_train.true_labels[poisoned] != 0).all()
    residual = bd_train.images[poisoned].int() - train.images[bd_train.index[poisoned]].int()
    assert 0 < residual.abs().max() <= round(0.15 * 255)

    # The record's backdoor test images are exactly the saved encoder's output for the secret.
    stega = Stega(1, (28, 28), 8, 0.15)
    stega.load_state_dict(safe_load(encoder))
    clean = test.images[bd_test.index]
    assert torch.equal(bd_test.images, embed(stega.eval(), clean, secret_bits(8, SEED)))
    assert (bd_test.labels == 0).all() and (bd_test.true_labels != 0).all()
    check("ASR", summary["final"]["test_asr"], ">", 0.6)  # 4 epochs on 5,000 images
    check("C-ACC", summary["final"]["test_acc"], ">", 0.7)


@needs_data
@pytest.mark.outcome
def test_semantic_record(tmp_path):
    semantic.main(["--yaml_path", str(ROOT / "config/attack/semantic/fashion_mnist.yaml"),
                   *SMALL, "--epochs", "4", "--quantile", "0.8", "--record_dir", str(tmp_path),
                   "--save_folder_name", "semantic"])
    summary, bd_train, bd_test, train, test = load(tmp_path, "semantic")
    poisoned = bd_train.poisoned.nonzero().flatten()
    assert summary["poisoned_train"] == summary["subgroup_train"] == len(poisoned) > 50
    assert (bd_train.labels[poisoned] == 6).all() and (bd_train.true_labels[poisoned] == 8).all()
    assert torch.equal(bd_train.images[poisoned], train.images[bd_train.index[poisoned]])
    # the subgroup: the brightest bags, above the training cut-off; the rest of the bags below it
    brightness = semantic.brightness(train.images[bd_train.index], 0)
    bags = bd_train.true_labels == 8
    assert brightness[bags & bd_train.poisoned].min() >= summary["cutoff"]
    assert brightness[bags & ~bd_train.poisoned].max() < summary["cutoff"]
    assert len(bd_test) == summary["subgroup_test"] > 5
    assert (bd_test.true_labels == 8).all() and (bd_test.labels == 6).all()
    assert torch.equal(bd_test.images, test.images[bd_test.index])
    assert summary["pratio_used"] is False
    check("ASR", summary["final"]["test_asr"], ">", 0.5)
    check("C-ACC", summary["final"]["test_acc"], ">", 0.7)
