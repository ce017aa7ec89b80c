"""The built-in demo dataset: two objects far apart whose *relations* are the class.

Every image holds exactly two objects on a noisy background with small grey distractor specks.
Each object has a shape (square, disc, triangle, cross), a hue, a size (3 levels) and a
brightness (3 levels); shape and hue are random and carry no information. Call the object
further left A and the other B (their centres are at least ``MIN_DX`` of the width apart, so
"left" is unambiguous, but either may sit anywhere). The label is four relations between A and
B, as bits::

    label = 8·[A is higher than B] + 4·[A is larger than B]
          + 2·[A is brighter than B] + 1·[A and B are far apart]

16 classes, exactly balanced (``label = index mod 16``), chance 6.25%. Ties ("as large",
"as bright") count as "no". No single object says anything about the label: which object is A
depends on where the *other* one is, and every bit compares the two. A network must relate two
distant parts of the image — what global attention is for: at 96 px the objects are at least
43 px apart, more than the 35 px that a stride-16 feature sees through the convolutions before
the first attention block of an EfficientViT.

Images are generated on the fly from ``numpy.random.default_rng((seed, split, index))``: the
set is identical on every machine, needs no download or disk, and renders at any resolution
(shapes are defined in coordinates relative to the image size).
"""

from __future__ import annotations

import numpy as np
import torch.utils.data
from PIL import Image

SHAPES = ("square", "disc", "triangle", "cross")
# red, green, blue, yellow; each with maximum channel 1, so brightness is the maximum channel
HUES = ((1.0, 0.25, 0.2), (0.2, 1.0, 0.35), (0.3, 0.5, 1.0), (1.0, 0.85, 0.15))
RADII = (0.05, 0.075, 0.1)  # small, medium, large (fraction of the image side)
BRIGHTNESS = (0.4, 0.7, 1.0)  # dim, medium, bright (scales the hue)
RELATIONS = ("A higher", "A larger", "A brighter", "far apart")  # label bits 3, 2, 1, 0
NUM_CLASSES = 2 ** len(RELATIONS)
MIN_DX = 0.45  # horizontal distance of the centres: "near" in [0.45, 0.57] ...
FAR_DX = 0.62  # ... "far" in [0.62, 0.74] (fractions of the width)
MIN_DY = 0.1  # minimum vertical distance, so "higher" is visible
_SPLITS = {"train": 0, "val": 1, "test": 2}


def class_names() -> list[str]:
    """Names by label, e.g. ``"A-higher,A-not-larger,A-brighter,near"``."""
    names = []
    for label in range(NUM_CLASSES):
        higher, larger, brighter, far = ((label >> b) & 1 for b in (3, 2, 1, 0))
        names.append(f"A-{'higher' if higher else 'lower'},A-{'' if larger else 'not-'}larger,"
                     f"A-{'' if brighter else 'not-'}brighter,{'far' if far else 'near'}")
    return names


