"""The training-controlled attacks (WaNet, BPP, InputAware, Blind): their trigger functions on
generated tensors, and each attack's record on a small Fashion-MNIST slice: it loads, its poisoned
samples are as configured, and its backdoor works."""
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from attack import blind, bpp, inputaware, wanet
from models import build_model
from tests.helpers import check_bd_train_is_poisoned_like_bd_test, have_fashion_mnist
from utils.attacks.controlled import apply_in_chunks
from utils.core.config import parse_config
from utils.core.errors import UserError
from utils.data.datasets import get_dataset, load_clean_dataset
from utils.data.images import Preprocess
from utils.data.record import load_attack_record
from tests.outcomes import SEED, check, seed_args

SHAPES = [(1, 28, 28), (3, 28, 28), (1, 32, 32), (3, 32, 32), (3, 64, 64)]


def _images(channels, height, width, n=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, height, width), generator=gen, dtype=torch.uint8)


def _wanet_grid(height, width, seed=0, s=0.5):
    control = wanet.control_grid(4, torch.Generator().manual_seed(seed))
    return wanet.warp_grid(control, height, width, s, 1.0)


# ------------------------------------------------------------------ trigger functions

def _pattern_nets(channels, seed=0):
    torch.manual_seed(seed)
    return (inputaware.TriggerNet(channels, channels).eval(),
            inputaware.TriggerNet(channels, 1).eval())


POISONS = {
    "wanet": lambda x: wanet.wanet_poison(x, _wanet_grid(*x.shape[2:])),
    "bpp": lambda x: bpp.bpp_poison(x, 8, dithering=False),
    "bpp_dither": lambda x: bpp.bpp_poison(x, 8, dithering=True),
    "inputaware": lambda x: apply_in_chunks(
        lambda u: inputaware.inputaware_poison(u, *_pattern_nets(x.shape[1])), x, "cpu"),
    "blind": lambda x: blind.blind_poison(x, 4),
}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", sorted(POISONS))
def test_poison_keeps_shape_and_dtype_changes_images_and_is_deterministic(name, shape):
    images = _images(*shape)
    out = POISONS[name](images)
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert not torch.equal(out, images)
    assert torch.equal(out, POISONS[name](images.clone()))


def test_wanet_field_comes_from_the_seed_and_zero_strength_is_the_identity():
    assert torch.equal(_wanet_grid(32, 32, seed=3), _wanet_grid(32, 32, seed=3))
    assert not torch.equal(_wanet_grid(32, 32, seed=3), _wanet_grid(32, 32, seed=4))
    images = _images(3, 32, 32)
    assert torch.equal(wanet.wanet_poison(images, _wanet_grid(32, 32, s=0.0)), images)
    # The training transform warps normalized batches: the same warp as on pixels.
    pre = Preprocess((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261), 3)
    grid = _wanet_grid(32, 32)
    on_pixels = pre(wanet.wanet_poison(images, grid))
    assert (wanet.warp(pre(images), grid) - on_pixels).abs().max() < 0.5 / 255 / 0.243 + 1e-5


def test_wanet_moves_pixels_by_about_a_quarter_pixel_at_s_half():
    grid = _wanet_grid(28, 28)
    identity = _wanet_grid(28, 28, s=0.0)
    shift_px = (grid - identity).abs() * (28 - 1) / 2
    assert 0.1 < shift_px.mean() < 0.5 and shift_px.max() < 2


def test_bpp_squeezes_to_the_levels_and_dithering_keeps_the_mean_brightness():
    levels = torch.tensor([round(i * 255 / 7) for i in range(8)], dtype=torch.uint8)
    images = _images(3, 32, 32)
    for dithering in (False, True):
        out = bpp.bpp_poison(images, 8, dithering)
        assert torch.isin(out, levels).all()
    grey = torch.full((1, 1, 32, 32), 100, dtype=torch.uint8)
    assert bpp.bpp_poison(grey, 8).float().mean() == 109  # nearest level of 100
    assert abs(bpp.bpp_poison(grey, 8, dithering=True).float().mean() - 100) < 2


