"""Training-time sample preparation for detection: multi-scale resize and horizontal flip, seeded.

The Trainer's sampler draws one short side per step (``(index, size, seed)`` keys);
:class:`DetectionTrainSet` resizes image, boxes and masks so the short side is ``size`` and the
long side at most ``max_size`` (mmdet's ``keep_ratio`` resize), and flips with probability
``hflip`` from the key's seed (a resumed run sees the same flips). The model then only normalises
and pads (its transform skips resizing in training).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

Target = dict[str, torch.Tensor]


def scale_for(height: int, width: int, short: int, max_size: int) -> float:
    """The factor that brings the short side to ``short`` without the long side exceeding ``max_size``."""
    return min(short / min(height, width), max_size / max(height, width))


def resize_sample(image: torch.Tensor, target: Target, short: int,
                  max_size: int) -> tuple[torch.Tensor, Target]:
    """Resize (3, H, W) ``image`` bilinearly and ``target``'s boxes and masks (nearest) to the new size."""
    h, w = image.shape[-2:]
    factor = scale_for(h, w, short, max_size)
    nh, nw = max(1, round(h * factor)), max(1, round(w * factor))
    if (nh, nw) == (h, w):
        return image, target
    image = F.interpolate(image[None], size=(nh, nw), mode="bilinear", align_corners=False)[0]
    out = dict(target)
    out["boxes"] = target["boxes"] * torch.tensor([nw / w, nh / h, nw / w, nh / h])
    if "masks" in target:
        masks = target["masks"]
        out["masks"] = (F.interpolate(masks[None].float(), size=(nh, nw), mode="nearest")[0].to(masks.dtype)
                        if len(masks) else masks.new_zeros((0, nh, nw)))
    return image, out


def hflip_sample(image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
    w = image.shape[-1]
    out = dict(target)
    boxes = target["boxes"]
    out["boxes"] = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], dim=1)
    if "masks" in target:
        out["masks"] = target["masks"].flip(-1)
    return image.flip(-1), out


class DetectionTrainSet(torch.utils.data.Dataset):
    """``base`` (items ``(image, target)``) indexed by sampler keys ``(index, size, seed)``."""

    def __init__(self, base, max_size: int, hflip: float = 0.5) -> None:
        self.base, self.max_size, self.hflip = base, max_size, hflip

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key) -> tuple[torch.Tensor, Target]:
        index, size, seed = key
        image, target = self.base[index]
        image, target = resize_sample(image, target, size, self.max_size)
        if self.hflip > 0 and np.random.default_rng(seed).random() < self.hflip:
            image, target = hflip_sample(image, target)
        return image, target


def collate(samples: list) -> tuple[list[torch.Tensor], list[Target]]:
    """Images of different sizes stay a list (the model pads them): ``(images, targets)``."""
    images, targets = zip(*samples, strict=True)
    return list(images), list(targets)


__all__ = ["DetectionTrainSet", "collate", "hflip_sample", "resize_sample", "scale_for"]
