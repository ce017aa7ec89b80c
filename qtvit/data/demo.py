"""The built-in demo dataset: the class is how two distant objects are *aligned* with each other.

Every image holds exactly two objects on a noisy background with small grey distractor specks.
Each object has a shape (square, disc, triangle, cross), a hue, a size and a brightness, all
drawn independently of the class: they are nuisance. The class is the geometry of the pair, with
Δx, Δy the differences of the two centres (fractions of the image side)::

    0 "same row"       |Δy| ≤ TOL and |Δx| ≥ SEP
    1 "same column"    |Δx| ≤ TOL and |Δy| ≥ SEP
    2 "same diagonal"  ||Δx| − |Δy|| ≤ TOL and both ≥ SEP/√2 (on a 45° line)
    3 "not aligned"    max(|Δx|, |Δy|) ≥ SEP; |Δx|, |Δy| and ||Δx| − |Δy|| all ≥ GAP

4 classes, exactly balanced (``label = index mod 4``), chance 25%. The centres are at least
SEP (0.3 of the side) apart, and every class is a statement about *both* centres:

* no object's local patch says anything: shape, hue, size and brightness are independent of the
  class, and a centre alone says nothing about where the other one is;
* no object's position says much either: the pair is placed uniformly wherever it fits, with the
  signs of Δx and Δy and the order of the two objects random, so each centre on its own is
  spread over the whole image in every class. A classifier that sees one centre's exact
  position reaches about 37% (chance 25%; bounded by ``tests/test_data.py``), against 100%
  for one that sees both;
* a model must therefore bring the two positions together: a convolution stack whose receptive
  field is smaller than the objects' distance cannot, global average pooling of position-free
  local features cannot (the class is not a function of the *set* of objects' appearances),
  while attention with positional information on its keys can (e.g. second moments of the
  object tokens' coordinates decide all four classes). A convolution stack whose receptive
  field spans the image can solve it too, and zero padding tells it where it is: the
  convolutions around the attention of the small QT-ViT used by ``qtvit reproduce`` reach 147 px
  at its 64-px default and still 83-99 px in the 16x16-token probes, and there they learn the
  task without attention. With the objects farther apart than the convolutions reach (128 px,
  32x32 tokens, a 59-px reach: ``configs/ablation/probes/stride4_128px.yaml``) attention learns
  first; within 1,000 steps the "none" control catches up (three seeds), and after 2,000 it
  stays 6 points behind (one seed): docs/RESULTS.md, section 3.

Images are generated on the fly from ``numpy.random.default_rng((seed, split, index))``: the
set is identical on every machine, needs no download or disk, and renders at any resolution
(shapes are defined in coordinates relative to the image size).
"""

from __future__ import annotations

import math

import numpy as np
import torch.utils.data
from PIL import Image

SHAPES = ("square", "disc", "triangle", "cross")
# red, green, blue, yellow; each with maximum channel 1, so brightness is the maximum channel
HUES = ((1.0, 0.25, 0.2), (0.2, 1.0, 0.35), (0.3, 0.5, 1.0), (1.0, 0.85, 0.15))
RADII = (0.05, 0.065, 0.08)  # small, medium, large (fraction of the image side)
BRIGHTNESS = (0.5, 0.75, 1.0)  # dim, medium, bright (scales the hue)
CLASSES = ("same row", "same column", "same diagonal", "not aligned")
NUM_CLASSES = len(CLASSES)
TOL = 0.03  # "aligned": the centres' offsets agree to 3% of the side (2 px at 64 px)
GAP = 0.15  # "not aligned": every alignment misses by at least 15% of the side
SEP = 0.3  # the centres are at least this far apart
MARGIN = max(RADII) + 0.02  # centres keep this far from the border, so every object is whole
SPAN = 1.0 - 2 * MARGIN  # the range a centre coordinate can take
_SPLITS = {"train": 0, "val": 1, "test": 2}


def class_names() -> list[str]:
    """Names by label: ``["same-row", "same-column", "same-diagonal", "not-aligned"]``."""
    return [c.replace(" ", "-") for c in CLASSES]


def label_of(centres: tuple[tuple[float, float], tuple[float, float]]) -> int | None:
    """The class of two centres by the rule in the module docstring; None if no rule applies."""
    (x1, y1), (x2, y2) = centres
    dx, dy = abs(x1 - x2), abs(y1 - y2)
    if dy <= TOL and dx >= SEP:
        return 0
    if dx <= TOL and dy >= SEP:
        return 1
    if abs(dx - dy) <= TOL and min(dx, dy) >= SEP / math.sqrt(2):
        return 2
    if min(dx, dy, abs(dx - dy)) >= GAP and max(dx, dy) >= SEP:
        return 3
    return None


def _offsets(rng: np.random.Generator, label: int) -> tuple[float, float]:
    """|Δx|, |Δy| of a pair of class ``label``."""
    if label in (0, 1):
        along, across = rng.uniform(SEP, SPAN), rng.uniform(0.0, TOL)
        return (along, across) if label == 0 else (across, along)
    if label == 2:
        a = rng.uniform(SEP / math.sqrt(2) + TOL, SPAN - TOL)
        return a, a + rng.uniform(-TOL, TOL)
    # not aligned: the longer offset drawn as for a row or column, the shorter at least GAP from
    # both 0 and the longer one (so single centres spread as in the other classes)
    along = rng.uniform(SEP, SPAN)
    across = rng.uniform(GAP, along - GAP)
    return (along, across) if rng.integers(2) else (across, along)


class RelationalShapes(torch.utils.data.Dataset):
    """Deterministic synthetic 4-class dataset (see the module docstring for the rule).

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``; each split is a separate random stream.
        length: number of images (labels cycle through the classes, so any multiple of 4 is
            exactly balanced).
        image_size: side of the square RGB image in pixels (any size ≥ 16).
        seed: dataset seed; the same (seed, split, index) always gives the same image.
        transform: applied to the PIL image (``None`` returns the PIL image).
        cache: keep rendered images in memory (``image_size``² × 3 bytes each) so later epochs
            skip rendering; what the CPU demo uses.

    Items are ``(image, label)``; ``classes`` and ``targets`` mirror torchvision's ImageFolder.
    """

    def __init__(self, split: str = "train", length: int = 10_000, image_size: int = 64, seed: int = 0,
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
        """The scene behind image ``index``: label, and per object shape, hue, radius, brightness
        and centre (x, y), both in [0, 1] with y pointing down."""
        rng = np.random.default_rng((self.seed, _SPLITS[self.split], index))
        label = index % NUM_CLASSES
        offsets = _offsets(rng, label)
        centres = [[0.0, 0.0], [0.0, 0.0]]
        for axis, delta in enumerate(offsets):
            low = rng.uniform(MARGIN, 1.0 - MARGIN - delta)  # the pair fits, placed uniformly
            first = int(rng.integers(2))  # which object takes the lower coordinate: random signs
            centres[first][axis], centres[1 - first][axis] = low, low + delta
        return {
            "label": label,
            "shapes": tuple(int(v) for v in rng.integers(len(SHAPES), size=2)),
            "hues": tuple(int(v) for v in rng.integers(len(HUES), size=2)),
            "radii": tuple(RADII[int(v)] for v in rng.integers(len(RADII), size=2)),
            "brightness": tuple(BRIGHTNESS[int(v)] for v in rng.integers(len(BRIGHTNESS), size=2)),
            "centres": tuple((float(x), float(y)) for x, y in centres), "rng": rng,
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
