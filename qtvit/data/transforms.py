"""Transforms resolved from the model: timm's ``resolve_data_config`` + ``create_transform``.

Evaluation uses the model's own ``pretrained_cfg`` (input size, crop_pct, interpolation,
mean/std), so a checkpoint is always measured the way it was meant to be. Training builds one
transform per resolution for multi-resolution training (see :mod:`qtvit.data.sampling`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch.nn as nn


@dataclass(frozen=True)
class TrainAugment:
    """The training-time augmentations (all timm's), each switchable.

    Attributes:
        scale: RandomResizedCrop area range; ``None`` disables cropping (plain resize).
        hflip: horizontal flip probability.
        randaug: timm RandAugment config string (``"rand-m3-n1-mstd0.5"``) or ``None``.
        color_jitter: ColorJitter strength (0 disables; timm also disables it under RandAugment).
        interpolation: resize interpolation for training (``"random"`` = bilinear or bicubic).
        re_prob: random-erasing probability (0 disables).
        no_aug: only resize + centre crop + normalise (synthetic data that must not be cropped
            or flipped, e.g. the demo set, whose labels depend on left/right).
    """

    scale: tuple[float, float] | None = (0.08, 1.0)
    hflip: float = 0.5
    randaug: str | None = None
    color_jitter: float = 0.0
    interpolation: str = "bicubic"
    re_prob: float = 0.0
    no_aug: bool = False


def data_config(model: nn.Module) -> dict:
    """timm's resolved data config for ``model``: input_size, interpolation, mean, std, crop_pct, ..."""
    from timm.data import resolve_data_config

    return resolve_data_config(model=model)


def eval_transform(cfg: dict, image_size: int | None = None) -> Callable:
    """The evaluation transform for a resolved data ``cfg``, optionally at another ``image_size``."""
    from timm.data import create_transform

    size = image_size or cfg["input_size"][-1]
    return create_transform(input_size=size, is_training=False, interpolation=cfg["interpolation"],
                            mean=cfg["mean"], std=cfg["std"], crop_pct=cfg["crop_pct"],
                            crop_mode=cfg.get("crop_mode"))


def train_transforms(cfg: dict, sizes: Sequence[int], augment: TrainAugment) -> dict[int, Callable]:
    """One training transform per resolution in ``sizes`` (same augmentations, different output size)."""
    from timm.data import create_transform

    def build(size: int) -> Callable:
        if augment.no_aug:
            return create_transform(input_size=size, is_training=True, no_aug=True, mean=cfg["mean"],
                                    std=cfg["std"], interpolation=cfg["interpolation"])
        scale = augment.scale if augment.scale is not None else (1.0, 1.0)
        # scale (1, 1) with ratio (1, 1) makes timm's RandomResizedCrop a plain resize.
        ratio = (3 / 4, 4 / 3) if augment.scale is not None else (1.0, 1.0)
        return create_transform(
            input_size=size, is_training=True, scale=scale, ratio=ratio, hflip=augment.hflip,
            color_jitter=augment.color_jitter or None, auto_augment=augment.randaug,
            interpolation=augment.interpolation, mean=cfg["mean"], std=cfg["std"],
            re_prob=augment.re_prob, re_mode="pixel", re_count=1)

    return {int(size): _fix_posterize(build(int(size))) for size in sizes}


def _posterize_keep_zero_bits(img, bits_to_keep: int, **_):
    """timm's ``posterize`` with the pre-Pillow-11 meaning of 0 bits (a black image).

    timm's RandAugment draws 0..4 bits for ``Posterize``; Pillow ≥ 11 rejects 0, which would crash
    the paper's recipe (m=3 with magnitude noise reaches 0 often). Older Pillow, which the
    recipe ran on, returned black for 0 bits (timm's policy comments rely on it); so do we.
    """
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _fix_posterize(transform: Callable) -> Callable:
    """Swap :func:`_posterize_keep_zero_bits` into every Posterize op of a RandAugment in ``transform``."""
    from timm.data.auto_augment import RandAugment

    for t in getattr(transform, "transforms", [transform]):
        if isinstance(t, RandAugment):
            for op in t.ops:
                if op.name.startswith("Posterize"):
                    op.aug_fn = _posterize_keep_zero_bits
    return transform
