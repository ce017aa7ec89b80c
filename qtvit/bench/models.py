"""``qtvit bench models``: whole-model speed and memory, each QT model beside its twins.

For every requested model (e.g. ``qtvit_1``) four *variants* are built and always measured
side by side, interleaved in the same process (:func:`qtvit.bench.timing.time_interleaved`):
  * ``qt``: the model as registered (QT-ViT: ``qt`` kernel, APE, GELU(BN(v)) shortcut);
  * ``relu``: the same model as EfficientViT (``kernel="relu", ape=False, shortcut=False``);
    for the plain-ViT family just ``kernel="relu"``;
  * ``softmax``: the same model with ``kernel="softmax"`` (everything else as ``qt``);
  * ``timm``: timm's model of that size (``efficientvit_b1`` …, DeiT for the ViT family),
    random weights.
Per resolution it measures params, MACs (:func:`qtvit.models.macs.count_macs` on the meta
device), batch-1 latency, batch-N latency and throughput, the peak memory of each call, and
with ``train_step`` the time of one training step (forward + backward + AdamW step, batch N,
train mode; non-fp32 dtypes train under autocast with fp32 weights). ``sweep`` adds a batch-1
resolution sweep (224 → 2048, square and 1024×2048) of latency and peak memory.

Protocols: timing and peak memory as in :mod:`qtvit.bench.timing` (CUDA: allocated bytes above
the start; CPU: the rise of peak RSS during one call, so weights and inputs are excluded and
activations and workspaces counted), allocator settings as in :mod:`qtvit.bench.env`.

Nothing is run that is predicted to be too slow or too big. Per variant, the time and peak
memory per image measured so far are fitted as a·P + b·P² in the pixel count P (two largest
sizes; one size: ∝P, or ∝P² for softmax) and extrapolated; a config is skipped, with the code
and reason recorded, when the prediction exceeds ``max_call_seconds`` (``time``), a fraction
``memory_fraction`` of the memory available now (``memory``), or the remaining run budget
(``budget``); a variant that failed is not retried at larger sizes (``failed``). When a
requested size is more than 4× the pixels measured so far, single probe calls at 224, 448, …
pixels come first, so the fit never extrapolates far. Skipped entries carry the prediction.

The result (also the JSON file) is a dict: ``env``, ``config``, ``models`` (variants, params,
MACs), ``results`` (main table), ``sweep``, ``ratios`` (the issue's targets from this run),
``elapsed_seconds`` and ``complete``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import QtvitError
from ..models import create_model, get_model_card, resolve_model_name
from . import env as bench_env
from .attention import write_json
from .timing import (
    VARIANT_ERRORS,
    MiB,
    PeakMemoryMeter,
    fmt_mb,
    fmt_ms,
    make_peak_meter,
    time_interleaved,
)

SCHEMA_VERSION = 1
Size = tuple[int, int]  # (H, W)
VARIANT_KEYS = ("qt", "relu", "softmax", "timm")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# 224 → 2048 square, plus Cityscapes-like 1024×2048 (H×W), in increasing pixel count.
SWEEP_SIZES: tuple[Size, ...] = ((224, 224), (384, 384), (512, 512), (768, 768), (1024, 1024),
                                 (1024, 2048), (1536, 1536), (2048, 2048))
RATIO_MODEL = "qtvit_b1"  # the issue states its targets for QT-ViT-1
# Training steps use a negligible learning rate: the arithmetic of an AdamW step is the same,
# but random-init weights do not drift into NaN/denormal ranges that would change the timing.
TRAIN_LR = 1e-8
# Single-size extrapolation exponents (pixels): O(P) for convs and linear attention, O(P²) softmax.
PROBE_START = 224

Echo = Callable[[str], None]


# ----------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class ModelBenchConfig:
    """Settings of one ``qtvit bench models`` run (the CLI flags map onto these fields)."""

    models: tuple[str, ...] = ("qtvit_b1",)
    resolutions: tuple[Size, ...] = ((224, 224),)
    batch_size: int = 32
    variants: tuple[str, ...] = VARIANT_KEYS
    dtype: str = "float32"
    device: str = "cpu"
    channels_last: bool = False
    compile: bool = False
    warmup: int = 2
    repeats: int = 10
    # a variant whose `repeats` samples would take longer than `variant_seconds` gets fewer
    # samples, never fewer than `min_repeats`
    min_repeats: int = 3
    variant_seconds: float = 6.0
    # fast calls are looped until one sample lasts this long (timer noise ≪ sample)
    min_sample_seconds: float = 0.05
    train_step: bool = False
    train_repeats: int = 5
    train_variant_seconds: float = 20.0
    sweep: bool = False
    sweep_sizes: tuple[Size, ...] = SWEEP_SIZES
    sweep_repeats: int = 3
    sweep_min_repeats: int = 2
    sweep_variant_seconds: float = 8.0
    sweep_max_seconds: float = 540.0  # the default sweep fits in ~10 minutes on a 2-core CPU
    max_call_seconds: float = 45.0
    max_seconds: float = 1200.0  # the main table (all models, resolutions, modes)
    memory_fraction: float = 0.5  # of the memory available at the time (the machine may be shared)
    measure_memory: bool = True
    count_macs: bool = True  # MACs per variant and size (FlopCounterMode on the meta device, ~1 s each)
    ratio_size: Size = (224, 224)
    ratio_sweep_size: Size = (2048, 2048)
    seed: int = 0
    progress: bool = True
    system_malloc: bool = False  # recorded in the header (the CLI re-runs itself otherwise)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad setting (unknown models included)."""
        if not self.models:
            raise ValueError("models: give at least one model name")
        if not self.variants:
            raise ValueError(f"variants: give at least one of {', '.join(VARIANT_KEYS)}")
        for name in self.models:
            if not model_variants(name, self.variants):  # raises for unknown models / variants
                raise ValueError(f"model {name!r} has none of the variants {', '.join(self.variants)}")
        for name in ("resolutions", "sweep_sizes"):
            sizes = getattr(self, name)
            if not sizes and (name == "resolutions" or self.sweep):
                raise ValueError(f"{name}: give at least one size")
            for s in sizes:
                if len(s) != 2 or any(not isinstance(v, int) or v < 32 for v in s):
                    raise ValueError(f"{name}: sizes must be (H, W) integers ≥ 32, got {s!r}")
        for name in ("batch_size", "repeats", "min_repeats", "train_repeats", "sweep_repeats",
                     "sweep_min_repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be ≥ 0, got {self.warmup}")
        for name in ("variant_seconds", "min_sample_seconds", "train_variant_seconds",
                     "sweep_variant_seconds", "sweep_max_seconds", "max_call_seconds", "max_seconds"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 < self.memory_fraction <= 1:
            raise ValueError(f"memory_fraction must be in (0, 1], got {self.memory_fraction}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} not supported; choose from {', '.join(DTYPES)}")
        device = parse_device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r}: CUDA is not available in this torch build/machine")


