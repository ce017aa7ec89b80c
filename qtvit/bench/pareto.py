"""``qtvit bench pareto``: the paper's Figure 1 on this device — latency vs ImageNet top-1.

Times QT-ViT-1..6 (ours), EfficientViT-B1..L3 (timm's ``efficientvit_*``) and the other
families of the paper's comparison that timm can build (EfficientNet, EfficientNetV2,
ConvNeXt, Swin, SwinV2, PoolFormer, MobileViT, MobileViTv2, DeiT, EfficientFormer, CoAtNet,
MaxViT), all with random weights (``pretrained=False``: weights do not change the time), at
one resolution (default 224) and one or more batch sizes, then marks the Pareto front of
(latency ↓, top-1 ↑). Top-1 values are the published ImageNet-1k numbers in
:data:`PAPER_MODELS`, each with its source and the resolution it was measured at (which can
differ from the timing resolution: EfficientNet-B3 is 81.6 at 300 px but is timed at 224 like
everything else, as in the paper's figure).

Each model is built, timed (:func:`qtvit.bench.timing.time_interleaved`: warm-up, looped
samples, median and spread) and freed before the next, since holding all of them would take
several GB. Machine drift over the run is tracked by timing QT-ViT-1 (or the first model)
again at the end: ``drift`` = last ÷ first.

Outputs in ``output_dir``: ``pareto.json`` (environment header, config, rows, front),
``pareto.csv`` (one row per model and batch size) and ``pareto_b{batch}.png``.
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import gc
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import QtvitError
from ..models import create_model, get_model_card
from . import env as bench_env
from .attention import write_json
from .models import (
    DTYPES,
    busy_warning,
    frozen_gc,
    import_timm,
    parse_device,
    parse_sizes,
)
from .timing import VARIANT_ERRORS, time_interleaved

SCHEMA_VERSION = 1
Echo = Callable[[str], None]


@dataclass(frozen=True)
class ParetoModel:
    """A model of the comparison: how to build it and its published ImageNet-1k top-1."""

    name: str  # display name, e.g. "ConvNeXt-T"
    family: str
    source: str  # "qtvit" or "timm"
    arch: str  # the builder's name
    top1: float
    top1_source: str
    top1_size: int  # input resolution of the published number
    kwargs: dict = field(default_factory=dict)

    def build(self) -> nn.Module:
        """A freshly initialised model (random weights, eval mode, float32, CPU)."""
        if self.source == "timm":
            return import_timm(self.name).create_model(self.arch, pretrained=False, **self.kwargs).eval()
        return create_model(self.arch, **self.kwargs).eval()


def _family(family: str, source: str, cite: str, rows: Sequence[tuple], **kwargs) -> list[ParetoModel]:
    """rows: (name, arch, top1, top1_size)."""
    return [ParetoModel(name, family, source, arch, top1, cite, size, dict(kwargs))
            for name, arch, top1, size in rows]


def _qtvit_rows() -> list[tuple]:
    rows = []
    for i, size in enumerate(("b1", "b2", "b3", "l1", "l2", "l3"), start=1):
        card = get_model_card(f"qtvit_{size}")
        rows.append((card.paper_name or f"QT-ViT-{i}", f"qtvit_{size}", card.top1, 224))
    return rows


# Published ImageNet-1k top-1 (%) of every model in the comparison, from each model's own paper
# (the numbers the QT-ViT/EfficientViT comparison tables quote). Resolution = that of the number.
PAPER_MODELS: tuple[ParetoModel, ...] = tuple(
    _family("QT-ViT", "qtvit", "QT-ViT (Xu et al., NeurIPS 2024) Table 1, via the model card (SPEC §4)",
            _qtvit_rows())
    + _family("EfficientViT", "timm", "EfficientViT (Cai et al., ICCV 2023), r224 models; SPEC §4", [
        ("EfficientViT-B1", "efficientvit_b1", 79.4, 224), ("EfficientViT-B2", "efficientvit_b2", 82.1, 224),
        ("EfficientViT-B3", "efficientvit_b3", 83.5, 224), ("EfficientViT-L1", "efficientvit_l1", 84.5, 224),
        ("EfficientViT-L2", "efficientvit_l2", 85.1, 224), ("EfficientViT-L3", "efficientvit_l3", 85.8, 224)])
    + _family("EfficientNet", "timm", "EfficientNet (Tan & Le, ICML 2019) Table 2", [
        ("EfficientNet-B0", "efficientnet_b0", 77.1, 224), ("EfficientNet-B1", "efficientnet_b1", 79.1, 240),
        ("EfficientNet-B2", "efficientnet_b2", 80.1, 260), ("EfficientNet-B3", "efficientnet_b3", 81.6, 300),
        ("EfficientNet-B4", "efficientnet_b4", 82.9, 380), ("EfficientNet-B5", "efficientnet_b5", 83.6, 456),
        ("EfficientNet-B6", "efficientnet_b6", 84.0, 528)])
    + _family("EfficientNetV2", "timm", "EfficientNetV2 (Tan & Le, ICML 2021) Table 7, ImageNet-1k only", [
        ("EfficientNetV2-S", "tf_efficientnetv2_s", 83.9, 384),
        ("EfficientNetV2-M", "tf_efficientnetv2_m", 85.1, 480)])
    + _family("ConvNeXt", "timm", "ConvNeXt (Liu et al., CVPR 2022) Table 1, ImageNet-1k", [
        ("ConvNeXt-T", "convnext_tiny", 82.1, 224), ("ConvNeXt-S", "convnext_small", 83.1, 224),
        ("ConvNeXt-B", "convnext_base", 83.8, 224)])
    + _family("Swin", "timm", "Swin Transformer (Liu et al., ICCV 2021) Table 1a", [
        ("Swin-T", "swin_tiny_patch4_window7_224", 81.3, 224),
        ("Swin-S", "swin_small_patch4_window7_224", 83.0, 224),
        ("Swin-B", "swin_base_patch4_window7_224", 83.5, 224)])
    + _family("SwinV2", "timm", "Swin Transformer V2 (Liu et al., CVPR 2022), ImageNet-1k, window 8 at 256", [
        ("SwinV2-T", "swinv2_tiny_window8_256", 81.8, 256),
        ("SwinV2-S", "swinv2_small_window8_256", 83.7, 256),
        ("SwinV2-B", "swinv2_base_window8_256", 84.2, 256)], img_size=224)
    + _family("PoolFormer", "timm", "MetaFormer/PoolFormer (Yu et al., CVPR 2022) Table 1", [
        ("PoolFormer-S12", "poolformer_s12", 77.2, 224), ("PoolFormer-S24", "poolformer_s24", 80.3, 224),
        ("PoolFormer-S36", "poolformer_s36", 81.4, 224), ("PoolFormer-M36", "poolformer_m36", 82.1, 224),
        ("PoolFormer-M48", "poolformer_m48", 82.5, 224)])
    + _family("MobileViT", "timm", "MobileViT (Mehta & Rastegari, ICLR 2022), 256 px", [
        ("MobileViT-XXS", "mobilevit_xxs", 69.0, 256), ("MobileViT-XS", "mobilevit_xs", 74.8, 256),
        ("MobileViT-S", "mobilevit_s", 78.4, 256)])
    + _family("MobileViTv2", "timm", "MobileViTv2 (Mehta & Rastegari, 2022, separable self-attention), "
              "256 px", [
        ("MobileViTv2-0.5", "mobilevitv2_050", 70.2, 256), ("MobileViTv2-0.75", "mobilevitv2_075", 75.6, 256),
        ("MobileViTv2-1.0", "mobilevitv2_100", 78.1, 256), ("MobileViTv2-1.25", "mobilevitv2_125", 79.7, 256),
        ("MobileViTv2-1.5", "mobilevitv2_150", 80.4, 256), ("MobileViTv2-1.75", "mobilevitv2_175", 80.8, 256),
        ("MobileViTv2-2.0", "mobilevitv2_200", 81.2, 256)])
    + _family("DeiT", "timm", "DeiT (Touvron et al., ICML 2021) Table 7, without distillation", [
        ("DeiT-Ti", "deit_tiny_patch16_224", 72.2, 224), ("DeiT-S", "deit_small_patch16_224", 79.8, 224),
        ("DeiT-B", "deit_base_patch16_224", 81.8, 224)])
    + _family("EfficientFormer", "timm", "EfficientFormer (Li et al., NeurIPS 2022) Table 1 (distilled)", [
        ("EfficientFormer-L1", "efficientformer_l1", 79.2, 224),
        ("EfficientFormer-L3", "efficientformer_l3", 82.4, 224),
        ("EfficientFormer-L7", "efficientformer_l7", 83.3, 224)])
    + _family("CoAtNet", "timm", "CoAtNet (Dai et al., NeurIPS 2021) Table 4, ImageNet-1k at 224", [
        ("CoAtNet-0", "coatnet_0_224", 81.6, 224), ("CoAtNet-1", "coatnet_1_224", 83.3, 224),
        ("CoAtNet-2", "coatnet_2_224", 84.1, 224), ("CoAtNet-3", "coatnet_3_224", 84.5, 224)])
    + _family("MaxViT", "timm", "MaxViT (Tu et al., ECCV 2022) Table 2, ImageNet-1k at 224", [
        ("MaxViT-T", "maxvit_tiny_tf_224", 83.6, 224), ("MaxViT-S", "maxvit_small_tf_224", 84.5, 224),
        ("MaxViT-B", "maxvit_base_tf_224", 85.0, 224)])
)


def select_models(patterns: Sequence[str] | None) -> list[ParetoModel]:
    """Models whose name, family or arch matches one of ``patterns`` (case-insensitive globs).

    None selects all. A pattern that matches nothing raises ``ValueError`` listing the names.
    """
    if patterns is None:
        return list(PAPER_MODELS)
    chosen: list[ParetoModel] = []
    for pattern in patterns:
        pat = pattern.lower()
        hits = [m for m in PAPER_MODELS
                if any(fnmatch.fnmatchcase(s.lower(), pat) for s in (m.name, m.family, m.arch))]
        if not hits:
            names = ", ".join(m.name for m in PAPER_MODELS)
            families = ", ".join(dict.fromkeys(m.family for m in PAPER_MODELS))
            raise ValueError(f"no model matches {pattern!r}; names: {names}; families: {families}")
        chosen += [m for m in hits if m not in chosen]
    return chosen


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points (latency, accuracy) no other point dominates, by increasing latency.

    A point is dominated when another has latency ≤ and accuracy ≥ with at least one strict.
    Exact duplicates do not dominate each other (both stay on the front).
    """
    front = []
    for i, (lat_i, acc_i) in enumerate(points):
        dominated = any(lat_j <= lat_i and acc_j >= acc_i and (lat_j < lat_i or acc_j > acc_i)
                        for j, (lat_j, acc_j) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))


