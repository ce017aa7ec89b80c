"""Reading, converting, checking and writing model checkpoints.

Four state-dict layouts load into qtvit models (docs/DESIGN.md §checkpoints):

``native``
    qtvit's own layout: timm's ``efficientvit_*`` key names (``stem.in_conv``, ``stem.res{k}``,
    ``stages.{i}.blocks.{j}``, ``head.in_conv``, ``head.classifier.{0,1,4}``) plus the QT-ViT
    extras inside every LiteMLA (``...context_module.main.``): ``ape`` (1, 2·heads·d, h, w),
    ``v_norm.*`` (the BatchNorm of the GELU(BN(v)) shortcut) and ``kernel_params.*`` (the
    kernel's learnable scalars, ``const`` for ``qt``).
``official_qtvit``
    the authors' QT-ViT release: ``backbone.input_stem.op_list.*`` / ``backbone.stages.{i}.
    op_list.{j}.*`` / ``head.op_list.*`` (L models keep the stem in ``backbone.stages.0``), with
    the QT keys named ``positional_encoding``, ``bn.*`` and ``ones_scale1``.
``mit_efficientvit``
    mit-han-lab EfficientViT: the official layout without the QT keys.
``timm``
    timm's ``efficientvit_*``: the native layout without the QT keys.

Loading never unpickles arbitrary objects: ``.safetensors`` files are read with safetensors and
everything else with ``torch.load(weights_only=True)``; a file that needs more is refused unless
the caller opts in with ``trust_pickle=True`` (CLI: ``--trust-pickle``).

Fine-tuning QT-ViT from EfficientViT weights: an EfficientViT checkpoint (MIT or timm) lacks the
QT keys, so strict loading into a QT model fails and lists them. Pass ``allow_missing_qt=True``
to keep those at their initial values (APE zero, ``const`` 1, shortcut BN at its defaults):
every pretrained tensor is loaded and only the kernel swap changes the function.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..errors import QtvitError
from ..layers.lite_mla import resize_ape  # the same resize the model applies at run time

Tensor = torch.Tensor
StateDict = dict[str, Tensor]

LAYOUTS = ("native", "official_qtvit", "mit_efficientvit", "timm")
LAYOUT_VERSION = "1"

# Wrapper keys of training checkpoints, tried in this order (EMA ones first if use_ema=True).
_PLAIN_WRAPPERS = ("state_dict", "model", "module", "net", "network")
_EMA_WRAPPERS = ("state_dict_ema", "model_ema", "ema", "ema_state_dict", "shadows")
_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile

# QT extras inside a LiteMLA, native names ...context_module.main.{ape, v_norm.*, kernel_params.*}
_NATIVE_QT = re.compile(r"\.context_module\.main\.(ape|v_norm\.\w+|kernel_params\.\w+)$")
# Learnable kernel scalars anywhere (also in the plain-ViT family's attention).
_KERNEL_PARAM = re.compile(r"(^|\.)kernel_params\.\w+$")
_OFFICIAL_QT = re.compile(r"\.context_module\.main\.(positional_encoding|bn\.\w+|ones_scale1)$")
_QT_TO_NATIVE = {"positional_encoding": "ape", "ones_scale1": "kernel_params.const", "bn": "v_norm"}
_QT_TO_OFFICIAL = {"ape": "positional_encoding", "kernel_params.const": "ones_scale1"}

# Head renames (official ↔ native), identical for B and L models.
_HEAD_TO_NATIVE = (
    ("head.op_list.0.", "head.in_conv."),
    ("head.op_list.2.linear.", "head.classifier.0."),
    ("head.op_list.2.norm.", "head.classifier.1."),
    ("head.op_list.3.linear.", "head.classifier.4."),
)

_MAX_LISTED = 20  # keys listed per category in a mismatch message


class CheckpointError(QtvitError):
    """A checkpoint cannot be read or is not a model checkpoint (the message names the file)."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint does not fit the model; ``report`` holds the full key lists."""

    def __init__(self, message: str, report: LoadReport) -> None:
        super().__init__(message)
        self.report = report