def test_bpp_dithering_treats_every_image_and_channel_on_its_own():
    images = _images(3, 16, 16, n=3)
    together = bpp.bpp_poison(images, 4, dithering=True)
    one_by_one = torch.cat([
        torch.cat([bpp.bpp_poison(images[i:i + 1, c:c + 1], 4, dithering=True) for c in range(3)],
                  dim=1) for i in range(3)])
    assert torch.equal(together, one_by_one)


def test_bpp_negatives_add_another_images_squeezing_residual():
    images, others = _images(1, 28, 28), _images(1, 28, 28, seed=1)
    neg = bpp.negatives(images, others, bpp.bpp_poison(others, 8))
    residual = bpp.bpp_poison(others, 8).float() - others.float()
    assert torch.equal(neg.float(), (images.float() + residual).clamp(0, 255))
    assert not torch.equal(neg, bpp.bpp_poison(images, 8))


def test_blind_pastes_a_checkerboard_and_leaves_the_rest():
    images = _images(3, 32, 32)
    out = blind.blind_poison(images, 4)
    patch = out[:, :, 1:5, 1:5]
    assert torch.equal(patch[:, :, 0, 0], torch.full((4, 3), 255, dtype=torch.uint8))
    assert torch.equal(patch[:, :, 0, 1], torch.zeros((4, 3), dtype=torch.uint8))
    outside = torch.ones(32, 32, dtype=torch.bool)
    outside[1:5, 1:5] = False
    assert torch.equal(out[..., outside], images[..., outside])


def test_mgda_weight_is_the_min_norm_combination():
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        g1, g2 = torch.randn(50, generator=gen), torch.randn(50, generator=gen) * 3
        alpha = blind.mgda_alpha(g1, g2)
        grid = torch.linspace(0.001, 0.999, 999)
        norms = torch.stack([(a * g1 + (1 - a) * g2).norm() for a in grid])
        assert abs(alpha - grid[norms.argmin()]) < 2e-3
    same = torch.ones(10)
    assert blind.mgda_alpha(same, 2 * same) == 0.999  # g1 alone is the smaller: all weight on it



@pytest.mark.parametrize("grads", ["all", "last"])
def test_blind_loss_balances_the_two_tasks_by_mgda(grads):
    torch.manual_seed(0)
    model = build_model("smallcnn", 10, in_channels=1, image_size=28)
    cfg = SimpleNamespace(model="smallcnn", patch_size=4, attack_target=0, loss_history=1,
                          backdoor_loss_threshold=10.0, loss_balance="mgda", mgda_grads=grads,
                          mgda_normalize="loss+")
    loss_fn = blind.BlindLoss(cfg, model, torch.ones(1, 1, 4, 4), num_classes=10)
    x, y = torch.randn(16, 1, 28, 28), torch.arange(16) % 9 + 1
    both, labels = loss_fn.transform(x, y)
    assert both.shape == (32, 1, 28, 28) and (labels[16:] == 0).all()
    assert (both[16:, :, 1:5, 1:5] == 1).all()
    logits = model(both)
    loss = loss_fn(logits, labels)
    clean = F.cross_entropy(logits[:16], y)
    backdoor = F.cross_entropy(logits[16:], labels[16:])
    params = list(model.parameters()) if grads == "all" else list(model.linear.parameters())
    g = [torch.cat([t.flatten() for t in torch.autograd.grad(v, params, retain_graph=True)])
         for v in (clean, backdoor)]
    g = [gi / (min(v.item() * gi.norm().item(), 10) + 1e-5) for gi, v in zip(g, (clean, backdoor))]
    alpha = blind.mgda_alpha(*g)
    assert torch.allclose(loss, alpha * clean + (1 - alpha) * backdoor, atol=1e-5)
    assert loss_fn.attacked == 1 and 0.001 <= loss_fn.alpha_sum <= 0.999
    loss.backward()  # the weighted loss still trains the model



