"""``qtvit bench models``: whole-model speed and memory, QT models beside their twins (docs/BENCHMARKS.md)."""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models import create_model, get_model_card, resolve_model_name
from .cli import add_benchmark, flag
from .env import frozen_gc
from .plots import plot_models
from .runner import DTYPES, BenchConfig, Echo, Job, Sweep, check, format_grid, status_cell
from .timing import fmt_mb, fmt_ms, train_step

Size = tuple[int, int]  # (H, W)
VARIANT_KEYS = ("qt", "relu", "softmax", "timm")
# 224 → 2048 square, plus Cityscapes-like 1024×2048 (H×W), in increasing pixel count.
SWEEP_SIZES: tuple[Size, ...] = ((224, 224), (384, 384), (512, 512), (768, 768), (1024, 1024),
                                 (1024, 2048), (1536, 1536), (2048, 2048))
TRAIN_LR = 1e-8  # the AdamW step's arithmetic, without random weights drifting into NaN/denormals


@dataclass(frozen=True)
class ModelBenchConfig(BenchConfig):
    """Settings of one ``qtvit bench models`` run (the CLI flags map onto these fields)."""

    models: tuple[str, ...] = flag(("qtvit_b1",), "models or aliases")
    resolutions: tuple[Size, ...] = flag(((224, 224),), "sizes N or HxW")
    batch_size: int = flag(32, "batch N for throughput and train steps")
    variants: tuple[str, ...] = flag(VARIANT_KEYS, f"subset of {','.join(VARIANT_KEYS)}")
    channels_last: bool = flag(False, "channels_last inputs")
    warmup: int = 2
    variant_seconds: float = 6.0
    min_sample_seconds: float = 0.05
    max_call_seconds: float = 45.0
    max_seconds: float = flag(1200.0, "budget of the main table (s)")
    memory_fraction: float = 0.5
    train_step: bool = flag(False, "also time training steps (fwd + bwd + AdamW)")
    train_repeats: int = 5
    train_variant_seconds: float = 20.0
    sweep: bool = flag(False, "batch-1 latency and peak memory over --sweep-sizes")
    sweep_sizes: tuple[Size, ...] = flag(SWEEP_SIZES, "sizes of the sweep")
    sweep_repeats: int = 3
    sweep_variant_seconds: float = 8.0
    sweep_max_seconds: float = flag(540.0, "budget of the sweep (s)")  # ~10 minutes on a 2-core CPU
    macs: bool = flag(True, "count MACs per variant and size")  # on the meta device, ~1 s each

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad setting (unknown models included)."""
        super().validate()
        if not self.models or not self.variants:
            raise ValueError("models, variants: give at least one of each")
        for name in self.models:
            if not model_variants(name, self.variants):  # raises for unknown models / variants
                raise ValueError(f"model {name!r} has none of the variants {', '.join(self.variants)}")
        for name in ("resolutions", "sweep_sizes"):
            sizes = getattr(self, name)
            if not sizes and (name == "resolutions" or self.sweep):
                raise ValueError(f"{name}: give at least one size")
            if any(len(s) != 2 or any(not isinstance(v, int) or v < 32 for v in s) for s in sizes):
                raise ValueError(f"{name}: sizes must be (H, W) integers ≥ 32, got {sizes!r}")
        check(self, "≥ 1", "batch_size", "train_repeats", "sweep_repeats")
        if self.dtype == "float64":
            raise ValueError("dtype float64 not supported for models; use float32, bfloat16 or float16")


# `--quick`: a smoke test finishing in well under a minute that still fills every table.
QUICK = ModelBenchConfig(resolutions=((64, 64),), batch_size=4, warmup=1, repeats=3, min_repeats=2,
                         variant_seconds=0.3, min_sample_seconds=0.01, train_step=True, train_repeats=2,
                         train_variant_seconds=1.0, sweep_sizes=((64, 64), (96, 96), (128, 128)),
                         sweep_repeats=2, sweep_variant_seconds=0.5, sweep_max_seconds=60.0,
                         max_seconds=120.0)

def build_model(source: str, arch: str, kwargs: dict, what: str) -> nn.Module:
    """A freshly initialised ``arch`` from qtvit or timm (random weights, eval mode, float32, CPU);
    a missing timm is a one-line error saying ``what`` needed it."""
    if source != "timm":
        return create_model(arch, **kwargs).eval()
    try:
        import timm
    except ImportError:
        raise ImportError(f"{what} needs timm: pip install timm (or qtvit[train])") from None
    return timm.create_model(arch, pretrained=False, **kwargs).eval()


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
        return build_model(self.source, self.arch, self.kwargs, f"the {self.key!r} variant ({self.arch})")


# timm twins of the plain-ViT family (DeiT = timm's ViT at these widths); micro has none.
_VIT_TIMM = {"qtvit_vit_tiny": "deit_tiny_patch16_224", "qtvit_vit_small": "deit_small_patch16_224",
             "qtvit_vit_base": "deit_base_patch16_224"}


def model_variants(name: str, keys: Sequence[str] = VARIANT_KEYS) -> list[VariantSpec]:
    """The variants ``keys`` of model ``name`` (or alias, e.g. ``qtvit_1``) that it has; ``ValueError`` for
    unknown models or keys (listing the valid ones) and families without twins."""
    bad = [k for k in keys if k not in VARIANT_KEYS]
    if bad:
        raise ValueError(f"unknown variant(s) {', '.join(bad)}; valid: {', '.join(VARIANT_KEYS)}")
    canonical = resolve_model_name(name)  # unknown names raise, listing the valid ones
    from ..models import efficientvit

    size, vit = canonical.removeprefix("qtvit_"), canonical.startswith("qtvit_vit_")
    if size in efficientvit.CONFIGS:
        paper = get_model_card(canonical).paper_name or f"QT-ViT-{size.upper()}"
        labels = (f"{paper} (qt)", f"EfficientViT-{size.upper()} (ours, relu)", f"{paper} with softmax")
        relu, timm_arch = {"kernel": "relu", "ape": False, "shortcut": False}, f"efficientvit_{size}"
    elif vit:
        labels = tuple(f"{canonical} ({k})" for k in VARIANT_KEYS[:3])
        relu, timm_arch = {"kernel": "relu"}, _VIT_TIMM.get(canonical)
    else:
        raise ValueError(f"model {name!r} has no benchmark twins; use an EfficientViT/QT-ViT size "
                         "(qtvit_b0..qtvit_l3, qtvit_1..6) or a qtvit_vit_* model")
    table = {"qt": VariantSpec(canonical, "qt", labels[0], "qtvit", canonical),
             "relu": VariantSpec(canonical, "relu", labels[1], "qtvit", canonical, relu),
             "softmax": VariantSpec(canonical, "softmax", labels[2], "qtvit", canonical,
                                    {"kernel": "softmax"}, quadratic=True)}
    if timm_arch:
        table["timm"] = VariantSpec(canonical, "timm", f"timm {timm_arch}", "timm", timm_arch,
                                    {"dynamic_img_size": True} if vit else {}, quadratic=vit)
    return [table[k] for k in keys if k in table]


def count_macs_g(build: Callable[[], nn.Module], size: Size) -> float | None:
    """MACs of one image at ``size`` in G (meta-device forward; None if it cannot be counted)."""
    from ..models.macs import count_macs

    try:
        with torch.device("meta"):
            model = build()
        return count_macs(model, (1, 3, *size)) / 1e9
    except Exception:  # noqa: BLE001 - MACs are informative only; any failure → unknown
        return None


def prepare(model: nn.Module, config: BenchConfig, dtype: torch.dtype | None, channels_last: bool = False
            ) -> nn.Module:
    """``model`` on the config's device (and dtype), channels_last and compiled when asked."""
    model = model.to(config.device) if dtype is None else model.to(config.device, dtype)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return torch.compile(model) if config.compile else model


