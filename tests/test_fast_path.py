"""The fast tensor path (`utils.training.train.Batches`) against the plain per-sample DataLoader reference
(`utils.data.loader.DataLoaderBatches`): same batches without augmentation, same augmentation
distribution (exact zero-padded crops, flip rate, all offsets) with it."""
import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from utils.data.images import ImageSet, Preprocess
from utils.data.loader import DataLoaderBatches
from utils.training.train import Batches

N = 300
PATHS = {"tensor": Batches, "dataloader": DataLoaderBatches}
# (channels, size, mean, std, hflip): a Fashion-MNIST-like and a CIFAR-like set.
SETS = {
    "grey": (1, 28, (0.2860,), (0.3530,), False),
    "rgb": (3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), True),
}


def make(kind: str, padding: int = 4):
    c, s, mean, std, hflip = SETS[kind]
    g = torch.Generator().manual_seed(123 + c)
    images = torch.randint(0, 256, (N, c, s, s), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (N,), generator=g)
    return ImageSet(images, labels), Preprocess(mean, std, c, crop_padding=padding, hflip=hflip)


def collect(batches):
    xs, ys, idxs = zip(*batches)
    return torch.cat(xs), torch.cat(ys), torch.cat(idxs)


@pytest.mark.parametrize("kind", list(SETS))
@pytest.mark.parametrize("shuffle", [True, False])
def test_no_augmentation_batches_identical(kind, shuffle):
    data, pre = make(kind)
    fast = Batches(data, pre, 64, shuffle=shuffle, augment=False, seed=7)
    ref = DataLoaderBatches(data, pre, 64, shuffle=shuffle, augment=False, seed=7)
    orders = []
    for _ in range(2):  # two epochs: each reshuffles, identically in both paths
        got_fast, got_ref = list(fast), list(ref)
        assert len(got_fast) == len(got_ref) == math.ceil(N / 64)
        for (xf, yf, i_f), (xr, yr, ir) in zip(got_fast, got_ref):
            assert xr.dtype == torch.float32 and xr.device == data.images.device
            assert yr.dtype == ir.dtype == torch.int64
            assert xf.shape == xr.shape and torch.equal(i_f, ir) and torch.equal(yf, yr)
            assert torch.allclose(xf, xr, atol=1e-6)
            assert torch.equal(yr, data.labels[ir])
        orders.append(torch.cat([b[2] for b in got_ref]))
    assert sorted(orders[0].tolist()) == list(range(N))
    assert torch.equal(orders[0], orders[1]) != shuffle


def match_crop(out: torch.Tensor, source: torch.Tensor, pre: Preprocess, flips: bool):
    """(dy, dx, flipped) such that `out` is the crop at offset (dy, dx) of the zero-padded
    (before normalization) source image, mirrored if flipped; fails if there is none."""
    p = pre.crop_padding
    _, h, w = source.shape
    padded = F.pad(source.float() / 255, (p, p, p, p))
    padded = (padded - pre.mean[0]) / pre.std[0]
    windows = padded.unfold(1, h, 1).unfold(2, w, 1)  # [C, 2p+1, 2p+1, H, W]
    for flipped in ((False, True) if flips else (False,)):
        target = out.flip(-1) if flipped else out
        # Screen all offsets on a central 4x4 patch, then check candidates' whole images.
        a, b = h // 2, w // 2
        patch_err = (windows[..., a:a + 4, b:b + 4] - target[:, None, None, a:a + 4, b:b + 4]).abs()
        hits = [(int(dy), int(dx)) for dy, dx in (patch_err.amax(dim=(0, 3, 4)) < 1e-5).nonzero()
                if torch.allclose(windows[:, dy, dx], target, rtol=0, atol=1e-5)]
        if hits:
            assert len(hits) == 1, "ambiguous crop"
            return (*hits[0], flipped)
    raise AssertionError("output image is not a zero-padded crop of its source")


@pytest.mark.parametrize("kind", list(SETS))
@pytest.mark.parametrize("path", list(PATHS))
def test_augmentation_is_exact_crops_and_flips(kind, path):
    data, pre = make(kind)
    p = pre.crop_padding
    batches = PATHS[path](data, pre, 100, shuffle=True, augment=True, seed=3)
    offsets, flips = Counter(), 0
    epochs = 10  # 3000 samples
    for _ in range(epochs):
        x, y, idx = collect(batches)
        assert torch.equal(y, data.labels[idx])
        for out, i in zip(x, idx.tolist()):
            dy, dx, flipped = match_crop(out, data.images[i], pre, pre.hflip)
            offsets[dy, dx] += 1
            flips += flipped
    total = epochs * N
    rate = flips / total
    if pre.hflip:
        assert 0.45 <= rate <= 0.55, rate
    else:
        assert rate == 0
    # Every one of the (2p+1)^2 offsets is used, none far from the uniform expectation (~37).
    assert set(offsets) == {(a, b) for a in range(2 * p + 1) for b in range(2 * p + 1)}
    expected = total / (2 * p + 1) ** 2
    assert min(offsets.values()) >= expected / 4 and max(offsets.values()) <= expected * 2


def test_augmentation_reproducible_and_leaves_global_rng_alone():
    data, pre = make("rgb")
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a = collect(DataLoaderBatches(data, pre, 64, shuffle=True, augment=True, seed=5))
    assert torch.equal(torch.get_rng_state(), before)
    b = collect(DataLoaderBatches(data, pre, 64, shuffle=True, augment=True, seed=5))
    c = collect(DataLoaderBatches(data, pre, 64, shuffle=True, augment=True, seed=6))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("batch_size", [1, 64, 100, 299, 300, 301])
def test_len_is_batches_per_epoch(batch_size):
    data, pre = make("grey")
    for cls in PATHS.values():
        for augment in (False, True):
            batches = cls(data, pre, batch_size, shuffle=True, augment=augment)
            assert len(batches) == math.ceil(N / batch_size)
            if batch_size >= 64:
                assert len(list(batches)) == len(batches)


def test_match_crop_rejects_wrong_images():
    data, pre = make("rgb")
    src = data.images[0]
    norm = (src.float() / 255 - pre.mean[0]) / pre.std[0]
    assert match_crop(norm, src, pre, flips=False) == (4, 4, False)
    assert match_crop(norm.flip(-1), src, pre, flips=True) == (4, 4, True)
    with pytest.raises(AssertionError, match="not a zero-padded crop"):
        match_crop(norm.flip(-1), src, pre, flips=False)
    shifted = F.pad(norm, (2, 0, 0, 0))[..., :-2]  # zero fill AFTER normalization: wrong
    with pytest.raises(AssertionError, match="not a zero-padded crop"):
        match_crop(shifted, src, pre, flips=True)
