"""COCO evaluation of detector outputs with pycocotools: box and mask AP, AP50, AP75, APs/m/l.

Detector outputs (torchvision format, labels 1..C) become COCO result entries (category ids,
``[x, y, w, h]`` boxes, masks thresholded at 0.5 and RLE-encoded) with :func:`to_coco_results`;
:func:`coco_evaluate` runs ``COCOeval`` on them against the ground-truth json (crowd regions and
the area ranges as COCO defines them: small < 32², medium < 96², large above).
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Sequence
from typing import Any

import torch

from .coco import encode_mask

# COCOeval.stats order → our metric names
STAT_NAMES = ("ap", "ap50", "ap75", "aps", "apm", "apl")


def to_coco_results(outputs: Sequence[dict[str, torch.Tensor]], image_ids: Sequence[int],
                    label_to_cat_id: Sequence[int], mask_threshold: float = 0.5
                    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(box results, mask results) in COCO's result format from one output dict per image.

    Args:
        outputs: ``boxes`` (n, 4) xyxy, ``scores`` (n,), ``labels`` (n,) in 1..C, optional ``masks``
            (n, 1, H, W) probabilities (or binary) in the image's pixels.
        image_ids: the COCO image id of each output.
        label_to_cat_id: category id of label l at index l − 1.
    """
    if len(outputs) != len(image_ids):
        raise ValueError(f"{len(outputs)} outputs but {len(image_ids)} image ids")
    boxes_out, masks_out = [], []
    for out, image_id in zip(outputs, image_ids, strict=True):
        boxes = out["boxes"].detach().float().cpu()
        scores = out["scores"].detach().float().cpu().tolist()
        labels = out["labels"].detach().cpu().tolist()
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        for box, score, label in zip(xywh, scores, labels, strict=True):
            if not 1 <= label <= len(label_to_cat_id):
                raise ValueError(f"label {label} outside 1..{len(label_to_cat_id)} (0 is background)")
            boxes_out.append({"image_id": int(image_id), "category_id": int(label_to_cat_id[label - 1]),
                              "bbox": [round(v, 3) for v in box], "score": float(score)})
        if "masks" in out:
            masks = out["masks"].detach().cpu()
            masks = (masks[:, 0] if masks.dim() == 4 else masks) >= mask_threshold
            for mask, score, label in zip(masks, scores, labels, strict=True):
                masks_out.append({"image_id": int(image_id), "category_id": int(label_to_cat_id[label - 1]),
                                  "segmentation": encode_mask(mask), "score": float(score)})
    return boxes_out, masks_out


def _coco_gt(data: dict[str, Any]):
    from pycocotools.coco import COCO

    gt = COCO()
    gt.dataset = copy.deepcopy(data)
    gt.dataset.setdefault("info", {})
    gt.dataset.setdefault("licenses", [])
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def coco_evaluate(gt_data: dict[str, Any], box_results: list[dict], mask_results: list[dict] | None = None,
                  image_ids: Sequence[int] | None = None) -> dict[str, float]:
    """COCO metrics: ``bbox_{ap,ap50,ap75,aps,apm,apl}`` and, if ``mask_results`` is given, ``segm_*``.

    Args:
        gt_data: the ground-truth json (images, annotations with bbox/segmentation/area/iscrowd,
            categories).
        box_results, mask_results: from :func:`to_coco_results`.
        image_ids: evaluate on these images only (default: every image of ``gt_data``).

    Returns metrics in [0, 1]; an area range without any ground truth gives −1 (COCO's convention);
    no detections at all give 0.
    """
    from pycocotools.cocoeval import COCOeval

    gt = _coco_gt(gt_data)
    metrics: dict[str, float] = {}
    for iou_type, results in (("bbox", box_results), ("segm", mask_results)):
        if results is None:
            continue
        if not results:
            metrics.update({f"{iou_type}_{n}": 0.0 for n in STAT_NAMES})
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            dt = gt.loadRes(copy.deepcopy(results))
            ev = COCOeval(gt, dt, iou_type)
            if image_ids is not None:
                ev.params.imgIds = list(image_ids)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        metrics.update({f"{iou_type}_{n}": float(v) for n, v in zip(STAT_NAMES, ev.stats[:6], strict=True)})
    return metrics


def add_areas(data: dict[str, Any]) -> dict[str, Any]:
    """Fill a missing ``area`` (mask area if a segmentation is given, else box area) and ``iscrowd`` in
    place, as COCOeval needs both; returns ``data``."""
    from pycocotools import mask as mask_utils

    for ann in data["annotations"]:
        ann.setdefault("iscrowd", 0)
        if "area" not in ann:
            segm = ann.get("segmentation")
            if isinstance(segm, dict) and isinstance(segm.get("counts"), str):
                ann["area"] = float(mask_utils.area({**segm, "counts": segm["counts"].encode("ascii")}))
            else:
                ann["area"] = float(ann["bbox"][2] * ann["bbox"][3])
    return data


__all__ = ["STAT_NAMES", "add_areas", "coco_evaluate", "to_coco_results"]
