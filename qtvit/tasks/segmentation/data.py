"""Segmentation datasets on disk: ADE20K, Cityscapes and a generic images + masks folder.

Every reader returns a list of :class:`SegSample` (image path, mask path) and the class names;
:class:`SegmentationDataset` loads a pair, maps the raw mask values to train ids (``ignore_index``
= 255 for pixels that do not count), checks it and applies a joint transform.

Layouts:

``ade20k`` (ADEChallengeData2016)::

    ROOT/images/{training,validation}/*.jpg
    ROOT/annotations/{training,validation}/*.png     0 = "other" (ignored), 1..150 = classes 0..149

``cityscapes``::

    ROOT/leftImg8bit/{train,val}/CITY/*_leftImg8bit.png
    ROOT/gtFine/{train,val}/CITY/*_gtFine_labelIds.png   34 label ids → 19 train ids, others ignored

``folder``::

    ROOT/SPLIT/images/NAME.{jpg,png,...}
    ROOT/SPLIT/masks/NAME.png          one class id per pixel (0..C-1), 255 = ignore
    ROOT/classes.txt                   optional: one class name per line (else ``num_classes``)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ...errors import QtvitError

IGNORE_INDEX = 255
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
DATASETS = ("ade20k", "cityscapes", "folder", "synthetic")

ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence",
    "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
    "glass", "clock", "flag",
)
CITYSCAPES_CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
                      "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car", "truck",
                      "bus", "train", "motorcycle", "bicycle")
# Cityscapes label id → train id (the 19 evaluated classes; everything else is ignored).
CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
                        25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
ADE20K_SPLITS = {"train": "training", "val": "validation", "training": "training", "validation": "validation"}


@dataclass(frozen=True)
class SegSample:
    image: str
    mask: str | None  # None: no labels (prediction only)


def ade20k_lut() -> np.ndarray:
    """uint8 lookup raw → train id: 0 → 255 (ignored), k → k − 1."""
    lut = np.arange(256, dtype=np.int64) - 1
    lut[0] = IGNORE_INDEX
    lut[lut < 0] = IGNORE_INDEX
    return lut.clip(0, 255).astype(np.uint8)


def cityscapes_lut() -> np.ndarray:
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for label_id, train_id in CITYSCAPES_TRAIN_IDS.items():
        lut[label_id] = train_id
    return lut


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{what} folder not found: {path}")
    return path


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _pair(images: list[Path], mask_of, dataset: str) -> list[SegSample]:
    samples = []
    for image in images:
        mask = mask_of(image)
        if not mask.is_file():
            raise QtvitError(f"{dataset}: image {image} has no mask (expected {mask})")
        samples.append(SegSample(str(image), str(mask)))
    if not samples:
        raise QtvitError(f"{dataset}: no images found under {images and images[0].parent}")
    return samples


def read_ade20k(root: str | os.PathLike, split: str = "train") -> list[SegSample]:
    """Pairs of ADEChallengeData2016 ``split`` (``train``/``training`` or ``val``/``validation``)."""
    if split not in ADE20K_SPLITS:
        raise ValueError(f"unknown ADE20K split {split!r}; valid: {', '.join(ADE20K_SPLITS)}")
    root = _require_dir(Path(root), "ADE20K root")
    sub = ADE20K_SPLITS[split]
    image_dir = _require_dir(root / "images" / sub, "ADE20K images")
    mask_dir = _require_dir(root / "annotations" / sub, "ADE20K annotations")
    images = _images_in(image_dir)
    if not images:
        raise QtvitError(f"ade20k: no images in {image_dir}")
    return _pair(images, lambda p: mask_dir / p.relative_to(image_dir).with_suffix(".png"), "ade20k")


def read_cityscapes(root: str | os.PathLike, split: str = "train") -> list[SegSample]:
    """Pairs of Cityscapes ``split`` (``train``, ``val``) with their ``gtFine`` label-id masks."""
    root = _require_dir(Path(root), "Cityscapes root")
    image_dir = _require_dir(root / "leftImg8bit" / split, "Cityscapes leftImg8bit")
    mask_dir = _require_dir(root / "gtFine" / split, "Cityscapes gtFine")
    images = [p for p in _images_in(image_dir) if p.name.endswith("_leftImg8bit.png")]
    if not images:
        raise QtvitError(f"cityscapes: no *_leftImg8bit.png images in {image_dir}")

    def mask_of(p: Path) -> Path:
        rel = p.relative_to(image_dir)
        return mask_dir / rel.parent / p.name.replace("_leftImg8bit.png", "_gtFine_labelIds.png")

    return _pair(images, mask_of, "cityscapes")


def read_folder(root: str | os.PathLike, split: str = "train") -> list[SegSample]:
    """Pairs of ``ROOT/SPLIT/images/*`` and ``ROOT/SPLIT/masks/<same name>.png``."""
    root = _require_dir(Path(root), "dataset root")
    image_dir = _require_dir(root / split / "images", f"{split!r} images")
    mask_dir = _require_dir(root / split / "masks", f"{split!r} masks")
    images = _images_in(image_dir)
    if not images:
        raise QtvitError(f"folder: no images in {image_dir}")
    return _pair(images, lambda p: mask_dir / p.relative_to(image_dir).with_suffix(".png"), "folder")


def folder_classes(root: str | os.PathLike, num_classes: int | None) -> list[str]:
    """Class names from ``ROOT/classes.txt``, else ``class_0 … class_{C-1}`` for ``num_classes``."""
    path = Path(root) / "classes.txt"
    if path.is_file():
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if num_classes is not None and len(names) != num_classes:
            raise QtvitError(f"{path} lists {len(names)} classes but num_classes={num_classes}")
        return names
    if num_classes is None:
        raise QtvitError(f"folder dataset {root}: give num_classes or write {path} (one class name a line)")
    return [f"class_{i}" for i in range(num_classes)]


def read_dataset(name: str, root: str | os.PathLike, split: str, num_classes: int | None = None
                 ) -> tuple[list[SegSample], list[str], np.ndarray | None]:
    """``(samples, class names, lookup table raw value → train id or None)`` of a dataset on disk."""
    if name == "ade20k":
        return read_ade20k(root, split), list(ADE20K_CLASSES), ade20k_lut()
    if name == "cityscapes":
        return read_cityscapes(root, split), list(CITYSCAPES_CLASSES), cityscapes_lut()
    if name == "folder":
        return read_folder(root, split), folder_classes(root, num_classes), None
    raise ValueError(f"unknown segmentation dataset {name!r}; valid: {', '.join(DATASETS)}")


def load_image(path: str) -> torch.Tensor:
    """(3, H, W) uint8 RGB."""
    from PIL import Image

    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)


def load_mask(path: str, lut: np.ndarray | None, num_classes: int, image_size: tuple[int, int] | None = None,
              ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(H, W) int64 train ids (``ignore_index`` where not counted), checked against the image size and
    the class range."""
    from PIL import Image

    with Image.open(path) as im:
        if im.mode not in ("L", "P", "I", "I;16"):
            raise QtvitError(f"mask {path}: mode {im.mode} is not a single-channel label image (L/P/I)")
        raw = np.asarray(im).astype(np.int64)
    if image_size is not None and raw.shape != tuple(image_size):
        raise QtvitError(f"mask {path} is {raw.shape[0]}×{raw.shape[1]} but its image is "
                         f"{image_size[0]}×{image_size[1]}")
    if lut is not None:
        if raw.max(initial=0) > 255:
            raise QtvitError(f"mask {path}: value {raw.max()} does not fit the dataset's 8-bit label ids")
        raw = lut[raw].astype(np.int64)
    bad = (raw != ignore_index) & ((raw < 0) | (raw >= num_classes))
    if bad.any():
        values = sorted(set(np.unique(raw[bad]).tolist()))[:5]
        raise QtvitError(f"mask {path}: label {values[0]} outside the class range 0..{num_classes - 1} "
                         f"(found {values}; {ignore_index} = ignore)")
    return torch.from_numpy(raw)


class SegmentationDataset(torch.utils.data.Dataset):
    """Reads (image, mask) pairs and applies ``transform(image uint8 (3,H,W), mask int64 (H,W), seed)``.

    Indexed by int, or by the trainer's sampler keys ``(index, size, seed)`` (the seed makes the
    augmentation of a sample reproducible). Returns what the transform returns (default: the pair).
    """

    def __init__(self, samples: list[SegSample], num_classes: int, lut: np.ndarray | None = None,
                 transform=None, ignore_index: int = IGNORE_INDEX) -> None:
        self.samples, self.num_classes, self.lut = samples, num_classes, lut
        self.transform, self.ignore_index = transform, ignore_index

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.samples[index]
        image = load_image(s.image)
        mask = load_mask(s.mask, self.lut, self.num_classes, tuple(image.shape[-2:]), self.ignore_index)
        return image, mask

    def __getitem__(self, key):
        index, seed = (key[0], key[2]) if isinstance(key, tuple) else (key, index_seed(key))
        image, mask = self.load(index)
        return self.transform(image, mask, seed) if self.transform else (image, mask)


def index_seed(index: int) -> int:
    return 1_000_003 * int(index) + 17


__all__ = ["ADE20K_CLASSES", "CITYSCAPES_CLASSES", "CITYSCAPES_TRAIN_IDS", "DATASETS", "IGNORE_INDEX",
           "SegSample", "SegmentationDataset", "ade20k_lut", "cityscapes_lut", "folder_classes", "load_image",
           "load_mask", "read_ade20k", "read_cityscapes", "read_dataset", "read_folder"]