def forward_call(model: nn.Module, config: BenchConfig, size: Size, batch: int, dtype: torch.dtype,
                 channels_last: bool = False) -> Callable[[], torch.Tensor]:
    """Random images (B, 3, H, W), seeded by size and batch, and one inference-mode forward of them."""
    generator = torch.Generator().manual_seed(config.seed + size[0] * 7 + size[1] + batch)
    x = torch.randn(batch, 3, *size, generator=generator).to(config.device, dtype)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    return torch.inference_mode()(lambda: model(x))


def _train_call(spec: VariantSpec, config: ModelBenchConfig, size: Size) -> Callable[[], None]:
    """One training step of a fresh train-mode model: forward, cross-entropy backward, AdamW."""
    model = prepare(spec.build().train(), config, None, config.channels_last)
    generator = torch.Generator().manual_seed(config.seed)
    x = torch.randn(config.batch_size, 3, *size, generator=generator).to(config.device)
    x = x.contiguous(memory_format=torch.channels_last) if config.channels_last else x
    y = torch.randint(0, 1000, (config.batch_size,), generator=generator).to(config.device)
    return train_step(model, x, y, F.cross_entropy, DTYPES[config.dtype], lr=TRAIN_LR)


def run_models_benchmark(config: ModelBenchConfig | None = None, echo: Echo | None = None,
                         checkpoint: str | Path | None = None) -> dict:
    """Run the benchmark (default: ``qtvit_b1`` and its twins at 224) and return the result document;
    ``echo`` (e.g. ``print``) gets the header and tables, ``checkpoint`` the JSON after every step."""
    config = config or ModelBenchConfig()
    config.validate()
    phases = [("forward", 1)] + [("forward", config.batch_size)] * (config.batch_size > 1)
    phases += [("train", config.batch_size)] * config.train_step
    resolutions = sorted(config.resolutions, key=_pixels)
    sweep_sizes = sorted(config.sweep_sizes, key=_pixels) if config.sweep else []
    n_steps = len(config.models) * (len(resolutions) * len(phases) + len(sweep_sizes))
    method = (f"forward + cross-entropy backward + AdamW step (lr {TRAIN_LR:g}), train mode, batch_size "
              "images; non-fp32 dtypes under autocast")
    settings = (f"models {', '.join(config.models)}; variants {', '.join(config.variants)}; batch N = "
                f"{config.batch_size}; warmup {config.warmup}, repeats {config.repeats}")
    with frozen_gc(), Sweep("models", config, n_steps, checkpoint, echo, settings,
                            train_step_method=method) as sweep:
        sweep.doc["models"] = []
        for name in config.models:
            group = _ModelGroup(config, model_variants(name, config.variants))
            sweep.doc["models"].append(group.info)
            for size in resolutions:
                for mode, batch in phases:
                    extra = {"repeats": config.train_repeats, "variant_seconds": config.train_variant_seconds}
                    sweep.run(f"{name} {size[0]}×{size[1]} {mode} batch {batch}",
                              group.jobs(size, mode, batch), **(extra if mode == "train" else {}))
            deadline = time.perf_counter() + config.sweep_max_seconds
            for size in sweep_sizes:
                sweep.run(f"{name} sweep {size[0]}×{size[1]}", group.jobs(size, "sweep", 1),
                          deadline=deadline, repeats=config.sweep_repeats, warmup=1,
                          variant_seconds=config.sweep_variant_seconds)
            del group
    sweep.report(format_table(sweep.doc) + [""] + format_sweep(sweep.doc))
    return sweep.doc


