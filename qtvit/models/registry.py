"""Model registry: names → builders, paper aliases, and model cards (params, MACs, accuracy).

Builders are registered with :func:`register_model` (duplicates raise); :func:`create_model`
builds by name or alias and optionally loads a checkpoint in any supported layout.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field

import torch.nn as nn


@dataclass(frozen=True)
class ModelCard:
    """Facts about a registered model; a test recounts ``params`` and ``macs_224`` exactly.

    Attributes:
        params: parameter count with 1000 classes and the default kernel/APE/shortcut.
        macs_224: multiply-accumulates of one 3×224×224 image, exactly as
            :func:`qtvit.models.macs.count_macs` counts them (convolutions, linear layers and the
            attention matmuls; element-wise work excluded). ``qtvit models --recount`` prints it.
        paper_gmacs_224: the MACs the paper reports (in G, as printed there, where it calls them
            FLOPs), None where it reports none. Its counting conventions are not ours, so it may
            differ from ``macs_224`` by about 1%.
        top1, top5: the paper's ImageNet-1k accuracy (%), None where not reported.
        paper_name: e.g. ``"QT-ViT-1"``.
        pretrained_cfg: timm-style config: input_size, crop_pct, interpolation, mean, std, ...
    """

    params: int | None = None
    macs_224: int | None = None
    paper_gmacs_224: float | None = None
    top1: float | None = None
    top5: float | None = None
    paper_name: str | None = None
    pretrained_cfg: dict = field(default_factory=dict)

    @property
    def gmacs_224(self) -> float | None:
        """``macs_224`` in G (what tables print, rounded to their precision)."""
        return None if self.macs_224 is None else self.macs_224 / 1e9


_BUILDERS: dict[str, Callable[..., nn.Module]] = {}
_ALIASES: dict[str, str] = {}
_CARDS: dict[str, ModelCard] = {}


def register_model(name: str, *, aliases: tuple[str, ...] = (), card: ModelCard | None = None):
    """Decorator registering ``builder(**kwargs) -> nn.Module`` under ``name`` (and ``aliases``)."""

    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        for key in (name, *aliases):
            if key in _BUILDERS or key in _ALIASES:
                raise ValueError(f"a model named {key!r} is already registered")
        _BUILDERS[name] = builder
        for alias in aliases:
            _ALIASES[alias] = name
        _CARDS[name] = card or ModelCard()
        return builder

    return decorator


def model_task(name: str) -> str:
    """What a registered model does: its card's ``pretrained_cfg["task"]``, ``classification`` by default."""
    return get_model_card(name).pretrained_cfg.get("task", "classification")


def list_models(pattern: str | None = None, include_aliases: bool = False,
                task: str | None = None) -> list[str]:
    """Registered model names in registration order, optionally filtered by a glob ``pattern`` and by
    ``task`` (``classification``, ``segmentation``, ``detection``; see :func:`model_task`)."""
    names = list(_BUILDERS) + (list(_ALIASES) if include_aliases else [])
    return [n for n in names if (pattern is None or fnmatch.fnmatch(n, pattern))
            and (task is None or model_task(n) == task)]


def resolve_model_name(name: str) -> str:
    """Canonical name for ``name`` or an alias; unknown names raise ``ValueError`` listing valid ones."""
    if name in _BUILDERS:
        return name
    if name in _ALIASES:
        return _ALIASES[name]
    valid = ", ".join(list_models(include_aliases=True))
    raise ValueError(f"unknown model {name!r}; valid models: {valid}")


def get_model_card(name: str) -> ModelCard:
    return _CARDS[resolve_model_name(name)]


def create_model(name: str, checkpoint=None, num_classes: int = 1000, *, strict: bool = True,
                 trust_pickle: bool = False, allow_missing_qt: bool = False, **kwargs) -> nn.Module:
    """Build a registered model, optionally loading ``checkpoint``.

    Args:
        name: a name from :func:`list_models` or an alias (``qtvit_1`` … ``qtvit_6``), or a folder
            written by :func:`qtvit.save_pretrained` (its stored architecture, classes and weights).
        checkpoint: path (.pt/.pth/.bin/.safetensors) or state dict, in qtvit's layout or any
            supported foreign layout (detected and converted).
        num_classes: classifier outputs.
        strict: raise on missing/unexpected keys or shape conflicts (default).
        trust_pickle: allow full unpickling of a trusted ``.pt`` file that ``weights_only``
            loading refuses.
        allow_missing_qt: load an EfficientViT checkpoint into a QT model, keeping the QT-only
            parameters (APE = 0, const = 1, shortcut BN) at their initial values.
        **kwargs: passed to the builder, e.g. ``kernel="qt"``, ``ape=True``, ``shortcut=True``,
            ``drop_path_rate=0.0`` for the EfficientViT/QT-ViT family.
    """
    if name not in _BUILDERS and name not in _ALIASES:
        from .hub import is_pretrained_dir, load_pretrained

        if is_pretrained_dir(name):  # a folder written by save_pretrained (timm's hub layout)
            model = load_pretrained(name, **kwargs)
            if checkpoint is not None:
                from .checkpoint import load_checkpoint

                load_checkpoint(model, checkpoint, strict=strict, trust_pickle=trust_pickle)
            return model
    builder = _BUILDERS[resolve_model_name(name)]
    model = builder(num_classes=num_classes, **kwargs)
    if checkpoint is not None:
        from .checkpoint import load_checkpoint

        load_checkpoint(model, checkpoint, strict=strict, trust_pickle=trust_pickle,
                        allow_missing_qt=allow_missing_qt)
    return model
