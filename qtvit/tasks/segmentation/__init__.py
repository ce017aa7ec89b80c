"""Semantic segmentation: datasets, joint transforms, mmseg-equal metrics, whole/sliding-window
inference, the trainer task (``task: segmentation``), the synthetic cue demo and the CLI.

Models live in :mod:`qtvit.models.segmentation` (``qtvit.create_model("qtvit_1_seghead_ade20k")``).
"""

from .inference import forward_logits, pad_to_multiple, predict, slide_logits
from .metrics import ConfusionMatrix, confusion_matrix, metrics_from_confusion
from .task import SegConfig, SegmentationTask, evaluate_segmentation, pixel_cross_entropy

__all__ = ["ConfusionMatrix", "SegConfig", "SegmentationTask", "confusion_matrix", "evaluate_segmentation",
           "forward_logits", "metrics_from_confusion", "pad_to_multiple", "pixel_cross_entropy", "predict",
           "slide_logits"]
