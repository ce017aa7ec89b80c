"""Training checkpoints: everything a resumed run needs to continue exactly, written atomically.

A checkpoint is a plain dict of tensors and Python scalars (readable with
``torch.load(weights_only=True)``, so :func:`qtvit.create_model` loads its ``model`` or ``ema``
weights directly):

``model`` / ``ema``
    native state dicts (the unwrapped model: no ``module.``/``_orig_mod.`` prefixes).
``optimizer``, ``scheduler``, ``scaler``
    their ``state_dict()``.
``rng``
    python, numpy, torch-CPU and every CUDA device's generator state.
``epoch``, ``step_in_epoch``, ``global_step``
    where the run is: the next step to take is ``step_in_epoch`` of ``epoch``.
``config``, ``model_name``, ``classes``, ``metrics``, ``qtvit_train_checkpoint``
    the resolved config, the class names and the last evaluation.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import QtvitError
from ..io import atomic_output

CHECKPOINT_VERSION = 1


def capture_rng() -> dict:
    """The state of every random generator a training step draws from."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()  # noqa: NPY002 (timm's mixup draws from it)
    state = {
        "python": _to_plain(random.getstate()),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    """Inverse of :func:`capture_rng`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["gauss"]))  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        states = state["cuda"][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(states)


def _to_plain(obj: Any) -> Any:
    """Tuples → lists recursively (weights-only unpickling accepts both; lists survive YAML/JSON too)."""
    if isinstance(obj, (tuple, list)):
        return [_to_plain(x) for x in obj]
    return obj


def save_atomic(obj: dict, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file beside ``path``, then rename: a crash never leaves half a file."""
    with atomic_output(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def read_checkpoint_file(path: str | os.PathLike) -> Any:
    """``torch.load`` of a file, weights only (nothing is unpickled beyond tensors), on the CPU; a
    missing file or one that does not load stops with one line naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is the file's fault
        raise QtvitError(f"cannot read checkpoint {path}: {str(err).splitlines()[0]}") from None


def load_training_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint written by the trainer (weights only: nothing is unpickled beyond tensors)."""
    ckpt = read_checkpoint_file(path)
    if not isinstance(ckpt, dict) or not ckpt.get("qtvit_train_checkpoint"):
        raise QtvitError(f"{path} is not a qtvit training checkpoint (no training state to resume from)")
    return ckpt
