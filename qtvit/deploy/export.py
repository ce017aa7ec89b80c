"""Export to ONNX and torch.export (``.pt2``) with dynamic batch, height and width.

The exported graph is the fused model's (:func:`qtvit.deploy.fuse`, exact): its attention is written
without Python branching on the token count and always resizes the APE inside the graph, so one
file serves every input size the model accepts. The training-time modules choose between dense
and linear paths and split tokens into cache-sized chunks with Python arithmetic on the token
count, and skip the APE resize when the size already matches: under ``torch.export`` each of
those decisions becomes a guard on H and W (specialising them to the sample's size) or integer
shape arithmetic in the graph. The fused attention has none of them.

Metadata (ONNX ``metadata_props``; ``.pt2`` extra file ``qtvit.json``), all JSON:
    ``qtvit.model``          registered architecture name;
    ``qtvit.preprocessing``  input_size, crop_pct, crop_mode, interpolation, mean, std (timm's data config);
    ``qtvit.class_names``    list of class names (ImageNet's when the model has 1000 classes and none stored);
    ``qtvit.input_sizes``    {"min": 32, "multiple_of": 32}: the sizes the export was checked for;
    ``qtvit.dtype``          "float32" or "float16" (the input and output dtype);
    ``qtvit.version``.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..errors import QtvitError
from .fuse import fuse

OPSET = 18
# Input sizes every export accepts: 64 px gives the stride-32 stage a 2×2 grid (torch.export
# specialises size-1 dims, so 32 px, a 1×1 grid, is outside the exported range); multiples of 32
# keep every stage's grid exact (other sizes run, but are padded by the strided convolutions).
MIN_SIZE = 64
MULTIPLE_OF = 32
FORMATS = ("onnx", "torch-export", "hub")


class ExportError(QtvitError):
    """The model could not be exported (the message names the step that failed)."""


def preprocessing_of(model: nn.Module) -> dict[str, Any]:
    """Eval preprocessing from the model's pretrained config (timm's keys and defaults)."""
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    size = tuple(cfg.get("input_size", (3, 224, 224)))
    return {"input_size": list(size), "crop_pct": float(cfg.get("crop_pct", 0.875)),
            "crop_mode": cfg.get("crop_mode", "center"), "interpolation": cfg.get("interpolation", "bicubic"),
            "mean": list(cfg.get("mean", (0.485, 0.456, 0.406))),
            "std": list(cfg.get("std", (0.229, 0.224, 0.225)))}


def class_names_of(model: nn.Module, class_names: Sequence[str] | None = None) -> list[str] | None:
    """Class names: given, else stored in the model's config, else ImageNet-1k's for 1000 classes."""
    if class_names is not None:
        return [str(c) for c in class_names]
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if cfg.get("label_names"):
        return [str(c) for c in cfg["label_names"]]
    if getattr(model, "num_classes", None) == 1000:
        try:
            from timm.data import ImageNetInfo
        except ImportError:
            return None
        info = ImageNetInfo()
        return [info.index_to_description(i) for i in range(1000)]
    return None


def export_metadata(model: nn.Module, class_names: Sequence[str] | None = None,
                    dtype: torch.dtype = torch.float32) -> dict[str, str]:
    """The metadata strings stored in an exported file (see the module docstring)."""
    from .. import __version__
    from ..models.checkpoint import model_name_of

    meta = {
        "qtvit.model": model_name_of(model) or type(model).__name__,
        "qtvit.preprocessing": json.dumps(preprocessing_of(model)),
        "qtvit.input_sizes": json.dumps({"min": MIN_SIZE, "multiple_of": MULTIPLE_OF}),
        "qtvit.dtype": str(dtype).removeprefix("torch."),
        "qtvit.version": __version__,
    }
    names = class_names_of(model, class_names)
    if names is not None:
        meta["qtvit.class_names"] = json.dumps(names)
    return meta


def check_input_size(height: int, width: int, input_sizes: dict[str, int] | str) -> None:
    """Raise a one-line ValueError unless H×W is a size the exported model declares it accepts."""
    rules = json.loads(input_sizes) if isinstance(input_sizes, str) else input_sizes
    lo, mult = int(rules.get("min", MIN_SIZE)), int(rules.get("multiple_of", 1))
    if height < lo or width < lo or height % mult or width % mult:
        raise ValueError(f"input size {height}×{width} is not accepted by this exported model: height and "
                         f"width must be at least {lo} and multiples of {mult}")


def _prepare(model: nn.Module, fp16: bool) -> nn.Module:
    model = fuse(model)  # a copy; the caller's model is untouched
    for m in model.modules():
        if hasattr(m, "ape_cache"):  # a cached APE would pin the size: export always resizes
            m.ape_cache, m.ape_cache_size = None, None
    return model.half() if fp16 else model.float()


def _sample(model: nn.Module, size: int | tuple[int, int] | None, dtype: torch.dtype) -> torch.Tensor:
    if size is None:
        size = tuple(preprocessing_of(model)["input_size"][1:])
    h, w = (size, size) if isinstance(size, int) else size
    check_input_size(h, w, {"min": MIN_SIZE, "multiple_of": MULTIPLE_OF})
    in_chans = getattr(model, "in_chans", 3)
    # batch 2 and H ≠ W: a sample of 1 or a square one would let the exporter specialise those dims
    return torch.randn(2, in_chans, h, w + MULTIPLE_OF, dtype=dtype)


def _dynamic_shapes() -> dict:
    from torch.export import Dim

    batch = Dim("batch", min=1, max=4096)
    height = Dim("height", min=MIN_SIZE, max=16384)
    width = Dim("width", min=MIN_SIZE, max=16384)
    return {"x": {0: batch, 2: height, 3: width}}


def _atomic_target(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    return Path(tmp)


def export_onnx(model: nn.Module, path: str | os.PathLike, *, fp16: bool = False, opset: int = OPSET,
                sample_size: int | tuple[int, int] | None = None,
                class_names: Sequence[str] | None = None, check: bool = True) -> Path:
    """Export ``model`` (fused on a copy) to a self-contained ONNX file with dynamic batch, H and W.

    Args:
        model: a qtvit classification model (or any module taking (B, C, H, W)).
        path: destination ``.onnx`` (written atomically; weights inside the file).
        fp16: float16 weights, input and output; the attention still runs in float32 inside.
        opset: ONNX opset (≥ 18).
        sample_size: size of the tracing sample (default: the model's input size).
        class_names: stored in the metadata (default: the model's, or ImageNet's for 1000 classes).
        check: run ``onnx.checker`` on the result.
    """
    import onnx

    if opset < 18:
        raise ExportError(f"opset {opset} is too old: the exporter needs opset 18 or newer")
    path = Path(path)
    dtype = torch.float16 if fp16 else torch.float32
    net = _prepare(model, fp16)
    x = _sample(net, sample_size, dtype)
    try:
        program = torch.onnx.export(net, (x,), dynamo=True, dynamic_shapes=_dynamic_shapes(),
                                    input_names=["x"], output_names=["logits"], opset_version=opset,
                                    optimize=True, verbose=False)
    except Exception as err:
        raise ExportError(f"ONNX export failed: {str(err).strip().splitlines()[0][:300]}") from err
    proto = program.model_proto
    for key, value in export_metadata(model, class_names, dtype).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    if check:
        onnx.checker.check_model(proto, full_check=True)
    tmp = _atomic_target(path)
    try:
        onnx.save_model(proto, str(tmp), save_as_external_data=False)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def onnx_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file (without loading its weights)."""
    import onnx

    proto = onnx.load_model(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


def export_program(model: nn.Module, path: str | os.PathLike, *, fp16: bool = False,
                   sample_size: int | tuple[int, int] | None = None,
                   class_names: Sequence[str] | None = None) -> Path:
    """Export ``model`` (fused on a copy) with :func:`torch.export.export` to a ``.pt2`` file.

    Dynamic batch, height and width; the metadata of :func:`export_metadata` is stored as the
    extra file ``qtvit.json`` (read it back with :func:`program_metadata`).
    """
    path = Path(path)
    dtype = torch.float16 if fp16 else torch.float32
    net = _prepare(model, fp16)
    x = _sample(net, sample_size, dtype)
    try:
        program = torch.export.export(net, (x,), dynamic_shapes=_dynamic_shapes())
    except Exception as err:
        raise ExportError(f"torch.export failed: {str(err).strip().splitlines()[0][:300]}") from err
    meta = export_metadata(model, class_names, dtype)
    tmp = _atomic_target(path)
    try:
        torch.export.save(program, str(tmp), extra_files={"qtvit.json": json.dumps(meta)})
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def load_program(path: str | os.PathLike) -> tuple[torch.export.ExportedProgram, dict[str, str]]:
    """A ``.pt2`` written by :func:`export_program` and its metadata."""
    extra = {"qtvit.json": ""}
    program = torch.export.load(str(path), extra_files=extra)
    return program, json.loads(extra["qtvit.json"] or "{}")


__all__ = ["ExportError", "FORMATS", "MIN_SIZE", "MULTIPLE_OF", "OPSET", "check_input_size", "class_names_of",
           "export_metadata", "export_onnx", "export_program", "load_program", "onnx_metadata",
           "preprocessing_of"]