@dataclass
class LoadReport:
    """What :func:`load_checkpoint` did.

    Attributes:
        source: the checkpoint path, or ``"<state dict>"``.
        layout: the detected layout (one of :data:`LAYOUTS`).
        loaded: native keys copied into the model.
        missing: model keys the checkpoint lacks (left at their current values).
        unexpected: checkpoint keys the model does not have (ignored).
        mismatched: ``(key, checkpoint shape, model shape)`` for tensors that cannot be fitted.
        resized: ``(key, checkpoint shape, model shape)`` for position grids fitted to the model
            (APEs resized bicubically here; a ViT ``pos_embed`` by the model while loading).
        qt_init: QT keys left at their initial values because ``allow_missing_qt=True``.
    """

    source: str
    layout: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    resized: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    qt_init: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True if every model key was loaded from a checkpoint tensor of a fitting shape."""
        return not (self.missing or self.unexpected or self.mismatched or self.qt_init)

    def summary(self) -> str:
        """One line: counts per category."""
        parts = [f"{len(self.loaded)} loaded"]
        for name, items in (("missing", self.missing), ("unexpected", self.unexpected),
                            ("shape conflicts", self.mismatched), ("position grids resized", self.resized),
                            ("QT keys at init", self.qt_init)):
            if items:
                parts.append(f"{len(items)} {name}")
        return f"{self.source} (layout {self.layout}): " + ", ".join(parts)

    def details(self) -> str:
        """Multi-line listing of the problem keys (first :data:`_MAX_LISTED` per category)."""
        lines = []
        if self.missing:
            lines.append("  missing keys: " + _listing(self.missing))
        if self.unexpected:
            lines.append("  unexpected keys: " + _listing(self.unexpected))
        if self.mismatched:
            lines.append("  shape conflicts (checkpoint vs model): " + _listing(
                [f"{k} {list(a)} vs {list(b)}" for k, a, b in self.mismatched]))
        return "\n".join(lines)

    def __str__(self) -> str:
        details = self.details()
        return self.summary() + ("\n" + details if details else "")


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f" (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else "")


# --------------------------------------------------------------------------------------------
# Reading


def read_state_dict(path_or_dict: str | os.PathLike | Mapping | nn.Module, trust_pickle: bool = False,
                    *, use_ema: bool = False) -> StateDict:
    """Read a state dict from a file or unwrap one given in memory (layout unchanged).

    Args:
        path_or_dict: a ``.pt``/``.pth``/``.bin``/``.safetensors`` path (the format is sniffed
            from the content), a state dict, a training checkpoint dict with a ``state_dict`` /
            ``model`` / ``ema`` / ``model_ema`` / ``state_dict_ema`` wrapper, or an ``nn.Module``.
        trust_pickle: allow full unpickling (``torch.load(weights_only=False)``) for a trusted
            file that ``weights_only`` loading refuses. Never needed for safetensors.
        use_ema: prefer the EMA weights when a checkpoint holds both.

    Returns:
        ``{key: tensor}`` with a ``module.`` (DDP) or ``_orig_mod.`` (torch.compile) prefix removed.

    Raises:
        CheckpointError: missing, unreadable or corrupt file; a file that needs unpickling
            without ``trust_pickle``; content that is not a state dict.
    """
    return _read(path_or_dict, trust_pickle, use_ema)[0]


def _source_name(obj: object) -> str:
    return str(obj) if isinstance(obj, (str, os.PathLike)) else "<state dict>"


def _read(obj: Any, trust_pickle: bool, use_ema: bool) -> tuple[StateDict, dict[str, str]]:
    """State dict and safetensors metadata (empty for other sources)."""
    source = _source_name(obj)
    metadata: dict[str, str] = {}
    if isinstance(obj, (str, os.PathLike)):
        obj, metadata = _load_file(Path(obj), trust_pickle)
    return _unwrap(obj, source, use_ema), metadata


def _is_safetensors(path: Path) -> bool:
    """Sniff the safetensors header: u64 little-endian header length, then a JSON object."""
    with path.open("rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return int.from_bytes(head[:8], "little") <= path.stat().st_size - 8


def _load_file(path: Path, trust_pickle: bool) -> tuple[Any, dict[str, str]]:
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"checkpoint is a directory, not a file: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint is an empty file: {path}")
    if _is_safetensors(path) or path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except Exception as err:  # safetensors raises its own error types
            raise CheckpointError(f"cannot read safetensors checkpoint {path}: corrupt or "
                                  f"truncated ({_first_line(err)})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True), {}
    except Exception as err:
        needs = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if needs is None:
            # torch's weights-only message suggests weights_only=False; the useful part is the cause
            cause = re.search(r"WeightsUnpickler error:\s*([^\n]+)", str(err))
            detail = cause.group(1).strip() if cause else f"{type(err).__name__}: {_first_line(err)}"
            raise CheckpointError(f"cannot read checkpoint {path}: not a PyTorch or safetensors "
                                  f"file, or corrupt ({detail})") from None
        if not trust_pickle:
            raise CheckpointError(
                f"refusing to unpickle {path}: it holds Python objects ({needs.group(1)}) that "
                "weights-only loading does not allow; if you trust the file, pass "
                "trust_pickle=True (CLI: --trust-pickle), or convert it once to .safetensors "
                "with `qtvit convert --trust-pickle`") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False), {}
    except Exception as err:
        raise CheckpointError(f"cannot read checkpoint {path} even with trust_pickle: "
                              f"{_first_line(err)}") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0][:200]


def _unwrap(obj: Any, source: str, use_ema: bool) -> StateDict:
    wrappers = _EMA_WRAPPERS + _PLAIN_WRAPPERS if use_ema else _PLAIN_WRAPPERS + _EMA_WRAPPERS
    for _ in range(4):  # wrappers nest at most a few levels deep
        if isinstance(obj, nn.Module):
            obj = obj.state_dict()
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"not a model checkpoint: {source} holds a {type(obj).__name__}, "
                                  "not a state dict")
        if obj and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
            return _strip_prefixes(dict(obj))
        inner = next((obj[w] for w in wrappers
                      if isinstance(obj.get(w), (Mapping, nn.Module)) and obj.get(w)), None)
        if inner is None:
            break
        obj = inner
    if isinstance(obj, Mapping) and not obj:
        raise CheckpointError(f"not a model checkpoint: {source} holds an empty state dict")
    keys = ", ".join(map(str, list(obj)[:10])) if isinstance(obj, Mapping) else type(obj).__name__
    raise CheckpointError(f"not a model checkpoint: no state dict found in {source} "
                          f"(top-level keys: {keys})")


def _strip_prefixes(sd: StateDict) -> StateDict:
    for prefix in _PREFIXES:
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


# --------------------------------------------------------------------------------------------
# Layouts


def detect_layout(sd: Mapping[str, Any]) -> str:
    """Which layout ``sd`` is in: ``"native"``, ``"official_qtvit"``, ``"mit_efficientvit"`` or ``"timm"``.

    Official keys start with ``backbone.``; they are ``official_qtvit`` if any LiteMLA has the QT
    keys. A state dict in the ``stem.``/``stages.`` layout without any QT key is ``timm``
    (identical to a native EfficientViT, so both load the same way). Anything else is treated as
    ``native``: models outside the EfficientViT family have only their own layout, and strict
    loading then reports every key that does not fit.
    """
    keys = list(sd)
    if any(k.startswith("backbone.") for k in keys):
        return "official_qtvit" if any(_OFFICIAL_QT.search(k) for k in keys) else "mit_efficientvit"
    if any(_NATIVE_QT.search(k) for k in keys):
        return "native"
    if any(k.startswith("stem.in_conv.") for k in keys) and any(k.startswith("stages.") for k in keys):
        return "timm"
    return "native"


def is_qt_key(key: str) -> bool:
    """True for the QT-ViT extras of the native layout: a LiteMLA's ``ape`` and ``v_norm.*``, and
    the kernel's learnable ``kernel_params.*`` in any attention module."""
    return _NATIVE_QT.search(key) is not None or _KERNEL_PARAM.search(key) is not None