def test_inputaware_diversity_is_finite_when_two_outputs_coincide():
    u = torch.rand(4, 1, 8, 8)
    same = torch.ones(4, 1, 8, 8, requires_grad=True)  # saturated generator: identical patterns
    loss = inputaware.diversity(u, same)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(same.grad).all()
    apart = torch.rand(4, 1, 8, 8)
    assert inputaware.diversity(u, apart) < loss  # different outputs are cheaper


@pytest.mark.parametrize("size", [(28, 28), (30, 30), (64, 64)])
def test_inputaware_generators_fit_any_size_and_stay_in_range(size):
    for channels in (1, 3):
        pattern_net, mask_net = _pattern_nets(channels)
        u = torch.rand(2, channels, *size)
        pattern, mask = pattern_net(u), mask_net(u)
        assert pattern.shape == u.shape and mask.shape == (2, 1, *size)
        assert 0 <= pattern.min() and pattern.max() <= 1 and 0 <= mask.min() and mask.max() <= 1



def test_inputaware_batch_gets_own_triggers_then_cross_triggers_then_clean_rows():
    pattern_net, mask_net = _pattern_nets(1)
    pre = Preprocess((0.5,), (0.5,), 1)
    cfg = SimpleNamespace(pratio=0.1, cross_ratio=1.0, attack_target=0, lambda_div=1.0)
    mix = inputaware.TriggerMix(SimpleNamespace(preprocess=pre), cfg, pattern_net, mask_net)
    images = _images(1, 28, 28, n=40)
    x, y = pre(images), torch.arange(40) % 9 + 1
    out, labels = mix.transform(x, y)  # 4 own-trigger rows (int(40 x 0.1)), 4 cross rows
    u = images.float() / 255
    with torch.no_grad():
        own = inputaware.inputaware_poison(u[:4], pattern_net, mask_net)
        # Row i of the cross part wears the pattern and mask of row i - 1.
        cross = inputaware.apply_trigger(u[4:8], pattern_net(u[3:7]),
                                         inputaware.sharpen(mask_net(u[3:7])))
    assert torch.allclose(out[:4].detach(), (own - 0.5) / 0.5, atol=1e-5)
    assert torch.allclose(out[4:8].detach(), (cross - 0.5) / 0.5, atol=1e-5)
    assert torch.equal(out[8:], x[8:])
    assert (labels[:4] == 0).all() and torch.equal(labels[4:], y[4:])
    assert out.requires_grad  # the victim's loss reaches the pattern generator
    logits = torch.zeros(40, 10)
    assert mix.loss(logits, labels) > torch.nn.functional.cross_entropy(logits, labels)


# ------------------------------------------------------------------ records on Fashion-MNIST

@pytest.fixture(scope="module")
def fashion():
    """The full clean Fashion-MNIST train and test sets (the records index into them)."""
    if not have_fashion_mnist():
        pytest.skip("Fashion-MNIST not installed (bash sh/install.sh)")
    return (load_clean_dataset("fashion_mnist", "./data", train=True),
            load_clean_dataset("fashion_mnist", "./data", train=False))


SMALL = ["--dataset", "fashion_mnist", "--model", "smallcnn", "--train_size", "5000",
         "--test_size", "1000", "--save_mode", "ram", "--save_folder_name", "r"]


