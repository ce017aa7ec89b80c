"""Make every qtvit model a timm model: ``timm.create_model("qtvit_1")`` once qtvit is imported.

Registration is lazy so that ``import qtvit`` never imports timm (a heavy, optional dependency):
:func:`enable_timm_integration` (called by ``qtvit.models``) registers at once if timm is already
imported, and otherwise installs a one-shot import hook that registers right after timm's own
import finishes. Either order works::

    import qtvit, timm                       # or: import timm, qtvit
    m = timm.create_model("qtvit_b1", num_classes=10)
    f = timm.create_model("qtvit_1", features_only=True, out_indices=(1, 3))   # strides 8, 32
    cfg = timm.data.resolve_data_config({}, model=m)                          # eval transforms

Names and aliases (``qtvit_b0 … qtvit_l3``, ``qtvit_1 … qtvit_6``, the ViT family) never collide
with timm's own: a name timm already knows from another module raises instead of overwriting.
``pretrained=True`` has no hosted weights to fetch; point timm at a local file in any layout
qtvit reads with ``pretrained_cfg_overlay=dict(file="qtvit_1.pt")`` (converted on the fly).
Models registered with qtvit after import are added by calling :func:`register_with_timm`.
"""

from __future__ import annotations

import dataclasses
import importlib.abc
import importlib.util
import inspect
import sys
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch.nn as nn

from ..errors import QtvitError
from .registry import _BUILDERS, get_model_card, list_models, resolve_model_name

# timm's register_model reads the pretrained configs from the entrypoint module's `default_cfgs`.
default_cfgs: dict[str, dict[str, Any]] = {}