def official_to_native(sd: Mapping[str, Tensor]) -> StateDict:
    """Rename an official QT-ViT / MIT EfficientViT state dict to the native layout.

    Keys outside the known prefixes keep their names (strict loading reports them).
    """
    large = not any(k.startswith("backbone.input_stem.") for k in sd)
    out: StateDict = {}
    for key, value in sd.items():
        out[_official_key_to_native(key, large)] = value
    return out


def _official_key_to_native(key: str, large: bool) -> str:
    m = _OFFICIAL_QT.search(key)
    if m:  # positional_encoding / bn.* / ones_scale1 → ape / v_norm.* / kernel_params.const
        name = m.group(1)
        head, _, tail = name.partition(".")
        new = _QT_TO_NATIVE[head] + (f".{tail}" if tail else "")
        key = key[: m.start(1)] + new
    if large:
        m = re.match(r"backbone\.stages\.(\d+)\.op_list\.(\d+)\.(.*)$", key)
        if m:
            i, j, rest = int(m.group(1)), int(m.group(2)), m.group(3)
            if i == 0:
                return f"stem.in_conv.{rest}" if j == 0 else f"stem.res{j - 1}.{rest}"
            return f"stages.{i - 1}.blocks.{j}.{rest}"
    else:
        m = re.match(r"backbone\.input_stem\.op_list\.(\d+)\.(.*)$", key)
        if m:
            k, rest = int(m.group(1)), m.group(2)
            return f"stem.in_conv.{rest}" if k == 0 else f"stem.res{k - 1}.{rest}"
        m = re.match(r"backbone\.stages\.(\d+)\.op_list\.(\d+)\.(.*)$", key)
        if m:
            return f"stages.{m.group(1)}.blocks.{m.group(2)}.{m.group(3)}"
    for old, new in _HEAD_TO_NATIVE:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def native_to_official(sd: Mapping[str, Tensor]) -> StateDict:
    """Rename a native (or timm) state dict to the official layout (QT keys renamed back).

    B vs L is told from the stem (an L stem block is a ResBlock with ``conv1``/``conv2``).
    Kernel parameters other than ``qt``'s ``const`` have no official name and raise.
    """
    large = any(k.startswith("stem.res0.main.conv1.") for k in sd)
    out: StateDict = {}
    for key, value in sd.items():
        m = _NATIVE_QT.search(key)
        if m:
            name = m.group(1)
            if name.startswith("kernel_params.") and name != "kernel_params.const":
                raise CheckpointError(f"{key}: the official layout has no place for kernel "
                                      "parameters other than qt's const")
            if name in _QT_TO_OFFICIAL:  # ape, kernel_params.const
                key = key[: m.start(1)] + _QT_TO_OFFICIAL[name]
            else:  # v_norm.<buffer or parameter>
                key = key[: m.start(1)] + "bn." + name.split(".", 1)[1]
        out[_native_key_to_official(key, large)] = value
    return out