def make_record(module, tmp_path, fashion, *args):
    """Run the attack in-process on the small slice; check what every record of these attacks
    must satisfy; return (summary, bd_train, bd_test) with the sets rebuilt from the record."""
    summary = module.main([*SMALL, "--record_dir", str(tmp_path), *seed_args(), *map(str, args)])
    folder = tmp_path / "r"
    record = load_attack_record(folder)
    clean_train, clean_test = fashion
    bd_train = record.bd_train.images(clean_train)
    bd_test = record.bd_test.images(clean_test)
    assert summary["poisoned_train"] == 500 == int(bd_train.poisoned.sum())
    assert len(bd_train) == 5000
    flagged = bd_train.poisoned
    assert (bd_train.labels[flagged] == 0).all() and (bd_train.true_labels[flagged] != 0).all()
    assert torch.equal(bd_train.images[~flagged], clean_train.images[bd_train.index[~flagged]])
    assert len(bd_test) == summary["bd_test_size"] and 850 < len(bd_test) < 950  # 9 of 10 classes
    assert bd_test.poisoned.all() and (bd_test.labels == 0).all()
    assert (bd_test.true_labels != 0).all()
    saved = json.loads((folder / "attack_summary.json").read_text())
    assert saved["final"] == summary["final"] and len(summary["final"]) > 0
    check_bd_train_is_poisoned_like_bd_test(folder, bd_train, bd_test)
    return summary, bd_train, bd_test


def assert_poisoned_with(poison, bd_train, bd_test, fashion):
    """The record's poisoned training and test images are `poison` of their clean originals."""
    flagged = bd_train.poisoned
    train_images, test_images = fashion[0].images, fashion[1].images
    assert torch.equal(bd_train.images[flagged], poison(train_images[bd_train.index[flagged]]))
    assert torch.equal(bd_test.images, poison(test_images[bd_test.index]))



@pytest.mark.outcome
def test_wanet_record_and_backdoor(tmp_path, fashion):
    # s 2 (four times the default warp) so that four short epochs learn it; the default 0.5 is
    # learnt on the full data (config/attack/wanet/fashion_mnist.yaml).
    summary, bd_train, bd_test = make_record(wanet, tmp_path, fashion, "--epochs", 4, "--lr", 0.05,
                                             "--s", 2)
    grid = _wanet_grid(28, 28, seed=SEED, s=2.0)
    assert_poisoned_with(lambda x: wanet.wanet_poison(x, grid), bd_train, bd_test, fashion)
    control = wanet.control_grid(4, torch.Generator().manual_seed(SEED))
    assert summary["warp"]["control_grid"] == control[0].tolist()
    check("ASR", summary["final"]["test_asr"], ">=", 0.3)  # seeds 0-2 x 1-2 threads: 45-95 %
    check("C-ACC", summary["final"]["test_acc"], ">=", 0.6)


@pytest.mark.outcome
def test_bpp_record_and_backdoor(tmp_path, fashion):
    # 4 levels with dithering: learnt in four short epochs; the defaults (8 levels, no dithering)
    # need the full data.
    summary, bd_train, bd_test = make_record(bpp, tmp_path, fashion, "--epochs", 4, "--lr", 0.05,
                                             "--squeeze_num", 4, "--dithering", "true")
    assert_poisoned_with(lambda x: bpp.bpp_poison(x, 4, dithering=True), bd_train, bd_test,
                         fashion)
    assert summary["bpp"] == {"squeeze_num": 4, "dithering": True, "neg_ratio": 0.1}
    check("ASR", summary["final"]["test_asr"], ">=", 0.5)  # seeds 0-2 x 1-2 threads: 65-83 %
    check("C-ACC", summary["final"]["test_acc"], ">=", 0.6)


@pytest.mark.outcome
def test_blind_record_and_backdoor(tmp_path, fashion):
    # MGDA on the classifier layer (half the cost of every parameter, which
    # test_blind_mgda_on_every_parameter covers); the backdoor loss joins after 10 batches.
    summary, bd_train, bd_test = make_record(blind, tmp_path, fashion, "--epochs", 3, "--lr", 0.05,
                                             "--loss_history", 10, "--mgda_grads", "last")
    assert_poisoned_with(lambda x: blind.blind_poison(x, 4), bd_train, bd_test, fashion)
    info = summary["blind"]
    assert info["mgda_grads"] == "last"
    assert 0 < info["backdoor_loss_batches"] < 120  # of 3 x 40 batches
    assert 0.001 <= info["mgda_clean_weight_mean"] <= 0.999
    check("ASR", summary["final"]["test_asr"], ">=", 0.8)  # seeds 0-2 x 1-2 threads: 98-100 %
    check("C-ACC", summary["final"]["test_acc"], ">=", 0.6)