# `--quick`: a smoke test finishing in well under a minute that still fills every table and ratio.
QUICK = ModelBenchConfig(resolutions=((64, 64),), batch_size=4, warmup=1, repeats=3, min_repeats=2,
                         variant_seconds=0.3, min_sample_seconds=0.01, train_step=True, train_repeats=2,
                         train_variant_seconds=1.0, sweep_sizes=((64, 64), (96, 96), (128, 128)),
                         sweep_repeats=2, sweep_variant_seconds=0.5, sweep_max_seconds=60.0,
                         max_seconds=120.0, ratio_size=(64, 64), ratio_sweep_size=(128, 128))


def parse_device(text: str) -> torch.device:
    """``torch.device(text)`` limited to cpu and cuda, with a one-line error otherwise."""
    try:
        device = torch.device(text)
    except RuntimeError as err:
        raise ValueError(f"device {text!r} not understood ({err})") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {text!r}: only cpu and cuda are supported")
    return device


# ---------------------------------------------------------------------------------- variants


@dataclass(frozen=True)
class VariantSpec:
    """One model to build and measure: a variant (``qt``/``relu``/``softmax``/``timm``) of a model."""

    model: str  # canonical qtvit name of the row group, e.g. "qtvit_b1"
    key: str  # one of VARIANT_KEYS
    label: str  # for tables and plots
    source: str  # "qtvit" or "timm"
    arch: str  # the name the builder takes
    kwargs: dict = field(default_factory=dict)
    quadratic: bool = False  # softmax attention: cost grows with the square of the token count

    def build(self) -> nn.Module:
        """A freshly initialised model (random weights, eval mode, float32, CPU)."""
        if self.source == "timm":
            timm = import_timm(f"the {self.key!r} variant ({self.arch})")
            return timm.create_model(self.arch, pretrained=False, **self.kwargs).eval()
        return create_model(self.arch, **self.kwargs).eval()


def import_timm(purpose: str):
    """``import timm`` with a one-line error saying what needed it."""
    try:
        import timm
    except ImportError:
        raise ImportError(f"{purpose} needs timm: pip install timm (or qtvit[train])") from None
    return timm


# timm twins of the plain-ViT family (DeiT = timm's ViT at these widths); micro has none.
_VIT_TIMM = {"qtvit_vit_tiny": "deit_tiny_patch16_224", "qtvit_vit_small": "deit_small_patch16_224",
             "qtvit_vit_base": "deit_base_patch16_224"}


def model_variants(name: str, keys: Sequence[str] = VARIANT_KEYS) -> list[VariantSpec]:
    """The variants of model ``name`` (a registered name or alias such as ``qtvit_1``) to measure.

    Raises ``ValueError`` for unknown models (listing the valid ones), unknown variant keys, and
    models of a family without twins. Variants a model lacks (no timm twin) are left out.
    """
    bad = [k for k in keys if k not in VARIANT_KEYS]
    if bad:
        raise ValueError(f"unknown variant(s) {', '.join(bad)}; valid: {', '.join(VARIANT_KEYS)}")
    canonical = resolve_model_name(name)  # unknown names raise, listing the valid ones
    from ..models import efficientvit

    size = canonical.removeprefix("qtvit_")
    if size in efficientvit.CONFIGS:
        paper = get_model_card(canonical).paper_name or f"QT-ViT-{size.upper()}"
        table = {
            "qt": VariantSpec(canonical, "qt", f"{paper} (qt)", "qtvit", canonical),
            "relu": VariantSpec(canonical, "relu", f"EfficientViT-{size.upper()} (ours, relu)", "qtvit",
                                canonical, {"kernel": "relu", "ape": False, "shortcut": False}),
            "softmax": VariantSpec(canonical, "softmax", f"{paper} with softmax", "qtvit", canonical,
                                   {"kernel": "softmax"}, quadratic=True),
            "timm": VariantSpec(canonical, "timm", f"timm efficientvit_{size}", "timm",
                                f"efficientvit_{size}"),
        }
    elif canonical.startswith("qtvit_vit_"):
        table = {
            "qt": VariantSpec(canonical, "qt", f"{canonical} (qt)", "qtvit", canonical),
            "relu": VariantSpec(canonical, "relu", f"{canonical} (relu)", "qtvit", canonical,
                                {"kernel": "relu"}),
            "softmax": VariantSpec(canonical, "softmax", f"{canonical} (softmax)", "qtvit", canonical,
                                   {"kernel": "softmax"}, quadratic=True),
        }
        if canonical in _VIT_TIMM:
            table["timm"] = VariantSpec(canonical, "timm", f"timm {_VIT_TIMM[canonical]}", "timm",
                                        _VIT_TIMM[canonical], {"dynamic_img_size": True}, quadratic=True)
    else:
        raise ValueError(f"model {name!r} has no benchmark twins; use an EfficientViT/QT-ViT size "
                         "(qtvit_b0..qtvit_l3, qtvit_1..6) or a qtvit_vit_* model")
    return [table[k] for k in keys if k in table]


# ------------------------------------------------------------------------------- prediction


def fit_predict(points: Sequence[tuple[float, float]], pixels: float, quadratic: bool) -> float | None:
    """Extrapolate a per-image cost measured at ``points`` = [(pixels, value)] to ``pixels``.

    Two or more sizes: value = a·P + b·P² through the two largest (a, b ≥ 0; a negative
    coefficient is dropped and the other refitted to the largest point). One size: ∝ P, or ∝ P²
    when ``quadratic``. None without points.
    """
    best: dict[float, float] = {}
    for p, v in points:
        if v is not None and p > 0:
            best[p] = max(v, best.get(p, 0.0))  # the worse of repeated measurements
    if not best:
        return None
    sizes = sorted(best)
    if len(sizes) == 1:
        p, v = sizes[0], best[sizes[0]]
        return v * (pixels / p) ** (2 if quadratic else 1)
    p1, p2 = sizes[-2], sizes[-1]
    v1, v2 = best[p1], best[p2]
    b = (v2 / p2 - v1 / p1) / (p2 - p1)
    a = v1 / p1 - b * p1
    if b < 0:
        a, b = v2 / p2, 0.0
    elif a < 0:
        a, b = 0.0, v2 / (p2 * p2)
    return max(0.0, a * pixels + b * pixels * pixels)