def _native_key_to_official(key: str, large: bool) -> str:
    stem_stage = "backbone.stages.0" if large else "backbone.input_stem"
    if key.startswith("stem.in_conv."):
        return f"{stem_stage}.op_list.0." + key[len("stem.in_conv."):]
    m = re.match(r"stem\.res(\d+)\.(.*)$", key)
    if m:
        return f"{stem_stage}.op_list.{int(m.group(1)) + 1}.{m.group(2)}"
    m = re.match(r"stages\.(\d+)\.blocks\.(\d+)\.(.*)$", key)
    if m:
        return f"backbone.stages.{int(m.group(1)) + int(large)}.op_list.{m.group(2)}.{m.group(3)}"
    for old, new in _HEAD_TO_NATIVE:
        if key.startswith(new):
            return old + key[len(new):]
    return key


def native_to_timm(sd: Mapping[str, Tensor], drop_qt: bool = False) -> StateDict:
    """The timm ``efficientvit_*`` state dict of a native one (same names, no QT keys).

    Raises unless ``drop_qt=True`` when ``sd`` has QT keys, which timm's model cannot hold.
    """
    qt = [k for k in sd if is_qt_key(k)]
    if qt and not drop_qt:
        raise CheckpointError(f"timm's efficientvit has no QT-ViT keys ({len(qt)}, e.g. {qt[0]}); "
                              "pass drop_qt=True to drop them")
    return {k: v for k, v in sd.items() if not is_qt_key(k)}


