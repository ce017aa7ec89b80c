"""Colour masks and overlays for ``qtvit seg predict`` and the demo (PNG files written atomically)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .data import IGNORE_INDEX


def palette(num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8 colours, fixed and well spread (bit-interleaved, as PASCAL VOC's)."""
    colours = np.zeros((max(num_classes, 1), 3), dtype=np.uint8)
    for c in range(num_classes):
        label, r, g, b = c + 1, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= ((label >> 0) & 1) << shift
            g |= ((label >> 1) & 1) << shift
            b |= ((label >> 2) & 1) << shift
            label >>= 3
        colours[c] = (r, g, b)
    return colours


def colorize(mask: torch.Tensor, num_classes: int) -> np.ndarray:
    """(H, W) class ids → (H, W, 3) uint8; ``ignore`` (255) pixels black."""
    m = mask.cpu().numpy().astype(np.int64)
    out = np.zeros((*m.shape, 3), dtype=np.uint8)
    valid = (m >= 0) & (m < num_classes) & (m != IGNORE_INDEX)
    out[valid] = palette(num_classes)[m[valid]]
    return out


def blend(image: torch.Tensor, mask: torch.Tensor, num_classes: int, alpha: float = 0.5) -> np.ndarray:
    """uint8 image (3, H, W) with the coloured mask laid over it: (H, W, 3) uint8."""
    rgb = image.permute(1, 2, 0).cpu().numpy().astype(np.float32)
    over = colorize(mask, num_classes).astype(np.float32)
    return (rgb * (1 - alpha) + over * alpha).round().astype(np.uint8)


def save_png(path: str | Path, array: np.ndarray) -> Path:
    """Write an (H, W) or (H, W, 3) uint8 array as PNG, atomically."""
    import io

    from PIL import Image

    from ...io import write_atomic

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return write_atomic(path, buffer.getvalue())


def save_overlay_grid(path: str | Path, images: list[torch.Tensor], masks: list[torch.Tensor],
                      preds: list[torch.Tensor], num_classes: int | None = None) -> Path:
    """One row per image: the image, its ground truth over it, the prediction over it."""
    if num_classes is None:
        num_classes = int(max(int(m[m != IGNORE_INDEX].max(initial=0)) if m.numel() else 0
                              for m in [*masks, *preds])) + 1
    rows = []
    for image, mask, pred in zip(images, masks, preds, strict=True):
        sep = np.full((image.shape[-2], 4, 3), 255, dtype=np.uint8)
        plain = image.permute(1, 2, 0).cpu().numpy()
        rows.append(np.concatenate([plain, sep, blend(image, mask, num_classes), sep,
                                    blend(image, pred, num_classes)], 1))
        rows.append(np.full((4, rows[-1].shape[1], 3), 255, dtype=np.uint8))
    return save_png(path, np.concatenate(rows[:-1], 0))


__all__ = ["blend", "colorize", "palette", "save_overlay_grid", "save_png"]