@dataclass
class _History:
    """Per (variant, mode): [(pixels, batch, seconds per image, peak bytes per image)] measured so far.

    Predictions use the points measured at the batch size asked for, else at the largest batch
    measured (per-image cost falls with the batch, so batch 1 would over-predict batch 32).
    """

    points: dict[tuple[str, str], list[tuple[int, int, float | None, float | None]]] = field(
        default_factory=dict)
    failed: dict[tuple[str, str], str] = field(default_factory=dict)

    def add(self, key: str, mode: str, pixels: int, batch: int, seconds: float | None,
            peak: float | None) -> None:
        self.points.setdefault((key, mode), []).append(
            (pixels, batch, None if seconds is None else seconds / batch,
             None if peak is None else peak / batch))

    def max_pixels(self, key: str, mode: str = "forward") -> int:
        return max((p for p, _, _, _ in self.points.get((key, mode), [])), default=0)

    def predict(self, key: str, mode: str, pixels: int, batch: int, quadratic: bool
                ) -> tuple[float | None, float | None]:
        pts = self.points.get((key, mode), [])
        if not pts:
            return None, None
        batches = {b for _, b, _, _ in pts}
        use = batch if batch in batches else max(batches)
        pts = [x for x in pts if x[1] == use]
        s = fit_predict([(p, t) for p, _, t, _ in pts if t is not None], pixels, quadratic)
        m = fit_predict([(p, b) for p, _, _, b in pts if b is not None], pixels, quadratic)
        return (None if s is None else s * batch, None if m is None else m * batch)


# ----------------------------------------------------------------------------------- running


def _pixels(size: Size) -> int:
    return size[0] * size[1]


def _log(config: ModelBenchConfig, text: str) -> None:
    if config.progress:
        print(f"[bench models] {text}", file=sys.stderr, flush=True)


def _error_text(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text[:300]}"


_TIMING_METHOD = ("interleaved rounds (rotated order) after warm-up; fast calls looped to "
                  "min_sample_seconds per sample; wall clock, CUDA synchronised; ms per call")