class _ModelGroup:
    """One model's variants, built once (eval, the config's dtype) and described for the document."""

    def __init__(self, config: ModelBenchConfig, specs: list[VariantSpec]) -> None:
        self.config, self.specs, self.built, self.macs = config, specs, {}, {}
        self.info = {"model": specs[0].model, "variants": []}
        for spec in specs:
            params = error = None
            try:
                torch.manual_seed(config.seed)
                model = prepare(spec.build(), config, DTYPES[config.dtype], config.channels_last)
                self.built[spec.key], params = model, sum(p.numel() for p in model.parameters())
            except (RuntimeError, ValueError, TypeError, ImportError) as err:
                error = f"{type(err).__name__}: {err}"
            self.info["variants"].append({"variant": spec.key, "label": spec.label, "source": spec.source,
                                          "arch": spec.arch, "kwargs": spec.kwargs, "params": params,
                                          "error": error})

    def jobs(self, size: Size, mode: str, batch: int) -> list[Job]:
        """The runner's jobs for one step: every variant at one size, mode and batch."""
        cfg, out, train = self.config, [], mode == "train"
        for spec, info in zip(self.specs, self.info["variants"], strict=True):
            if cfg.macs and (spec.key, size) not in self.macs:
                self.macs[spec.key, size] = count_macs_g(spec.build, size)
            if train:
                build = lambda spec=spec: _train_call(spec, cfg, size)  # noqa: E731
            else:
                build = lambda spec=spec: forward_call(  # noqa: E731
                    self.built[spec.key], cfg, size, batch, DTYPES[cfg.dtype], cfg.channels_last)
            out.append(Job(
                series=f"{spec.key} {'train' if train else 'forward'}", size=_pixels(size), batch=batch,
                quadratic=spec.quadratic, build=build,
                fallback=(f"{spec.key} forward", 3.0) if train else None,  # backward ≈ 2 forwards
                extra_bytes=3 * 4 * (info["params"] or 0) if train else 0,  # grads + AdamW state
                skip=None if spec.key in self.built else ("failed", f"could not be built: {info['error']}"),
                entry={"model": spec.model, "variant": spec.key, "label": spec.label, "mode": mode,
                       "batch": batch, "resolution": list(size), "params": info["params"],
                       "macs_g": self.macs.get((spec.key, size))}))
        return out


