"""Image folders (torchvision ``ImageFolder``) with the checks a user needs to hear about.

Every problem is one line naming the path: a missing or empty folder, a class folder without
images, train and val folders with different classes, an image that cannot be decoded.
"""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

from ..errors import QtvitError


class BadImageError(QtvitError):
    """An image file that cannot be read or decoded (the message names the file)."""

    def __init__(self, message: str) -> None:
        # DataLoader workers re-raise an exception as ``type(err)(text_with_traceback)``; keep the
        # original one-line message, which is the traceback's last line after the class name.
        if message.startswith("Caught ") and "Original Traceback" in message:
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        super().__init__(message)


def load_rgb(path: str) -> Image.Image:
    """Open ``path`` as an RGB PIL image, decoding it fully; undecodable files raise BadImageError."""
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            return img.convert("RGB")  # forces the decode, so truncated files fail here
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise BadImageError(f"cannot read image {path}: {err}") from None


def _image_extensions() -> tuple[str, ...]:
    from torchvision.datasets.folder import IMG_EXTENSIONS

    return IMG_EXTENSIONS


def check_image_folder(root: str | os.PathLike, what: str = "data") -> list[str]:
    """Validate ``root`` as an ImageFolder (one sub-folder of images per class); return the classes.

    Raises:
        FileNotFoundError: ``root`` does not exist.
        QtvitError: ``root`` is not a folder, has no class folders, or a class folder has no images.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{what} folder not found: {root}")
    if not root.is_dir():
        raise QtvitError(f"{what} path is not a folder: {root}")
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not classes:
        raise QtvitError(f"{what} folder is empty: {root} has no class sub-folders "
                         "(expected one folder of images per class)")
    extensions = _image_extensions()
    for name in classes:
        has_image = any(f.lower().endswith(extensions) for _, _, files in os.walk(root / name) for f in files)
        if not has_image:
            raise QtvitError(f"{what} class folder has no images: {root / name} "
                             f"(looked for {', '.join(extensions)})")
    return classes


def image_folder(root: str | os.PathLike, what: str = "data"):
    """A torchvision ``ImageFolder`` at ``root`` returning PIL images (checked first, see above)."""
    from torchvision.datasets import ImageFolder

    check_image_folder(root, what)
    return ImageFolder(str(root), loader=load_rgb)


def check_same_classes(train_classes: list[str], val_classes: list[str], train_root: str | os.PathLike,
                       val_root: str | os.PathLike) -> None:
    """Raise QtvitError naming the differing classes if train and val folders disagree."""
    if list(train_classes) == list(val_classes):
        return
    only_train = sorted(set(train_classes) - set(val_classes))
    only_val = sorted(set(val_classes) - set(train_classes))
    parts = []
    if only_train:
        parts.append(f"only in train: {', '.join(only_train[:10])}"
                     + (" ..." if len(only_train) > 10 else ""))
    if only_val:
        parts.append(f"only in val: {', '.join(only_val[:10])}" + (" ..." if len(only_val) > 10 else ""))
    if not parts:
        parts.append("the same names in a different order")
    raise QtvitError(f"class mismatch between {train_root} ({len(train_classes)} classes) and {val_root} "
                     f"({len(val_classes)} classes): {'; '.join(parts)}")
