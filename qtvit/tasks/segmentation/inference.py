"""Inference helpers: padding to the backbone's stride, whole-image and sliding-window prediction.

Models take inputs whose sides are multiples of 32 and return logits at their ``output_stride``
(``qtvit.models.segmentation``). These helpers accept any size:

* :func:`forward_logits` pads the batch on the right/bottom to a multiple of 32, runs the model,
  resizes the logits (bilinear) to the padded size and crops the padding off: (B, 3, H, W) →
  (B, C, H, W).
* :func:`slide_logits` runs overlapping ``crop``×``crop`` windows every ``stride`` pixels (the last
  window in each direction is aligned with the border, as in mmseg) and averages the logits where
  windows overlap; an image smaller than a window is one (padded) window.
* :func:`predict` adds test-time resizing of the logits to the label size, horizontal flip and
  multi-scale averaging (of softmax probabilities) on top of either mode.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

Tensor = torch.Tensor
DIVISOR = 32


def pad_to_multiple(x: Tensor, divisor: int = DIVISOR, value: float = 0.0) -> tuple[Tensor, tuple[int, int]]:
    """Pad (…, H, W) on the right/bottom to multiples of ``divisor``; returns (padded, (H, W))."""
    H, W = x.shape[-2:]
    ph, pw = (-H) % divisor, (-W) % divisor
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), value=value)
    return x, (H, W)


def _main(out) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def forward_logits(model: nn.Module, x: Tensor) -> Tensor:
    """(B, 3, H, W) any size → logits (B, C, H, W) in float32 (padding removed)."""
    padded, (H, W) = pad_to_multiple(x)
    logits = _main(model(padded)).float()
    if logits.shape[-2:] != padded.shape[-2:]:
        logits = F.interpolate(logits, size=padded.shape[-2:], mode="bilinear", align_corners=False)
    return logits[..., :H, :W]


def window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Start offsets of the windows along one side (the last one flush with the border)."""
    n = max(length - crop + stride - 1, 0) // stride + 1
    return sorted({max(min(i * stride + crop, length) - crop, 0) for i in range(n)})


def slide_logits(model: nn.Module, x: Tensor, crop: int | Sequence[int] = 512,
                 stride: int | Sequence[int] = 341, batch_windows: int = 1) -> Tensor:
    """Sliding-window logits (B, C, H, W) of (B, 3, H, W), averaged where windows overlap.

    Args:
        crop: window size (h, w) or one int.
        stride: step between windows (h, w) or one int; must not exceed the window.
        batch_windows: windows per forward call (per image); memory vs. speed.
    """
    ch, cw = (crop, crop) if isinstance(crop, int) else tuple(crop)
    sh, sw = (stride, stride) if isinstance(stride, int) else tuple(stride)
    if not (0 < sh <= ch and 0 < sw <= cw):
        raise ValueError(f"stride {sh}×{sw} must be positive and at most the window {ch}×{cw}")
    B, _, H, W = x.shape
    boxes = [(t, left) for t in window_starts(H, ch, sh) for left in window_starts(W, cw, sw)]
    total = count = None
    for i in range(0, len(boxes), batch_windows):
        group = boxes[i:i + batch_windows]
        tiles = torch.cat([x[..., t:t + ch, left:left + cw] for t, left in group])
        logits = forward_logits(model, tiles)
        if total is None:
            total = x.new_zeros((B, logits.shape[1], H, W), dtype=torch.float32)
            count = x.new_zeros((1, 1, H, W), dtype=torch.float32)
        for j, (t, left) in enumerate(group):
            h, w = logits.shape[-2:]
            total[..., t:t + h, left:left + w] += logits[j * B:(j + 1) * B]
            count[..., t:t + h, left:left + w] += 1
    return total / count


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, out_size: Sequence[int] | None = None, mode: str = "whole",
            crop: int | Sequence[int] = 512, stride: int | Sequence[int] = 341, flip: bool = False,
            scales: Sequence[float] = (1.0,)) -> Tensor:
    """Class scores (B, C, h, w) of a normalised batch x (B, 3, H, W), at ``out_size`` (default (H, W)).

    One scale without flip returns logits; with flip or several scales, the mean of the softmax
    probabilities (the argmax is what matters either way).

    Args:
        mode: ``"whole"`` (one forward of the whole image) or ``"slide"`` (windows ``crop`` every ``stride``).
        flip: also run the horizontally flipped image.
        scales: resize factors of the input (e.g. 0.5 … 1.75 for multi-scale testing).
    """
    if mode not in ("whole", "slide"):
        raise ValueError(f"unknown inference mode {mode!r}; valid: whole, slide")
    out_size = tuple(out_size) if out_size is not None else tuple(x.shape[-2:])
    runs = [(s, f) for s in scales for f in ((False, True) if flip else (False,))]
    acc = None
    for scale, flipped in runs:
        xi = x
        if scale != 1.0:
            size = [max(1, round(x.shape[-2] * scale)), max(1, round(x.shape[-1] * scale))]
            xi = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        if flipped:
            xi = xi.flip(-1)
        logits = forward_logits(model, xi) if mode == "whole" else slide_logits(model, xi, crop, stride)
        if flipped:
            logits = logits.flip(-1)
        if tuple(logits.shape[-2:]) != out_size:
            logits = F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)
        if len(runs) > 1:
            logits = logits.softmax(1)
        acc = logits if acc is None else acc + logits
    return acc / len(runs) if len(runs) > 1 else acc


__all__ = ["forward_logits", "pad_to_multiple", "predict", "slide_logits", "window_starts"]