def _pixels(size: Sequence[int]) -> int:
    return size[0] * size[1]


def _cells(entry: dict | None, *fields: str) -> list[str]:
    """A status cell and blanks, or the entry's ``fields`` formatted (``ms``, ``iqr``, ``mb``, ``per_s``)."""
    status = status_cell(entry)
    if status:
        return [status] + [""] * (len(fields) - 1)
    fmt = {"ms": lambda e: fmt_ms(e["median_ms"]), "iqr": lambda e: f"±{fmt_ms(e['iqr_ms'] / 2)}",
           "mb": lambda e: fmt_mb(e["peak_mb"]), "per_s": lambda e: f"{e['per_s']:.1f}"}
    return [fmt[f](entry) for f in fields]


def format_table(doc: dict) -> list[str]:
    """Main table: one block per model and resolution, one row per variant."""
    cfg, lines, n = doc["config"], [], doc["config"]["batch_size"]
    by_key = {(e["model"], e["variant"], e["mode"], e["batch"], tuple(e["resolution"])): e
              for e in doc["results"]}
    header = ["variant", "params", "GMACs", "b1 ms", "IQR", "b1 MB"]
    header += [f"b{n} ms", f"b{n} img/s", f"b{n} MB"] * (n > 1)
    header += ["train img/s", "train MB"] * cfg["train_step"]
    for info in doc["models"]:
        model = info["model"]
        sizes = {key[4] for key in by_key if key[0] == model and key[2] != "sweep"}
        for size in sorted(sizes, key=_pixels):
            rows = []
            for v in info["variants"]:
                b1, bn, tr = (by_key.get((model, v["variant"], m, b, size))
                              for m, b in (("forward", 1), ("forward", n), ("train", n)))
                rows.append([f"{v['variant']}: {v['label']}",
                             "?" if v["params"] is None else f"{v['params'] / 1e6:.2f}M",
                             "?" if not b1 or b1.get("macs_g") is None else f"{b1['macs_g']:.3g}",
                             *_cells(b1, "ms", "iqr", "mb"),
                             *(_cells(bn, "ms", "per_s", "mb") if n > 1 else []),
                             *(_cells(tr, "per_s", "mb") if cfg["train_step"] else [])])
            lines += [f"{model} at {size[0]}×{size[1]}"] + format_grid(header, rows) + [""]
    return lines + ["ms: median per call (IQR/2 as ±); MB: peak MiB above weights and inputs; "
                    "skip:<code>, errors and details in the JSON."]


def format_sweep(doc: dict) -> list[str]:
    """Sweep table: rows variants, columns sizes, cells ``ms | MB`` (skips show predictions)."""
    entries = [e for e in doc["results"] if e["mode"] == "sweep"]
    lines = ["resolution sweep, batch 1 (cells: median ms | peak MiB; skip:<code> ~predicted ms)"]
    lines = lines if entries else []
    for model in dict.fromkeys(e["model"] for e in entries):
        cells = {(e["variant"], tuple(e["resolution"])): e for e in entries if e["model"] == model}
        sizes = sorted({size for _, size in cells}, key=_pixels)
        rows = []
        for key in dict.fromkeys(v for v, _ in cells):
            row = [key]
            for e in (cells.get((key, size)) for size in sizes):
                s = status_cell(e)
                if s and e is not None and e.get("predicted_ms") is not None:
                    s += f" ~{fmt_ms(e['predicted_ms'])}"
                row.append(s or f"{fmt_ms(e['median_ms'])} | {fmt_mb(e['peak_mb'])}")
            rows.append(row)
        lines += format_grid([model] + [f"{h}×{w}" for h, w in sizes], rows) + [""]
    return lines


def register(bench_subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``qtvit bench models``."""
    return add_benchmark(
        bench_subparsers, "models",
        help="whole-model latency, throughput, memory and training steps vs twins",
        doc=__doc__, config_class=ModelBenchConfig, quick=QUICK,
        run=lambda config, args: run_models_benchmark(config, echo=print, checkpoint=args.output),
        output=("--output", "FILE.json", "write the results as JSON (updated after each step)"),
        plot=("log-log sweep plot (with --sweep), else batch-1 bars", plot_models))