@pytest.mark.outcome
def test_inputaware_record_and_backdoor(tmp_path, fashion):
    """One mask epoch and no cross-trigger samples (the input-specific version, cross_ratio 1,
    needs far more training). Whether four short epochs on 5,000 images learn the dynamic trigger
    is a coin flip: ASR 5-80 % over seeds 0-2 (one thread), still 5-74 % with 8 epochs and 23-98 %
    with pratio 0.3 (seeds 1-2), so no ASR bound holds; the test holds the mechanism (triggers
    differ between images, masks cover a small part of the image) and the C-ACC. At seed 2 /
    two threads the mask is empty on some test images (their trigger changes no pixel), so only
    a share of changed images is bounded. The full-data record learns it (README, "Making a
    record")."""
    summary, bd_train, bd_test = make_record(inputaware, tmp_path, fashion, "--epochs", 4,
                                             "--lr", 0.05, "--mask_epochs", 1, "--cross_ratio", 0)
    flagged = bd_train.poisoned
    train_images, test_images = fashion[0].images, fashion[1].images
    assert not torch.equal(bd_train.images[flagged], train_images[bd_train.index[flagged]])
    residual = bd_test.images.int() - test_images[bd_test.index].int()
    changed = residual.flatten(1).ne(0).any(1)
    check("share of test images the trigger changes", changed.float().mean(), ">=", 0.5)
    assert len(torch.unique(residual[changed].sign(), dim=0)) > 1  # each image its own trigger
    masks = summary["inputaware"]["mask_training"]
    assert masks["coverage"] > 0
    check("mask coverage", masks["coverage"], "<", 0.5)  # seeds 0-2 x 1-2 threads: 0.06-0.16
    check("C-ACC", summary["final"]["test_acc"], ">=", 0.6)


@pytest.mark.parametrize("module, args, message", [
    (wanet, ["--k", "1"], "--k must be at least 2"),
    (wanet, ["--k", "40"], "exceeds the image size"),
    (bpp, ["--squeeze_num", "1"], "--squeeze_num must be in 2..255"),
    (blind, ["--patch_size", "28"], "--patch_size must be in 1..27"),
    (inputaware, ["--mask_epochs", "-1"], "--mask_epochs must be >= 0"),
], ids=["wanet_k", "wanet_k_size", "bpp_levels", "blind_patch", "inputaware_epochs"])
def test_bad_options_are_one_clear_error(module, args, message):
    cfg = parse_config(module.OPTIONS, "test", args)
    spec = get_dataset("fashion_mnist")
    ctx = SimpleNamespace(spec=spec, channels=1, device=torch.device("cpu"))
    with pytest.raises(UserError, match=message):
        module.make_attack(ctx, cfg)


@pytest.mark.parametrize("module", [wanet, bpp, inputaware, blind],
                         ids=["wanet", "bpp", "inputaware", "blind"])
def test_same_seed_same_model(tmp_path, fashion, module):
    tiny = ["--train_size", "600", "--test_size", "200", "--epochs", "1", "--lr", "0.05"]
    extra = {inputaware: ["--mask_epochs", "1"], blind: ["--loss_history", "2"]}.get(module, [])
    runs = []
    for name in ("a", "b"):
        module.main([*SMALL, *tiny, *extra, "--record_dir", str(tmp_path / name)])
        runs.append(load_attack_record(tmp_path / name / "r").state_dict)
    assert runs[0].keys() == runs[1].keys()
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