def _shape_mask(shape: int, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Boolean mask of ``SHAPES[shape]`` given offsets from its centre in units of its radius."""
    ax, ay = np.abs(dx), np.abs(dy)
    if shape == 0:  # square
        return (ax <= 0.8) & (ay <= 0.8)
    if shape == 1:  # disc
        return dx * dx + dy * dy <= 1.0
    if shape == 2:  # upward triangle: apex at dy=-1, base at dy=+0.8
        return (dy <= 0.8) & (ax <= (dy + 1.0) * 0.55)
    return ((ax <= 0.3) & (ay <= 1.0)) | ((ay <= 0.3) & (ax <= 1.0))  # plus-shaped cross


def _ordered_pair(rng: np.random.Generator, n: int, a_greater: int) -> tuple[int, int]:
    """Levels (a, b) in range(n), uniform over the pairs with a > b (if ``a_greater``) or a <= b."""
    pairs = [(a, b) for a in range(n) for b in range(n) if (a > b) == bool(a_greater)]
    return pairs[int(rng.integers(len(pairs)))]


class RelationalShapes(torch.utils.data.Dataset):
    """Deterministic synthetic 16-class dataset (see the module docstring for the rule).

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``; each split is a separate random stream.
        length: number of images (labels cycle through the classes, so any multiple of 16 is
            exactly balanced).
        image_size: side of the square RGB image in pixels (any size ≥ 16).
        seed: dataset seed; the same (seed, split, index) always gives the same image.
        transform: applied to the PIL image (``None`` returns the PIL image).
        cache: keep rendered images in memory (``image_size``² × 3 bytes each) so later epochs
            skip rendering; what the CPU demo uses.

    Items are ``(image, label)``; ``classes`` and ``targets`` mirror torchvision's ImageFolder.
    """

    def __init__(self, split: str = "train", length: int = 10_000, image_size: int = 96, seed: int = 0,
                 transform=None, cache: bool = False) -> None:
        if split not in _SPLITS:
            raise ValueError(f"unknown demo split {split!r}; valid splits: {', '.join(_SPLITS)}")
        if image_size < 16:
            raise ValueError(f"demo image_size must be at least 16 pixels; got {image_size}")
        if length < 1:
            raise ValueError(f"demo dataset length must be positive; got {length}")
        self.split, self.length, self.image_size, self.seed = split, length, image_size, seed
        self.transform = transform
        self.classes = class_names()
        self.targets = [i % NUM_CLASSES for i in range(length)]
        self._cache: dict[int, np.ndarray] | None = {} if cache else None

    def __len__(self) -> int:
        return self.length

    def describe(self, index: int) -> dict:
        """The scene behind image ``index``: label, and per object (A first) shape, hue, radius,
        brightness and centre."""
        rng = np.random.default_rng((self.seed, _SPLITS[self.split], index))
        label = index % NUM_CLASSES
        higher, larger, brighter, far = ((label >> b) & 1 for b in (3, 2, 1, 0))
        size_a, size_b = _ordered_pair(rng, len(RADII), larger)
        light_a, light_b = _ordered_pair(rng, len(BRIGHTNESS), brighter)
        shapes = tuple(int(v) for v in rng.integers(len(SHAPES), size=2))
        hues = tuple(int(v) for v in rng.integers(len(HUES), size=2))
        # Centres: A in the left part, B near or far to its right; the higher one (smaller y)
        # at least MIN_DY above the other.
        m = max(RADII) + 0.02
        dx = rng.uniform(FAR_DX, FAR_DX + 0.12) if far else rng.uniform(MIN_DX, MIN_DX + 0.12)
        xa = rng.uniform(m, 1.0 - m - dx)
        y_top = rng.uniform(m, 1.0 - m - MIN_DY)
        y_bottom = rng.uniform(y_top + MIN_DY, 1.0 - m)
        ya, yb = (y_top, y_bottom) if higher else (y_bottom, y_top)
        return {
            "label": label, "shapes": shapes, "hues": hues, "radii": (RADII[size_a], RADII[size_b]),
            "brightness": (BRIGHTNESS[light_a], BRIGHTNESS[light_b]),
            "centres": ((float(xa), float(ya)), (float(xa + dx), float(yb))), "rng": rng,
        }

    def render(self, index: int) -> np.ndarray:
        """The uint8 (H, W, 3) image for ``index``."""
        scene = self.describe(index)
        rng: np.random.Generator = scene["rng"]
        n = self.image_size
        coords = (np.arange(n, dtype=np.float32) + 0.5) / n
        gx, gy = coords[None, :], coords[:, None]  # broadcast to (H, W); x along columns
        img = np.full((n, n, 3), rng.uniform(0.05, 0.2), dtype=np.float32)
        # Distractors: grey specks of random brightness, smaller than any object.
        for _ in range(int(rng.integers(3, 7))):
            cx, cy, half = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.01, 0.025)
            speck = (np.abs(gx - cx) <= half) & (np.abs(gy - cy) <= half)
            img[speck] = rng.uniform(0.3, 0.6)
        for shape, hue, r, light, (cx, cy) in zip(scene["shapes"], scene["hues"], scene["radii"],
                                                  scene["brightness"], scene["centres"], strict=True):
            mask = _shape_mask(shape, (gx - cx) / r, (gy - cy) / r)
            img[mask] = np.asarray(HUES[hue], dtype=np.float32) * light
        img += rng.normal(0.0, 0.04, size=img.shape).astype(np.float32)
        return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)

    def __getitem__(self, index: int):
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a demo split of {self.length}")
        if self._cache is None:
            pixels = self.render(index)
        elif (pixels := self._cache.get(index)) is None:
            pixels = self._cache[index] = self.render(index)
        image = Image.fromarray(pixels)
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]
