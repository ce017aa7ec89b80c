"""Weights in the Hugging Face / timm hub layout: a folder with ``model.safetensors`` + ``config.json``.

``config.json`` follows timm's hub format, so both of these rebuild the same model::

    qtvit.save_pretrained(model, "my_model", class_names=classes)
    timm.create_model("local-dir:my_model", pretrained=True)   # timm reads config.json + weights
    qtvit.create_model("my_model")                              # the same, without timm

Keys of ``config.json``:
    ``architecture``   registered qtvit name (e.g. ``qtvit_b1``), a timm entrypoint once qtvit is imported;
    ``num_classes``, ``num_features``;
    ``model_args``     builder arguments that rebuild the network: the kernel and its fixed settings,
                       ``ape``/``shortcut``, ``img_size`` (the APE/position-embedding grid), …;
    ``pretrained_cfg`` preprocessing (input_size, crop_pct, interpolation, mean, std) and the rest of
                       the model's timm config;
    ``label_names``    the class names (timm moves them into ``pretrained_cfg``);
    ``qtvit_version``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch.nn as nn

from ..errors import QtvitError

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def is_pretrained_dir(path: str | os.PathLike) -> bool:
    """True if ``path`` is a folder holding a hub ``config.json``."""
    try:
        return (Path(path) / CONFIG_NAME).is_file()
    except (TypeError, OSError):
        return False


def model_args_of(model: nn.Module) -> dict[str, Any]:
    """Builder arguments (JSON-serialisable) that rebuild ``model``'s architecture.

    The EfficientViT/QT-ViT family: ``kernel`` (+ fixed kernel settings as ``kernel_params``),
    ``ape``, ``shortcut``, ``img_size``. The plain ViT family: ``kernel`` (+ fixed settings as
    keywords), ``img_size``, ``patch_size``, ``global_pool``.
    """
    from ..layers.attention import KernelAttention
    from ..layers.lite_mla import LiteMLA

    args: dict[str, Any] = {}
    img_size = getattr(model, "img_size", None)
    if img_size is not None:
        args["img_size"] = list(img_size) if not isinstance(img_size, int) else img_size
    mla = next((m for m in model.modules() if isinstance(m, LiteMLA)), None)
    if mla is None:  # a fused model: its FusedLiteMLAs remember the settings
        mla = next((m for m in model.modules() if type(m).__name__ == "FusedLiteMLA"), None)
    if mla is not None:
        args["kernel"] = mla.kernel
        fixed = dict(getattr(getattr(mla, "kernel_params", None), "fixed", None) or
                     getattr(mla, "kernel_kwargs", {}))
        if fixed:
            args["kernel_params"] = fixed
        args["ape"] = mla.ape is not None
        args["shortcut"] = (getattr(mla, "v_norm", None) is not None or
                            getattr(mla, "v_scale", None) is not None)
        return args
    attn = next((m for m in model.modules() if isinstance(m, KernelAttention)), None)
    if attn is not None:
        args["kernel"] = attn.kernel
        args.update(attn.kernel_params.fixed)
        for key in ("patch_size", "global_pool"):
            if hasattr(model, key):
                args[key] = getattr(model, key)
    return args


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def save_pretrained(model: nn.Module, save_dir: str | os.PathLike, *,
                    class_names: Sequence[str] | None = None, model_name: str | None = None,
                    model_args: Mapping[str, Any] | None = None,
                    overwrite: bool = False) -> Path:
    """Write ``model`` to ``save_dir`` as ``model.safetensors`` + ``config.json`` (timm's hub layout).

    Args:
        model: an unfused qtvit model (fused models have no BatchNorms to save; save before fusing).
        save_dir: folder to create. An existing non-empty folder is refused unless ``overwrite``.
        class_names: stored as ``label_names`` (default: ``model.pretrained_cfg['label_names']`` if set).
        model_name: registered name (default: read off the model).
        model_args: builder arguments overriding the ones read off the model.
        overwrite: replace an existing folder's two files.

    The folder is written to a temporary sibling and renamed into place, so a crash never leaves
    half a model.
    """
    from safetensors.torch import save_file

    from .checkpoint import model_name_of
    from .registry import resolve_model_name

    if getattr(model, "is_fused", False):
        raise QtvitError("save_pretrained needs the unfused model (fusion folds BatchNorms away); "
                         "save it first and fuse after loading")
    save_dir = Path(save_dir)
    if save_dir.exists() and not save_dir.is_dir():
        raise QtvitError(f"{save_dir} exists and is not a folder")
    if save_dir.is_dir() and any(save_dir.iterdir()) and not overwrite:
        raise QtvitError(f"{save_dir} already exists and is not empty; pass overwrite=True "
                         f"(CLI: --overwrite) to replace its model files")
    name = model_name or model_name_of(model)
    if name is None:
        raise QtvitError("cannot tell which registered model this is; pass model_name=")
    name = resolve_model_name(name)
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    labels = list(class_names) if class_names is not None else cfg.get("label_names")
    num_classes = int(getattr(model, "num_classes", cfg.get("num_classes", 0)) or 0)
    if labels is not None and num_classes and len(labels) != num_classes:
        raise QtvitError(f"{len(labels)} class names for a model with {num_classes} classes")
    args = {**model_args_of(model), **dict(model_args or {})}
    pretrained_cfg = {k: v for k, v in cfg.items()
                      if k not in ("architecture", "label_names", "file", "source", "state_dict", "url",
                                   "hf_hub_id", "tag")}
    pretrained_cfg["num_classes"] = num_classes
    from .. import __version__

    config = {"architecture": name, "num_classes": num_classes,
              "num_features": int(getattr(model, "num_features", 0) or 0),
              "model_args": args, "pretrained_cfg": pretrained_cfg, "qtvit_version": __version__}
    if labels is not None:
        config["label_names"] = [str(c) for c in labels]
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}

    save_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=save_dir.parent, prefix=f".{save_dir.name}.", suffix=".tmp"))
    try:
        save_file(tensors, str(tmp / WEIGHTS_NAME),
                  metadata={"format": "pt", "qtvit_layout": "native", "qtvit_model": name})
        (tmp / CONFIG_NAME).write_text(json.dumps(_jsonable(config), indent=2) + "\n")
        if save_dir.is_dir():  # overwrite: move our two files in, each by an atomic rename
            for fname in (WEIGHTS_NAME, CONFIG_NAME):
                os.replace(tmp / fname, save_dir / fname)
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, save_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return save_dir


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``config.json`` of a hub folder (clear errors for a missing or broken file)."""
    cfg_file = Path(path) / CONFIG_NAME
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path}: no {CONFIG_NAME} (not a model folder written by save_pretrained)")
    try:
        config = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as err:
        raise QtvitError(f"{cfg_file}: cannot parse: {err}") from None
    if not isinstance(config, dict) or "architecture" not in config:
        raise QtvitError(f"{cfg_file}: no 'architecture' entry")
    return config


