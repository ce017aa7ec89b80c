"""Semantic segmentation as a task of the one Trainer (``task: segmentation`` in a recipe).

The task supplies the datasets (ADE20K, Cityscapes, an images + masks folder or the synthetic
cue set), the model (any registered segmentation model, e.g. ``qtvit_1_upernet_ade20k``), the
loss (pixel cross-entropy with ``ignore_index``, logits resized bilinearly to the crop; plus 0.4 ×
the auxiliary head's loss when the model has one) and the evaluation (mIoU / mAcc / aAcc from
one confusion matrix summed over ranks, whole-image or sliding-window inference). Everything
else (DDP, AMP, EMA, optimiser, schedule, resume, checkpoints, logs) is the Trainer's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...errors import QtvitError
from ...train.config import BaseDataConfig, Config, ModelConfig, check_common
from ...train.task import StepContext, Task, register_task
from .data import DATASETS, IGNORE_INDEX
from .metrics import ConfusionMatrix, format_metrics


@dataclass
class SegModelConfig(ModelConfig):
    """The network; ``backbone_checkpoint`` starts the backbone from an ImageNet classifier (any layout),
    ``sync_bn`` uses SyncBatchNorm when training on several processes, ``aux_weight`` weighs the
    auxiliary head's loss (models built with ``kwargs: {aux_head: true}``)."""

    name: str = "qtvit_1_seghead_ade20k"
    drop_path_rate: float = 0.1
    backbone_checkpoint: str | None = None
    allow_missing_qt: bool = False  # an EfficientViT backbone checkpoint into a QT backbone
    sync_bn: bool = False
    aux_weight: float = 0.4


@dataclass
class SegDataConfig(BaseDataConfig):
    """Where the images and masks come from and how evaluation runs."""

    dataset: str = "ade20k"  # ade20k | cityscapes | folder | synthetic
    path: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    num_classes: int | None = None  # folder datasets without classes.txt
    ignore_index: int = IGNORE_INDEX
    eval_scale: list[int] | None = field(default_factory=lambda: [2048, 512])  # fit (long, short); null: keep
    eval_mode: str = "whole"  # whole | slide
    eval_crop: int = 512
    eval_stride: int = 341
    eval_flip: bool = False
    eval_scales: list[float] = field(default_factory=lambda: [1.0])
    synthetic_size: list[int] = field(default_factory=lambda: [32, 128])  # (H, W) of the synthetic set
    synthetic_train: int = 4000
    synthetic_val: int = 200


@dataclass
class SegAugConfig:
    """Training augmentation (mmseg's ADE20K pipeline); the synthetic set is only normalised."""

    crop_size: list[int] = field(default_factory=lambda: [512, 512])
    scale: list[int] = field(default_factory=lambda: [2048, 512])  # rescaled to fit (long, short) × ratio
    ratio_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    cat_max_ratio: float = 0.75
    hflip: float = 0.5
    photometric: bool = True


@dataclass
class SegConfig(Config):
    """A segmentation run (``task: segmentation``)."""

    task = "segmentation"

    model: SegModelConfig = field(default_factory=SegModelConfig)
    data: SegDataConfig = field(default_factory=SegDataConfig)
    aug: SegAugConfig = field(default_factory=SegAugConfig)

    def check(self) -> None:
        check_common(self)
        d, a = self.data, self.aug
        if d.dataset not in DATASETS:
            raise QtvitError(f"data.dataset={d.dataset!r} is not valid; choose from {', '.join(DATASETS)}")
        if d.dataset != "synthetic" and not d.path:
            raise QtvitError(f"data.path is required for data.dataset={d.dataset!r}")
        if d.eval_mode not in ("whole", "slide"):
            raise QtvitError(f"data.eval_mode={d.eval_mode!r} is not valid; choose from whole, slide")
        if not 0 < d.eval_stride <= d.eval_crop:
            raise QtvitError(f"data.eval_stride={d.eval_stride} must be in (0, eval_crop={d.eval_crop}]")
        if len(a.crop_size) != 2 or min(a.crop_size) < 32:
            raise QtvitError(f"aug.crop_size must be [height, width] of at least 32; got {a.crop_size}")
        if len(a.ratio_range) != 2 or not 0 < a.ratio_range[0] <= a.ratio_range[1]:
            raise QtvitError(f"aug.ratio_range must be [min, max] with 0 < min <= max; got {a.ratio_range}")
        if len(d.synthetic_size) != 2 or min(d.synthetic_size) < 32:
            raise QtvitError(f"data.synthetic_size must be [height, width] of at least 32; got "
                             f"{d.synthetic_size}")