def convert_state_dict(sd: Mapping[str, Tensor], model: nn.Module | None = None,
                       layout: str | None = None) -> StateDict:
    """Convert a state dict in any supported layout to the native layout.

    Args:
        sd: a plain state dict (use :func:`read_state_dict` for files and wrappers).
        model: if given, APEs whose grid differs from the model's are resized bicubically
            (e.g. a checkpoint trained at 256 px into a 224-px model); other shape conflicts are
            left for :func:`load_checkpoint` to report.
        layout: skip detection (one of :data:`LAYOUTS`).
    """
    layout = layout or detect_layout(sd)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; valid: {', '.join(LAYOUTS)}")
    out = official_to_native(sd) if layout in ("official_qtvit", "mit_efficientvit") else dict(sd)
    if model is not None:
        target = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        out = {k: _fit_tensor(k, v, target[k])[0] if k in target else v for k, v in out.items()}
    return out


def _fit_tensor(key: str, value: Tensor, shape: tuple[int, ...]) -> tuple[Tensor, str]:
    """``(tensor, status)`` with status "ok", "resized" or "mismatch"."""
    if tuple(value.shape) == shape:
        return value, "ok"
    if key.endswith(".ape") and value.dim() == 4 and len(shape) == 4 and value.shape[:2] == shape[:2]:
        return resize_ape(value, shape[2:]), "resized"
    if _KERNEL_PARAM.search(key) and value.numel() == 1 and _numel(shape) == 1:
        return value.reshape(shape), "ok"  # a scalar saved as (1,) or ()
    if (key.endswith("pos_embed") and value.dim() == 3 and len(shape) == 3
            and value.shape[0] == shape[0] and value.shape[2] == shape[2]):
        return value, "resized"  # a ViT position grid: the model resizes it while loading
    return value, "mismatch"


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _fit(sd: Mapping[str, Tensor], target: Mapping[str, tuple[int, ...]], report: LoadReport,
         allow_missing_qt: bool) -> StateDict:
    """Match ``sd`` against the model's ``target`` shapes, filling ``report``; returns what fits."""
    fitted: StateDict = {}
    for key, value in sd.items():
        if key not in target:
            report.unexpected.append(key)
            continue
        tensor, status = _fit_tensor(key, value, target[key])
        if status == "mismatch":
            report.mismatched.append((key, tuple(value.shape), target[key]))
            continue
        if status == "resized":
            report.resized.append((key, tuple(value.shape), target[key]))
        fitted[key] = tensor
        report.loaded.append(key)
    for key in target:
        # BatchNorm fills a missing num_batches_tracked itself; it never changes eval outputs
        if key in sd or key.endswith(".num_batches_tracked"):
            continue
        (report.qt_init if allow_missing_qt and is_qt_key(key) else report.missing).append(key)
    return fitted


# --------------------------------------------------------------------------------------------
# Loading


