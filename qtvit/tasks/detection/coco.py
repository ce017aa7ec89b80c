"""COCO-format instance annotations: reading, category mapping, masks.

:class:`CocoDetection` reads an ``instances_*.json`` (the COCO 2017 layout or any dataset written
in it) and an image folder. Item ``i`` is ``(image, target)``: image a float tensor (3, H, W) in
[0, 1], target a dict with ``boxes`` (n, 4) float xyxy pixels, ``labels`` (n,) int64 in 1..C,
``masks`` (n, H, W) uint8 and ``image_id`` (the json's id). Crowd regions (``iscrowd: 1``) are left
out of the targets (COCO's evaluation reads them from the json and ignores detections on them);
boxes thinner than one pixel too.

Category ids are mapped to contiguous labels in id order (COCO's 80 ids 1..90 with gaps → 1..80;
0 is background, torchvision's convention) and back with :attr:`CocoDetection.label_to_cat_id`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...errors import QtvitError

EDGE_TOLERANCE = 1.0  # px a box may stick out of the image (rounding in real annotation files)


class CocoFormatError(QtvitError):
    """An annotation file that is not valid COCO instances json (the message names file and entry)."""


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed annotation file, with one-line errors for a missing file and bad json."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotation file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise CocoFormatError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}, "
                              f"column {err.colno})") from None
    except UnicodeDecodeError as err:
        raise CocoFormatError(f"{path}: not a UTF-8 text file ({err.reason})") from None
    if not isinstance(data, dict):
        raise CocoFormatError(f"{path}: expected a JSON object with images, annotations and categories")
    missing = [k for k in ("images", "annotations", "categories") if k not in data]
    if missing:
        raise CocoFormatError(f"{path}: not a COCO instances file (missing {', '.join(missing)})")
    return data


def validate(data: dict[str, Any], source: str = "<annotations>") -> None:
    """Check ids, references and geometry of every annotation; raise one line naming the first problem."""
    images = {}
    for img in data["images"]:
        try:
            images[img["id"]] = (float(img["width"]), float(img["height"]))
        except (KeyError, TypeError, ValueError):
            raise CocoFormatError(f"{source}: image entry {img!r:.80} lacks id, width or height") from None
    cats = {c.get("id") for c in data["categories"]}
    for ann in data["annotations"]:
        aid = ann.get("id", "?")
        if ann.get("image_id") not in images:
            raise CocoFormatError(f"{source}: annotation {aid} refers to unknown image {ann.get('image_id')}")
        if ann.get("category_id") not in cats:
            raise CocoFormatError(f"{source}: annotation {aid} has unknown category {ann.get('category_id')}")
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
            raise CocoFormatError(f"{source}: annotation {aid} has no [x, y, w, h] bbox (got {bbox!r:.60})")
        w_img, h_img = images[ann["image_id"]]
        x, y, w, h = bbox
        if (w < 0 or h < 0 or x < -EDGE_TOLERANCE or y < -EDGE_TOLERANCE
                or x + w > w_img + EDGE_TOLERANCE or y + h > h_img + EDGE_TOLERANCE):
            raise CocoFormatError(f"{source}: annotation {aid} (image {ann['image_id']}) box "
                                  f"[x, y, w, h] = {bbox} lies outside the {w_img:g}×{h_img:g} image")


def category_mapping(data: dict[str, Any]) -> tuple[list[int], list[str]]:
    """(category id per label − 1, class names), categories in id order."""
    cats = sorted(data["categories"], key=lambda c: c["id"])
    return [c["id"] for c in cats], [str(c.get("name", c["id"])) for c in cats]


def decode_segmentation(segm: Any, height: int, width: int) -> np.ndarray:
    """A polygon list, an uncompressed RLE (counts list) or a compressed RLE → (H, W) uint8 mask."""
    from pycocotools import mask as mask_utils

    if isinstance(segm, list):  # polygons [[x0, y0, x1, y1, ...], ...]
        polygons = [p for p in segm if len(p) >= 6]
        if not polygons:
            return np.zeros((height, width), dtype=np.uint8)
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(segm, dict) and isinstance(segm.get("counts"), list):
        rle = mask_utils.frPyObjects(segm, height, width)
    elif isinstance(segm, dict) and "counts" in segm:
        rle = dict(segm)
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
    else:
        raise CocoFormatError(f"unknown segmentation format {type(segm).__name__}")
    return np.ascontiguousarray(mask_utils.decode(rle), dtype=np.uint8)


def encode_mask(mask: np.ndarray | torch.Tensor) -> dict[str, Any]:
    """(H, W) binary mask → compressed RLE with a str ``counts`` (JSON-serialisable)."""
    from pycocotools import mask as mask_utils

    if isinstance(mask, torch.Tensor):
        mask = mask.cpu().numpy()
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def annotations_to_target(anns: list[dict[str, Any]], height: int, width: int,
                          cat_to_label: dict[int, int], with_masks: bool = True) -> dict[str, torch.Tensor]:
    """COCO annotations of one image → torchvision target (crowd regions and sub-pixel boxes dropped)."""
    boxes, labels, masks = [], [], []
    for ann in anns:
        if ann.get("iscrowd", 0):
            continue
        x, y, w, h = ann["bbox"]
        x0, y0 = max(x, 0.0), max(y, 0.0)
        x1, y1 = min(x + w, float(width)), min(y + h, float(height))
        if x1 - x0 < 1 or y1 - y0 < 1:
            continue
        boxes.append([x0, y0, x1, y1])
        labels.append(cat_to_label[ann["category_id"]])
        if with_masks:
            segm = ann.get("segmentation")
            if segm:
                masks.append(decode_segmentation(segm, height, width))
            else:  # no outline given: the box is the mask
                m = np.zeros((height, width), dtype=np.uint8)
                m[int(y0):int(np.ceil(y1)), int(x0):int(np.ceil(x1))] = 1
                masks.append(m)
    target = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
              "labels": torch.tensor(labels, dtype=torch.int64)}
    if with_masks:
        target["masks"] = (torch.from_numpy(np.stack(masks)) if masks
                           else torch.zeros((0, height, width), dtype=torch.uint8))
    return target


class CocoDetection(torch.utils.data.Dataset):
    """Images and instance targets of a COCO-format dataset.

    Args:
        image_dir: folder holding the images (``file_name`` of each image entry is relative to it).
        ann_file: the instances json.
        with_masks: decode instance masks (False: boxes only, faster).
        skip_empty: leave out images without any (non-crowd) object (training sets).

    Attributes:
        data: the parsed json (the ground truth for :func:`qtvit.tasks.detection.evaluation.coco_evaluate`).
        classes: class names by label − 1. label_to_cat_id: category id by label − 1.
        ids: image ids in item order.
    """

    def __init__(self, image_dir: str | os.PathLike, ann_file: str | os.PathLike, *, with_masks: bool = True,
                 skip_empty: bool = False) -> None:
        self.image_dir, self.ann_file = Path(image_dir), Path(ann_file)
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"COCO image folder not found: {self.image_dir}")
        self.data = read_json(self.ann_file)
        validate(self.data, str(self.ann_file))
        self.with_masks = with_masks
        self.label_to_cat_id, self.classes = category_mapping(self.data)
        self.cat_to_label = {c: i + 1 for i, c in enumerate(self.label_to_cat_id)}
        self.images = {img["id"]: img for img in self.data["images"]}
        self.anns: dict[int, list[dict]] = {i: [] for i in self.images}
        for ann in self.data["annotations"]:
            self.anns[ann["image_id"]].append(ann)
        self.ids = sorted(self.images)
        if skip_empty:
            self.ids = [i for i in self.ids if any(not a.get("iscrowd", 0) for a in self.anns[i])]

    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, index: int) -> Path:
        return self.image_dir / self.images[self.ids[index]]["file_name"]

    def load_image(self, index: int) -> torch.Tensor:
        from PIL import Image

        path = self.image_path(index)
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {path} (image id {self.ids[index]} in "
                                    f"{self.ann_file})")
        with Image.open(path) as img:
            array = np.asarray(img.convert("RGB"), dtype=np.uint8)
        return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        image = self.load_image(index)
        info = self.images[self.ids[index]]
        h, w = image.shape[-2:]
        if (h, w) != (info["height"], info["width"]):
            raise CocoFormatError(f"{self.image_path(index)} is {w}×{h} but {self.ann_file} says "
                                  f"{info['width']}×{info['height']}")
        target = annotations_to_target(self.anns[self.ids[index]], h, w, self.cat_to_label, self.with_masks)
        target["image_id"] = torch.tensor(self.ids[index])
        return image, target


__all__ = ["CocoDetection", "CocoFormatError", "annotations_to_target", "category_mapping",
           "decode_segmentation", "encode_mask", "read_json", "validate"]