def _normalize_only(image: torch.Tensor, mask: torch.Tensor, seed: int = 0):
    from .transforms import normalize

    return normalize(image), mask


@register_task
class SegmentationTask(Task):
    """Images → per-pixel class logits; ``best.pt`` is chosen by validation mIoU (a fraction)."""

    name = "segmentation"
    metric = "miou"
    config_class = SegConfig
    curve_metrics = ("miou", "macc", "aacc")

    def load_data(self, seed: int) -> list[str]:
        d = self.cfg.data
        if d.dataset == "synthetic":
            from .synthetic import CLASSES

            self.train_samples = self.val_samples = self.lut = None
            return list(CLASSES)
        from .data import read_dataset

        self.train_samples, classes, self.lut = read_dataset(d.dataset, d.path, d.train_split, d.num_classes)
        self.val_samples, _, _ = read_dataset(d.dataset, d.path, d.val_split, d.num_classes)
        return classes

    def build_model(self, num_classes: int) -> nn.Module:
        from ...train.evaluate import build_model

        m = self.cfg.model
        extra = {}
        if m.backbone_checkpoint:
            extra = dict(backbone_checkpoint=m.backbone_checkpoint, allow_missing_qt=m.allow_missing_qt)
        m_with = SegModelConfig(**{**m.__dict__, "kwargs": {**m.kwargs, **extra}})
        model = build_model(m_with, num_classes)
        if not hasattr(model, "output_stride"):
            raise QtvitError(f"model {m.name} is not a segmentation model (qtvit models --pattern '*seg*' "
                             f"or '*upernet*' lists them)")
        if m.sync_bn and self.info.world_size > 1:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return model

    def train_dataset(self, model: nn.Module) -> torch.utils.data.Dataset:
        d, a = self.cfg.data, self.cfg.aug
        if d.dataset == "synthetic":
            from .synthetic import SyntheticCueSegmentation

            return SyntheticCueSegmentation(d.synthetic_train, self.cfg.train.seed, tuple(d.synthetic_size),
                                            transform=_normalize_only)
        from .data import SegmentationDataset
        from .transforms import TrainTransform

        tf = TrainTransform(tuple(a.crop_size), tuple(a.scale), tuple(a.ratio_range), a.cat_max_ratio,
                            a.hflip, a.photometric, ignore_index=d.ignore_index)
        return SegmentationDataset(self.train_samples, model.num_classes, self.lut, tf, d.ignore_index)

    def val_dataset(self, model: nn.Module) -> torch.utils.data.Dataset:
        d = self.cfg.data
        if d.dataset == "synthetic":
            from .synthetic import SyntheticCueSegmentation

            # another seed: images never seen in training
            return SyntheticCueSegmentation(d.synthetic_val, self.cfg.train.seed + 7919,
                                            tuple(d.synthetic_size), transform=_normalize_only)
        from .data import SegmentationDataset
        from .transforms import EvalTransform

        return SegmentationDataset(self.val_samples, model.num_classes, self.lut, EvalTransform(d.eval_scale),
                                   d.ignore_index)

    def train_sizes(self) -> list[int]:
        d = self.cfg.data
        return [max(d.synthetic_size) if d.dataset == "synthetic" else max(self.cfg.aug.crop_size)]

    @staticmethod
    def collate(samples):
        from .transforms import collate_pairs

        return collate_pairs(samples)

    def to_device(self, batch, device: torch.device):
        x, y = batch
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        if isinstance(x, list):
            return [move(i) for i in x], [move(m) for m in y]
        x = move(x)
        if self.cfg.train.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, move(y)

    def batch_info(self, batch) -> dict[str, int]:
        x = batch[0]
        return {"images": len(x), "size": int(x[0].shape[-1]), "bad": 0}

    def training_loss(self, net: nn.Module, batch, step: StepContext) -> torch.Tensor:
        x, y = batch
        out = net(x)
        main, aux = (out if isinstance(out, tuple) else (out, None))
        loss = pixel_cross_entropy(main, y, self.cfg.data.ignore_index)
        if aux is not None:
            loss = loss + self.cfg.model.aux_weight * pixel_cross_entropy(aux, y, self.cfg.data.ignore_index)
        return loss

    def evaluate(self, model: nn.Module, loader, amp_dtype: torch.dtype | None) -> dict[str, Any]:
        d = self.cfg.data
        return evaluate_segmentation(model, loader, self.device, model.num_classes, d.ignore_index,
                                     amp_dtype, mode=d.eval_mode, crop=d.eval_crop, stride=d.eval_stride,
                                     flip=d.eval_flip, scales=tuple(d.eval_scales))

    def describe(self, metrics: dict[str, Any]) -> str:
        return f"val {format_metrics(metrics)}  ({metrics['images']} images)"


