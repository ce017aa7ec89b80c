"""Deployment: inference-time fusion, ONNX / torch.export export, prediction and hub weights.

* :func:`fuse` folds BatchNorms and converts the attention to its inference form (exact);
* :func:`export_onnx` / :func:`export_program` write ``.onnx`` / ``.pt2`` files with dynamic batch,
  height and width, and the preprocessing, class names and accepted sizes as metadata;
* :func:`save_pretrained` / :func:`load_pretrained` use timm's hub folder layout.

Only :mod:`torch` is imported here; onnx/onnxruntime/timm are imported by the functions that need them.
"""

from ..models.hub import load_pretrained, save_pretrained
from .fuse import FusedLiteMLA, FusedModelError, fold_bn, fuse

__all__ = ["FusedLiteMLA", "FusedModelError", "fold_bn", "fuse", "load_pretrained", "save_pretrained"]
