"""Segmentation metrics as mmseg computes them: one dataset-level confusion matrix.

Pixels whose label is ``ignore_index`` are left out. With the (C, C) confusion matrix M
(rows: ground truth, columns: prediction) summed over every pixel of the whole set:

    IoU_c = M_cc / (Σ_j M_cj + Σ_i M_ic − M_cc)      (TP / (TP + FP + FN))
    Acc_c = M_cc / Σ_j M_cj                          (per-class recall)
    mIoU  = mean of IoU_c over classes with a non-zero union (present in prediction or label)
    mAcc  = mean of Acc_c over classes present in the labels
    aAcc  = Σ_c M_cc / Σ M                           (pixel accuracy)

Classes absent from both prediction and label are NaN and left out of the means (nanmean), as
in mmseg and ``torchmetrics``' ``MulticlassJaccardIndex(average="macro")``. (Averaging per image,
as ``torchmetrics.segmentation.MeanIoU`` does, is a different metric.) Under DDP the matrices are
summed over ranks (:meth:`ConfusionMatrix.all_reduce`) before the means.
"""

from __future__ import annotations

import math

import torch

Tensor = torch.Tensor


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    """(C, C) int64 counts; rows = ground truth, columns = prediction.

    Args:
        pred: predicted class ids, any shape.
        target: labels of the same shape; ``ignore_index`` pixels are skipped.

    Raises:
        ValueError: shapes differ, or a label/prediction outside [0, C) that is not ``ignore_index``.
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != label shape {tuple(target.shape)}")
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    keep = target != ignore_index
    pred, target = pred[keep], target[keep]
    if target.numel():
        lo, hi = int(torch.minimum(pred.min(), target.min())), int(torch.maximum(pred.max(), target.max()))
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"class id out of range [0, {num_classes}) (found {lo}..{hi}); labels to "
                             f"skip must equal ignore_index={ignore_index}")
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def metrics_from_confusion(matrix: Tensor) -> dict[str, float | list[float]]:
    """``miou``, ``macc``, ``aacc`` (fractions in [0, 1]), per-class ``iou``/``acc`` lists (NaN: absent)."""
    m = matrix.double()
    tp = m.diagonal()
    label_area = m.sum(1)
    pred_area = m.sum(0)
    union = label_area + pred_area - tp
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=m.device)
    iou = torch.where(union > 0, tp / union.clamp_min(1), nan)
    acc = torch.where(label_area > 0, tp / label_area.clamp_min(1), nan)
    total = label_area.sum()
    return {
        "miou": _nanmean(iou),
        "macc": _nanmean(acc),
        "aacc": float(tp.sum() / total) if total > 0 else float("nan"),
        "iou": iou.tolist(),
        "acc": acc.tolist(),
    }


def _nanmean(x: Tensor) -> float:
    valid = ~torch.isnan(x)
    return float(x[valid].mean()) if valid.any() else float("nan")


class ConfusionMatrix:
    """Accumulates one confusion matrix over a dataset (and over ranks).

    Example::

        cm = ConfusionMatrix(150)
        for logits, labels in batches:
            cm.update(logits.argmax(1), labels)
        cm.all_reduce()               # DDP: sum over ranks (no-op otherwise)
        cm.compute()["miou"]
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, device: torch.device | str = "cpu") -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, pred: Tensor, target: Tensor) -> None:
        self.matrix += confusion_matrix(pred.to(self.matrix.device), target.to(self.matrix.device),
                                        self.num_classes, self.ignore_index)

    def all_reduce(self) -> None:
        """Sum the matrices of every rank (when torch.distributed is initialised)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.matrix, op=dist.ReduceOp.SUM)

    def compute(self) -> dict[str, float | list[float]]:
        return metrics_from_confusion(self.matrix)


def format_metrics(metrics: dict) -> str:
    """``mIoU 41.20  mAcc 52.00  aAcc 79.10`` (percent)."""
    def pct(v: float) -> str:
        return "nan" if v is None or math.isnan(v) else f"{100 * v:.2f}"

    return f"mIoU {pct(metrics['miou'])}  mAcc {pct(metrics['macc'])}  aAcc {pct(metrics['aacc'])}"


__all__ = ["ConfusionMatrix", "confusion_matrix", "format_metrics", "metrics_from_confusion"]