def load_checkpoint(model: nn.Module, checkpoint: str | os.PathLike | Mapping, strict: bool = True,
                    trust_pickle: bool = False, *, allow_missing_qt: bool = False,
                    use_ema: bool = False) -> LoadReport:
    """Load a checkpoint in any supported layout into ``model``.

    Args:
        model: the model to fill (in place).
        checkpoint: a path or state dict, see :func:`read_state_dict`.
        strict: if True (default), any missing/unexpected key or shape conflict raises one
            :class:`CheckpointMismatchError` listing them, and the model is left untouched. If
            False, every tensor that fits is loaded, the rest is listed in the returned report
            and a warning summarises it.
        trust_pickle: allow full unpickling of a trusted file (see :func:`read_state_dict`).
        allow_missing_qt: with ``strict=True``, accept a checkpoint without the QT-ViT keys
            (an EfficientViT checkpoint) and keep them at their initial values: APE zero,
            ``const`` 1, shortcut BN at its defaults. The way to fine-tune QT-ViT from
            EfficientViT weights.
        use_ema: prefer EMA weights when the checkpoint holds both.

    Returns:
        a :class:`LoadReport`. APEs trained at another resolution are resized bicubically to
        the model's grid and listed in ``report.resized``.
    """
    source = _source_name(checkpoint)
    raw, metadata = _read(checkpoint, trust_pickle, use_ema)
    layout = detect_layout(raw)
    sd = convert_state_dict(raw, layout=layout)
    report = LoadReport(source=source, layout=layout)
    target = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    fitted = _fit(sd, target, report, allow_missing_qt)
    problems = report.missing or report.unexpected or report.mismatched
    if problems and strict:
        raise CheckpointMismatchError(_mismatch_message(model_name_of(model), sd, report, metadata),
                                      report)
    result = model.load_state_dict(fitted, strict=False)
    skipped = set(report.missing) | set(report.qt_init) | {k for k, _, _ in report.mismatched}
    leftover = [k for k in result.missing_keys if k not in skipped and not k.endswith(".num_batches_tracked")]
    if leftover or result.unexpected_keys:  # cannot happen unless the model's state dict lies
        raise CheckpointError(f"{source}: load_state_dict disagreed with the key check "
                              f"(missing {leftover[:5]}, unexpected {result.unexpected_keys[:5]})")
    if problems:
        warnings.warn(f"partial checkpoint load: {report.summary()}", stacklevel=2)
    return report


def _mismatch_message(model_name: str | None, sd: StateDict, report: LoadReport,
                      metadata: Mapping[str, str]) -> str:
    ckpt_name = metadata.get("qtvit_model") or infer_model_name(sd)
    if ckpt_name and model_name and ckpt_name != model_name:
        head = (f"checkpoint {report.source} holds {ckpt_name} weights but the model is "
                f"{model_name} (layout {report.layout})")
    else:
        head = f"checkpoint {report.source} (layout {report.layout}) does not fit the model" + (
            f" {model_name}" if model_name else "")
    counts = (f"{len(report.missing)} missing, {len(report.unexpected)} unexpected, "
              f"{len(report.mismatched)} shape conflicts")
    hints = []
    if report.missing and all(is_qt_key(k) for k in report.missing) and not report.unexpected:
        hints.append("the checkpoint has no QT-ViT keys (an EfficientViT checkpoint?): pass "
                     "allow_missing_qt=True to keep them at their initial values (APE 0, const 1, "
                     "BN defaults) and fine-tune, or build the model with kernel='relu', "
                     "ape=False, shortcut=False for plain EfficientViT")
    if report.unexpected and all(is_qt_key(k) for k in report.unexpected) and not report.missing:
        hints.append("the checkpoint has QT-ViT keys the model lacks: build it with the QT "
                     "defaults (kernel='qt', ape=True, shortcut=True)")
    head_only = report.mismatched and all(".classifier." in k or k.startswith(("head.fc.", "fc."))
                                          for k, _, _ in report.mismatched)
    if head_only and not report.missing and not report.unexpected:
        hints.append("only the classifier differs (another number of classes): pass "
                     "strict=False to load everything else and keep the new classifier")
    lines = [f"{head}: {counts}", report.details()] + [f"  hint: {h}" for h in hints]
    return "\n".join(line for line in lines if line)


# --------------------------------------------------------------------------------------------
# Telling models apart by their shapes


def model_name_of(model: nn.Module) -> str | None:
    """The registered name of ``model``: its ``pretrained_cfg['architecture']`` or ``model_name``
    attribute if set, else inferred from its state dict's shapes (None if no model matches)."""
    name = getattr(model, "model_name", None)
    if isinstance(name, str):
        return name
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, Mapping) and isinstance(cfg.get("architecture"), str):
        from .registry import resolve_model_name

        try:
            return resolve_model_name(cfg["architecture"])
        except ValueError:
            pass
    return infer_model_name({k: v for k, v in model.state_dict().items()})


