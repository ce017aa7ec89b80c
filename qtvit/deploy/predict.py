"""Image classification on files and folders with a qtvit model or an exported ONNX file.

The eval transform comes from the model's pretrained config (timm's ``resolve_data_config`` /
``create_transform``: resize to input_size/crop_pct, centre crop, normalise) or, for ONNX, from the
preprocessing stored in the file's metadata. Images that cannot be decoded are reported (one line
each) and skipped; the others are still predicted.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ..errors import QtvitError
from .export import check_input_size, class_names_of


@dataclass
class Prediction:
    """Top-k classes of one image: indices, names and softmax probabilities, best first."""

    path: str
    indices: list[int]
    probs: list[float]
    names: list[str]

    def as_dict(self) -> dict[str, Any]:
        ranked = zip(self.indices, self.names, self.probs, strict=True)
        return {"path": self.path, "topk": [{"index": i, "name": n, "prob": p} for i, n, p in ranked]}


@dataclass
class PredictResult:
    predictions: list[Prediction] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    def as_dict(self) -> dict[str, Any]:
        return {"predictions": [p.as_dict() for p in self.predictions],
                "skipped": [{"path": p, "reason": r} for p, r in self.skipped]}


def image_extensions() -> tuple[str, ...]:
    from torchvision.datasets.folder import IMG_EXTENSIONS

    return tuple(IMG_EXTENSIONS)


def collect_images(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Image files among ``inputs``: files as given, folders searched recursively (sorted)."""
    exts = image_extensions()
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in exts)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"no such image or folder: {path}")
    if not files:
        raise QtvitError(f"no images found in {', '.join(map(str, inputs))} "
                         f"(extensions: {', '.join(exts)})")
    return files


def transform_from_preprocessing(pre: dict[str, Any]) -> Callable:
    """timm's eval transform for stored preprocessing (input_size, crop_pct, interpolation, mean, std)."""
    from timm.data import create_transform

    return create_transform(input_size=tuple(pre["input_size"]), is_training=False,
                            interpolation=pre.get("interpolation", "bicubic"), mean=tuple(pre["mean"]),
                            std=tuple(pre["std"]), crop_pct=pre.get("crop_pct"),
                            crop_mode=pre.get("crop_mode", "center"))


def transform_for_model(model: nn.Module) -> Callable:
    """timm's eval transform resolved from ``model.pretrained_cfg``."""
    from timm.data import create_transform, resolve_data_config

    cfg = resolve_data_config({}, model=model)
    return create_transform(**cfg, is_training=False)


class _Images(torch.utils.data.Dataset):
    def __init__(self, paths: list[Path], transform: Callable) -> None:
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from ..data.folders import load_rgb

        path = str(self.paths[i])
        try:
            return path, self.transform(load_rgb(path)), ""
        except Exception as err:  # noqa: BLE001 - any decode/transform failure skips this image
            return path, None, str(err).splitlines()[0] if str(err) else type(err).__name__


def _collate(batch):
    return batch


class OnnxClassifier:
    """An exported ONNX classifier: ``(B, 3, H, W)`` float array → logits, with its stored metadata."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        import onnxruntime as ort

        from .export import onnx_metadata

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"ONNX file not found: {path}")
        self.metadata = onnx_metadata(path)
        if "qtvit.preprocessing" not in self.metadata:
            raise QtvitError(f"{path} has no qtvit preprocessing metadata (export it with `qtvit export`)")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0]
        self.dtype = np.float16 if "float16" in self.input.type else np.float32
        self.preprocessing = json.loads(self.metadata["qtvit.preprocessing"])
        self.input_sizes = json.loads(self.metadata.get("qtvit.input_sizes", "{}"))
        names = self.metadata.get("qtvit.class_names")
        self.class_names = json.loads(names) if names else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        check_input_size(int(h), int(w), self.input_sizes)  # a clear error, never a wrong answer
        out = self.session.run(None, {self.input.name: x.numpy().astype(self.dtype)})[0]
        return torch.from_numpy(out.astype(np.float32))


def predict(inputs: Sequence[str | os.PathLike], classifier: nn.Module | OnnxClassifier, *,
            transform: Callable | None = None, class_names: Sequence[str] | None = None, topk: int = 5,
            batch_size: int = 32, num_workers: int = 0, progress: bool = True,
            report: Callable[[str], None] | None = None) -> PredictResult:
    """Top-k predictions for every readable image in ``inputs`` (files and folders).

    Args:
        classifier: a qtvit model (run in eval mode under no_grad) or an :class:`OnnxClassifier`.
        transform: eval transform (default: from the model's config or the ONNX metadata).
        class_names: names of the classes (default: stored ones, ImageNet's for 1000 classes,
            else ``class_<i>``).
        report: called with one line per skipped image (default: print to stderr).
    """
    from tqdm import tqdm

    if topk < 1:
        raise ValueError(f"topk must be at least 1, got {topk}")
    report = report or (lambda line: print(line, file=sys.stderr))
    paths = collect_images(inputs)
    is_onnx = isinstance(classifier, OnnxClassifier)
    if transform is None:
        transform = (transform_from_preprocessing(classifier.preprocessing) if is_onnx
                     else transform_for_model(classifier))
    if class_names is None:
        class_names = classifier.class_names if is_onnx else class_names_of(classifier)
    if not is_onnx:
        classifier.eval()
        device = next(classifier.parameters()).device
        dtype = next(classifier.parameters()).dtype
    loader = torch.utils.data.DataLoader(_Images(paths, transform), batch_size=batch_size,
                                         num_workers=num_workers, collate_fn=_collate)
    result = PredictResult()
    with tqdm(total=len(paths), desc="predict", unit="img", disable=not progress, file=sys.stderr) as bar:
        for batch in loader:
            good = [(p, t) for p, t, err in batch if t is not None]
            for p, t, err in batch:
                if t is None:
                    result.skipped.append((p, err))
                    report(f"skipped {p}: {err}")
            if good:
                x = torch.stack([t for _, t in good])
                if is_onnx:
                    logits = classifier(x)
                else:
                    with torch.no_grad():
                        logits = classifier(x.to(device, dtype)).float().cpu()
                k = min(topk, logits.shape[-1])
                probs, idx = logits.softmax(-1).topk(k, dim=-1)
                for (p, _), pr, ix in zip(good, probs.tolist(), idx.tolist(), strict=True):
                    names = [class_names[i] if class_names and i < len(class_names) else f"class_{i}"
                             for i in ix]
                    result.predictions.append(Prediction(p, ix, pr, names))
            bar.update(len(batch))
    return result


def format_predictions(result: PredictResult) -> Iterable[str]:
    """Human-readable lines: the path, then one indented line per top-k class."""
    for p in result.predictions:
        yield p.path
        for name, prob in zip(p.names, p.probs, strict=True):
            yield f"  {prob * 100:6.2f}%  {name}"


__all__ = ["OnnxClassifier", "PredictResult", "Prediction", "collect_images", "format_predictions", "predict",
           "transform_for_model", "transform_from_preprocessing"]
