"""``qtvit bench attention``: time and peak memory of every attention kernel and SDPA (docs/BENCHMARKS.md)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..kernels import attention as kernel_attention
from ..kernels import get_kernel, list_kernels
from ..kernels import triton as fused_triton
from .cli import add_benchmark, flag
from .runner import BenchConfig, Echo, Job, Sweep, check, format_grid, status_cell
from .timing import fmt_mb, fmt_ms

IMPLS = ("linear", "dense", "sdpa", "triton")


@dataclass(frozen=True)
class AttentionBenchConfig(BenchConfig):
    """Settings of one attention benchmark run (``qtvit bench attention`` flags map onto them)."""

    kernels: tuple[str, ...] | None = flag(None, "comma-separated kernel names, or all")
    impls: tuple[str, ...] = flag(("linear", "dense", "sdpa"), f"comma-separated from {','.join(IMPLS)}")
    tokens: tuple[int, ...] = flag((256, 1024, 4096, 16384, 65536), "token counts N")
    head_dims: tuple[int, ...] = flag((16, 32), "head dims d")
    batch: int = flag(1, "batch size B")
    heads: int = flag(8, "heads H")
    backward: bool = flag(False, "time forward + backward")
    compile_backend: str = "inductor"  # torch.compile's backend ("eager" only traces: tests)
    max_dense_tokens: int = flag(16384, "largest N for the O(N²) dense paths")

    def validate(self) -> None:
        super().validate()
        for name in self.kernels or ():  # () is "nothing to measure" at run time; the CLI refuses it
            get_kernel(name)  # raises, listing the valid names
        bad = [i for i in self.impls if i not in IMPLS]
        if bad or not self.impls:
            raise ValueError(f"impls: {', '.join(bad) or 'nothing'} not valid; choose from "
                             f"{', '.join(IMPLS)}")
        check(self, "≥ 1", "tokens", "head_dims", "batch", "heads", "max_dense_tokens")
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

@dataclass(frozen=True)
class Variant:
    """One measured code path: a kernel and how it is computed ("linear", "dense", "sdpa", "triton")."""

    kernel: str
    impl: str

    @property
    def name(self) -> str:
        return f"{self.kernel}/{self.impl}"


def build_variants(config: AttentionBenchConfig) -> list[Variant]:
    """SDPA first, then every linear path, then every dense path (the table's row order)."""
    kernels, impls, fused = [get_kernel(n) for n in config.kernel_names()], config.impls, fused_triton.KERNELS
    return ([Variant("softmax", "sdpa")] * ("sdpa" in impls)
            + [Variant(k.name, "linear") for k in kernels if "linear" in impls and k.has_linear]
            + [Variant(k.name, "triton") for k in kernels if "triton" in impls and k.name in fused]
            + [Variant(k.name, "dense") for k in kernels
               if "dense" in impls and not (k.name == "softmax" and "sdpa" in impls)])


def _make_call(variant: Variant, config: AttentionBenchConfig, d: int, n: int) -> Callable[[], object]:
    """Inputs (B, H, N, d) and a zero-argument function doing one forward (or forward + backward)."""
    generator = torch.Generator().manual_seed(config.seed + 1000 * d + n)
    device, dtype = torch.device(config.device), getattr(torch, config.dtype)
    shape = (config.batch, config.heads, n, d)
    q, k, v = (torch.randn(shape, generator=generator).to(device, dtype).requires_grad_(config.backward)
               for _ in range(3))

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if variant.impl == "sdpa":
            return F.scaled_dot_product_attention(q, k, v)
        return kernel_attention(q, k, v, variant.kernel, impl=variant.impl)

    if config.compile:
        attend = torch.compile(attend, backend=config.compile_backend, fullgraph=True, dynamic=False)
    if not config.backward:
        return torch.no_grad()(lambda: attend(q, k, v))
    grad_out = torch.randn(shape, generator=generator).to(device, dtype)

    def forward_backward() -> None:
        q.grad = k.grad = v.grad = None
        attend(q, k, v).backward(grad_out)
    return forward_backward


def run_attention_benchmark(config: AttentionBenchConfig | None = None, echo: Echo | None = None,
                            checkpoint: str | Path | None = None) -> dict:
    """Run the benchmark (default: the full sweep) and return the result document; ``echo`` (e.g.
    ``print``) gets the header and table, ``checkpoint`` the JSON after every step."""
    config = config or AttentionBenchConfig()
    config.validate()
    variants = build_variants(config)
    if not variants:
        raise ValueError(f"nothing to measure: kernels {', '.join(config.kernel_names())} have no "
                         f"variant for impl {', '.join(config.impls)}")
    steps = [(d, n) for d in config.head_dims for n in config.tokens]
    mode = "forward + backward" if config.backward else "forward only (no_grad)"
    mode += f", torch.compile ({config.compile_backend})" if config.compile else ""
    settings = (f"B={config.batch} H={config.heads}, {mode}, warmup {config.warmup}, repeats "
                f"{config.repeats} (≥ {config.min_repeats} for slow variants), budget "
                f"{config.max_seconds:g} s")
    with Sweep("attention", config, len(steps), checkpoint, echo, settings, kernels=config.kernel_names(),
               variants=[v.name for v in variants]) as sweep:
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
    sweep.report(format_table(sweep.doc) + [""])
    return sweep.doc


def format_table(doc: dict) -> list[str]:
    """One table per head dim: rows variants, columns N, cells ``median ms | peak MiB`` (``*``: noisy)."""
    cfg, lines = doc["config"], []
    by_key = {(r["variant"], r["head_dim"], r["tokens"]): r for r in doc["results"]}
    for d in cfg["head_dims"]:
        rows = [[name] + [status_cell(e) or f"{fmt_ms(e['median_ms'])}{'*' if _noisy(e) else ''} | "
                          f"{fmt_mb(e['peak_mb'])}" for e in (by_key.get((name, d, n)) for n in cfg["tokens"])
                          ] for name in cfg["variants"]]
        lines += format_grid([f"d={d}"] + [f"N={n}" for n in cfg["tokens"]], rows) + [""]
    return lines + [
        "cells: median ms per call | peak MiB above the inputs; * noisy (median > 1.5× min or IQR > 50% "
        "of median: see min_ms in the JSON).",
        "skip:cap dense N cap; skip:triton Triton kernels unavailable (CUDA only; TRITON_INTERPRET=1 "
        "runs them on CPU, for checking, not timing);",
        "skip:time/memory predicted (or warm-up) over max_call_seconds / available "
        "memory; skip:budget max_seconds spent; skip:failed failed at a smaller N."]


def _noisy(entry: dict) -> bool:
    """Samples spread too widely for the median to be trusted (a busy machine)."""
    return entry["median_ms"] > 1.5 * entry["min_ms"] or entry["iqr_ms"] > 0.5 * entry["median_ms"]


def register(bench_subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``qtvit bench attention``."""
    return add_benchmark(
        bench_subparsers, "attention", help="time and peak memory of every attention kernel and SDPA",
        doc=__doc__, config_class=AttentionBenchConfig, quick=QUICK,
        run=lambda config, args: run_attention_benchmark(config, echo=print, checkpoint=args.output),
        output=("--output", "FILE.json", "write the results as JSON (updated after each step)"))