@cache
def _signature(name: str) -> tuple[dict[str, tuple[int, ...]], frozenset[str]] | None:
    """Shapes of a registered model's state dict (built on the meta device) and its classifier keys."""
    from .registry import _BUILDERS

    def shapes(num_classes: int) -> dict[str, tuple[int, ...]]:
        with torch.device("meta"):
            model = _BUILDERS[name](num_classes=num_classes)
        return {k: tuple(v.shape) for k, v in model.state_dict().items()}

    try:
        a, b = shapes(1000), shapes(7)
    except Exception:  # a builder that cannot run on meta: not inferable, never fatal
        return None
    classifier = frozenset(k for k in a if a[k] != b.get(k))
    return a, classifier


def _comparable(shapes: Mapping[str, tuple[int, ...]], skip: frozenset[str]) -> dict[str, tuple[int, ...]]:
    return {k: s for k, s in shapes.items() if k not in skip and not is_qt_key(k)
            and not k.endswith(".num_batches_tracked")}


def infer_model_name(sd: Mapping[str, Tensor], layout: str | None = None) -> str | None:
    """The registered model whose shapes match ``sd`` (any layout), or None.

    Compared: every key and shape except the QT extras (kernel/resolution dependent) and the
    classifier (number of classes), so widths and depths decide.
    """
    from .registry import list_models

    sd = convert_state_dict(sd, layout=layout)
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    # Classifiers only: the checkpoint layouts qtvit converts are classification ones, and building
    # every detector/segmenter (even on the meta device) to compare would cost seconds per call.
    for name in list_models(task="classification"):
        sig = _signature(name)
        if sig is None:
            continue
        ref, classifier = sig
        if _comparable(shapes, classifier) == _comparable(ref, classifier):
            return name
    return None


def infer_model_kwargs(sd: Mapping[str, Tensor]) -> dict[str, Any]:
    """Builder kwargs read off a native state dict: ``num_classes`` and, where they show in the
    keys, ``kernel``, ``ape``, ``shortcut``.

    ``kernel`` is the registered kernel whose learnable parameters are exactly the checkpoint's
    ``kernel_params``; with none, an EfficientViT state dict gets ``relu`` (parameter-free kernels
    share one layout) and other families leave the kernel unset.
    """
    from ..kernels import get_kernel, list_kernels

    keys = list(sd)
    params = {k.rsplit(".", 1)[1] for k in keys if _KERNEL_PARAM.search(k)}
    kwargs: dict[str, Any] = {}
    if params:
        kernel = next((n for n in list_kernels() if set(get_kernel(n).learnable) == params), None)
        if kernel is None:
            raise CheckpointError(f"no registered kernel has exactly the learnable parameters "
                                  f"{sorted(params)}")
        kwargs["kernel"] = kernel
    if "stem.in_conv.conv.weight" in sd:  # EfficientViT / QT-ViT family
        kwargs.setdefault("kernel", "relu")
        kwargs["ape"] = any(k.endswith(".context_module.main.ape") for k in keys)
        kwargs["shortcut"] = any(".context_module.main.v_norm." in k for k in keys)
        if "head.classifier.4.weight" in sd:
            kwargs["num_classes"] = int(sd["head.classifier.4.weight"].shape[0])
    return kwargs


@dataclass
class ConvertResult:
    """What :func:`convert_checkpoint` wrote: the model name, builder kwargs and the key check."""

    path: Path
    model: str
    model_kwargs: dict[str, Any]
    report: LoadReport