_EVIT_CFG = dict(  # defaults for the EfficientViT/QT-ViT family when the card leaves them out
    first_conv="stem.in_conv.conv", classifier="head.classifier.4", pool_size=(7, 7),
    paper_name="QT-ViT: Improving Linear Attention in ViT with Quadratic Taylor Expansion",
    paper_ids="openreview:V2e0A2XIPF", origin_url="https://github.com/AMD-AIG-AIMA/AMD_QTViT",
)
_COMMON_CFG = dict(url="", num_classes=1000, input_size=(3, 224, 224), interpolation="bicubic",
                   crop_pct=1.0, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def timm_available() -> bool:
    """True if timm can be imported (without importing it)."""
    return "timm" in sys.modules or importlib.util.find_spec("timm") is not None


def pretrained_cfg_for(name: str) -> dict[str, Any]:
    """timm pretrained config of a registered model (its card's ``pretrained_cfg`` over defaults)."""
    canonical = resolve_model_name(name)
    card = get_model_card(canonical)
    cfg: dict[str, Any] = dict(_COMMON_CFG)
    if not canonical.startswith("qtvit_vit"):
        cfg.update(_EVIT_CFG)
    cfg.update(card.pretrained_cfg or {})
    if card.paper_name:
        cfg.setdefault("description", card.paper_name)
    return cfg


def register_with_timm(names: list[str] | None = None) -> list[str]:
    """Register qtvit models (default: every classifier, aliases included) as timm entrypoints.

    Only classifiers: timm's model contract (a classifier head, pooled features) does not fit the
    segmentation and detection models, which are built through :func:`qtvit.create_model`.

    Idempotent: names this module registered before are skipped. Returns the newly registered
    names. Raises :class:`QtvitError` if timm already has one of the names from another module.
    """
    import timm.models  # noqa: F401  (timm's own registrations run first)
    from timm.layers import register_notrace_module
    from timm.models import is_model, model_entrypoint, register_model
    from timm.models._pretrained import PretrainedCfg

    from ..layers import LiteMLA

    # a leaf for FX tracing (features_only=True, feature_cls="fx"), as timm does for its LiteMLA
    register_notrace_module(LiteMLA)
    fields = {f.name for f in dataclasses.fields(PretrainedCfg)}
    names = list_models(include_aliases=True, task="classification") if names is None else list(names)
    new = []
    for name in names:
        if is_model(name):
            owner = getattr(model_entrypoint(name), "__module__", "?")
            if owner == __name__:
                continue
            raise QtvitError(f"cannot register qtvit model {name!r} with timm: timm already has a "
                             f"model of that name (from {owner})")
        canonical = resolve_model_name(name)
        cfg = pretrained_cfg_for(canonical)
        default_cfgs[name] = {k: v for k, v in cfg.items() if k in fields}
        entrypoint = _make_entrypoint(name, canonical)
        setattr(sys.modules[__name__], name, entrypoint)
        register_model(entrypoint)
        new.append(name)
    return new


def _make_entrypoint(name: str, canonical: str) -> Callable[..., nn.Module]:
    def entrypoint(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return create_timm_model(name, pretrained=pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    alias = f" (alias of {canonical})" if name != canonical else ""
    entrypoint.__doc__ = f"qtvit {name}{alias}, built through timm's build_model_with_cfg."
    return entrypoint


def create_timm_model(name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Build ``name`` through ``timm.models.build_model_with_cfg``.

    Gives the model its ``pretrained_cfg`` (input size, crop, interpolation, mean/std) and handles
    ``features_only=True`` (``out_indices`` default (0, 1, 2, 3): strides 4, 8, 16, 32),
    ``pretrained`` (with ``pretrained_cfg_overlay=dict(file=...)``) the way timm models do. Every
    other keyword goes to the qtvit builder (``num_classes``, ``kernel``, ``ape``, ...).
    """
    from timm.models import build_model_with_cfg

    canonical = resolve_model_name(name)
    builder = _BUILDERS[canonical]
    if canonical.startswith("qtvit_vit"):  # plain ViT: features from forward_intermediates, last 4 blocks
        feature_cfg = dict(feature_cls="getter", out_indices=kwargs.pop("out_indices", 4))
    else:
        feature_cfg = dict(flatten_sequential=True, out_indices=kwargs.pop("out_indices", (0, 1, 2, 3)))
    return build_model_with_cfg(
        _adapt(builder, canonical), name, pretrained,
        pretrained_filter_fn=_pretrained_filter, feature_cfg=feature_cfg, **kwargs)


def _adapt(builder: Callable[..., nn.Module], name: str) -> Callable[..., nn.Module]:
    """The builder, minus the ``in_chans=3`` timm always passes when the builder has no such option."""
    params = inspect.signature(builder).parameters
    takes_in_chans = "in_chans" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())

    def build(**kwargs: Any) -> nn.Module:
        if not takes_in_chans:
            in_chans = kwargs.pop("in_chans", 3)
            if in_chans != 3:
                raise QtvitError(f"{name} takes 3 input channels, got in_chans={in_chans}")
        return builder(**kwargs)

    return build


def _pretrained_filter(state_dict: Mapping[str, Any], model: nn.Module) -> dict[str, Any]:
    """timm's pretrained-weights hook: unwrap and convert any supported layout to native."""
    from .checkpoint import convert_state_dict, read_state_dict

    return convert_state_dict(read_state_dict(dict(state_dict)), model)


class _TimmImportHook(importlib.abc.MetaPathFinder):
    """Finder that, when ``timm`` is first imported, registers qtvit's models right after it.

    Every spec it hands out for ``timm`` runs the registration after timm's module code; the
    hook removes itself once that has happened (a spec asked for without importing is harmless).
    """

    def __init__(self) -> None:
        self._busy = False

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != "timm" or self._busy:
            return None
        self._busy = True
        try:
            spec = importlib.util.find_spec("timm")
        finally:
            self._busy = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_register(module: Any) -> None:
            exec_module(module)
            _remove_hook()
            _register_quietly()

        spec.loader.exec_module = exec_and_register  # type: ignore[method-assign]
        return spec


_HOOK = _TimmImportHook()


def _remove_hook() -> None:
    if _HOOK in sys.meta_path:
        sys.meta_path.remove(_HOOK)


def _register_quietly() -> None:
    try:
        register_with_timm()
    except Exception as err:  # never break `import timm` for the user
        warnings.warn(f"qtvit: could not register its models with timm: {err}", stacklevel=2)


def enable_timm_integration() -> None:
    """Register with timm now if it is imported, else when it is (no-op without timm)."""
    if "timm.models" in sys.modules:
        _register_quietly()
    elif timm_available() and _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)


__all__ = ["create_timm_model", "enable_timm_integration", "pretrained_cfg_for", "register_with_timm",
           "timm_available"]