class _ModelBench:
    """Builds one model's variants and measures them (main table and sweep)."""

    def __init__(self, config: ModelBenchConfig, specs: list[VariantSpec], device: torch.device,
                 meter: PeakMemoryMeter) -> None:
        self.config, self.specs, self.device, self.meter = config, specs, device, meter
        self.dtype = DTYPES[config.dtype]
        self.history = _History()
        self.models: dict[str, nn.Module] = {}
        self.build_errors: dict[str, str] = {}
        self.params: dict[str, int] = {}
        self.weight_bytes: dict[str, int] = {}
        self._meta: dict[str, nn.Module | None] = {}
        self._macs: dict[tuple[str, Size], float | None] = {}
        for spec in specs:
            torch.manual_seed(config.seed)
            try:
                model = spec.build()
            except (*VARIANT_ERRORS, ImportError) as err:
                self.build_errors[spec.key] = _error_text(err)
                continue
            self.params[spec.key] = sum(p.numel() for p in model.parameters())
            self.weight_bytes[spec.key] = sum(p.numel() * 4 for p in model.parameters())
            self.models[spec.key] = self._prepare(model, self.dtype)

    def _prepare(self, model: nn.Module, dtype: torch.dtype | None) -> nn.Module:
        model = model.to(self.device)
        if dtype is not None:
            model = model.to(dtype)
        if self.config.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if self.config.compile:
            model = torch.compile(model)
        return model

    def describe(self) -> dict:
        """The model's variants with params (and build errors)."""
        return {"model": self.specs[0].model,
                "variants": [{"variant": s.key, "label": s.label, "source": s.source, "arch": s.arch,
                              "kwargs": s.kwargs, "params": self.params.get(s.key),
                              "error": self.build_errors.get(s.key)} for s in self.specs]}

    def macs(self, spec: VariantSpec, size: Size) -> float | None:
        """MACs of one image at ``size`` in G (meta-device forward; None if it cannot be counted)."""
        key = (spec.key, size)
        if not self.config.count_macs:
            return None
        if key not in self._macs:
            from ..models.macs import count_macs

            try:
                if spec.key not in self._meta:
                    with torch.device("meta"):
                        self._meta[spec.key] = spec.build()
                meta = self._meta[spec.key]
                self._macs[key] = count_macs(meta, (1, 3, *size)) / 1e9 if meta is not None else None
            except Exception:  # noqa: BLE001 - MACs are informative only; any failure → unknown
                self._meta.setdefault(spec.key, None)
                self._macs[key] = None
        return self._macs[key]

    # -------------------------------------------------------------- entries
    def _base(self, spec: VariantSpec, size: Size, mode: str, batch: int) -> dict:
        return {"model": spec.model, "variant": spec.key, "label": spec.label, "source": spec.source,
                "arch": spec.arch, "mode": mode, "batch": batch, "resolution": list(size),
                "params": self.params.get(spec.key), "macs_g": self.macs(spec, size),
                "status": "skipped", "skip": None, "reason": None,
                "predicted_ms": None, "predicted_peak_mb": None}

    def _skip_reason(self, spec: VariantSpec, size: Size, mode: str, batch: int, deadline: float,
                     n_calls: int, extra_bytes: int = 0
                     ) -> tuple[str, str, float | None, float | None] | None:
        """(code, reason, predicted seconds, predicted bytes), or None to run."""
        pixels = _pixels(size)
        if spec.key in self.build_errors:
            return "failed", f"could not be built: {self.build_errors[spec.key]}", None, None
        failed = self.history.failed.get((spec.key, mode)) or self.history.failed.get((spec.key, "forward"))
        if failed:
            return "failed", failed, None, None
        seconds, peak = self.history.predict(spec.key, mode, pixels, batch, spec.quadratic)
        if mode == "train" and seconds is None:  # no train history yet: from the forward pass
            fwd_s, fwd_b = self.history.predict(spec.key, "forward", pixels, batch, spec.quadratic)
            seconds = None if fwd_s is None else 3 * fwd_s  # backward ≈ 2× forward
            peak = None if fwd_b is None else 3 * fwd_b  # saved activations ≫ a forward's transient peak
        where = f"{size[0]}×{size[1]}, batch {batch}"
        if seconds is not None and seconds > self.config.max_call_seconds:
            return ("time", f"predicted {seconds:.3g} s per call > max_call_seconds "
                    f"{self.config.max_call_seconds:g} ({where})", seconds, peak)
        remaining = deadline - time.perf_counter()
        if remaining <= 0 or (seconds is not None and seconds * n_calls > remaining):
            return "budget", f"run budget exhausted ({max(0.0, remaining):.0f} s left)", seconds, peak
        available = bench_env.available_memory_bytes(self.device)
        limit = None if available is None else self.config.memory_fraction * available
        if peak is not None and limit is not None and peak + extra_bytes > limit:
            return ("memory", f"predicted peak {(peak + extra_bytes) / MiB:.0f} MiB > "
                    f"{self.config.memory_fraction:.0%} of available {available / MiB:.0f} MiB ({where})",
                    seconds, peak)
        return None

    def _input(self, size: Size, batch: int, dtype: torch.dtype) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.config.seed + size[0] * 7 + size[1] + batch)
        x = torch.randn(batch, 3, *size, generator=generator).to(self.device, dtype)
        if self.config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _forward_fn(self, model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
        def call() -> torch.Tensor:
            with torch.inference_mode():
                return model(x)
        return call

    def _probe(self, spec: VariantSpec, target_pixels: int, deadline: float) -> None:
        """Single calls at 224, 448, … until the measured sizes reach a quarter of the target's pixels."""
        model = self.models.get(spec.key)
        while model is not None:
            have = self.history.max_pixels(spec.key)
            if have * 4 >= target_pixels:
                return
            side = PROBE_START if have == 0 else int(math.isqrt(have) * 2) // 32 * 32
            size = (side, side)
            if _pixels(size) >= target_pixels or self._skip_reason(spec, size, "forward", 1, deadline, 1):
                return
            _log(self.config, f"{spec.model}/{spec.key}: probe at {side}×{side}")
            fn = self._forward_fn(model, self._input(size, 1, self.dtype))
            try:
                start = time.perf_counter()
                peak = self.meter.measure(fn)
                seconds = time.perf_counter() - start
            except VARIANT_ERRORS as err:
                self.history.failed[(spec.key, "forward")] = f"failed at {side}×{side}: {_error_text(err)}"
                return
            self.history.add(spec.key, "forward", _pixels(size), 1, seconds, peak)

    def run_main(self, deadline: float) -> list[dict]:
        """The main table: each resolution, batch 1 and batch N forward, and training steps."""
        cfg = self.config
        phases = [("forward", 1)]
        if cfg.batch_size > 1:
            phases.append(("forward", cfg.batch_size))
        if cfg.train_step:
            phases.append(("train", cfg.batch_size))
        entries: list[dict] = []
        for size in sorted(cfg.resolutions, key=_pixels):
            for mode, batch in phases:
                entries += self._phase(size, mode, batch, deadline)
        return entries

    def _phase(self, size: Size, mode: str, batch: int, deadline: float) -> list[dict]:
        cfg = self.config
        label = f"{self.specs[0].model} {size[0]}×{size[1]} {mode} batch {batch}"
        _log(cfg, label)
        entries = {s.key: self._base(s, size, mode, batch) for s in self.specs}
        warmup = cfg.warmup
        repeats = cfg.train_repeats if mode == "train" else cfg.repeats
        n_calls = warmup + min(repeats, cfg.min_repeats) + 1
        active: list[VariantSpec] = []
        for spec in self.specs:
            if mode == "forward":
                self._probe(spec, _pixels(size), deadline)
            extra = 3 * self.weight_bytes.get(spec.key, 0) if mode == "train" else 0  # grads + AdamW
            reason = self._skip_reason(spec, size, mode, batch, deadline, n_calls, extra)
            if reason is not None:
                code, text, pred_s, pred_b = reason
                entries[spec.key].update(skip=code, reason=text, status="skipped",
                                         predicted_ms=None if pred_s is None else pred_s * 1e3,
                                         predicted_peak_mb=None if pred_b is None else pred_b / MiB)
            else:
                pred_s, pred_b = self.history.predict(spec.key, mode, _pixels(size), batch, spec.quadratic)
                entries[spec.key].update(predicted_ms=None if pred_s is None else pred_s * 1e3,
                                         predicted_peak_mb=None if pred_b is None else pred_b / MiB)
                active.append(spec)
        if not active:
            return list(entries.values())
        fns: dict[str, Callable[[], object]] = {}
        errors: dict[str, BaseException] = {}
        train_models: dict[str, nn.Module] = {}
        if mode == "forward":
            x = self._input(size, batch, self.dtype)
            fns = {s.key: self._forward_fn(self.models[s.key], x) for s in active}
        else:
            x = self._input(size, batch, torch.float32)
            y = torch.randint(0, 1000, (batch,), generator=torch.Generator().manual_seed(cfg.seed))
            y = y.to(self.device)
            for spec in active:
                try:
                    torch.manual_seed(cfg.seed)
                    model = self._prepare(spec.build().train(), None)
                    train_models[spec.key] = model
                    fns[spec.key] = self._train_fn(model, x, y)
                except (*VARIANT_ERRORS, ImportError) as err:
                    errors[spec.key] = err
        samples, timing_errors = time_interleaved(
            fns, device=self.device, warmup=warmup, repeats=repeats, min_repeats=cfg.min_repeats,
            min_sample_seconds=cfg.min_sample_seconds,
            variant_seconds=cfg.train_variant_seconds if mode == "train" else cfg.variant_seconds)
        errors.update(timing_errors)
        peaks: dict[str, int | None] = {}
        for key in samples:
            try:
                peaks[key] = self.meter.measure(fns[key])
            except VARIANT_ERRORS as err:
                errors[key] = err
        for spec in active:
            entry = entries[spec.key]
            if spec.key in errors:
                text = _error_text(errors[spec.key])
                entry.update(status="error", reason=text)
                self.history.failed[(spec.key, mode)] = f"failed at {size[0]}×{size[1]} batch {batch}: {text}"
                continue
            stats = samples[spec.key].stats()
            peak = peaks.get(spec.key)
            entry.update(status="ok", **stats, images_per_s=batch / (stats["median_ms"] / 1e3),
                         peak_mb=None if peak is None else peak / MiB)
            self.history.add(spec.key, mode, _pixels(size), batch, stats["median_ms"] / 1e3, peak)
        del fns, train_models, x
        gc.collect()
        return list(entries.values())

    def _train_fn(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
        opt = torch.optim.AdamW(model.parameters(), lr=TRAIN_LR, weight_decay=0.05)
        amp = self.dtype != torch.float32
        device_type = self.device.type

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device_type, dtype=self.dtype, enabled=amp):
                out = model(x)
            F.cross_entropy(out.float(), y).backward()
            opt.step()
        return step

    def run_sweep(self) -> list[dict]:
        """Batch-1 latency and peak memory over ``sweep_sizes``; memory first (it doubles as warm-up)."""
        cfg = self.config
        deadline = time.perf_counter() + cfg.sweep_max_seconds
        out: list[dict] = []
        for size in sorted(cfg.sweep_sizes, key=_pixels):
            _log(cfg, f"{self.specs[0].model} sweep {size[0]}×{size[1]}")
            entries = {s.key: self._base(s, size, "sweep", 1) for s in self.specs}
            active = []
            for spec in self.specs:
                reason = self._skip_reason(spec, size, "forward", 1, deadline, 1 + cfg.sweep_min_repeats)
                pred_s, pred_b = self.history.predict(spec.key, "forward", _pixels(size), 1, spec.quadratic)
                entries[spec.key].update(predicted_ms=None if pred_s is None else pred_s * 1e3,
                                         predicted_peak_mb=None if pred_b is None else pred_b / MiB)
                if reason is not None:
                    entries[spec.key].update(skip=reason[0], reason=reason[1])
                else:
                    active.append(spec)
            if active:
                x = self._input(size, 1, self.dtype)
                fns = {s.key: self._forward_fn(self.models[s.key], x) for s in active}
                peaks, first, errors = {}, {}, {}
                for key, fn in fns.items():
                    try:
                        start = time.perf_counter()
                        peaks[key] = self.meter.measure(fn)
                        first[key] = time.perf_counter() - start
                    except VARIANT_ERRORS as err:
                        errors[key] = err
                slow = max(first.values(), default=0.0) > 1.0
                samples, timing_errors = time_interleaved(
                    {k: f for k, f in fns.items() if k not in errors}, device=self.device,
                    warmup=0 if slow else 1, repeats=cfg.sweep_min_repeats if slow else cfg.sweep_repeats,
                    min_repeats=cfg.sweep_min_repeats, min_sample_seconds=cfg.min_sample_seconds,
                    variant_seconds=cfg.sweep_variant_seconds)
                errors.update(timing_errors)
                for spec in active:
                    entry = entries[spec.key]
                    if spec.key in errors:
                        text = _error_text(errors[spec.key])
                        entry.update(status="error", reason=text)
                        self.history.failed[(spec.key, "forward")] = f"failed at {size[0]}×{size[1]}: {text}"
                        continue
                    stats = samples[spec.key].stats()
                    peak = peaks.get(spec.key)
                    entry.update(status="ok", **stats, images_per_s=1 / (stats["median_ms"] / 1e3),
                                 peak_mb=None if peak is None else peak / MiB)
                    self.history.add(spec.key, "forward", _pixels(size), 1, stats["median_ms"] / 1e3, peak)
                del fns, x
                gc.collect()
            out += list(entries.values())
        return out

    def close(self) -> None:
        self.models.clear()
        self._meta.clear()
        gc.collect()


def busy_warning(env: dict) -> str | None:
    """A warning line when the machine was busy during the run (timings then say little), else None.

    Busy: CPU pressure (PSI ``some avg10``) above 20% at the start or end, or a 1-minute load
    average above the usable CPUs. With every core shared, each OpenMP parallel region can wait
    a scheduler time slice for a descheduled thread, which inflates models of many small ops most.
    """
    usable = env.get("cpu_usable") or env.get("cpu_count") or 1
    notes = []
    for when in ("load_start", "load_end"):
        load = env.get(when) or {}
        pressure, loadavg = load.get("cpu_pressure_avg10"), load.get("loadavg")
        if (pressure is not None and pressure > 20) or (loadavg and loadavg[0] > usable):
            notes.append(f"{when.removeprefix('load_')}: {bench_env.format_load(load)}")
    if not notes or env.get("device", "cpu") != "cpu":
        return None
    return ("warning: the machine was busy (" + "; ".join(notes) + f"; {usable} usable CPUs): "
            "these CPU timings are unreliable, re-run on a quiet machine")


@contextlib.contextmanager
def frozen_gc() -> Iterator[None]:
    """Exclude every object alive now from garbage collection until the block ends (``gc.freeze``).

    The peak-memory meter runs ``gc.collect()`` before each measurement; with timm imported a
    full collection scans ~400k objects (0.3 s or more per call). Frozen objects are still
    freed by reference counting; only cycles among them wait until the block ends.
    """
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def run_models_benchmark(config: ModelBenchConfig | None = None, echo: Echo | None = None,
                         checkpoint: str | Path | None = None) -> dict:
    """Run the model benchmark and return the result document (see the module docstring).

    Args:
        config: settings; the defaults measure ``qtvit_b1`` and its twins at 224.
        echo: prints the header, tables and ratios when given (e.g. ``print``).
        checkpoint: if given, the document so far is written there (JSON) after every model.
    """
    config = config or ModelBenchConfig()
    config.validate()
    device, dtype = parse_device(config.device), DTYPES[config.dtype]
    meter = make_peak_meter(device) if config.measure_memory else PeakMemoryMeter()
    doc = {
        "benchmark": "models",
        "schema_version": SCHEMA_VERSION,
        "env": bench_env.collect_environment(device, dtype, config.system_malloc),
        "config": {**asdict(config), "memory_method": meter.method, "timing_method": _TIMING_METHOD,
                   "train_step_method": f"forward + cross-entropy backward + AdamW step (lr {TRAIN_LR:g}), "
                                        "train mode, batch_size images; non-fp32 dtypes under autocast"},
        "models": [], "results": [], "sweep": [], "ratios": [],
        "elapsed_seconds": 0.0, "complete": False,
    }
    doc["env"]["load_start"] = bench_env.machine_load()
    if echo:
        for line in format_header(doc):
            echo(line)
    start = time.perf_counter()
    deadline = start + config.max_seconds
    with frozen_gc():
        for name in config.models:
            specs = model_variants(name, config.variants)
            # each variant × size × mode (batch 1, batch N, train step) may be its own graph
            graphs = len(specs) * 3 * (len(config.resolutions) + len(config.sweep_sizes) * config.sweep)
            with bench_env.compile_scope(config.compile, graphs):
                bench = _ModelBench(config, specs, device, meter)
                try:
                    doc["models"].append(bench.describe())
                    doc["results"] += bench.run_main(deadline)
                    if config.sweep:
                        doc["sweep"] += bench.run_sweep()
                finally:
                    bench.close()
            doc["ratios"] = compute_ratios(doc, config)
            doc["elapsed_seconds"] = round(time.perf_counter() - start, 2)
            if checkpoint is not None:
                write_json(doc, checkpoint)
    doc["complete"] = not any(e.get("skip") == "budget" for e in doc["results"] + doc["sweep"])
    doc["env"]["load_end"] = bench_env.machine_load()
    if checkpoint is not None:
        write_json(doc, checkpoint)
    if echo:
        for line in format_table(doc) + [""] + format_sweep(doc) + format_ratios(doc):
            echo(line)
        echo(f"\nmachine load at the end: {bench_env.format_load(doc['env']['load_end'])}")
        warning = busy_warning(doc["env"])
        if warning:
            echo(warning)
    return doc


# ------------------------------------------------------------------------------------ ratios


@dataclass(frozen=True)
class RatioSpec:
    """One of the issue's targets: ``value = numerator ÷ denominator`` of a measured quantity."""

    name: str
    description: str
    numerator: str  # variant key
    denominator: str
    quantity: str  # "latency" (median ms), "throughput" (images/s) or "peak" (peak MB)
    mode: str  # "forward", "train" or "sweep"
    batch: str  # "1" or "N"
    compare: str  # ">=" or "<="
    target: float
    # a side skipped as too big/slow may enter through its prediction (only the high-resolution
    # targets, where softmax may not fit at all); the main-table targets need measurements
    allow_predicted: bool = False


RATIO_SPECS = (
    RatioSpec("qt_vs_relu_latency_b1", "latency, qt ÷ its relu twin (EfficientViT), batch 1", "qt", "relu",
              "latency", "forward", "1", "<=", 1.15),
    RatioSpec("qt_vs_relu_latency_bN", "latency, qt ÷ its relu twin (EfficientViT), batch N", "qt", "relu",
              "latency", "forward", "N", "<=", 1.15),
    RatioSpec("qt_vs_timm_latency_b1", "latency, qt ÷ timm, batch 1", "qt", "timm", "latency", "forward", "1",
              "<=", 1.2),
    RatioSpec("qt_vs_timm_latency_bN", "latency, qt ÷ timm, batch N", "qt", "timm", "latency", "forward", "N",
              "<=", 1.2),
    RatioSpec("qt_vs_timm_train_throughput", "training-step throughput, qt ÷ timm", "qt", "timm",
              "throughput", "train", "N", ">=", 0.85),
    RatioSpec("softmax_vs_qt_latency_hires", "latency, softmax twin ÷ qt (how much faster qt is)", "softmax",
              "qt", "latency", "sweep", "1", ">=", 5.0, allow_predicted=True),
    RatioSpec("qt_vs_softmax_peak_hires", "peak memory, qt ÷ softmax twin", "qt", "softmax", "peak", "sweep",
              "1", "<=", 1 / 3, allow_predicted=True),
)


def _lookup(doc: dict, model: str, variant: str, mode: str, batch: int, size: Size) -> dict | None:
    if mode == "sweep":  # the sweep, else a main-table batch-1 forward at that size
        pools = [(doc.get("sweep", []), "sweep"), (doc.get("results", []), "forward")]
    else:
        pools = [(doc.get("results", []), mode)]
    fallback = None
    for entries, m in pools:
        for e in entries:
            if (e["model"], e["variant"], e["mode"], e["batch"], tuple(e["resolution"])) == (
                    model, variant, m, batch, tuple(size)):
                if e["status"] == "ok":
                    return e
                fallback = fallback or e
    return fallback


def _quantity(entry: dict, quantity: str, use_min: bool = False) -> tuple[float | None, str]:
    """(value, basis) of a measured entry, or the prediction of a skipped one."""
    if entry["status"] == "ok":
        if quantity == "peak":
            return entry.get("peak_mb"), "measured"
        ms = entry["min_ms"] if use_min else entry["median_ms"]
        return (entry["batch"] / (ms / 1e3) if quantity == "throughput" else ms), "measured"
    if quantity == "peak":
        return entry.get("predicted_peak_mb"), "predicted"
    ms = entry.get("predicted_ms")
    if ms is None:
        return None, "predicted"
    return (entry["batch"] / (ms / 1e3) if quantity == "throughput" else ms), "predicted"


def compute_ratios(doc: dict, config: ModelBenchConfig) -> list[dict]:
    """The issue's targets, for every model measured (they are stated for ``qtvit_b1``).

    ``value`` divides medians (peak MB for memory); ``value_from_min`` divides minima. When one
    side was skipped but has a prediction (e.g. softmax at 2048 too big to run), the value uses
    it and ``basis`` says ``predicted``. ``applies`` is True for the model the targets are for.
    """
    ratios = []
    for info in doc.get("models", []):
        model = info["model"]
        for spec in RATIO_SPECS:
            size = config.ratio_sweep_size if spec.mode == "sweep" else config.ratio_size
            batch = 1 if spec.batch == "1" else config.batch_size
            entry = {"model": model, "applies": model == RATIO_MODEL, "name": spec.name,
                     "description": spec.description, "numerator": spec.numerator,
                     "denominator": spec.denominator, "quantity": spec.quantity,
                     "mode": "train" if spec.mode == "train" else "forward", "batch": batch,
                     "resolution": list(size), "compare": spec.compare, "target": spec.target,
                     "value": None, "value_from_min": None, "basis": None, "met": None, "reason": None}
            a = _lookup(doc, model, spec.numerator, spec.mode, batch, size)
            b = _lookup(doc, model, spec.denominator, spec.mode, batch, size)
            where = f"{size[0]}×{size[1]}, batch {batch}" + (", train step" if spec.mode == "train" else "")
            if a is None or b is None:
                missing = [v for v, e in ((spec.numerator, a), (spec.denominator, b)) if e is None]
                hint = " (pass --train-step)" if spec.mode == "train" and not config.train_step else ""
                if spec.mode == "sweep" and not config.sweep:
                    hint = " (pass --sweep-resolution)"
                entry["reason"] = f"{', '.join(missing)} not run at {where}{hint}"
                ratios.append(entry)
                continue
            (va, ba), (vb, bb) = _quantity(a, spec.quantity), _quantity(b, spec.quantity)
            if not spec.allow_predicted:
                va, vb = (va if ba == "measured" else None), (vb if bb == "measured" else None)
            if va is None or vb is None or vb == 0:
                bad = [e["variant"] for e, v in ((a, va), (b, vb)) if v is None]
                entry["reason"] = (f"{', '.join(bad) or spec.denominator} not measured at {where}: "
                                   + "; ".join(f"{e['variant']}: {e.get('reason')}" for e in (a, b)
                                               if e["status"] != "ok"))
                ratios.append(entry)
                continue
            value = va / vb
            basis = "measured" if ba == bb == "measured" else "predicted"
            entry.update(value=value, basis=basis,
                         met=value >= spec.target if spec.compare == ">=" else value <= spec.target)
            if spec.quantity != "peak" and a["status"] == b["status"] == "ok":
                entry["value_from_min"] = (_quantity(a, spec.quantity, True)[0]
                                           / _quantity(b, spec.quantity, True)[0])
            if basis == "predicted":
                entry["reason"] = "; ".join(f"{e['variant']} {e.get('skip')}: {e.get('reason')}"
                                            for e in (a, b) if e["status"] != "ok")
            ratios.append(entry)
    return ratios


# ------------------------------------------------------------------------------------ output


def format_header(doc: dict) -> list[str]:
    """The environment and settings as readable lines."""
    cfg = doc["config"]
    extras = [n for n in ("channels_last", "compile") if cfg[n]]
    load = doc["env"].get("load_start")
    load_line = [f"  machine load at the start: {bench_env.format_load(load)}"] if load else []
    return ["qtvit bench models", *(f"  {line}" for line in bench_env.format_environment(doc["env"])),
            *load_line,
            f"  models {', '.join(cfg['models'])}; variants {', '.join(cfg['variants'])}; batch N = "
            f"{cfg['batch_size']}; warmup {cfg['warmup']}, repeats {cfg['repeats']} (≥ {cfg['min_repeats']} "
            f"for slow variants){'; ' + ', '.join(extras) if extras else ''}",
            f"  memory: {cfg['memory_method']}", ""]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                              for i, (c, w) in enumerate(zip(r, widths, strict=True)))
    return [fmt(header)] + [fmt(r) for r in rows]


