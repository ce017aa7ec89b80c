"""The detection task for the one Trainer: COCO or synthetic data, a detector, COCO evaluation.

Recipes select it with ``task: detection`` (``configs/det/``). Per micro-batch the detector in train
mode returns its loss dict (RPN, box and mask losses, cascade stage weights applied); the training
loss is their sum. Evaluation runs the detector in eval mode over the validation set and scores
box and mask AP with pycocotools (``bbox_ap`` selects ``best.pt``).

Config sections differing from classification:

``model``   ``name`` is a registered detector (``qtvit_1_cascade_mask_rcnn_coco`` …) or an
            EfficientViT-family backbone name combined with ``arch`` (the demo's ``qtvit_b0``);
            ``backbone_checkpoint`` (ImageNet weights), ``norm`` (bn/frozen_bn/sync_bn); ``kwargs``
            go to :func:`qtvit.models.detection.build_detector` (head widths, proposal counts).
``data``    ``dataset: coco`` (``path`` holds ``{train,val}2017/`` and ``annotations/``) or
            ``synthetic`` (:mod:`qtvit.tasks.detection.synthetic`).
``aug``     ``train_sizes`` (short sides, one drawn per step), ``max_size``, ``hflip``, ``test_size``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ...errors import QtvitError
from ...train.config import BaseDataConfig, Config, ModelConfig, OptimConfig, TrainConfig, check_common
from ...train.task import StepContext, Task, register_task
from .data import DetectionTrainSet, collate


@dataclass
class DetModelConfig(ModelConfig):
    """The detector. ``name``: a registered detector, or a backbone name (then ``arch`` says which head)."""

    name: str = "qtvit_1_cascade_mask_rcnn_coco"
    arch: str = "cascade_mask_rcnn"  # used only when name is a backbone
    drop_path_rate: float = 0.1
    backbone_checkpoint: str | None = None  # ImageNet classification weights, any layout qtvit reads
    allow_missing_qt: bool = False  # an EfficientViT checkpoint into a QT backbone
    norm: str = "bn"  # backbone BN: bn | frozen_bn | sync_bn


@dataclass
class DetDataConfig(BaseDataConfig):
    """Where the images come from: ``coco`` (``path`` = the COCO root) or ``synthetic``."""

    dataset: str = "coco"
    path: str | None = None
    train_split: str = "train2017"
    val_split: str = "val2017"
    synthetic_train_size: int = 512
    synthetic_val_size: int = 64
    synthetic_image_size: int = 128
    synthetic_max_objects: int = 3


@dataclass
class DetAugConfig:
    """Multi-scale training (short side drawn per step), flip, and the test scale."""

    train_sizes: list[int] = field(default_factory=lambda: [800])
    max_size: int = 1333
    hflip: float = 0.5
    test_size: int = 800


@dataclass
class DetectionConfig(Config):
    task = "detection"

    model: DetModelConfig = field(default_factory=DetModelConfig)
    data: DetDataConfig = field(default_factory=DetDataConfig)
    aug: DetAugConfig = field(default_factory=DetAugConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        lr=1e-4, weight_decay=0.05, decay_rule="timm", sched="step", warmup_epochs=0, clip_grad=None))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        epochs=12, batch_size=2, ema=False, bn_reestimate=False, eval_batch_size=2))

    def check(self) -> None:
        check_common(self)
        d, a, m = self.data, self.aug, self.model
        if d.dataset not in ("coco", "synthetic"):
            raise QtvitError(f"data.dataset={d.dataset!r} is not valid; choose from coco, synthetic")
        if d.dataset == "coco" and not d.path:
            raise QtvitError("data.path must name the COCO root (train2017/, val2017/, annotations/) "
                             "for data.dataset=coco")
        if not a.train_sizes or any(s < 32 for s in a.train_sizes) or a.test_size < 32:
            raise QtvitError(f"aug.train_sizes and aug.test_size must be image sides of at least 32 px; "
                             f"got {a.train_sizes}, {a.test_size}")
        if a.max_size < max(max(a.train_sizes), a.test_size):
            raise QtvitError(f"aug.max_size={a.max_size} is below a short side in aug.train_sizes/test_size")
        if m.norm not in ("bn", "frozen_bn", "sync_bn"):
            raise QtvitError(f"model.norm={m.norm!r} is not valid; choose from bn, frozen_bn, sync_bn")
        if self.train.bn_reestimate:
            raise QtvitError("train.bn_reestimate must be false for detection (detectors train their BN "
                             "with the task's own data pipeline)")


def build_detection_model(m: DetModelConfig, num_classes: int, aug: DetAugConfig) -> nn.Module:
    """The detector named by ``m`` with ``num_classes`` object classes, resizing inputs as ``aug`` says."""
    from ...models import create_model, resolve_model_name
    from ...models.detection import build_detector

    kwargs = dict(m.kwargs)
    for key in ("kernel", "ape", "shortcut"):
        if getattr(m, key) is not None:
            kwargs[key] = getattr(m, key)
    kwargs.update(drop_path_rate=m.drop_path_rate, backbone_checkpoint=m.backbone_checkpoint,
                  allow_missing_qt=m.allow_missing_qt, norm=m.norm, min_size=aug.test_size,
                  max_size=aug.max_size)
    canonical = resolve_model_name(m.name)
    if canonical.endswith(("_cascade_mask_rcnn_coco", "_mask_rcnn_coco")):
        model = create_model(canonical, num_classes=num_classes, **kwargs)
    else:
        model = build_detector(m.arch, canonical, num_classes, **kwargs)
    if m.init_checkpoint:
        load_detector_weights(model, m.init_checkpoint)
    return model


def load_detector_weights(model: nn.Module, path: str | Path, use_ema: bool = False) -> None:
    """Load a detector state dict: a training checkpoint's (``model``/``ema``) or a plain one."""
    from ...train.state import read_checkpoint_file

    ckpt = read_checkpoint_file(path)
    if isinstance(ckpt, dict) and ckpt.get("qtvit_train_checkpoint"):
        if use_ema and ckpt.get("ema") is None:
            raise QtvitError(f"{path} has no EMA weights (trained with train.ema=false)")
        ckpt = ckpt["ema"] if use_ema else ckpt["model"]
    result = model.load_state_dict(ckpt, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise QtvitError(f"{path} does not fit the detector: {len(missing)} missing keys (e.g. "
                         f"{missing[:3]}), {len(result.unexpected_keys)} unexpected (e.g. "
                         f"{result.unexpected_keys[:3]})")


def build_sets(d: DetDataConfig, seed: int):
    """(train base, val base, classes, label → category id, val ground truth as a COCO dict)."""
    if d.dataset == "synthetic":
        from .synthetic import SyntheticShapes

        kw = dict(image_size=d.synthetic_image_size, max_objects=d.synthetic_max_objects, seed=seed)
        train = SyntheticShapes(d.synthetic_train_size, split="train", **kw)
        val = SyntheticShapes(d.synthetic_val_size, split="val", **kw)
        return train, val, list(train.classes), list(train.label_to_cat_id), None
    from .coco import CocoDetection

    root = Path(d.path)
    ann = root / "annotations"
    train = CocoDetection(root / d.train_split, ann / f"instances_{d.train_split}.json", skip_empty=True)
    val = CocoDetection(root / d.val_split, ann / f"instances_{d.val_split}.json")
    if val.label_to_cat_id != train.label_to_cat_id:
        raise QtvitError(f"{d.train_split} and {d.val_split} annotation files list different categories")
    return train, val, train.classes, train.label_to_cat_id, val.data


@register_task
class DetectionTask(Task):
    """Images → boxes, labels, scores, masks; ``best.pt`` is chosen by box AP."""

    name = "detection"
    metric = "bbox_ap"
    curve_metrics = ("bbox_ap", "bbox_ap50", "segm_ap")
    config_class = DetectionConfig
    collate = staticmethod(collate)

    def load_data(self, seed: int) -> list[str]:
        sets = build_sets(self.cfg.data, seed)
        self.train_base, self.val_base, classes, self.label_to_cat_id, self._val_gt = sets
        return classes

    def val_ground_truth(self) -> dict[str, Any]:
        if self._val_gt is None:  # the synthetic set renders its ground truth once, on demand
            self._val_gt = self.val_base.coco()
        return self._val_gt

    def build_model(self, num_classes: int) -> nn.Module:
        model = build_detection_model(self.cfg.model, num_classes, self.cfg.aug)
        model.transform.resize_in_training = False  # the training set resizes (multi-scale per step)
        return model

    def train_dataset(self, model: nn.Module) -> torch.utils.data.Dataset:
        a = self.cfg.aug
        return DetectionTrainSet(self.train_base, a.max_size, a.hflip)

    def val_dataset(self, model: nn.Module) -> torch.utils.data.Dataset:
        return self.val_base

    def train_sizes(self) -> list[int]:
        return list(self.cfg.aug.train_sizes)

    def eval_size(self) -> int:
        return self.cfg.aug.test_size

    def to_device(self, batch, device: torch.device):
        images, targets = batch
        images = [x.to(device, non_blocking=True) for x in images]
        targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
        return images, targets

    def inputs(self, batch):
        return batch[0]

    def batch_info(self, batch) -> dict[str, int]:
        images = batch[0]
        return {"images": len(images), "size": int(min(images[0].shape[-2:])), "bad": 0}

    def training_loss(self, net: nn.Module, batch, step: StepContext) -> torch.Tensor:
        images, targets = batch
        losses = net(images, targets)
        return sum(losses.values())

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader, amp_dtype: torch.dtype | None) -> dict[str, Any]:
        from ...train.evaluate import autocast
        from .evaluation import to_coco_results

        was_training = model.training
        model.eval()
        boxes, masks, ids = [], [], []
        try:
            for images, targets in loader:
                images = [x.to(self.device) for x in images]
                with autocast(self.device, amp_dtype):
                    outputs = model(images)
                image_ids = [int(t["image_id"]) for t in targets]
                outputs = [{k: (v.float() if v.is_floating_point() else v).cpu() for k, v in o.items()}
                           for o in outputs]
                b, m = to_coco_results(outputs, image_ids, self.label_to_cat_id)
                boxes += b
                masks += m
                ids += image_ids
        finally:
            model.train(was_training)
        return self._score(boxes, masks, ids)

    def _score(self, boxes: list, masks: list, ids: list) -> dict[str, Any]:
        """Gather the results of every rank, score on rank 0 and share the metrics."""
        from ...train import distributed as du
        from .evaluation import coco_evaluate

        if self.info.distributed:
            import torch.distributed as dist

            parts = [None] * self.info.world_size
            dist.all_gather_object(parts, (boxes, masks, ids))
            boxes = [r for p in parts for r in p[0]]
            masks = [r for p in parts for r in p[1]]
            ids = [i for p in parts for i in p[2]]
        metrics = None
        if self.info.is_main:
            metrics = coco_evaluate(self.val_ground_truth(), boxes, masks, image_ids=sorted(set(ids)))
            metrics["images"] = len(set(ids))
        return du.broadcast_object(metrics, self.info)

    def describe(self, metrics: dict[str, Any]) -> str:
        return (f"box AP {metrics['bbox_ap']:.3f} (AP50 {metrics['bbox_ap50']:.3f})  mask AP "
                f"{metrics['segm_ap']:.3f}  ({metrics['images']} images)")


__all__ = ["DetAugConfig", "DetDataConfig", "DetModelConfig", "DetectionConfig", "DetectionTask",
           "build_detection_model", "build_sets", "load_detector_weights"]
