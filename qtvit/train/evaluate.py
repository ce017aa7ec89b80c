"""Top-1/top-5 evaluation (distributed-aware), and building a model from a training config."""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import QtvitError
from .config import ModelConfig
from .distributed import DistInfo, all_reduce_sum


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype`` on ``device``'s type, or a no-op for ``None`` (full precision)."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def build_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """Create ``cfg.name`` with ``num_classes`` outputs and the config's kernel/APE/shortcut/drop-path.

    Unknown model or kernel names raise ``ValueError`` listing the valid ones (from the
    registries); builder arguments the model does not take raise a one-line QtvitError.
    """
    from ..models import create_model, resolve_model_name

    resolve_model_name(cfg.name)  # unknown names raise first, listing the valid ones
    kwargs = dict(cfg.kwargs)
    for key in ("kernel", "ape", "shortcut"):
        if getattr(cfg, key) is not None:
            kwargs[key] = getattr(cfg, key)
    if cfg.kernel is not None:
        from ..kernels import get_kernel

        get_kernel(cfg.kernel)  # raises listing the valid kernels
    kwargs["drop_path_rate"] = cfg.drop_path_rate
    try:
        model = create_model(cfg.name, num_classes=num_classes, **kwargs)
    except TypeError as err:
        raise QtvitError(f"model {cfg.name} does not accept the arguments {sorted(kwargs)}: {err}") from None
    img_size = kwargs.get("img_size")
    cfg_dict = getattr(model, "pretrained_cfg", None)
    if img_size is not None and isinstance(cfg_dict, dict):
        # A model built for another resolution is evaluated at that resolution.
        h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        model.pretrained_cfg = {**cfg_dict, "input_size": (3, h, w)}
    return model


def classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    """State-dict prefixes of ``model``'s final classifier(s), e.g. ``("head.classifier.4.",)``.

    Read from ``pretrained_cfg["classifier"]`` (timm's convention: a module name or a tuple of
    them; an EfficientViT's ``head.classifier.4``, a ViT's ``head``), else from the module that
    ``get_classifier()`` returns. Empty when the model names neither.
    """
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    if isinstance(names, str):
        names = (names,)
    if not names and hasattr(model, "get_classifier"):
        head = model.get_classifier()
        names = tuple(n for n, m in model.named_modules() if m is head and n)
    return tuple(f"{n}." for n in names)


def load_weights(model: nn.Module, source, *, use_ema: bool = False, trust_pickle: bool = False,
                 new_classifier_ok: bool = False) -> None:
    """Load ``source`` (path or state dict, any layout) into ``model`` strictly.

    A checkpoint of another model raises a one-line QtvitError naming it (the key listing is in
    the error's ``report``). With ``new_classifier_ok`` (fine-tuning on another class count) a
    checkpoint whose only conflicts are the classifier's shapes (found through
    :func:`classifier_prefixes`) loads everything else and leaves the model's classifier as it was
    initialised.
    """
    from ..models.checkpoint import CheckpointMismatchError, load_checkpoint

    try:
        load_checkpoint(model, source, trust_pickle=trust_pickle, use_ema=use_ema)
    except CheckpointMismatchError as err:
        report = err.report
        prefixes = classifier_prefixes(model)
        classifier_only = bool(prefixes) and bool(report.mismatched) and all(
            key.startswith(prefixes) for key, _, _ in report.mismatched) and not (
            report.missing or report.unexpected)
        if new_classifier_ok and classifier_only:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the partial load is the point here
                load_checkpoint(model, source, strict=False, trust_pickle=trust_pickle, use_ema=use_ema)
            return
        first = str(err).splitlines()[0]
        raise QtvitError(first + " (run with --debug for the key listing)") from err


def _accuracy_counts(logits: torch.Tensor, target: torch.Tensor, ks: tuple[int, ...]) -> list[int]:
    topk = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices  # (B, k)
    hits = topk.eq(target[:, None])
    return [int(hits[:, :k].any(dim=1).sum()) for k in ks]


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable, device: torch.device, info: DistInfo | None = None,
             amp_dtype: torch.dtype | None = None, channels_last: bool = False, progress=None) -> dict:
    """Top-1/top-5 accuracy (in %) and mean cross-entropy of ``model`` over ``batches``.

    ``batches`` yields ``(images, labels, n_bad)``; counts are summed over ranks, so every rank
    returns the global result. ``progress`` is an optional callable advanced once per batch.

    Returns:
        ``{"top1", "top5", "loss", "images", "bad_images", "seconds"}``.
    """
    model.eval()
    start = time.perf_counter()
    totals = torch.zeros(5, dtype=torch.float64)  # images, top1 hits, top5 hits, loss sum, bad images
    for x, y, bad in batches:
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp_dtype):
            logits = model(x)
        logits = logits.float()
        top1, top5 = _accuracy_counts(logits, y, (1, 5))
        totals += torch.tensor([len(y), top1, top5, float(F.cross_entropy(logits, y, reduction="sum")),
                                float(torch.as_tensor(bad).sum())], dtype=torch.float64)
        if progress is not None:
            progress()
    if info is not None and info.distributed:
        t = totals.to(info.device)
        totals = all_reduce_sum(t, info).cpu()
    n = max(int(totals[0]), 1)
    return {"top1": 100.0 * float(totals[1]) / n, "top5": 100.0 * float(totals[2]) / n,
            "loss": float(totals[3]) / n, "images": int(totals[0]), "bad_images": int(totals[4]),
            "seconds": time.perf_counter() - start}