def _cell_status(entry: dict | None) -> str | None:
    if entry is None:
        return "-"
    if entry["status"] == "skipped":
        return f"skip:{entry['skip']}"
    if entry["status"] == "error":
        return "error"
    return None


def format_table(doc: dict) -> list[str]:
    """Main table: one block per model and resolution, one row per variant."""
    cfg = doc["config"]
    n = cfg["batch_size"]
    by_key = {(e["model"], e["variant"], e["mode"], e["batch"], tuple(e["resolution"])): e
              for e in doc["results"]}
    lines = []
    for info in doc["models"]:
        model = info["model"]
        for size in sorted({tuple(e["resolution"]) for e in doc["results"] if e["model"] == model},
                           key=_pixels):
            header = ["variant", "params", "GMACs", "b1 ms", "IQR", "b1 MB"]
            if n > 1:
                header += [f"b{n} ms", f"b{n} img/s", f"b{n} MB"]
            if cfg["train_step"]:
                header += ["train img/s", "train MB"]
            rows = []
            for v in info["variants"]:
                b1 = by_key.get((model, v["variant"], "forward", 1, size))
                row = [f"{v['variant']}: {v['label']}",
                       "?" if v["params"] is None else f"{v['params'] / 1e6:.2f}M",
                       "?" if not b1 or b1.get("macs_g") is None else f"{b1['macs_g']:.3g}"]
                row += [_cell_status(b1) or fmt_ms(b1["median_ms"]), "" if _cell_status(b1) else
                        f"±{fmt_ms(b1['iqr_ms'] / 2)}", "" if _cell_status(b1) else fmt_mb(b1["peak_mb"])]
                if n > 1:
                    bn = by_key.get((model, v["variant"], "forward", n, size))
                    s = _cell_status(bn)
                    row += [s or fmt_ms(bn["median_ms"]), "" if s else f"{bn['images_per_s']:.1f}",
                            "" if s else fmt_mb(bn["peak_mb"])]
                if cfg["train_step"]:
                    tr = by_key.get((model, v["variant"], "train", n, size))
                    s = _cell_status(tr)
                    row += [s or f"{tr['images_per_s']:.1f}", "" if s else fmt_mb(tr["peak_mb"])]
                rows.append(row)
            lines += [f"{model} at {size[0]}×{size[1]}"] + _table(header, rows) + [""]
    lines.append("ms: median per call (IQR/2 as ±); MB: peak MiB above weights and inputs; "
                 "skip:<code>, errors and details in the JSON.")
    return lines


