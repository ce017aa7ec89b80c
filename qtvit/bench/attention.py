"""``qtvit bench attention``: time and peak memory of every attention kernel and of SDPA.

For each head dim d and token count N, q, k, v of shape (B, H, N, d) (random normal, fixed
seed) go through every *variant*, all interleaved in one step of the shared runner
(:mod:`qtvit.bench.runner`, which also documents the skip codes):
  * ``<kernel>/linear``: ``qtvit.attention(q, k, v, kernel, impl="linear")`` (kernels with a
    feature map); time grows ∝ N;
  * ``<kernel>/dense``: ``impl="dense"``, the N×N reference path (∝ N²), capped at
    ``max_dense_tokens`` (skip code ``cap``);
  * ``<kernel>/triton``: ``impl="triton"``, the fused Triton kernels (qt and relu; only when
    asked for, e.g. ``--impl linear,sdpa,triton``; skip code ``triton`` where Triton cannot run:
    CPU tensors unless ``TRITON_INTERPRET=1``, whose interpreted timings mean nothing);
  * ``softmax/sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` called directly, the
    baseline. ``softmax/dense`` runs that same function through ``qtvit.attention``, so it is
    measured only when ``sdpa`` is not.
Forward only under ``torch.no_grad()`` by default; ``backward`` times forward + backward.
``compile`` puts every variant through ``torch.compile`` (``compile_backend``, static shapes).
Ratios (qt ÷ relu, SDPA ÷ qt) are divisions of medians from one run; the targets the project
holds them to are stated in docs/RESULTS.md, not here.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..io import write_json  # noqa: F401  (re-exported for modules that still import it from here)
from ..kernels import attention as kernel_attention
from ..kernels import get_kernel, list_kernels
from ..kernels import triton as fused_triton
from .cli import add_benchmark
from .runner import (
    COMMON_HELPS,
    BenchConfig,
    Echo,
    Job,
    Sweep,
    format_footer,
    format_grid,
    format_header,
    status_cell,
)
from .timing import fmt_mb, fmt_ms

IMPLS = ("linear", "dense", "sdpa", "triton")


@dataclass(frozen=True)
class AttentionBenchConfig(BenchConfig):
    """Settings of one attention benchmark run (``qtvit bench attention`` flags map onto them)."""

    kernels: tuple[str, ...] | None = None  # None: every registered kernel
    impls: tuple[str, ...] = ("linear", "dense", "sdpa")  # "triton" on request (CUDA)
    tokens: tuple[int, ...] = (256, 1024, 4096, 16384, 65536)
    head_dims: tuple[int, ...] = (16, 32)
    batch: int = 1
    heads: int = 8
    backward: bool = False
    compile_backend: str = "inductor"  # torch.compile's backend ("eager" only traces: tests)
    # SDPA at N=16384 takes ~3.5 s per call on the 2-core CPU and is worth measuring; the dense
    # paths at 16384 (predicted 16× their N=4096 time) are not
    max_dense_tokens: int = 16384

    def validate(self) -> None:
        super().validate()
        if self.kernels is not None:
            if not self.kernels:
                raise ValueError("kernels: give at least one kernel name")
            for name in self.kernels:
                get_kernel(name)  # raises, listing the valid names
        bad = [i for i in self.impls if i not in IMPLS]
        if bad or not self.impls:
            raise ValueError(f"impls: {', '.join(bad) or 'nothing'} not valid; "
                             f"choose from {', '.join(IMPLS)}")
        for name in ("tokens", "head_dims"):
            values = getattr(self, name)
            if not values or any(not isinstance(v, int) or v < 1 for v in values):
                raise ValueError(f"{name}: need positive integers, got {values!r}")
        for name in ("batch", "heads", "max_dense_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        backends = torch.compiler.list_backends(exclude_tags=())
        if self.compile and self.compile_backend not in backends:
            raise ValueError(f"compile_backend {self.compile_backend!r} unknown; torch.compile has "
                             f"{', '.join(backends)}")

    def kernel_names(self) -> list[str]:
        """The kernels to measure, in registry order when not given explicitly."""
        return list(self.kernels) if self.kernels is not None else list_kernels()


# `--quick`: a smoke test finishing in seconds.
QUICK = AttentionBenchConfig(kernels=("relu", "qt"), impls=("linear", "sdpa"), tokens=(256, 1024, 4096),
                             head_dims=(16,), repeats=3, min_repeats=2, variant_seconds=0.3, max_seconds=60.0)

# the fields that are command-line flags, with their help
HELPS = {
    **COMMON_HELPS, "kernels": "comma-separated kernel names, or all",
    "impls": f"comma-separated from {','.join(IMPLS)}", "tokens": "token counts N",
    "head_dims": "head dims d",
    "batch": "batch size B", "heads": "heads H", "backward": "time forward + backward",
    "max_dense_tokens": "largest N for the O(N²) dense paths",
}


@dataclass(frozen=True)
class Variant:
    """One measured code path: a kernel and how it is computed."""

    kernel: str
    impl: str  # "linear", "dense", "sdpa" or "triton"

    @property
    def name(self) -> str:
        return f"{self.kernel}/{self.impl}"


def build_variants(config: AttentionBenchConfig) -> list[Variant]:
    """SDPA first, then every linear path, then every dense path (the table's row order)."""
    kernels = [get_kernel(n) for n in config.kernel_names()]
    variants = [Variant("softmax", "sdpa")] if "sdpa" in config.impls else []
    if "linear" in config.impls:
        variants += [Variant(k.name, "linear") for k in kernels if k.has_linear]
    if "triton" in config.impls:
        variants += [Variant(k.name, "triton") for k in kernels if k.name in fused_triton.KERNELS]
    if "dense" in config.impls:
        variants += [Variant(k.name, "dense") for k in kernels
                     if not (k.name == "softmax" and "sdpa" in config.impls)]
    return variants


def _make_call(variant: Variant, config: AttentionBenchConfig, d: int, n: int) -> Callable[[], object]:
    """Inputs (B, H, N, d) and a zero-argument function doing one forward (or forward + backward)."""
    generator = torch.Generator().manual_seed(config.seed + 1000 * d + n)
    device, dtype = torch.device(config.device), getattr(torch, config.dtype)
    shape = (config.batch, config.heads, n, d)
    q, k, v = (torch.randn(shape, generator=generator).to(device, dtype).requires_grad_(config.backward)
               for _ in range(3))
    if variant.impl == "sdpa":
        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return F.scaled_dot_product_attention(q, k, v)
    else:
        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return kernel_attention(q, k, v, variant.kernel, impl=variant.impl)
    if config.compile:
        attend = torch.compile(attend, backend=config.compile_backend, fullgraph=True, dynamic=False)
    if not config.backward:
        def forward() -> torch.Tensor:
            with torch.no_grad():
                return attend(q, k, v)
        return forward
    grad_out = torch.randn(shape, generator=generator).to(device, dtype)

    def forward_backward() -> None:
        q.grad = k.grad = v.grad = None
        attend(q, k, v).backward(grad_out)
    return forward_backward


def run_attention_benchmark(config: AttentionBenchConfig | None = None, echo: Echo | None = None,
                            checkpoint: str | Path | None = None) -> dict:
    """Run the attention benchmark and return the result document (:mod:`qtvit.bench.runner`).

    Args:
        config: settings; the defaults are the full sweep.
        echo: prints the header and table when given (e.g. ``print``).
        checkpoint: if given, the document so far is written there (JSON) after every step.
    """
    config = config or AttentionBenchConfig()
    config.validate()
    variants = build_variants(config)
    if not variants:
        raise ValueError(f"nothing to measure: kernels {', '.join(config.kernel_names())} have no "
                         f"variant for impl {', '.join(config.impls)}")
    steps = [(d, n) for d in config.head_dims for n in config.tokens]
    with Sweep("attention", config, len(steps), checkpoint, kernels=config.kernel_names(),
               variants=[v.name for v in variants]) as sweep:
        if echo:
            mode = "forward + backward" if config.backward else "forward only (no_grad)"
            mode += f", torch.compile ({config.compile_backend})" if config.compile else ""
            for line in format_header(sweep.doc, f"B={config.batch} H={config.heads}, {mode}, warmup "
                                      f"{config.warmup}, repeats {config.repeats} (≥ {config.min_repeats} "
                                      f"for slow variants), budget {config.max_seconds:g} s"):
                echo(line)
        cap = f"dense paths capped at N ≤ {config.max_dense_tokens} (max_dense_tokens)"
        no_triton = fused_triton.unavailable_reason(config.device)
        for d, n in steps:
            sweep.run(f"d={d} N={n}", [
                Job(series=f"{v.name} d={d}", size=n, quadratic=v.impl not in ("linear", "triton"),
                    build=lambda v=v, d=d, n=n: _make_call(v, config, d, n),
                    skip=("cap", cap) if v.impl == "dense" and n > config.max_dense_tokens else
                    ("triton", no_triton) if v.impl == "triton" and no_triton else None,
                    entry={"variant": v.name, "kernel": v.kernel, "impl": v.impl, "head_dim": d,
                           "tokens": n, "batch": config.batch})
                for v in variants])
    if echo:
        for line in format_table(sweep.doc) + [""] + format_footer(sweep.doc):
            echo(line)
    return sweep.doc


def _noisy(entry: dict) -> bool:
    """Samples spread too widely for the median to be trusted (a busy machine)."""
    return entry["median_ms"] > 1.5 * entry["min_ms"] or entry["iqr_ms"] > 0.5 * entry["median_ms"]


def format_table(doc: dict) -> list[str]:
    """One table per head dim: rows variants, columns N, cells ``median ms | peak MiB``."""
    cfg = doc["config"]
    by_key = {(r["variant"], r["head_dim"], r["tokens"]): r for r in doc["results"]}
    lines = []
    for d in cfg["head_dims"]:
        rows = []
        for name in cfg["variants"]:
            entries = [by_key.get((name, d, n)) for n in cfg["tokens"]]
            rows.append([name] + [status_cell(e) or f"{fmt_ms(e['median_ms'])}{'*' if _noisy(e) else ''} | "
                                  f"{fmt_mb(e['peak_mb'])}" for e in entries])
        lines += format_grid([f"d={d}"] + [f"N={n}" for n in cfg["tokens"]], rows) + [""]
    return lines + [
        "cells: median ms per call | peak MiB above the inputs; * noisy (median > 1.5× min or IQR > 50% "
        "of median: see min_ms in the JSON).",
        "skip:cap dense N cap; skip:triton Triton kernels unavailable (CUDA only; TRITON_INTERPRET=1 "
        "runs them on CPU, for checking, not timing);",
        "skip:time/memory predicted (or warm-up) over max_call_seconds / available "
        "memory; skip:budget max_seconds spent; skip:failed failed at a smaller N."]


def _run(config: AttentionBenchConfig, args: argparse.Namespace) -> int:
    run_attention_benchmark(config, echo=print, checkpoint=args.output)
    if args.output:
        print(f"\nwrote {args.output}")
    return 0


def register(bench_subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``qtvit bench attention``."""
    return add_benchmark(
        bench_subparsers, "attention", help="time and peak memory of every attention kernel and SDPA",
        description="Time and peak memory of every attention kernel (linear and dense paths) and of torch's "
                    "scaled_dot_product_attention, interleaved; prints a table, writes JSON.",
        config_class=AttentionBenchConfig, quick=QUICK, helps=HELPS, run=_run,
        output=("--output", "FILE.json", "write the results as JSON (updated after each step)"))


__all__ = ["AttentionBenchConfig", "QUICK", "Variant", "build_variants", "format_table", "register",
           "run_attention_benchmark"]
