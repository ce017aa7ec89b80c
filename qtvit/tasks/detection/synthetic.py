"""A built-in synthetic detection set: coloured shapes pasted on textured backgrounds.

Each image holds 1–``max_objects`` non-overlapping objects of three classes (``square``, ``disc``,
``triangle``) with random size, colour and position, on a background of random smooth stripes
plus pixel noise (so "not background" is not simply "not flat"). Every object has an exact
mask; its box is the mask's extent. Images are generated on the fly from
``numpy.random.default_rng((seed, split, index))``: identical on every machine, no download, no disk.

Items are ``(image, target)`` exactly as :class:`~qtvit.tasks.detection.coco.CocoDetection`'s, and
:meth:`SyntheticShapes.coco` writes the ground truth as a COCO json dict for COCO evaluation.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .coco import encode_mask

CLASSES = ("square", "disc", "triangle")
_SPLITS = {"train": 0, "val": 1, "test": 2}


def _shape_mask(kind: int, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    """Boolean (H, W) mask of shape ``kind`` centred at (cy, cx) with half-size r (pixels)."""
    dy, dx = (yy - cy) / r, (xx - cx) / r
    if kind == 0:  # square
        return (np.abs(dx) <= 0.85) & (np.abs(dy) <= 0.85)
    if kind == 1:  # disc
        return dx * dx + dy * dy <= 1.0
    # upward triangle: apex at the top, base at the bottom
    return (dy <= 0.9) & (dy >= -0.9) & (np.abs(dx) <= (dy + 0.9) / 1.8)


class SyntheticShapes(torch.utils.data.Dataset):
    """``length`` images of ``image_size``² pixels with squares, discs and triangles.

    Args:
        length: number of images.
        image_size: side in pixels.
        split: ``train``, ``val`` or ``test`` (independent streams).
        seed: the set's seed.
        max_objects: at most this many objects per image (at least one).
        min_size, max_size: object side range as fractions of the image side.
    """

    classes = list(CLASSES)
    label_to_cat_id = [1, 2, 3]

    def __init__(self, length: int = 512, image_size: int = 128, split: str = "train", seed: int = 0,
                 max_objects: int = 3, min_size: float = 0.18, max_size: float = 0.4) -> None:
        if split not in _SPLITS:
            raise ValueError(f"unknown split {split!r}; valid: {', '.join(_SPLITS)}")
        if length < 1 or image_size < 32 or max_objects < 1 or not 0 < min_size <= max_size < 1:
            raise ValueError(f"bad synthetic set: length={length}, image_size={image_size} (≥ 32), "
                             f"max_objects={max_objects}, sizes {min_size}..{max_size} (fractions in (0, 1))")
        self.length, self.image_size, self.split, self.seed = length, image_size, split, seed
        self.max_objects, self.min_size, self.max_size = max_objects, min_size, max_size
        self.ids = list(range(1, length + 1))

    def __len__(self) -> int:
        return self.length

    def render(self, index: int) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
        """(H, W, 3) float image in [0, 1] and [(label, (H, W) bool mask), ...]."""
        rng = np.random.default_rng((self.seed, _SPLITS[self.split], index))
        s = self.image_size
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
        # background: two random stripe patterns in two random colours, plus noise
        image = np.zeros((s, s, 3), dtype=np.float32)
        for _ in range(2):
            angle, freq, phase = rng.uniform(0, np.pi), rng.uniform(2, 8) * 2 * np.pi / s, rng.uniform(0, 6.3)
            wave = 0.5 + 0.5 * np.sin(freq * (np.cos(angle) * xx + np.sin(angle) * yy) + phase)
            image += wave[..., None] * rng.uniform(0.1, 0.45, size=3)
        image += rng.normal(0.0, 0.04, size=image.shape)
        objects: list[tuple[int, np.ndarray]] = []
        boxes: list[tuple[float, float, float, float]] = []
        for _ in range(int(rng.integers(1, self.max_objects + 1))):
            for _attempt in range(20):  # place without overlapping earlier objects (2 px margin)
                r = rng.uniform(self.min_size, self.max_size) * s / 2
                cy, cx = rng.uniform(r, s - r, size=2)
                box = (cx - r - 2, cy - r - 2, cx + r + 2, cy + r + 2)
                if all(box[2] < b[0] or b[2] < box[0] or box[3] < b[1] or b[3] < box[1] for b in boxes):
                    break
            else:
                continue
            kind = int(rng.integers(0, len(CLASSES)))
            mask = _shape_mask(kind, yy, xx, cy, cx, r)
            if mask.sum() < 16:
                continue
            colour = rng.uniform(0.55, 1.0, size=3) * (rng.uniform(size=3) < 0.7)
            colour[int(rng.integers(0, 3))] = 1.0
            image[mask] = colour + rng.normal(0.0, 0.03, size=(int(mask.sum()), 3))
            boxes.append(box)
            objects.append((kind + 1, mask))
        return np.clip(image, 0.0, 1.0), objects

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} images")
        image, objects = self.render(index)
        masks = np.stack([m for _, m in objects]).astype(np.uint8)
        boxes = []
        for m in masks:
            ys, xs = np.nonzero(m)
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        target = {"boxes": torch.tensor(boxes, dtype=torch.float32),
                  "labels": torch.tensor([label for label, _ in objects], dtype=torch.int64),
                  "masks": torch.from_numpy(masks), "image_id": torch.tensor(self.ids[index])}
        return torch.from_numpy(image).permute(2, 0, 1).contiguous(), target

    def coco(self, indices: list[int] | None = None) -> dict[str, Any]:
        """The ground truth of ``indices`` (default all) as a COCO instances dict (RLE masks)."""
        indices = range(self.length) if indices is None else indices
        images, annotations = [], []
        for index in indices:
            _, target = self[index]
            image_id = self.ids[index]
            images.append({"id": image_id, "file_name": f"{self.split}_{index:06d}.png",
                           "width": self.image_size, "height": self.image_size})
            for box, label, mask in zip(target["boxes"].tolist(), target["labels"].tolist(), target["masks"],
                                        strict=True):
                x0, y0, x1, y1 = box
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": label,
                                    "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float(mask.sum()),
                                    "iscrowd": 0, "segmentation": encode_mask(mask)})
        categories = [{"id": i + 1, "name": n} for i, n in enumerate(CLASSES)]
        return {"images": images, "annotations": annotations, "categories": categories}


__all__ = ["CLASSES", "SyntheticShapes"]
