"""Build a model for deployment from a name, a hub folder or a checkpoint (training runs included)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import QtvitError


def load_model(name: str | None, checkpoint: str | os.PathLike | None = None, *, use_ema: bool = True,
               trust_pickle: bool = False) -> tuple[nn.Module, list[str] | None]:
    """The model to deploy (eval mode) and its class names (None when nothing stores them).

    Args:
        name: registered model name or alias, or a folder written by ``save_pretrained``. May be
            None for a training checkpoint, which records its model.
        checkpoint: weights in any layout qtvit reads; a qtvit training checkpoint (``last.pt`` /
            ``best.pt``) also gives the model's settings and class names.
        use_ema: take the EMA weights when the checkpoint has them (default).
    """
    from ..models import create_model
    from ..models.checkpoint import infer_model_kwargs, load_checkpoint, read_state_dict
    from ..models.hub import is_pretrained_dir

    if name is not None and is_pretrained_dir(name):
        model = create_model(str(name), checkpoint=checkpoint, trust_pickle=trust_pickle)
        return model.eval(), model.pretrained_cfg.get("label_names")
    if checkpoint is None:
        if name is None:
            raise QtvitError("give a model name, a model folder or a --checkpoint")
        return create_model(name).eval(), None
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    train = _training_checkpoint(path)
    if train is not None:
        cfg = (train.get("config") or {}).get("model") or {}
        kwargs = dict(cfg.get("kwargs") or {})
        kwargs.update({k: cfg[k] for k in ("kernel", "ape", "shortcut") if cfg.get(k) is not None})
        classes = [str(c) for c in train.get("classes") or []] or None
        model_name = name or train.get("model_name") or cfg.get("name")
        weights = train.get("ema") if use_ema and train.get("ema") else train.get("model")
        if model_name is None or not weights:
            raise QtvitError(f"{path}: training checkpoint without a model name or weights")
        num_classes = len(classes) if classes else 1000
        model = create_model(model_name, num_classes=num_classes, **kwargs)
        load_checkpoint(model, weights, strict=True)
        return model.eval(), classes
    if name is None:
        raise QtvitError(f"{path} is a plain weights file: give the model name too")
    sd = read_state_dict(path, trust_pickle=trust_pickle, use_ema=use_ema)
    from ..models.checkpoint import convert_state_dict

    kwargs = infer_model_kwargs(convert_state_dict(sd))
    if "head.weight" in sd:  # the plain ViT family's classifier
        kwargs.setdefault("num_classes", int(sd["head.weight"].shape[0]))
    model = create_model(name, **kwargs)
    load_checkpoint(model, sd, strict=True)
    return model.eval(), None


def _training_checkpoint(path: Path) -> dict | None:
    """The dict of a qtvit training checkpoint, or None for any other file."""
    with open(path, "rb") as f:
        head = f.read(8)
    if path.suffix == ".safetensors" or not head.startswith(b"PK"):  # torch.save writes zip archives
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - not for us to judge here; read_state_dict reports it clearly
        return None
    return obj if isinstance(obj, dict) and obj.get("qtvit_train_checkpoint") else None


__all__ = ["load_model"]
