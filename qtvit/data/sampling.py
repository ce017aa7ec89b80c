"""Global-batch sampling: which images, at which resolution, with which augmentation seed.

Why not ``DistributedSampler``: it shards the *dataset*, so the images that form one optimizer
step depend on the number of processes. Here every step is a fixed *global* batch — a slice of
one permutation per epoch — split into ``world_size × accum_steps`` micro-batches. Hence:

* 2 processes × batch b ≡ 1 process × batch b × 2 accumulation steps, sample for sample (and
  ≡ 1 process × batch 2b for a model without batch statistics);
* the resolution of step s (multi-resolution training) is drawn from ``(seed, epoch, s)``, so
  all ranks agree without communication;
* augmentation is seeded per sample from ``(seed, epoch, index)``, so it does not depend on the
  rank, the number of data-loader workers or where a run was resumed;
* resuming mid-epoch skips to step s without loading the skipped images.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
import torch.utils.data

from ..errors import QtvitError
from .folders import BadImageError

Key = tuple[int, int, int]  # (dataset index, image size, augmentation seed)


def step_size(sizes: Sequence[int], seed: int, epoch: int, step: int) -> int:
    """The resolution of global step ``step`` of ``epoch``: uniform over ``sizes``, same on every rank."""
    if len(sizes) == 1:
        return int(sizes[0])
    rng = np.random.default_rng((seed, epoch, step, 0x5E5))
    return int(sizes[int(rng.integers(len(sizes)))])


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of image ``index`` in ``epoch`` (independent of rank and workers)."""
    return int(np.random.SeedSequence((seed, epoch, index)).generate_state(1, np.uint64)[0] >> 1)


class GlobalBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's micro-batches of ``(index, size, seed)`` keys, epoch by epoch.

    Step ``s`` of an epoch uses ``perm[s·G:(s+1)·G]`` with ``G = batch_size · world_size ·
    accum_steps``; micro-batch ``a`` (0 ≤ a < accum_steps) of rank ``r`` is its slice number
    ``a · world_size + r``. The last incomplete global batch is dropped (as in the paper's
    recipe), so every step has the same size on every rank.

    Args:
        num_samples: dataset length.
        batch_size: images per micro-batch on one process.
        world_size, rank: the process group.
        accum_steps: micro-batches per optimizer step.
        sizes: resolutions to draw from per step (one entry disables multi-resolution).
        shuffle: permute per epoch (else dataset order).
        seed: base seed of permutation, sizes and augmentation.
        max_steps: cap on steps per epoch (quick runs); ``None`` for all.
    """

    def __init__(self, num_samples: int, batch_size: int, world_size: int = 1, rank: int = 0,
                 accum_steps: int = 1, sizes: Sequence[int] = (224,), shuffle: bool = True,
                 seed: int = 0, max_steps: int | None = None) -> None:
        if batch_size < 1 or accum_steps < 1:
            raise ValueError(f"batch_size and accum_steps must be positive; got {batch_size}, {accum_steps}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        self.num_samples, self.batch_size = num_samples, batch_size
        self.world_size, self.rank, self.accum_steps = world_size, rank, accum_steps
        self.sizes, self.shuffle, self.seed = tuple(int(s) for s in sizes), shuffle, seed
        self.global_batch = batch_size * world_size * accum_steps
        if num_samples < self.global_batch:
            raise QtvitError(f"the training set has {num_samples} images, fewer than one global batch of "
                             f"{self.global_batch} (batch_size {batch_size} × {world_size} processes × "
                             f"{accum_steps} accumulation steps); lower train.batch_size")
        self.epoch, self.start_step, self.max_steps = 0, 0, max_steps

    @property
    def steps_per_epoch(self) -> int:
        steps = self.num_samples // self.global_batch
        return min(steps, self.max_steps) if self.max_steps else steps

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Select the epoch's permutation and skip its first ``start_step`` steps (resume)."""
        self.epoch, self.start_step = epoch, start_step

    def permutation(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.num_samples, generator=g)

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.accum_steps

    def __iter__(self) -> Iterator[list[Key]]:
        perm = self.permutation().tolist()
        b = self.batch_size
        for step in range(self.start_step, self.steps_per_epoch):
            size = step_size(self.sizes, self.seed, self.epoch, step)
            batch = perm[step * self.global_batch:(step + 1) * self.global_batch]
            for a in range(self.accum_steps):
                part = (a * self.world_size + self.rank) * b
                yield [(i, size, sample_seed(self.seed, self.epoch, i)) for i in batch[part:part + b]]


class ShardSampler(torch.utils.data.Sampler):
    """Every ``world_size``-th index from ``rank`` (evaluation: no padding, no duplicates)."""

    def __init__(self, num_samples: int, world_size: int = 1, rank: int = 0,
                 limit: int | None = None) -> None:
        self.indices = list(range(rank, min(num_samples, limit or num_samples), world_size))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)


@contextmanager
def seeded(seed: int):
    """Seed python, numpy and torch's CPU generator for one transform, then restore their states.

    Restoring matters when transforms run in the main process (``num_workers=0``): the training
    loop's own random stream (mixup, drop-path) must not depend on the data pipeline.
    """
    # numpy's legacy global generator on purpose: it is what timm's augmentations draw from.
    states = random.getstate(), np.random.get_state(), torch.default_generator.get_state()  # noqa: NPY002
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])  # noqa: NPY002
        torch.default_generator.set_state(states[2])


class AugmentedDataset(torch.utils.data.Dataset):
    """Wraps a dataset of ``(PIL image, label)`` with per-size, per-sample-seeded transforms.

    Keys are either a plain index (evaluation: ``transform`` must be a callable) or an
    ``(index, size, seed)`` key from :class:`GlobalBatchSampler` (training: ``transform`` maps
    size → callable). Items are ``(tensor, label, n_bad)``: with ``skip_bad_images`` an
    unreadable image is replaced by the next readable one and counted in ``n_bad``; otherwise it
    raises :class:`~qtvit.data.folders.BadImageError` naming the file. ``seed_transforms=False``
    skips the per-sample seeding, for transforms without randomness (it costs ~0.1 ms a sample).
    """

    MAX_SKIP = 32  # consecutive unreadable files before giving up even when skipping

    def __init__(self, base: torch.utils.data.Dataset, transform: Callable | dict[int, Callable],
                 skip_bad_images: bool = False, seed_transforms: bool = True) -> None:
        self.base, self.transform, self.skip_bad_images = base, transform, skip_bad_images
        self.seed_transforms = seed_transforms

    def __len__(self) -> int:
        return len(self.base)

    def _load(self, index: int):
        n = len(self.base)
        for bad in range(self.MAX_SKIP + 1):
            try:
                image, target = self.base[(index + bad) % n]
                return image, target, bad
            except BadImageError:
                if not self.skip_bad_images or bad == self.MAX_SKIP:
                    raise
        raise AssertionError("unreachable")

    def __getitem__(self, key: int | Key):
        if isinstance(key, tuple):
            index, size, seed = key
            image, target, bad = self._load(index)
            if not self.seed_transforms:
                return self.transform[size](image), target, bad
            with seeded(seed):
                return self.transform[size](image), target, bad
        image, target, bad = self._load(key)
        return self.transform(image), target, bad
