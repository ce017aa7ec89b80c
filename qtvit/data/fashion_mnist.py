"""Fashion-MNIST from its IDX files (as installed by Debian's ``dataset-fashion-mnist``).

The IDX format: a 4-byte magic ``0x00 0x00 <dtype> <ndim>``, then ``ndim`` big-endian uint32
sizes, then the data in row-major order, big-endian. Files may be gzip-compressed (``.gz``).
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch.utils.data
from PIL import Image

from ..errors import QtvitError

DEBIAN_ROOT = "/usr/share/datasets/fashion-mnist"  # where `apt-get install dataset-fashion-mnist` puts it
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle boot")
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
# IDX type byte → big-endian numpy dtype
_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally ``.gz``) into a numpy array of its declared shape and type.

    Raises:
        FileNotFoundError: no such file.
        QtvitError: the file is not IDX (bad magic, unknown type code, or truncated data).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise QtvitError(f"cannot read IDX file {path}: {err}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise QtvitError(f"not an IDX file: {path} (bad magic number {raw[:4].hex() or 'empty'})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_DTYPES[raw[2]])
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise QtvitError(f"corrupt IDX file {path}: header says shape {shape} ({expected} bytes) but the "
                         f"file has {len(raw)} bytes")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(f"Fashion-MNIST file {stem}[.gz] not found in {root}")


class FashionMNIST(torch.utils.data.Dataset):
    """Fashion-MNIST read from IDX files in ``root`` (default: Debian's install location).

    Items are ``(image, label)`` with 28×28 images converted to RGB (so every model's 3-channel
    stem and normalisation apply unchanged). ``split``: ``"train"`` (60k) or ``"val"`` (the 10k
    test set).
    """

    def __init__(self, root: str | os.PathLike | None = None, split: str = "train", transform=None) -> None:
        if split not in _FILES:
            raise ValueError(f"unknown Fashion-MNIST split {split!r}; valid splits: {', '.join(_FILES)}")
        root = Path(root or DEBIAN_ROOT)
        if not root.is_dir():
            raise FileNotFoundError(f"Fashion-MNIST folder not found: {root} (on Debian/Ubuntu: "
                                    "apt-get install dataset-fashion-mnist)")
        images = read_idx(_find(root, _FILES[split][0]))
        labels = read_idx(_find(root, _FILES[split][1]))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise QtvitError(f"Fashion-MNIST files in {root} disagree: images {images.shape}, labels "
                             f"{labels.shape} (expected (N, H, W) and (N,))")
        if labels.size and (labels.min() < 0 or labels.max() >= len(CLASSES)):
            raise QtvitError(f"Fashion-MNIST labels in {root} outside 0..{len(CLASSES) - 1}")
        self.images, self.transform = images.astype(np.uint8), transform
        self.targets = [int(t) for t in labels]
        self.classes = list(CLASSES)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image = Image.fromarray(self.images[index]).convert("RGB")
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]
