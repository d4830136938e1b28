"""In-memory image sets and tensor-side preprocessing.

Every data set in this project is an `ImageSet`: uint8 images [N, C, H, W] and int64 labels [N], plus,
for backdoor sets, the true labels and the poison flags. Data stay uint8 until a batch is drawn, then
are converted, augmented and normalized on the device, so no PIL or DataLoader is in the hot loop.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from PIL import Image

from utils.core.errors import UserError, shown

# What image files (image folders, trigger pictures) may be: formats PIL decodes itself (no plugin
# that runs an external program, as EPS does), and a pixel count far above any classifier's input
# that stops a forged header from making us allocate gigabytes (checked before decoding).
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "PPM", "WEBP", "GIF")
MAX_IMAGE_PIXELS = 1 << 26  # 64 Mpx, e.g. 8192 x 8192


def _standard_strides(shape) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


@dataclass
class ImageSet:
    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor  # int64 [N]: the label the model is trained / scored against
    true_labels: torch.Tensor | None = None  # int64 [N]: original class of a backdoor sample
    poisoned: torch.Tensor | None = None  # bool [N]
    index: torch.Tensor | None = None  # int64 [N]: index into the clean data set it came from

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {self.images.dtype} "
                             f"{tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels must have shape ({self.images.shape[0]},), got "
                             f"{tuple(self.labels.shape)}")
        if self.images.stride() != _standard_strides(self.images.shape):
            # One layout for every source: a one-channel array numpy strides as (HW, 1, W, 1)
            # reads as channels_last to torch, whose convolutions then round differently, so
            # the same images from a record and from memory trained to other weights.
            self.images = self.images.clone(memory_format=torch.contiguous_format)

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W), as utils.data.datasets.CleanSplit has it before decoding."""
        return tuple(self.images.shape[1:])

    def subset(self, idx) -> "ImageSet":
        idx = torch.as_tensor(idx)
        if idx.dtype == torch.bool:  # a mask would otherwise be read as indices 0 and 1
            raise ValueError("subset takes indices, not a boolean mask: pass mask.nonzero()")
        idx = idx.long()
        pick = lambda t: None if t is None else t[idx]  # noqa: E731
        return ImageSet(self.images[idx], self.labels[idx], pick(self.true_labels),
                        pick(self.poisoned), pick(self.index))

    def to(self, device) -> "ImageSet":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return ImageSet(move(self.images), move(self.labels), move(self.true_labels),
                        move(self.poisoned), move(self.index))

    def with_channels(self, channels: int) -> "ImageSet":
        return replace(self, images=convert_channels(self.images, channels))


def backdoor_set(triggered: ImageSet, target: int, trigger=None) -> ImageSet:
    """A backdoor test set from images labelled by their true class: those of the target class
    left out (as BackdoorBench's bd_test), `trigger(images)` applied if given (else the images
    carry it already), labels = the target, true labels kept for RA."""
    keep = (triggered.labels != target).nonzero().flatten()
    if len(keep) == 0:
        raise UserError(f"every backdoor test image is of the target class {target}: ASR needs "
                        "images of other classes")
    part = triggered.subset(keep)
    images = part.images if trigger is None else trigger(part.images)
    return ImageSet(images, torch.full_like(part.labels, target), part.labels,
                    torch.ones(len(part), dtype=torch.bool, device=part.labels.device))


def class_folds(labels: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """The fold (0..k-1) of every image: each class is shuffled with a seeded generator and dealt
    round-robin, so every fold holds about 1/k of each class."""
    generator = torch.Generator().manual_seed(seed)
    labels = labels.cpu()
    fold = torch.empty(len(labels), dtype=torch.long)
    for c in labels.unique().tolist():
        members = (labels == c).nonzero().flatten()
        fold[members[torch.randperm(len(members), generator=generator)]] = \
            torch.arange(len(members)) % k
    return fold


def convert_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """Match the channel count a model expects: grey -> RGB repeats, RGB -> grey uses ITU-R 601-2
    luma (PIL's "L" conversion), so 1-channel data run on 3-channel models and vice versa."""
    have = images.shape[1]
    if have == channels:
        return images
    if have == 1 and channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    if have == 3 and channels == 1:
        weights = torch.tensor([0.299, 0.587, 0.114], device=images.device).view(1, 3, 1, 1)
        return (images.float() * weights).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    raise ValueError(f"cannot convert {have}-channel images to {channels} channels")


def channel_stats(values, channels: int) -> tuple[float, ...]:
    """Per-channel mean or std for `channels`, repeating or averaging a data set's own values."""
    values = tuple(values)
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    if channels == 1:
        return (sum(values) / len(values),)
    raise ValueError(f"cannot map {len(values)} normalization values to {channels} channels")


class Preprocess:
    """uint8 batch -> normalized float batch, with the train-time augmentation on tensors:
    RandomCrop(padding=4, zero fill) and, where the data set uses it, RandomHorizontalFlip."""

    def __init__(self, mean, std, channels: int, crop_padding: int = 4, hflip: bool = False):
        self.mean = torch.tensor(channel_stats(mean, channels)).view(1, -1, 1, 1)
        self.std = torch.tensor(channel_stats(std, channels)).view(1, -1, 1, 1)
        self.crop_padding = crop_padding
        self.hflip = hflip

    def __call__(self, images: torch.Tensor, augment: bool = False,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        x = images.float().div_(255)
        if augment:
            x = self.augment(x, generator)
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        x = x.sub_(mean).div_(std)
        # channels_last matches the model's layout on CUDA (utils.training.train.to_device); CPU keeps NCHW
        return x.contiguous(memory_format=torch.channels_last) if x.is_cuda else x

    def augment(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        n, c, h, w = x.shape
        p = self.crop_padding
        # Random numbers are drawn on the generator's device (CPU by default) so that CPU and CUDA
        # runs with the same seed see the same crops and flips.
        gen_device = generator.device if generator is not None else torch.device("cpu")
        if p > 0:
            dy = torch.randint(0, 2 * p + 1, (n,), generator=generator, device=gen_device).to(x.device)
            dx = torch.randint(0, 2 * p + 1, (n,), generator=generator, device=gen_device).to(x.device)
            # All (2p+1)^2 crops as a strided view [n, c, 2p+1, 2p+1, h, w]; pick one per image.
            windows = torch.nn.functional.pad(x, (p, p, p, p)).unfold(2, h, 1).unfold(3, w, 1)
            x = windows[torch.arange(n, device=x.device), :, dy, dx]
        if self.hflip:
            flip = torch.rand(n, generator=generator, device=gen_device).to(x.device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        return x


def open_image(path, what: str) -> Image.Image:
    """PIL image of a file in one of IMAGE_FORMATS, its size checked before decoding; any failure
    is one UserError naming `what` (e.g. '--trigger_patch x.png')."""
    image = None
    try:
        image = Image.open(path, formats=IMAGE_FORMATS)
        if image.width * image.height > MAX_IMAGE_PIXELS:
            raise UserError(f"{what} is {image.width} x {image.height} pixels, more than the "
                            f"{MAX_IMAGE_PIXELS:,} allowed: resize it first")
        image.load()
        return image
    except BaseException as e:
        if image is not None:
            image.close()
        if isinstance(e, (OSError, ValueError, SyntaxError, Image.DecompressionBombError)):
            raise UserError(f"{what} is not a readable {'/'.join(IMAGE_FORMATS)} image "
                            f"({shown(e)}): replace or remove the file") from None
        raise