# ----------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class ParetoConfig:
    """Settings of one ``qtvit bench pareto`` run."""

    models: tuple[str, ...] | None = None  # patterns; None: every model in PAPER_MODELS
    resolution: tuple[int, int] = (224, 224)
    batch_sizes: tuple[int, ...] = (1,)
    dtype: str = "float32"
    device: str = "cpu"
    channels_last: bool = False
    warmup: int = 2
    repeats: int = 7
    min_repeats: int = 3
    variant_seconds: float = 3.0
    min_sample_seconds: float = 0.05
    max_seconds: float = 900.0
    seed: int = 0
    progress: bool = True
    system_malloc: bool = False

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad setting."""
        select_models(self.models)
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise ValueError(f"batch_sizes must be positive, got {self.batch_sizes!r}")
        if len(self.resolution) != 2 or min(self.resolution) < 32:
            raise ValueError(f"resolution must be (H, W) ≥ 32, got {self.resolution!r}")
        for name in ("repeats", "min_repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be ≥ 0, got {self.warmup}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} not supported; choose from {', '.join(DTYPES)}")
        device = parse_device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r}: CUDA is not available in this torch build/machine")


# `--quick`: three small models at 64 px — a smoke test of the whole pipeline in seconds.
QUICK = ParetoConfig(models=("QT-ViT-1", "EfficientViT-B1", "PoolFormer-S12"), resolution=(64, 64),
                     warmup=1, repeats=2, min_repeats=2, variant_seconds=0.3, min_sample_seconds=0.01,
                     max_seconds=120.0)


# ----------------------------------------------------------------------------------- running


def _error_text(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text[:300]}"


def _time_model(model: nn.Module, config: ParetoConfig, device: torch.device, batch: int) -> dict:
    dtype = DTYPES[config.dtype]
    g = torch.Generator().manual_seed(config.seed + batch)
    x = torch.randn(batch, 3, *config.resolution, generator=g).to(device, dtype)
    if config.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def call() -> torch.Tensor:
        with torch.inference_mode():
            return model(x)

    samples, errors = time_interleaved({"m": call}, device=device, warmup=config.warmup,
                                       repeats=config.repeats, min_repeats=config.min_repeats,
                                       min_sample_seconds=config.min_sample_seconds,
                                       variant_seconds=config.variant_seconds)
    if errors:
        raise errors["m"]
    return samples["m"].stats()


def _macs(spec: ParetoModel, size: tuple[int, int]) -> float | None:
    from ..models.macs import count_macs

    try:
        with torch.device("meta"):
            meta = spec.build()
        return count_macs(meta, (1, 3, *size)) / 1e9
    except Exception:  # noqa: BLE001 - informative only
        return None


def run_pareto_benchmark(config: ParetoConfig | None = None, echo: Echo | None = None,
                         output_dir: str | Path | None = None) -> dict:
    """Time every selected model, mark the Pareto front; write JSON/CSV/PNG to ``output_dir`` if given."""
    with frozen_gc():
        return _run_pareto(config, echo, output_dir)


def _run_pareto(config: ParetoConfig | None, echo: Echo | None, output_dir: str | Path | None) -> dict:
    config = config or ParetoConfig()
    config.validate()
    device, dtype = parse_device(config.device), DTYPES[config.dtype]
    specs = select_models(config.models)
    doc = {
        "benchmark": "pareto", "schema_version": SCHEMA_VERSION,
        "env": bench_env.collect_environment(device, dtype, config.system_malloc),
        "config": {**asdict(config), "timing_method": "per model: warm-up, then samples looped to "
                   "min_sample_seconds; median ms per call (wall clock, CUDA synchronised)"},
        "rows": [], "front": {}, "drift": None, "elapsed_seconds": 0.0, "complete": False,
    }
    doc["env"]["load_start"] = bench_env.machine_load()
    if echo:
        echo("qtvit bench pareto")
        for line in bench_env.format_environment(doc["env"]):
            echo(f"  {line}")
        echo(f"  machine load at the start: {bench_env.format_load(doc['env']['load_start'])}")
        echo(f"  {len(specs)} models at {config.resolution[0]}×{config.resolution[1]}, batch "
             f"{', '.join(map(str, config.batch_sizes))}, random weights\n")
    start = time.perf_counter()
    first_latency: float | None = None
    for i, spec in enumerate(specs):
        if config.progress:
            print(f"[bench pareto] {i + 1}/{len(specs)} {spec.name}", file=sys.stderr, flush=True)
        base = {"name": spec.name, "family": spec.family, "source": spec.source, "arch": spec.arch,
                "top1": spec.top1, "top1_size": spec.top1_size, "top1_source": spec.top1_source,
                "resolution": list(config.resolution), "params_m": None,
                "macs_g": _macs(spec, config.resolution), "status": "skipped", "reason": None}
        if time.perf_counter() - start > config.max_seconds:
            reason = f"budget: max_seconds {config.max_seconds:g} spent"
            doc["rows"] += [{**base, "batch": b, "reason": reason} for b in config.batch_sizes]
            continue
        try:
            torch.manual_seed(config.seed)
            model = spec.build().to(device, dtype)
            if config.channels_last:
                model = model.to(memory_format=torch.channels_last)
            base["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
        except (*VARIANT_ERRORS, ImportError) as err:
            doc["rows"] += [{**base, "batch": b, "status": "error", "reason": f"build: {_error_text(err)}"}
                            for b in config.batch_sizes]
            continue
        for batch in config.batch_sizes:
            row = {**base, "batch": batch}
            try:
                stats = _time_model(model, config, device, batch)
            except VARIANT_ERRORS as err:
                row.update(status="error", reason=_error_text(err))
            else:
                row.update(status="ok", latency_ms=stats["median_ms"], iqr_ms=stats["iqr_ms"],
                           min_ms=stats["min_ms"], samples=stats["samples"],
                           images_per_s=batch / (stats["median_ms"] / 1e3))
                if i == 0 and batch == config.batch_sizes[0]:
                    first_latency = stats["median_ms"]
            doc["rows"].append(row)
        del model
        gc.collect()
        doc["elapsed_seconds"] = round(time.perf_counter() - start, 2)
    _mark_front(doc)
    if first_latency is not None:  # the first model again: how much did the machine drift?
        try:
            torch.manual_seed(config.seed)
            model = specs[0].build().to(device, dtype)
            again = _time_model(model, config, device, config.batch_sizes[0])["median_ms"]
            doc["drift"] = {"model": specs[0].name, "first_ms": first_latency, "last_ms": again,
                            "last_over_first": again / first_latency}
            del model
        except VARIANT_ERRORS:
            pass
    doc["elapsed_seconds"] = round(time.perf_counter() - start, 2)
    doc["complete"] = all(r["status"] == "ok" for r in doc["rows"])
    doc["env"]["load_end"] = bench_env.machine_load()
    if output_dir is not None:
        write_outputs(doc, output_dir)
    if echo:
        for line in format_table(doc):
            echo(line)
    return doc


def _mark_front(doc: dict) -> None:
    """Set ``on_front`` on every row and ``doc["front"][batch]`` = names on the front."""
    for batch in doc["config"]["batch_sizes"]:
        rows = [r for r in doc["rows"] if r["batch"] == batch and r["status"] == "ok"]
        idx = set(pareto_front([(r["latency_ms"], r["top1"]) for r in rows]))
        for i, r in enumerate(rows):
            r["on_front"] = i in idx
        doc["front"][str(batch)] = [rows[i]["name"] for i in pareto_front(
            [(r["latency_ms"], r["top1"]) for r in rows])]
    for r in doc["rows"]:
        r.setdefault("on_front", False)


CSV_FIELDS = ("name", "family", "source", "arch", "batch", "resolution", "latency_ms", "iqr_ms", "min_ms",
              "images_per_s", "params_m", "macs_g", "top1", "top1_size", "top1_source", "on_front", "status",
              "reason")


def write_outputs(doc: dict, output_dir: str | Path) -> dict[str, Path]:
    """``pareto.json``, ``pareto.csv`` and ``pareto_b{batch}.png`` in ``output_dir``."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "pareto.json", "csv": out / "pareto.csv"}
    write_json(doc, paths["json"])
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for r in doc["rows"]:
            writer.writerow({**r, "resolution": "x".join(map(str, r["resolution"]))})
    from .plots import plot_pareto

    env = doc["env"]
    where = env["device_name"] if env["device"] != "cpu" else f"{env['cpu_model']}, {env['threads']} threads"
    for batch in doc["config"]["batch_sizes"]:
        rows = [r for r in doc["rows"] if r["batch"] == batch and r["status"] == "ok"]
        if rows:
            res = doc["config"]["resolution"]
            paths[f"png_b{batch}"] = plot_pareto(
                rows, out / f"pareto_b{batch}.png", batch,
                title=f"ImageNet top-1 vs latency at {res[0]}×{res[1]}, batch {batch} "
                      f"({where}, {env['dtype']})")
    return paths