def format_sweep(doc: dict) -> list[str]:
    """Sweep table: rows variants, columns sizes, cells ``ms | MB`` (skips show predictions)."""
    if not doc.get("sweep"):
        return []
    lines = ["resolution sweep, batch 1 (cells: median ms | peak MiB; skip:<code> ~predicted ms)"]
    for model in dict.fromkeys(e["model"] for e in doc["sweep"]):
        rows_e = [e for e in doc["sweep"] if e["model"] == model]
        sizes = sorted({tuple(e["resolution"]) for e in rows_e}, key=_pixels)
        header = [model] + [f"{h}×{w}" for h, w in sizes]
        rows = []
        for key in dict.fromkeys(e["variant"] for e in rows_e):
            row = [key]
            for size in sizes:
                e = next((x for x in rows_e if x["variant"] == key and tuple(x["resolution"]) == size), None)
                s = _cell_status(e)
                if s and e is not None and e.get("predicted_ms") is not None:
                    s += f" ~{fmt_ms(e['predicted_ms'])}"
                row.append(s or f"{fmt_ms(e['median_ms'])} | {fmt_mb(e['peak_mb'])}")
            rows.append(row)
        lines += _table(header, rows) + [""]
    return lines


def format_ratios(doc: dict) -> list[str]:
    """The target ratios, one line each (targets are the issue's, stated for qtvit_b1)."""
    lines = ["target ratios (medians; from minima in brackets):"]
    for r in doc["ratios"]:
        size = f"{r['resolution'][0]}×{r['resolution'][1]}"
        what = f"{r['model']}: {r['description']} at {size}, batch {r['batch']}"
        target = f"target {r['compare'].replace('>=', '≥').replace('<=', '≤')} {r['target']:.3g}"
        if r["value"] is None:
            lines.append(f"  {what}: not measured ({r['reason']}); {target}")
            continue
        verdict = ("met" if r["met"] else "NOT met") if r["applies"] else ("would be met" if r["met"] else
                                                                             "would not be met")
        from_min = f" ({r['value_from_min']:.3f})" if r["value_from_min"] is not None else ""
        basis = " [PREDICTED: " + r["reason"] + "]" if r["basis"] == "predicted" else ""
        lines.append(f"  {what}: {r['value']:.3f}{from_min}; {target}: {verdict}{basis}")
    return lines


