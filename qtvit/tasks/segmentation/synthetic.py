"""A synthetic segmentation set where the right label depends on a distant cue (no download).

Each image (default 32×128, wide) shows, on a noisy grey background:

* one **cue**: a square of pure red, green or blue somewhere in the left quarter;
* one to three **objects**: grey squares in the right half, all drawn the same way.

Labels: background and cue pixels are class 0 (``background``); every object pixel is class
1 + (colour of the cue). An object's class cannot be read from the object: it is decided by a
cue a quarter to a full image width away. Global attention brings it over in one step (at the
stride-16 stage of the demo model the image is 2×8 tokens); convolutions can only reach it
through a stack of layers (the demo backbone's convolutions see 127 px at the stride-16 stage,
the whole width only at the stride-32 stage, through 3×3/5×5 depthwise convs on a 1×4 grid), and
a short schedule finds that path only in part. A model without global token mixing finds the
objects but often has the wrong class for them; a model with attention can reach mIoU ≈ 1
(measured numbers: docs/RESULTS.md).

Samples are generated from ``(seed, index)`` on the fly, so the set costs no disk and every
worker and rank sees the same images.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor

CUE_COLOURS = ((230, 40, 40), (40, 200, 40), (40, 80, 230))  # red, green, blue (uint8 RGB)
CLASSES = ["background", "object (red cue)", "object (green cue)", "object (blue cue)"]


def make_sample(index: int, seed: int = 0, size: tuple[int, int] = (32, 128)) -> tuple[Tensor, Tensor]:
    """(image uint8 (3, H, W), mask int64 (H, W)) number ``index`` of the set with ``seed``.

    Sizes scale with H: the cue is an H/4–H/3 square in the left quarter, the objects H/4–H/2
    squares in the right half (W ≥ 4·H keeps every object at least W/4 from the cue).
    """
    H, W = size
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(index))

    def randint(lo: int, hi: int) -> int:  # inclusive lo, exclusive hi
        return int(torch.randint(lo, max(hi, lo + 1), (), generator=g))

    base = randint(90, 150)
    image = (base + 25 * torch.randn(3, H, W, generator=g)).clamp(0, 255)
    mask = torch.zeros(H, W, dtype=torch.int64)
    cue = randint(0, len(CUE_COLOURS))
    c = randint(H // 4, H // 3 + 1)
    top, left = randint(0, H - c + 1), randint(0, W // 4 - c + 1)
    image[:, top:top + c, left:left + c] = torch.tensor(CUE_COLOURS[cue], dtype=torch.float32).view(3, 1, 1)
    shade = 220 if base < 120 else 30  # contrast with the background, unrelated to the class
    for _ in range(randint(1, 4)):
        s = randint(H // 4, H // 2 + 1)
        top, left = randint(0, H - s + 1), randint(W // 2, W - s + 1)
        image[:, top:top + s, left:left + s] = shade + 10 * torch.randn(3, s, s, generator=g)
        mask[top:top + s, left:left + s] = 1 + cue
    return image.clamp(0, 255).to(torch.uint8), mask


class SyntheticCueSegmentation(torch.utils.data.Dataset):
    """``length`` samples of :func:`make_sample`; indexed by int or the trainer's ``(index, size, seed)``.

    ``transform(image uint8, mask int64, seed)`` is applied when given (default: the raw pair).
    """

    classes = CLASSES

    def __init__(self, length: int, seed: int = 0, size: tuple[int, int] = (32, 128), transform=None) -> None:
        if length < 1:
            raise ValueError(f"the synthetic set needs at least one sample, got length={length}")
        self.length, self.seed, self.size, self.transform = length, seed, tuple(size), transform

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key):
        index, aug_seed = (key[0], key[2]) if isinstance(key, tuple) else (key, key)
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} samples")
        image, mask = make_sample(index, self.seed, self.size)
        return self.transform(image, mask, aug_seed) if self.transform else (image, mask)


__all__ = ["CLASSES", "CUE_COLOURS", "SyntheticCueSegmentation", "make_sample"]