def format_table(doc: dict) -> list[str]:
    """One table per batch size, sorted by latency; front members starred."""
    lines = []
    for batch in doc["config"]["batch_sizes"]:
        rows = sorted((r for r in doc["rows"] if r["batch"] == batch),
                      key=lambda r: (r["status"] != "ok", r.get("latency_ms") or 0.0))
        lines.append(f"batch {batch} (* = Pareto front of latency vs published top-1)")
        lines.append(f"  {'model':<20} {'family':<16} {'ms':>9} {'IQR':>7} {'img/s':>8} {'params':>8} "
                     f"{'GMACs':>7} {'top-1':>6}")
        for r in rows:
            if r["status"] != "ok":
                lines.append(f"  {r['name']:<20} {r['family']:<16} {r['status']}: {r['reason']}")
                continue
            star = "*" if r["on_front"] else " "
            macs = "?" if r["macs_g"] is None else f"{r['macs_g']:.2f}"
            lines.append(f"{star} {r['name']:<20} {r['family']:<16} {r['latency_ms']:9.2f} "
                         f"{r['iqr_ms']:7.2f} {r['images_per_s']:8.1f} {r['params_m']:7.1f}M {macs:>7} "
                         f"{r['top1']:6.1f}")
        lines.append("")
    if doc.get("drift"):
        d = doc["drift"]
        lines.append(f"drift: {d['model']} {d['first_ms']:.2f} ms first, {d['last_ms']:.2f} ms last "
                     f"(×{d['last_over_first']:.2f})")
    if doc["env"].get("load_end"):
        lines.append(f"machine load at the end: {bench_env.format_load(doc['env']['load_end'])}")
    warning = busy_warning(doc["env"])
    if warning:
        lines.append(warning)
    return lines