# ------------------------------------------------------------------------------------ CLI


def parse_sizes(flag: str, text: str) -> tuple[Size, ...]:
    """``"224,512,1024x2048"`` → ((224, 224), (512, 512), (1024, 2048)) (H×W)."""
    out = []
    for item in [s.strip() for s in text.split(",") if s.strip()]:
        parts = item.lower().replace("×", "x").split("x")
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise QtvitError(f"{flag}: {item!r} is not a size (use 224 or 1024x2048)") from None
        if len(values) == 1:
            values *= 2
        if len(values) != 2 or min(values) < 32:
            raise QtvitError(f"{flag}: {item!r} must be N or HxW with sides ≥ 32")
        out.append((values[0], values[1]))
    if not out:
        raise QtvitError(f"{flag}: empty list")
    return tuple(out)


def _names(flag: str, text: str) -> tuple[str, ...]:
    items = tuple(s.strip() for s in text.split(",") if s.strip())
    if not items:
        raise QtvitError(f"{flag}: empty list")
    return items


def _add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags; every default is None so ``--quick`` and explicit values can be told apart."""
    d = ModelBenchConfig()
    p.add_argument("--models", metavar="M1,M2", help=f"models or aliases (default {','.join(d.models)})")
    p.add_argument("--resolutions", metavar="R1,R2",
                   help="sizes N or HxW (default 224; e.g. 224,512,1024x2048)")
    p.add_argument("--batch-size", type=int,
                   help=f"batch N for throughput and train steps (default {d.batch_size})")
    p.add_argument("--variants", metavar="V1,V2", help=f"subset of {','.join(VARIANT_KEYS)} (default all)")
    p.add_argument("--dtype", choices=tuple(DTYPES), help=f"weights/input dtype (default {d.dtype})")
    p.add_argument("--device", help=f"cpu or cuda[:i] (default {d.device})")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    p.add_argument("--compile", action="store_true", help="torch.compile every variant")
    p.add_argument("--repeats", type=int, help=f"timed samples per variant (default {d.repeats})")
    p.add_argument("--warmup", type=int, help=f"warm-up calls per variant (default {d.warmup})")
    p.add_argument("--train-step", action="store_true",
                   help="also time training steps (forward + backward + AdamW step, batch N)")
    p.add_argument("--sweep-resolution", action="store_true",
                   help="batch-1 latency and peak memory from 224 to 2048 (square and 1024x2048)")
    p.add_argument("--sweep-sizes", metavar="R1,R2", help="sizes of the sweep (default 224 … 2048)")
    p.add_argument("--max-seconds", type=float, help=f"budget of the main table (default {d.max_seconds:g})")
    p.add_argument("--sweep-max-seconds", type=float,
                   help=f"budget of the sweep (default {d.sweep_max_seconds:g})")
    p.add_argument("--max-call-seconds", type=float,
                   help=f"skip configs predicted slower than this per call (default {d.max_call_seconds:g})")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    p.add_argument("--output", metavar="FILE.json",
                   help="write the results as JSON (updated after each model)")
    p.add_argument("--plot", metavar="FILE.png",
                   help="log-log sweep plot (with --sweep-resolution), else batch-1 latency bars")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 64 px, batch 4, few repeats, train step and a 64–128 px sweep")
    p.add_argument("--system-malloc", action="store_true",
                   help="keep glibc's default malloc thresholds (default: re-run with tuned ones, "
                        "see qtvit/bench/env.py)")
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")


def register(bench_subparsers: argparse._SubParsersAction) -> None:
    """Add ``qtvit bench models``."""
    p = bench_subparsers.add_parser(
        "models", help="whole-model latency, throughput, memory and training steps vs twins",
        description=__doc__.splitlines()[0].split(": ", 1)[1])
    _add_arguments(p)
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> ModelBenchConfig:
    """Resolve the flags (explicit value > ``--quick`` > default) into a validated config."""
    base = QUICK if args.quick else ModelBenchConfig()
    over: dict[str, object] = {}
    if args.models is not None:
        over["models"] = _names("--models", args.models)
    if args.variants is not None:
        over["variants"] = _names("--variants", args.variants)
    if args.resolutions is not None:
        over["resolutions"] = parse_sizes("--resolutions", args.resolutions)
        over["ratio_size"] = (224, 224) if (224, 224) in over["resolutions"] else over["resolutions"][0]
    if args.sweep_sizes is not None:
        over["sweep_sizes"] = parse_sizes("--sweep-sizes", args.sweep_sizes)
        over["ratio_sweep_size"] = max(over["sweep_sizes"], key=_pixels)
    return bench_env.config_from_flags(
        base, args, ("batch_size", "dtype", "device", "repeats", "warmup", "max_seconds", "sweep_max_seconds",
                     "max_call_seconds"),
        **over, channels_last=args.channels_last or base.channels_last, compile=args.compile or base.compile,
        train_step=args.train_step or base.train_step, sweep=args.sweep_resolution or base.sweep,
        measure_memory=not args.no_memory)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``qtvit bench models``."""
    config = config_from_args(args)  # bad flags fail here, before any re-run
    code = bench_env.rerun_with_tuned_malloc("models", args, _add_arguments)
    if code is not None:
        return code
    doc = run_models_benchmark(config, echo=print, checkpoint=args.output)
    if args.output:
        print(f"\nwrote {args.output}")
    if args.plot:
        from .plots import plot_model_bars, plot_resolution_sweep

        path = plot_resolution_sweep(doc, args.plot) if doc["sweep"] else plot_model_bars(doc, args.plot)
        print(f"wrote {path}")
    return 0


__all__ = ["DTYPES", "ModelBenchConfig", "QUICK", "RATIO_SPECS", "SWEEP_SIZES", "VARIANT_KEYS", "VariantSpec",
           "busy_warning",
           "compute_ratios", "config_from_args", "fit_predict", "format_ratios", "format_sweep",
           "format_table", "model_variants", "parse_sizes", "register", "run",
           "run_models_benchmark"]