def convert_checkpoint(src: str | os.PathLike | Mapping, dst: str | os.PathLike, model: str | None = None,
                       *, trust_pickle: bool = False, use_ema: bool = False) -> ConvertResult:
    """Convert a checkpoint in any supported layout to a native ``.safetensors`` file.

    The tensors are checked strictly against the model (built on the meta device, so no memory
    is spent on weights) and written with metadata ``qtvit_model``,
    ``qtvit_model_kwargs`` and ``source_layout``. APEs keep their trained grid (loading resizes
    them); nothing else is changed.

    Args:
        src: path or state dict (see :func:`read_state_dict`).
        dst: destination ``.safetensors`` path (written atomically).
        model: registered name or alias; inferred from the checkpoint's widths and depths when
            omitted (a clear error if no registered model matches).
        trust_pickle, use_ema: see :func:`read_state_dict`.
    """
    from .registry import _BUILDERS, list_models, resolve_model_name

    dst = Path(dst)
    if dst.suffix != ".safetensors":
        raise CheckpointError(f"{dst}: the converted checkpoint must be a .safetensors file")
    raw, metadata = _read(src, trust_pickle, use_ema)
    layout = detect_layout(raw)
    sd = convert_state_dict(raw, layout=layout)
    source = _source_name(src)
    if model is not None:
        name = resolve_model_name(model)
    else:
        name = metadata.get("qtvit_model")
        name = resolve_model_name(name) if name in list_models(include_aliases=True) else infer_model_name(sd)
        if name is None:
            raise CheckpointError(f"cannot tell which model {source} belongs to from its shapes; pass "
                                  f"--model NAME (one of {', '.join(list_models())})")
    kwargs = infer_model_kwargs(sd)
    signature = _signature(name)
    if "num_classes" not in kwargs and signature is not None:  # other families: read the classifier
        rows = {sd[k].shape[0] for k in signature[1] if k in sd and sd[k].dim() >= 1}
        if len(rows) == 1:
            kwargs["num_classes"] = int(rows.pop())
    build = {"kernel": "relu", **kwargs}  # a parameter-free kernel when the keys show none
    try:
        with torch.device("meta"):
            reference = _BUILDERS[name](**build)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"cannot build {name} with {build} read off {source}: {_first_line(err)}"
                              ) from None
    target = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    report = LoadReport(source=source, layout=layout)
    _fit(sd, target, report, allow_missing_qt=False)
    if report.missing or report.unexpected or report.mismatched:
        raise CheckpointMismatchError(_mismatch_message(name, sd, report, metadata), report)
    ordered = {k: sd[k] for k in target if k in sd}
    save_state_dict(ordered, dst, model_name=name, metadata={
        "qtvit_model_kwargs": json.dumps(kwargs, sort_keys=True), "source_layout": layout})
    return ConvertResult(path=dst, model=name, model_kwargs=kwargs, report=report)


# --------------------------------------------------------------------------------------------
# Saving


def save_state_dict(model_or_sd: nn.Module | Mapping[str, Tensor], path: str | os.PathLike, *,
                    model_name: str | None = None, metadata: Mapping[str, str] | None = None) -> Path:
    """Write a native state dict to ``path`` (.safetensors) atomically: temp file, then rename.

    Args:
        model_or_sd: a model (its ``state_dict()``) or a state dict (written as given).
        path: destination; must end in ``.safetensors``. Parent folders are created.
        model_name: recorded as metadata ``qtvit_model`` (inferred for a model when omitted).
        metadata: extra string metadata.

    Metadata always holds ``format=pt``, ``qtvit_layout=native`` and ``qtvit_layout_version``.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: checkpoints are written as .safetensors; use that suffix")
    if isinstance(model_or_sd, nn.Module):
        if model_name is None:
            model_name = model_name_of(model_or_sd)
        sd = model_or_sd.state_dict()
    else:
        sd = dict(model_or_sd)
    # safetensors refuses shared or non-contiguous storage: give every tensor its own copy
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}
    meta = {"format": "pt", "qtvit_layout": "native", "qtvit_layout_version": LAYOUT_VERSION}
    if model_name:
        meta["qtvit_model"] = model_name
    meta.update({str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a ``.safetensors`` file (empty for other formats)."""
    path = Path(path)
    if not path.is_file() or not _is_safetensors(path):
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        return dict(f.metadata() or {})