def load_pretrained(path: str | os.PathLike, **overrides: Any) -> nn.Module:
    """Rebuild the model saved in a hub folder and load its weights (strictly); eval mode.

    ``overrides`` go to the builder over the stored ``model_args`` (e.g. ``attn_impl``). The
    model's ``pretrained_cfg`` is the stored one, with ``label_names`` when class names were saved.
    """
    from .checkpoint import load_checkpoint
    from .registry import create_model

    path = Path(path)
    config = read_config(path)
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{path}: no {WEIGHTS_NAME}")
    args = dict(config.get("model_args") or {})
    if isinstance(args.get("img_size"), list):
        args["img_size"] = tuple(args["img_size"])
    args.update(overrides)
    num_classes = int(config.get("num_classes", args.pop("num_classes", 1000)))
    args.pop("num_classes", None)
    model = create_model(config["architecture"], num_classes=num_classes, **args)
    load_checkpoint(model, weights, strict=True)
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    cfg.update(config.get("pretrained_cfg") or {})
    for key in ("input_size", "mean", "std", "pool_size"):
        if isinstance(cfg.get(key), list):
            cfg[key] = tuple(cfg[key])
    cfg["architecture"] = config["architecture"]
    if config.get("label_names") is not None:
        cfg["label_names"] = list(config["label_names"])
    model.pretrained_cfg = cfg
    return model.eval()


__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "is_pretrained_dir", "load_pretrained", "model_args_of",
           "read_config", "save_pretrained"]
