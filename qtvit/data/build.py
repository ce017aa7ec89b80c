"""Datasets by name: an image folder, the built-in demo set, or Fashion-MNIST.

Each returns ``(train, val, classes)`` where ``train``/``val`` yield ``(PIL image, label)``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.utils.data

from ..errors import QtvitError
from .folders import check_same_classes, image_folder

DATASETS = ("folder", "demo", "fashion_mnist")


def build_datasets(dataset: str, path: str | os.PathLike | None = None, *, train_split: str = "train",
                   val_split: str = "val", val_fraction: float = 0.1, seed: int = 0,
                   demo_image_size: int = 96, demo_train_size: int = 10_000, demo_val_size: int = 2_000,
                   demo_cache: bool = False):
    """Build the train and validation sets.

    Args:
        dataset: ``folder``, ``demo`` or ``fashion_mnist``.
        path: the folder (``folder``: required; ``fashion_mnist``: the IDX folder, default Debian's).
        train_split, val_split: sub-folder names under ``path`` (``folder``). When ``path`` has no
            ``train_split`` sub-folder it is read as one class-folder tree and ``val_fraction`` of
            it (a fixed random subset, by ``seed``) is held out.
        demo_*: the demo set's resolution, sizes and whether to keep rendered images in memory.

    Returns:
        ``(train, val, classes)``.
    """
    if dataset == "demo":
        from .demo import RelationalShapes

        train = RelationalShapes("train", demo_train_size, demo_image_size, seed, cache=demo_cache)
        val = RelationalShapes("val", demo_val_size, demo_image_size, seed, cache=demo_cache)
        return train, val, train.classes
    if dataset == "fashion_mnist":
        from .fashion_mnist import FashionMNIST

        train, val = FashionMNIST(path, "train"), FashionMNIST(path, "val")
        return train, val, train.classes
    if dataset != "folder":
        raise QtvitError(f"unknown dataset {dataset!r}; valid datasets: {', '.join(DATASETS)}")
    if path is None:
        raise QtvitError("data.path is required for data.dataset=folder (a folder with train/ and val/, "
                         "or one folder of class folders)")
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"data folder not found: {root}")
    if (root / train_split).is_dir():
        train = image_folder(root / train_split, "training data")
        if not (root / val_split).exists():
            raise FileNotFoundError(f"validation folder not found: {root / val_split} "
                                    f"(expected beside {root / train_split})")
        val = image_folder(root / val_split, "validation data")
        check_same_classes(train.classes, val.classes, root / train_split, root / val_split)
        return train, val, train.classes
    full = image_folder(root, "data")
    n_val = max(1, round(len(full) * val_fraction))
    if n_val >= len(full):
        raise QtvitError(f"data folder {root} has only {len(full)} images: too few to hold out a "
                         "validation set")
    perm = torch.randperm(len(full), generator=torch.Generator().manual_seed(seed)).tolist()
    val, train = torch.utils.data.Subset(full, perm[:n_val]), torch.utils.data.Subset(full, perm[n_val:])
    return train, val, full.classes
