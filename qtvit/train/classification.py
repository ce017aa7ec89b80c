"""Image classification, the Trainer's first task: the paper's ImageNet recipe and the demo.

Per micro-batch: mixup/cutmix (timm) → forward → BCE with label smoothing (or softmax cross-entropy)
→ plus EMA self-distillation late in training (L models: loss += r·BCE(out, sigmoid(ema_out))).
Evaluation: top-1/top-5 and cross-entropy over the validation set, summed over ranks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .config import Config
from .evaluate import evaluate
from .task import StepContext, Task, register_task


@register_task
class ClassificationTask(Task):
    """Images → class logits; ``best.pt`` is chosen by validation top-1 (%)."""

    name = "classification"
    metric = "top1"
    curve_metrics = ("top1", "top5")
    config_class = Config

    # ------------------------------------------------------------------------------------ data
    def load_data(self, seed: int) -> list[str]:
        from ..data import build_datasets

        d = self.cfg.data
        self.train_base, self.val_base, classes = build_datasets(
            d.dataset, d.path, train_split=d.train_split, val_split=d.val_split, val_fraction=d.val_fraction,
            seed=seed, demo_image_size=d.demo_image_size, demo_train_size=d.demo_train_size,
            demo_val_size=d.demo_val_size, demo_cache=d.demo_cache)
        self._build_loss(len(classes))
        return classes

    def _build_loss(self, num_classes: int) -> None:
        from timm.data import Mixup
        from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

        a = self.cfg.aug
        self.mixup = None
        if a.mixup_alpha > 0 or a.cutmix_alpha > 0:
            self.mixup = Mixup(mixup_alpha=a.mixup_alpha, cutmix_alpha=a.cutmix_alpha, prob=a.mixup_prob,
                               switch_prob=a.mixup_switch_prob, label_smoothing=a.label_smoothing,
                               num_classes=num_classes)
        if a.bce:
            # Integer targets are smoothed here; mixup's dense targets arrive smoothed already.
            self.loss_fn = BinaryCrossEntropy(smoothing=a.label_smoothing)
        elif self.mixup is not None:
            self.loss_fn = SoftTargetCrossEntropy()
        elif a.label_smoothing:
            self.loss_fn = LabelSmoothingCrossEntropy(a.label_smoothing)
        else:
            self.loss_fn = nn.CrossEntropyLoss()
        self.distill_fn = BinaryCrossEntropy(smoothing=0.0)

    def _data_config(self, model: nn.Module) -> dict:
        from ..data import data_config

        self.data_cfg = data_config(model)
        return self.data_cfg

    def eval_size(self) -> int:
        return self.cfg.train.eval_size or int(self.data_cfg["input_size"][-1])

    def train_sizes(self) -> list[int]:
        a = self.cfg.aug
        return list(a.train_sizes) if a.multi_res else [self.eval_size()]

    def train_dataset(self, model: nn.Module) -> torch.utils.data.Dataset:
        """Transforms resolved from the model's pretrained_cfg, one per resolution (+ the eval size)."""
        from ..data import AugmentedDataset, TrainAugment, train_transforms

        a = self.cfg.aug
        data_cfg = self._data_config(model)
        augment = TrainAugment(
            scale=tuple(a.crop_scale) if a.crop_scale else None, hflip=a.hflip,
            randaug=f"rand-m{a.randaug_m}-n{a.randaug_n}-mstd{a.randaug_mstd}" if a.randaug else None,
            color_jitter=a.color_jitter, interpolation=a.train_interpolation, re_prob=a.re_prob,
            no_aug=a.no_aug)
        # The eval size too: BN re-estimation draws training images at that size.
        tfs = train_transforms(data_cfg, sorted(set(self.train_sizes()) | {self.eval_size()}), augment)
        return AugmentedDataset(self.train_base, tfs, self.cfg.data.skip_bad_images,
                                seed_transforms=not a.no_aug)

    def val_dataset(self, model: nn.Module) -> torch.utils.data.Dataset:
        from ..data import AugmentedDataset, eval_transform

        data_cfg = self._data_config(model)
        return AugmentedDataset(self.val_base, eval_transform(data_cfg, self.eval_size()),
                                self.cfg.data.skip_bad_images)

    def to_device(self, batch, device: torch.device):
        x, y, bad = batch
        x = x.to(device, non_blocking=True)
        if self.cfg.train.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y.to(device, non_blocking=True), bad

    def batch_info(self, batch) -> dict[str, int]:
        x, _, bad = batch
        return {"images": int(x.shape[0]), "size": int(x.shape[-1]), "bad": int(bad.sum())}

    # ---------------------------------------------------------------------------------- train
    def training_loss(self, net: nn.Module, batch, step: StepContext) -> torch.Tensor:
        x, y, _ = batch
        t = self.cfg.train
        target = y
        if self.mixup is not None:
            x, target = self.mixup(x, y)
        out = net(x)
        loss = self.loss_fn(out, target)
        if t.distill_ratio > 0 and step.global_step >= int(t.distill_start * step.total_steps):
            with torch.no_grad():
                teacher = step.ema(x)
            loss = loss + t.distill_ratio * self.distill_fn(out, teacher.float().sigmoid())
        return loss

    # ----------------------------------------------------------------------------------- eval
    def evaluate(self, model: nn.Module, loader, amp_dtype: torch.dtype | None) -> dict[str, Any]:
        return evaluate(model, loader, self.device, self.info, amp_dtype, self.cfg.train.channels_last)

    def describe(self, metrics: dict[str, Any]) -> str:
        return (f"val top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%  "
                f"loss {metrics['loss']:.4f}  ({metrics['images']} images)")

    def summary(self, metrics: dict[str, Any]) -> dict[str, Any]:
        return {"accuracy": metrics.get("top1", 0.0) / 100.0}


__all__ = ["ClassificationTask"]
