"""Joint image + mask transforms (mmseg's ADE20K pipeline) on ``torchvision.transforms.v2``.

Training (:class:`TrainTransform`): random rescale so the image fits (2048, 512)·r with r ~ U(0.5, 2.0)
(aspect kept) → random crop 512×512 (padded with 0 / ignore when smaller; a crop where one class
covers more than 75% of the labelled pixels is redrawn up to 10 times) → horizontal flip (p 0.5)
→ photometric distortion (brightness, contrast, saturation, hue) → float, ImageNet mean/std.
The mask is resized with nearest neighbour (torchvision dispatches on ``tv_tensors.Mask``).

Evaluation (:class:`EvalTransform`): resize the image to fit ``scale`` (ADE20K: short side 512,
long side at most 2048), normalise; the mask stays at its original size (metrics compare at the
label size, after resizing the logits).

Randomness comes from the ``seed`` each call receives (the trainer's per-sample seed), so a
resumed run repeats the same augmentations.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .data import IGNORE_INDEX

Tensor = torch.Tensor
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def rescale_size(hw: Sequence[int], scale: Sequence[int]) -> tuple[int, int]:
    """Size of an (H, W) image rescaled, aspect kept, to fit ``scale`` = (long, short) edges."""
    h, w = int(hw[0]), int(hw[1])
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(h, w), short_edge / min(h, w))
    return max(1, int(h * factor + 0.5)), max(1, int(w * factor + 0.5))


def normalize(image: Tensor, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD) -> Tensor:
    """uint8 (…, 3, H, W) → float32 normalised."""
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (image.float() / 255.0 - m) / s


class TrainTransform:
    """Rescale → crop → flip → photometric distortion → normalise. (uint8 (3,H,W), int64 (H,W), seed) →
    (float32 (3, crop, crop), int64 (crop, crop))."""

    def __init__(self, crop_size: int | Sequence[int] = 512, scale: Sequence[int] = (2048, 512),
                 ratio_range: Sequence[float] = (0.5, 2.0), cat_max_ratio: float = 0.75, hflip: float = 0.5,
                 photometric: bool = True, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, ignore_index: int = IGNORE_INDEX) -> None:
        self.crop = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)
        self.scale, self.ratio_range = tuple(scale), tuple(ratio_range)
        self.cat_max_ratio, self.hflip, self.photometric = cat_max_ratio, hflip, photometric
        self.mean, self.std, self.ignore_index = mean, std, ignore_index

    def __call__(self, image: Tensor, mask: Tensor, seed: int) -> tuple[Tensor, Tensor]:
        from torchvision import tv_tensors
        from torchvision.transforms import v2
        from torchvision.transforms.v2 import functional as TF

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            img, msk = tv_tensors.Image(image), tv_tensors.Mask(mask[None])
            lo, hi = self.ratio_range
            ratio = lo + (hi - lo) * float(torch.rand(()))
            size = rescale_size(img.shape[-2:], [s * ratio for s in self.scale])
            img, msk = TF.resize(img, list(size), antialias=True), TF.resize(msk, list(size))
            img, msk = self._pad(img, msk)
            img, msk = self._random_crop(img, msk)
            if float(torch.rand(())) < self.hflip:
                img, msk = TF.horizontal_flip(img), TF.horizontal_flip(msk)
            if self.photometric:
                # mmseg's PhotoMetricDistortion: brightness ±32 of 255 (here ×0.875–1.125, the same
                # at mid-grey), contrast and saturation ×0.5–1.5, hue ±18 of OpenCV's 180 = ±0.1 turn
                img = v2.RandomPhotometricDistort(brightness=(0.875, 1.125), contrast=(0.5, 1.5),
                                                  saturation=(0.5, 1.5), hue=(-0.1, 0.1), p=0.5)(img)
        return normalize(img.as_subclass(Tensor), self.mean, self.std), msk.as_subclass(Tensor)[0].long()

    def _pad(self, img, msk):
        from torchvision.transforms.v2 import functional as TF

        ph, pw = max(self.crop[0] - img.shape[-2], 0), max(self.crop[1] - img.shape[-1], 0)
        if ph or pw:  # right/bottom padding: image 0, mask ignored
            img = TF.pad(img, [0, 0, pw, ph], fill=0)
            msk = TF.pad(msk, [0, 0, pw, ph], fill=self.ignore_index)
        return img, msk

    def _random_crop(self, img, msk):
        from torchvision.transforms.v2 import functional as TF

        H, W = img.shape[-2:]
        ch, cw = self.crop
        for _ in range(10):
            top = int(torch.randint(0, H - ch + 1, ()))
            left = int(torch.randint(0, W - cw + 1, ()))
            crop = msk[..., top:top + ch, left:left + cw]
            if self.cat_max_ratio >= 1.0:
                break
            labels = crop[crop != self.ignore_index]
            counts = torch.bincount(labels.flatten().long()) if labels.numel() else torch.zeros(1)
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                break
        return TF.crop(img, top, left, ch, cw), TF.crop(msk, top, left, ch, cw)


class EvalTransform:
    """Resize the image to fit ``scale`` (None: keep), normalise; the mask is returned unchanged."""

    def __init__(self, scale: Sequence[int] | None = (2048, 512), mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD) -> None:
        self.scale, self.mean, self.std = (tuple(scale) if scale else None), mean, std

    def __call__(self, image: Tensor, mask: Tensor, seed: int = 0) -> tuple[Tensor, Tensor]:
        if self.scale is not None:
            from torchvision.transforms.v2 import functional as TF

            image = TF.resize(image, list(rescale_size(image.shape[-2:], self.scale)), antialias=True)
        return normalize(image, self.mean, self.std), mask


def collate_pairs(samples: list[tuple[Tensor, Tensor]]):
    """Stack (image, mask) pairs when all sizes agree; else return two lists (evaluation at native sizes)."""
    images, masks = zip(*samples, strict=True)
    if len({tuple(i.shape) for i in images}) == 1 and len({tuple(m.shape) for m in masks}) == 1:
        return torch.stack(images), torch.stack(masks)
    return list(images), list(masks)


__all__ = ["EvalTransform", "IMAGENET_MEAN", "IMAGENET_STD", "TrainTransform", "collate_pairs", "normalize",
           "rescale_size"]