# ------------------------------------------------------------------------------------ CLI


def _add_arguments(p: argparse.ArgumentParser) -> None:
    d = ParetoConfig()
    p.add_argument("--output-dir", metavar="DIR",
                   help="where pareto.json/.csv/.png go (default runs/bench/pareto)")
    p.add_argument("--models", metavar="P1,P2",
                   help="names, families or archs, globs allowed (e.g. 'QT-ViT*,ConvNeXt'; default all)")
    p.add_argument("--resolution", metavar="N|HxW", help="input size (default 224)")
    p.add_argument("--batch-sizes", metavar="B1,B2", help="batch sizes (default 1)")
    p.add_argument("--dtype", choices=tuple(DTYPES), help=f"weights/input dtype (default {d.dtype})")
    p.add_argument("--device", help=f"cpu or cuda[:i] (default {d.device})")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    p.add_argument("--repeats", type=int, help=f"timed samples per model (default {d.repeats})")
    p.add_argument("--warmup", type=int, help=f"warm-up calls per model (default {d.warmup})")
    p.add_argument("--max-seconds", type=float, help=f"budget for the whole run (default {d.max_seconds:g})")
    p.add_argument("--list", action="store_true", help="list the models with their published top-1 and exit")
    p.add_argument("--quick", action="store_true", help="smoke test: 3 small models at 64 px")
    p.add_argument("--system-malloc", action="store_true",
                   help="keep glibc's default malloc thresholds (default: re-run with tuned ones)")
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")


