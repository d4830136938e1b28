"""The plain per-sample DataLoader path (`--loader dataloader`): the reference `utils.training.train.Batches`
(the fast path) is checked against, built the way BackdoorBench and the public ULRL code build theirs.

A map-style Dataset over CPU images transforms ONE image at a time with torchvision.transforms.v2
(RandomCrop with zero fill, RandomHorizontalFlip, ToDtype, Normalize); a DataLoader (num_workers=0)
collates the batch, which is then copied to the device. It is slower than `Batches`, which does one
vectorized, indexed operation per batch on the device: here every image goes through a Python-level
transform pipeline and the default collate on the CPU, plus a host-to-device copy per batch.

Without augmentation and with the same seed it yields exactly `Batches`' batches: the sampler draws
one `torch.randperm(n, generator=...)` per epoch from a generator seeded once, as `Batches` does
(torch's RandomSampler draws a second, discarded permutation every epoch, so it would diverge from
epoch 2 on). Augmentation draws from a private CPU RNG state swapped in around each sample, so it is
reproducible for a seed and leaves the global RNG alone; it matches `Batches` in distribution only.
"""
from __future__ import annotations

import math

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, SequentialSampler
from torchvision.transforms import v2

from utils.data.images import ImageSet, Preprocess


class _PerSampleSet(Dataset):
    def __init__(self, data: ImageSet, transform, seed: int):
        self.images, self.labels = data.images.cpu(), data.labels.cpu()
        self.transform = transform
        self.rng_state = torch.Generator().manual_seed(seed + 1).get_state()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        with torch.random.fork_rng(devices=[]):  # restores the global CPU RNG on exit
            torch.set_rng_state(self.rng_state)
            x = self.transform(self.images[i])
            self.rng_state = torch.get_rng_state()
        return x, self.labels[i], i


class _PermutationSampler(Sampler):
    """One torch.randperm(n, generator=generator) per epoch, exactly as `Batches` draws it."""

    def __init__(self, n: int, generator: torch.Generator):
        self.n, self.generator = n, generator

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=self.generator).tolist())


class DataLoaderBatches:
    """Drop-in for `utils.training.train.Batches`: yields (inputs, labels, batch_indices) on the data's
    device, built by a per-sample torch DataLoader."""

    def __init__(self, data: ImageSet, preprocess: Preprocess, batch_size: int, *, shuffle: bool,
                 augment: bool, seed: int = 0):
        h, w = data.images.shape[-2:]
        steps = []
        if augment:
            steps.append(v2.RandomCrop((h, w), padding=preprocess.crop_padding, fill=0))
            if preprocess.hflip:
                steps.append(v2.RandomHorizontalFlip())
        steps += [v2.ToDtype(torch.float32, scale=True),
                  v2.Normalize(preprocess.mean.flatten().tolist(), preprocess.std.flatten().tolist())]
        self.device, self.batch_size = data.images.device, batch_size
        self.dataset = _PerSampleSet(data, v2.Compose(steps), seed)
        self.generator = torch.Generator().manual_seed(seed)
        sampler = (_PermutationSampler(len(self.dataset), self.generator) if shuffle
                   else SequentialSampler(self.dataset))
        # DataLoader draws a worker base seed from its own generator every epoch; a separate one
        # keeps that draw off both the global RNG and the sampler's permutation stream.
        self.loader = DataLoader(self.dataset, batch_size=batch_size, sampler=sampler, num_workers=0,
                                 drop_last=False, generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return math.ceil(len(self.dataset) / self.batch_size)

    def __iter__(self):
        for x, y, idx in self.loader:
            yield x.to(self.device), y.to(self.device), idx.to(self.device)
