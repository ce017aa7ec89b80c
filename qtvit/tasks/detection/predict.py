"""Loading a trained detector and drawing its predictions (boxes, labels, scores, masks) on images."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from ...errors import QtvitError

PALETTE = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6", "#bcf60c",
           "#fabebe", "#008080", "#e6beff", "#9a6324")


def load_trained_detector(path: str | os.PathLike, use_ema: bool = False,
                          device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """(detector in eval mode, its training checkpoint) from a ``qtvit det train``/``demo`` checkpoint."""
    from ...train.config import config_from_dict
    from ...train.state import load_training_checkpoint
    from .task import build_detection_model, load_detector_weights

    ckpt = load_training_checkpoint(path)
    if ckpt.get("task") != "detection":
        raise QtvitError(f"{path} is a {ckpt.get('task', 'classification')} checkpoint, not a detection one")
    cfg = config_from_dict(ckpt["config"])
    cfg.model.backbone_checkpoint = None  # the trained weights replace the ImageNet start
    cfg.model.init_checkpoint = None
    cfg.model.drop_path_rate = 0.0
    model = build_detection_model(cfg.model, len(ckpt["classes"]), cfg.aug)
    load_detector_weights(model, path, use_ema=use_ema)
    return model.to(device).eval(), ckpt


def draw_predictions(image: torch.Tensor, prediction: dict[str, torch.Tensor], classes: list[str],
                     score_thresh: float = 0.5, mask_thresh: float = 0.5) -> torch.Tensor:
    """(3, H, W) float image in [0, 1] → uint8 image with masks, boxes and "class score" labels drawn."""
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    keep = prediction["scores"] >= score_thresh
    labels = prediction["labels"][keep].tolist()
    colours = [PALETTE[(label - 1) % len(PALETTE)] for label in labels]
    canvas = (image.detach().cpu().clamp(0, 1) * 255).to(torch.uint8)
    if "masks" in prediction and keep.any():
        masks = prediction["masks"][keep][:, 0].cpu() >= mask_thresh
        canvas = draw_segmentation_masks(canvas, masks, alpha=0.45, colors=colours)
    if keep.any():
        text = [f"{classes[label - 1] if label <= len(classes) else label} {score:.2f}"
                for label, score in zip(labels, prediction["scores"][keep].tolist(), strict=True)]
        canvas = draw_bounding_boxes(canvas, prediction["boxes"][keep].cpu(), text, colors=colours, width=2)
    return canvas


def save_png(image: torch.Tensor, path: str | os.PathLike) -> Path:
    """Write a uint8 (3, H, W) image atomically."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """An image file → float (3, H, W) in [0, 1]; one-line errors for missing or unreadable files."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            array = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as err:
        raise QtvitError(f"cannot read image {path}: {err}") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255)


__all__ = ["draw_predictions", "load_trained_detector", "read_image", "save_png"]