def register(bench_subparsers: argparse._SubParsersAction) -> None:
    """Add ``qtvit bench pareto``."""
    p = bench_subparsers.add_parser(
        "pareto", help="latency vs published ImageNet top-1, Pareto front (Fig. 1)",
        description=__doc__.splitlines()[0].split(": ", 1)[1])
    _add_arguments(p)
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> ParetoConfig:
    """Resolve the flags (explicit value > ``--quick`` > default) into a validated config."""
    base = QUICK if args.quick else ParetoConfig()
    over: dict[str, object] = {}
    if args.models is not None:
        names = tuple(s.strip() for s in args.models.split(",") if s.strip())
        if not names:
            raise QtvitError("--models: empty list")
        over["models"] = names
    if args.resolution is not None:
        sizes = parse_sizes("--resolution", args.resolution)
        if len(sizes) != 1:
            raise QtvitError("--resolution: give one size")
        over["resolution"] = sizes[0]
    if args.batch_sizes is not None:
        try:
            over["batch_sizes"] = tuple(int(s) for s in args.batch_sizes.split(",") if s.strip())
        except ValueError:
            raise QtvitError(f"--batch-sizes: {args.batch_sizes!r} is not a list of integers") from None
    return bench_env.config_from_flags(base, args, ("dtype", "device", "repeats", "warmup", "max_seconds"),
                                       **over, channels_last=args.channels_last)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``qtvit bench pareto``."""
    if args.list:
        for m in PAPER_MODELS:
            print(f"{m.name:<20} {m.family:<16} {m.source}:{m.arch:<30} top-1 {m.top1:.1f} @ {m.top1_size}  "
                  f"[{m.top1_source}]")
        return 0
    config = config_from_args(args)
    code = bench_env.rerun_with_tuned_malloc("pareto", args, _add_arguments)
    if code is not None:
        return code
    out = args.output_dir or "runs/bench/pareto"
    run_pareto_benchmark(config, echo=print, output_dir=out)
    print(f"\nwrote {out}/pareto.json, pareto.csv, pareto_b*.png")
    return 0


__all__ = ["PAPER_MODELS", "ParetoConfig", "ParetoModel", "QUICK", "config_from_args", "format_table",
           "pareto_front", "register", "run", "run_pareto_benchmark", "select_models", "write_outputs"]
