"""``qtvit bench pareto``: the paper's Figure 1 on this device, latency vs top-1 (docs/BENCHMARKS.md)."""
from __future__ import annotations

import argparse
import csv
import dataclasses
import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch.nn as nn

from ..io import atomic_output
from ..models import get_model_card
from .cli import add_benchmark, flag
from .env import frozen_gc
from .models import Size, build_model, forward_call, prepare
from .plots import plot_pareto
from .runner import DTYPES, BenchConfig, Echo, Job, Sweep, check, format_grid


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
        return build_model(self.source, self.arch, self.kwargs, self.name)


def _family(family: str, source: str, cite: str, rows: Sequence[tuple], **kwargs) -> list[ParetoModel]:
    """rows: (name, arch, top1, top1_size)."""
    return [ParetoModel(name, family, source, arch, top1, cite, size, dict(kwargs))
            for name, arch, top1, size in rows]


_EFFVIT = ("b1", "b2", "b3", "l1", "l2", "l3")
_EFFVIT_TOP1 = (79.4, 82.1, 83.5, 84.5, 85.1, 85.8)  # EfficientViT paper, r224 models
_EFFVIT_CITE = "EfficientViT (Cai et al., ICCV 2023), r224 models"

# Published ImageNet-1k top-1 (%) of every model in the comparison, from each model's own paper
# (the numbers the QT-ViT/EfficientViT comparison tables quote). Resolution = that of the number.
PAPER_MODELS: tuple[ParetoModel, ...] = tuple(
    _family("QT-ViT", "qtvit", "QT-ViT (Xu et al., NeurIPS 2024) Table 1, via the model card",
            [(get_model_card(f"qtvit_{s}").paper_name or f"QT-ViT-{i}", f"qtvit_{s}",
              get_model_card(f"qtvit_{s}").top1, 224) for i, s in enumerate(_EFFVIT, 1)])
    + _family("EfficientViT (qtvit)", "qtvit", _EFFVIT_CITE,
              [(f"EfficientViT-{s.upper()} (qtvit)", f"qtvit_{s}", t, 224)
               for s, t in zip(_EFFVIT, _EFFVIT_TOP1, strict=True)],
              kernel="relu", ape=False, shortcut=False)
    + _family("EfficientViT (timm)", "timm", _EFFVIT_CITE,
              [(f"EfficientViT-{s.upper()}", f"efficientvit_{s}", t, 224)
               for s, t in zip(_EFFVIT, _EFFVIT_TOP1, strict=True)])
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
    + _family("SwinV2", "timm", "Swin Transformer V2 (Liu et al., CVPR 2022), ImageNet-1k, window 8", [
        ("SwinV2-T", "swinv2_tiny_window8_256", 81.8, 256),
        ("SwinV2-S", "swinv2_small_window8_256", 83.7, 256),
        ("SwinV2-B", "swinv2_base_window8_256", 84.2, 256)])
    + _family("PoolFormer", "timm", "MetaFormer/PoolFormer (Yu et al., CVPR 2022) Table 1", [
        ("PoolFormer-S12", "poolformer_s12", 77.2, 224), ("PoolFormer-S24", "poolformer_s24", 80.3, 224),
        ("PoolFormer-S36", "poolformer_s36", 81.4, 224), ("PoolFormer-M36", "poolformer_m36", 82.1, 224),
        ("PoolFormer-M48", "poolformer_m48", 82.5, 224)])
    + _family("MobileViT", "timm", "MobileViT (Mehta & Rastegari, ICLR 2022), 256 px", [
        ("MobileViT-XXS", "mobilevit_xxs", 69.0, 256), ("MobileViT-XS", "mobilevit_xs", 74.8, 256),
        ("MobileViT-S", "mobilevit_s", 78.4, 256)])
    + _family("MobileViTv2", "timm", "MobileViTv2 (Mehta & Rastegari, 2022, separable attention), 256 px", [
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
# models whose timm builder takes a fixed input size: told the timed one
_FIXED_SIZE = ("SwinV2", "Swin", "CoAtNet", "MaxViT", "EfficientFormer")


def select_models(patterns: Sequence[str] | None) -> list[ParetoModel]:
    """Models whose name, family or arch matches one of ``patterns`` (case-insensitive globs; None:
    all); a pattern that matches nothing raises ``ValueError`` listing the names."""
    if patterns is None:
        return list(PAPER_MODELS)
    chosen: list[ParetoModel] = []
    for pattern in patterns:
        hits = [m for m in PAPER_MODELS
                if any(fnmatch.fnmatchcase(s.lower(), pattern.lower()) for s in (m.name, m.family, m.arch))]
        if not hits:
            families = ", ".join(dict.fromkeys(m.family for m in PAPER_MODELS))
            names = ", ".join(m.name for m in PAPER_MODELS)
            raise ValueError(f"no model matches {pattern!r}; names: {names}; families: {families}")
        chosen += [m for m in hits if m not in chosen]
    return chosen


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points (latency, accuracy) no other point dominates (latency ≤ and accuracy ≥,
    one strict: exact duplicates both stay), by increasing latency."""
    front = [i for i, (lat_i, acc_i) in enumerate(points)
             if not any(lat_j <= lat_i and acc_j >= acc_i and (lat_j < lat_i or acc_j > acc_i)
                        for j, (lat_j, acc_j) in enumerate(points) if j != i)]
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))


@dataclass(frozen=True)
class ParetoConfig(BenchConfig):
    """Settings of one ``qtvit bench pareto`` run (the CLI flags map onto these fields)."""

    models: tuple[str, ...] | None = flag(None, "names, families or archs, globs allowed (e.g. "
                                                "'QT-ViT*,ConvNeXt')")
    resolution: Size | None = flag(None, "one input size for every model, N or HxW (default: each at its "
                                         "top-1's resolution)")
    batch_sizes: tuple[int, ...] = flag((1,), "batch sizes")
    channels_last: bool = flag(False, "channels_last inputs")
    warmup: int = 2
    repeats: int = 7
    variant_seconds: float = 3.0
    min_sample_seconds: float = 0.05
    max_call_seconds: float = 30.0
    max_seconds: float = 1200.0
    memory: bool = flag(False, "also measure peak memory")

    def validate(self) -> None:
        super().validate()
        select_models(self.models)
        check(self, "≥ 1", "batch_sizes")
        if self.resolution is not None and (len(self.resolution) != 2 or min(self.resolution) < 32):
            raise ValueError(f"resolution must be (H, W) ≥ 32, got {self.resolution!r}")


# `--quick`: three small models at 64 px — a smoke test of the whole pipeline in seconds.
QUICK = ParetoConfig(models=("QT-ViT-1", "EfficientViT-B1 (qtvit)", "PoolFormer-S12"),
                     resolution=(64, 64), warmup=1, repeats=2, min_repeats=2, variant_seconds=0.3,
                     min_sample_seconds=0.01, max_seconds=120.0)

def _build(spec: ParetoModel, config: ParetoConfig, size: Size, batch: int):
    if spec.family in _FIXED_SIZE and size != (spec.top1_size, spec.top1_size):
        spec = dataclasses.replace(spec, kwargs={**spec.kwargs, "img_size": size})
    model = prepare(spec.build(), config, DTYPES[config.dtype], config.channels_last)
    return forward_call(model, config, size, batch, DTYPES[config.dtype], config.channels_last)


def run_pareto_benchmark(config: ParetoConfig | None = None, echo: Echo | None = None,
                         output_dir: str | Path | None = None) -> dict:
    """Time every selected model, mark the Pareto front; write JSON/CSV/PNG to ``output_dir`` if given."""
    config = config or ParetoConfig()
    config.validate()
    specs = select_models(config.models)
    out = Path(output_dir) if output_dir is not None else None
    where = ("each at its top-1's resolution" if config.resolution is None
             else f"all at {config.resolution[0]}×{config.resolution[1]}")
    settings = (f"{len(specs)} models, {where}, batch {', '.join(map(str, config.batch_sizes))}, random "
                "weights, interleaved")
    with frozen_gc(), Sweep("pareto", config, len(config.batch_sizes), out and out / "pareto.json", echo,
                            settings) as sweep:
        for batch in config.batch_sizes:
            jobs = []
            for spec in specs:
                size = config.resolution or (spec.top1_size, spec.top1_size)
                build = lambda spec=spec, size=size, b=batch: _build(spec, config, size, b)  # noqa: E731
                jobs.append(Job(series=spec.name, size=size[0] * size[1], batch=batch, build=build,
                                entry={**dataclasses.asdict(spec), "batch": batch, "resolution": list(size),
                                       "top1_at_timed_size": size == (spec.top1_size, spec.top1_size)}))
            rows = sweep.run(f"batch {batch}", jobs)
            ok = [r for r in rows if r["status"] == "ok"]
            front = [ok[i] for i in pareto_front([(r["median_ms"], r["top1"]) for r in ok])]
            for r in rows:
                r["on_front"] = any(r is f for f in front)
            sweep.doc.setdefault("front", {})[str(batch)] = [r["name"] for r in front]
    if out is not None:
        write_outputs(sweep.doc, out)
    sweep.report(format_table(sweep.doc))
    return sweep.doc


CSV_FIELDS = ("name", "family", "source", "arch", "batch", "resolution", "median_ms", "min_ms", "iqr_ms",
              "per_s", "top1", "top1_size", "top1_at_timed_size", "top1_source", "on_front", "status",
              "reason")


def write_outputs(doc: dict, output_dir: str | Path) -> dict[str, Path]:
    """``pareto.csv`` and ``pareto_b{batch}.png`` in ``output_dir`` (the JSON is the runner's)."""
    out = Path(output_dir)
    paths = {"json": out / "pareto.json", "csv": out / "pareto.csv"}
    with atomic_output(paths["csv"]) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for r in doc["results"]:
            writer.writerow({**r, "resolution": "x".join(map(str, r["resolution"]))})
    env = doc["env"]
    where = env["device_name"] if env["device"] != "cpu" else f"{env['cpu_model']}, {env['threads']} threads"
    for batch in doc["config"]["batch_sizes"]:
        rows = [r for r in doc["results"] if r["batch"] == batch and r["status"] == "ok"]
        if rows:
            title = f"ImageNet top-1 vs latency, batch {batch} ({where}, {env['dtype']})"
            paths[f"png_b{batch}"] = plot_pareto(rows, out / f"pareto_b{batch}.png", batch, title=title)
    return paths


def format_table(doc: dict) -> list[str]:
    """One table per batch size, sorted by median latency; front members starred."""
    lines = []
    for batch in doc["config"]["batch_sizes"]:
        rows = sorted((r for r in doc["results"] if r["batch"] == batch),
                      key=lambda r: (r["status"] != "ok", r.get("median_ms") or 0.0))
        lines += [f"batch {batch} (* = Pareto front of median latency vs published top-1; † top-1 "
                  "measured at another resolution)"] + format_grid(
            ["  model", "family", "size", "median ms", "min ms", "img/s", "top-1"],
            [[("* " if r["on_front"] else "  ") + r["name"], r["family"], str(r["resolution"][0]),
              f"{r['median_ms']:.2f}", f"{r['min_ms']:.2f}", f"{r['per_s']:.1f}",
              f"{r['top1']:.1f}{'' if r['top1_at_timed_size'] else '†'}"]
             for r in rows if r["status"] == "ok"])
        lines += [f"  {r['name']} ({r['family']}): {r['status']} {r['skip'] or ''}: {r['reason']}"
                  for r in rows if r["status"] != "ok"] + [""]
    return lines


def _run(config: ParetoConfig, args: argparse.Namespace) -> None:
    if args.list:
        for m in PAPER_MODELS:
            print(f"{m.name:<26} {m.family:<20} {m.source}:{m.arch:<30} top-1 {m.top1:.1f} @ "
                  f"{m.top1_size}  [{m.top1_source}]")
        return
    out = args.output_dir or "runs/bench/pareto"
    run_pareto_benchmark(config, echo=print, output_dir=out)
    print(f"\nwrote {out}/pareto.json, pareto.csv, pareto_b*.png")


def register(bench_subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``qtvit bench pareto``."""
    p = add_benchmark(bench_subparsers, "pareto", help="latency vs published ImageNet top-1, Pareto front",
                      doc=__doc__, config_class=ParetoConfig, quick=QUICK, run=_run,
                      output=("--output-dir", "DIR", "where pareto.json/.csv/.png go "
                                                     "(default runs/bench/pareto)"))
    p.add_argument("--list", action="store_true", help="list the models with their published top-1 and exit")
    return p