def pixel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX
                        ) -> torch.Tensor:
    """Cross-entropy of (B, C, h, w) logits against (B, H, W) labels, logits resized bilinearly to (H, W)."""
    if logits.shape[-2:] != target.shape[-2:]:
        logits = F.interpolate(logits.float(), size=target.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(logits.float(), target, ignore_index=ignore_index)


@torch.no_grad()
def evaluate_segmentation(model: nn.Module, loader, device: torch.device, num_classes: int,
                          ignore_index: int = IGNORE_INDEX, amp_dtype: torch.dtype | None = None,
                          mode: str = "whole", crop: int = 512, stride: int = 341, flip: bool = False,
                          scales: tuple[float, ...] = (1.0,), progress: bool = False) -> dict[str, Any]:
    """mIoU / mAcc / aAcc (fractions) and the image count of ``model`` over ``loader``, summed over ranks.

    ``loader`` yields (images, masks): stacked tensors, or lists of per-image tensors of any sizes
    (masks at their original size; logits are resized to them).
    """
    from .inference import predict

    was_training = model.training
    model.eval()
    cm = ConfusionMatrix(num_classes, ignore_index, device)
    images = 0
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    iterator = loader
    if progress:
        from tqdm import tqdm

        iterator = tqdm(loader, unit="batch", desc="evaluate")
    try:
        for xs, ys in iterator:
            pairs = zip(xs, ys, strict=True) if isinstance(xs, list) else [(xs, ys)]
            for x, y in pairs:
                x, y = x.to(device), y.to(device)
                if x.dim() == 3:
                    x, y = x[None], y[None]
                with autocast:
                    scores = predict(model, x, out_size=y.shape[-2:], mode=mode, crop=crop, stride=stride,
                                     flip=flip, scales=scales)
                cm.update(scores.argmax(1), y)
                images += x.shape[0]
    finally:
        model.train(was_training)
    cm.all_reduce()
    count = torch.tensor([images], device=device)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(count)
    result = cm.compute()
    return {"miou": result["miou"], "macc": result["macc"], "aacc": result["aacc"], "images": int(count)}


__all__ = ["SegAugConfig", "SegConfig", "SegDataConfig", "SegModelConfig", "SegmentationTask",
           "evaluate_segmentation", "pixel_cross_entropy"]
