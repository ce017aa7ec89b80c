"""``qtvit bench attention``: time and peak memory of every attention kernel and of SDPA.

For each head dim d and token count N, q, k, v of shape (B, H, N, d) (random normal, fixed
seed) go through every *variant*:
  * ``<kernel>/linear``: ``qtvit.attention(q, k, v, kernel, impl="linear")`` (kernels with a
    feature map);
  * ``<kernel>/dense``: ``impl="dense"``, the N×N reference path;
  * ``softmax/sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` called directly, the
    baseline. ``softmax/dense`` runs that same function through ``qtvit.attention``, so it is
    measured only when ``sdpa`` is not.
Forward only under ``torch.no_grad()`` by default; ``backward=True`` times forward + backward.
``compile=True`` (``--compile``) times every variant through ``torch.compile`` (inductor, static
shapes; compiled once per config before the warm-up, the seconds recorded as ``compile_seconds``):
what a fused kernel can do for the element-wise parts of each path (eager PyTorch runs the qt
map's row norms as separate reductions, see docs/RESULTS.md).
Timing and memory protocols: :mod:`qtvit.bench.timing`; allocator settings: :mod:`qtvit.bench.env`.

Budgets keep the default sweep to minutes on a 2-core CPU. Every variant not run is recorded
as ``skipped`` with its reason:
  * ``cap``: dense paths above ``max_dense_tokens`` (they are O(N²));
  * ``time``: predicted seconds per call over ``max_call_seconds``, extrapolated from the same
    variant at the previous N (×(N/N')¹ for linear paths, ×(N/N')² for dense and SDPA), or its
    warm-up call took longer than that;
  * ``memory``: predicted peak (same extrapolation of the measured peak) over
    ``memory_fraction`` of the memory available now;
  * ``budget``: the whole run's ``max_seconds`` would be exceeded (checked before a config from
    the predictions, and again after its warm-up from the measured calls);
  * ``failed``: the variant raised at a smaller N.

The result (also the JSON file) is a dict: ``env`` (machine header), ``config`` (resolved
settings, variant list, protocols), ``results`` (one entry per variant, d and N), ``ratios``
(the issue's targets computed from this run), ``elapsed_seconds`` and ``complete``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import QtvitError
from ..kernels import attention as kernel_attention
from ..kernels import get_kernel, list_kernels
from . import env as bench_env
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
IMPLS = ("linear", "dense", "sdpa")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16}

Echo = Callable[[str], None]


@dataclass(frozen=True)
class AttentionBenchConfig:
    """Settings of one attention benchmark run (the CLI flags map onto these fields)."""

    kernels: tuple[str, ...] | None = None  # None: every registered kernel
    impls: tuple[str, ...] = IMPLS
    tokens: tuple[int, ...] = (256, 1024, 4096, 16384, 65536)
    head_dims: tuple[int, ...] = (16, 32)
    batch: int = 1
    heads: int = 8
    dtype: str = "float32"
    device: str = "cpu"
    backward: bool = False
    compile: bool = False  # torch.compile every variant (module docstring)
    compile_backend: str = "inductor"  # torch.compile's backend ("eager" only traces: tests)
    warmup: int = 1
    repeats: int = 10
    # a variant whose `repeats` samples would take longer than `variant_seconds` gets fewer,
    # but never fewer than `min_repeats` (a median of 3 still rejects one outlier)
    min_repeats: int = 3
    variant_seconds: float = 1.0
    # fast calls are looped until one sample lasts this long (timer and launch noise ≪ sample)
    min_sample_seconds: float = 0.01
    # SDPA at N=16384 takes ~3.5 s per call on the 2-core CPU and is worth measuring; the dense
    # paths at 16384 (predicted 16× their N=4096 time) are not
    max_call_seconds: float = 5.0
    max_dense_tokens: int = 16384
    max_seconds: float = 540.0  # the default sweep fits in ~10 minutes on a busy 2-core CPU
    memory_fraction: float = 0.8
    measure_memory: bool = True
    # where the target ratios are read: qt/relu at every N here, SDPA/qt at the first
    ratio_tokens: tuple[int, ...] = (4096, 65536)
    ratio_head_dim: int = 16
    seed: int = 0
    # intra-op threads (torch.set_num_threads) for the run; None keeps torch's default. On a busy
    # machine fewer threads than cores avoid stalls at OpenMP barriers (see the report's load line)
    threads: int | None = None
    progress: bool = True
    system_malloc: bool = False  # recorded in the header (the CLI re-runs itself otherwise)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad setting."""
        if self.kernels is not None:
            if not self.kernels:
                raise ValueError("kernels: give at least one kernel name")
            for name in self.kernels:
                get_kernel(name)  # raises, listing the valid names
        bad = [i for i in self.impls if i not in IMPLS]
        if bad or not self.impls:
            raise ValueError(f"impl: {', '.join(bad) or 'nothing given'} not valid; choose from "
                             f"{', '.join(IMPLS)}")
        for name in ("tokens", "head_dims"):
            values = getattr(self, name)
            if not values or any(not isinstance(v, int) or v < 1 for v in values):
                raise ValueError(f"{name}: need positive integers, got {values!r}")
        for name in ("batch", "heads", "repeats", "min_repeats", "max_dense_tokens", "ratio_head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be ≥ 1, got {self.threads}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be ≥ 0, got {self.warmup}")
        for name in ("variant_seconds", "min_sample_seconds", "max_call_seconds", "max_seconds"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 < self.memory_fraction <= 1:
            raise ValueError(f"memory_fraction must be in (0, 1], got {self.memory_fraction}")
        if self.compile and self.compile_backend not in torch.compiler.list_backends(exclude_tags=()):
            raise ValueError(f"compile_backend {self.compile_backend!r} unknown; torch.compile has "
                             f"{', '.join(torch.compiler.list_backends(exclude_tags=()))}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} not supported; choose from {', '.join(DTYPES)}")
        device = _parse_device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r}: CUDA is not available in this torch build/machine")
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"device {self.device!r}: only cpu and cuda are supported")

    def kernel_names(self) -> list[str]:
        """The kernels to measure, in registry order when not given explicitly."""
        return list(self.kernels) if self.kernels is not None else list_kernels()


# `--quick`: a smoke test finishing in seconds, still measuring the first target ratio.
QUICK = AttentionBenchConfig(kernels=("relu", "qt"), impls=("linear", "sdpa"), tokens=(256, 1024, 4096),
                             head_dims=(16,),
                             repeats=3, min_repeats=2, variant_seconds=0.3, max_seconds=60.0,
                             ratio_tokens=(4096,))


def _parse_device(text: str) -> torch.device:
    try:
        return torch.device(text)
    except RuntimeError as err:
        raise ValueError(f"device {text!r} not understood ({err})") from None


@dataclass(frozen=True)
class Variant:
    """One measured code path: a kernel and how it is computed."""

    kernel: str
    impl: str  # "linear", "dense" or "sdpa"

    @property
    def name(self) -> str:
        return f"{self.kernel}/{self.impl}"

    @property
    def exponent(self) -> int:
        """Growth of time with N: linear paths O(N), dense and SDPA O(N²)."""
        return 1 if self.impl == "linear" else 2


def build_variants(config: AttentionBenchConfig) -> list[Variant]:
    """SDPA first, then every linear path, then every dense path (the table's row order)."""
    kernels = [get_kernel(n) for n in config.kernel_names()]
    variants = [Variant("softmax", "sdpa")] if "sdpa" in config.impls else []
    if "linear" in config.impls:
        variants += [Variant(k.name, "linear") for k in kernels if k.has_linear]
    if "dense" in config.impls:
        variants += [Variant(k.name, "dense") for k in kernels
                     if not (k.name == "softmax" and "sdpa" in config.impls)]
    return variants


def _make_call(variant: Variant, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               grad_out: torch.Tensor | None, compile: str | None = None) -> Callable[[], object]:
    """Zero-argument function doing one forward (or forward + backward when ``grad_out`` is given).

    With ``compile`` (a torch.compile backend) the attention call goes through ``torch.compile``
    (one graph, static shapes); the first call compiles.
    """
    if variant.impl == "sdpa":
        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return F.scaled_dot_product_attention(q, k, v)
    else:
        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return kernel_attention(q, k, v, variant.kernel, impl=variant.impl)
    if compile:
        attend = torch.compile(attend, backend=compile, fullgraph=True, dynamic=False)

    def forward() -> torch.Tensor:
        return attend(q, k, v)
    if grad_out is None:
        return forward

    def forward_backward() -> None:
        q.grad = k.grad = v.grad = None
        forward().backward(grad_out)
    return forward_backward


def _compile_calls(calls: dict[str, Callable[[], object]], progress: _Progress
                   ) -> tuple[dict[str, float], dict[str, BaseException]]:
    """Run each compiled call once (the compilation): seconds per variant, and the failures."""
    seconds, errors = {}, {}
    for name, call in calls.items():
        progress.phase(f"compiling {name}")
        start = time.perf_counter()
        try:
            call()
        except Exception as err:  # noqa: BLE001  (inductor raises many types: recorded per variant)
            errors[name] = err
        else:
            seconds[name] = round(time.perf_counter() - start, 3)
    return seconds, errors


@dataclass
class _Previous:
    """What a variant did at the last N of the current head dim (for extrapolation)."""

    tokens: int
    seconds: float = 0.0
    peak_bytes: int | None = None
    failed: bool = False


class _Progress:
    """Progress on stderr: a tqdm bar over configs if tqdm is installed, plain lines otherwise."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled, self.done, self.bar = total, enabled, 0, None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, unit="config", file=sys.stderr, dynamic_ncols=True)

    def start(self, label: str) -> None:
        if self.bar is not None:
            self.bar.set_description(label)
        elif self.enabled:
            print(f"[{self.done + 1}/{self.total}] {label} ...", file=sys.stderr, flush=True)

    def phase(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=True)

    def finish(self, label: str, summary: str) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        elif self.enabled:
            print(f"[{self.done}/{self.total}] {label}: {summary}", file=sys.stderr, flush=True)

    def warn(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(f"warning: {text}", file=sys.stderr)
        else:
            print(f"warning: {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _skip(variant: Variant, d: int, n: int, code: str, reason: str) -> dict:
    return {"variant": variant.name, "kernel": variant.kernel, "impl": variant.impl, "head_dim": d,
            "tokens": n, "status": "skipped", "skip": code, "reason": reason}


def _predicted_cost(seconds: float, config: AttentionBenchConfig) -> float:
    """Seconds one variant will take at one config if a call takes ``seconds`` (see ``time_interleaved``)."""
    per_sample = max(seconds, config.min_sample_seconds)  # fast calls are looped to fill a sample
    samples = min(config.repeats, max(config.min_repeats, int(config.variant_seconds // per_sample)))
    return seconds * (config.warmup + config.measure_memory) + per_sample * samples


def _skip_reason(variant: Variant, n: int, prev: _Previous | None, config: AttentionBenchConfig,
                 remaining: float, available: int | None) -> tuple[str, str, float]:
    """(code, reason, predicted seconds for this config); code "" means: run it (module docstring)."""
    if variant.impl == "dense" and n > config.max_dense_tokens:
        return "cap", f"dense paths capped at N ≤ {config.max_dense_tokens} (max_dense_tokens)", 0.0
    if remaining <= 0:
        return "budget", f"max_seconds {config.max_seconds:g} exhausted", 0.0
    if prev is None:
        return "", "", 0.0
    if prev.failed:
        return "failed", f"failed at N={prev.tokens}", 0.0
    scale = (n / prev.tokens) ** variant.exponent
    seconds = prev.seconds * scale
    if seconds > config.max_call_seconds:
        return "time", (f"predicted {seconds:.2g} s per call > max_call_seconds {config.max_call_seconds:g} "
                        f"(from {prev.seconds * 1e3:.3g} ms at N={prev.tokens})"), 0.0
    cost = _predicted_cost(seconds, config)
    if cost > remaining:
        return "budget", (f"predicted {cost:.2g} s > the {max(remaining, 0):.2g} s left of max_seconds "
                          f"{config.max_seconds:g}"), 0.0
    if available is not None and prev.peak_bytes is not None:
        peak = prev.peak_bytes * scale
        if peak > config.memory_fraction * available:
            return "memory", (f"predicted peak {peak / MiB:.0f} MB > {config.memory_fraction:.0%} of "
                              f"available {available / MiB:.0f} MB"), 0.0
    return "", "", cost


def _error_text(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text[:300]}"


def run_attention_benchmark(config: AttentionBenchConfig | None = None, echo: Echo | None = None,
                            checkpoint: str | Path | None = None) -> dict:
    """Run the attention benchmark and return the result document (see the module docstring).

    Args:
        config: settings; the defaults are the full sweep of the issue.
        echo: prints the header, table and ratios when given (e.g. ``print``).
        checkpoint: if given, the document so far is written there (JSON) after every config,
            so an interrupted run keeps what it measured.
    """
    config = config or AttentionBenchConfig()
    config.validate()
    threads_before = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        return _run_benchmark(config, echo, checkpoint)
    finally:
        torch.set_num_threads(threads_before)


def _run_benchmark(config: AttentionBenchConfig, echo: Echo | None, checkpoint: str | Path | None) -> dict:
    device, dtype = _parse_device(config.device), DTYPES[config.dtype]
    variants = build_variants(config)
    if not variants:
        raise ValueError(f"nothing to measure: kernels {', '.join(config.kernel_names())} have no "
                         f"variant for impl {', '.join(config.impls)}")
    meter = make_peak_meter(device) if config.measure_memory else PeakMemoryMeter()
    doc = {
        "benchmark": "attention",
        "schema_version": SCHEMA_VERSION,
        "env": bench_env.collect_environment(device, dtype, config.system_malloc),
        "config": {**asdict(config), "kernels": config.kernel_names(), "variants": [v.name for v in variants],
                   "memory_method": meter.method, "timing_method": _TIMING_METHOD},
        "results": [],
        "ratios": [],
        "elapsed_seconds": 0.0,
        "complete": False,
    }
    doc["env"]["load_start"] = bench_env.machine_load()
    if echo:
        for line in format_header(doc):
            echo(line)
    start = time.perf_counter()
    configs = [(d, n) for d in config.head_dims for n in config.tokens]
    progress = _Progress(len(configs), config.progress)
    try:
        previous: dict[tuple[int, str], _Previous] = {}
        for d, n in configs:
            label = f"d={d} N={n}"
            progress.start(label)
            entries = _run_config(config, variants, d, n, device, dtype, meter, previous,
                                  start + config.max_seconds, progress)
            doc["results"].extend(entries)
            counts = {s: sum(e["status"] == s for e in entries) for s in ("ok", "skipped", "error")}
            progress.finish(label, ", ".join(f"{c} {s}" for s, c in counts.items() if c)
                            + f" ({time.perf_counter() - start:.0f} s so far)")
            doc["ratios"] = compute_ratios(doc["results"], config)
            doc["elapsed_seconds"] = round(time.perf_counter() - start, 2)
            if checkpoint is not None:
                write_json(doc, checkpoint)
    finally:
        progress.close()
    doc["env"]["load_end"] = bench_env.machine_load()
    doc["complete"] = not any(e.get("skip") == "budget" for e in doc["results"])
    if checkpoint is not None:
        write_json(doc, checkpoint)
    if echo:
        for line in format_table(doc) + [""] + format_ratios(doc):
            echo(line)
        echo(f"\nmachine load at the end: {bench_env.format_load(doc['env']['load_end'])}; "
             f"{doc['elapsed_seconds']:.0f} s")
    return doc


_TIMING_METHOD = ("interleaved rounds (rotated order) after warm-up; fast calls looped to "
                  "min_sample_seconds per sample; wall clock, CUDA synchronised; ms per call")


def _run_config(config: AttentionBenchConfig, variants: list[Variant], d: int, n: int,
                device: torch.device, dtype: torch.dtype, meter: PeakMemoryMeter,
                previous: dict[tuple[int, str], _Previous], deadline: float,
                progress: _Progress) -> list[dict]:
    """Measure every variant at one (d, N) before ``deadline`` (perf_counter); updates ``previous``."""
    remaining = deadline - time.perf_counter()
    entries: dict[str, dict] = {}
    available = bench_env.available_memory_bytes(device)
    shape = (config.batch, config.heads, n, d)
    input_bytes = 3 * config.batch * config.heads * n * d * torch.finfo(dtype).bits // 8
    active = []
    for variant in variants:  # in table order, so dense paths are the first to go when time is short
        code, reason, cost = _skip_reason(variant, n, previous.get((d, variant.name)), config, remaining,
                                          available)
        if not code and available is not None and input_bytes * (2 + config.backward) > available:
            code = "memory"
            reason = f"inputs need {input_bytes / MiB:.0f} MB, {available / MiB:.0f} MB available"
        if code:
            entries[variant.name] = _skip(variant, d, n, code, reason)
        else:
            active.append(variant)
            remaining -= cost
    if active:
        generator = torch.Generator().manual_seed(config.seed + 1000 * d + n)
        q, k, v = (torch.randn(shape, generator=generator).to(device, dtype).requires_grad_(config.backward)
                   for _ in range(3))
        grad_out = torch.randn(shape, generator=generator).to(device, dtype) if config.backward else None
        backend = config.compile_backend if config.compile else None
        calls = {var.name: _make_call(var, q, k, v, grad_out, backend) for var in active}
        compile_seconds: dict[str, float] = {}
        compile_errors: dict[str, BaseException] = {}
        with torch.set_grad_enabled(config.backward), bench_env.compile_scope(config.compile, len(active)):
            if config.compile:
                compile_seconds, compile_errors = _compile_calls(calls, progress)
                calls = {name: call for name, call in calls.items() if name not in compile_errors}
            timed = time_interleaved(
                calls, device=device, warmup=config.warmup, repeats=config.repeats,
                min_repeats=config.min_repeats, min_sample_seconds=config.min_sample_seconds,
                variant_seconds=config.variant_seconds, max_call_seconds=config.max_call_seconds,
                deadline=deadline, extra_calls=int(config.measure_memory), on_progress=progress.phase)
            samples, errors = timed.samples, timed.errors
            errors.update(compile_errors)
            peaks: dict[str, int | None] = {}
            progress.phase("memory")
            for name in samples:
                try:
                    peaks[name] = meter.measure(calls[name])
                except VARIANT_ERRORS as err:
                    errors[name] = err
        for var in active:
            key = (d, var.name)
            if var.name in timed.dropped:
                code, reason, seconds = timed.dropped[var.name]
                entries[var.name] = _skip(var, d, n, code, reason)
                previous[key] = _Previous(n, seconds=seconds)  # the next N extrapolates from it
                continue
            if var.name in errors:
                text = _error_text(errors[var.name])
                progress.warn(f"{var.name} at d={d} N={n} failed: {text}")
                entries[var.name] = {**_skip(var, d, n, "", ""), "status": "error", "skip": None,
                                     "reason": text}
                previous[key] = _Previous(n, failed=True)
                continue
            stats = samples[var.name].stats()
            peak = peaks.get(var.name)
            entries[var.name] = {"variant": var.name, "kernel": var.kernel, "impl": var.impl,
                                 "head_dim": d, "tokens": n, "status": "ok", **stats,
                                 "peak_mb": None if peak is None else peak / MiB}
            if var.name in compile_seconds:
                entries[var.name]["compile_seconds"] = compile_seconds[var.name]
            previous[key] = _Previous(n, seconds=stats["median_ms"] / 1e3, peak_bytes=peak)
        del q, k, v, grad_out, calls
    return [entries[v.name] for v in variants]


# ------------------------------------------------------------------------------------ ratios


def compute_ratios(results: list[dict], config: AttentionBenchConfig) -> list[dict]:
    """The issue's targets from one run: SDPA/qt (≥ 30×) at the first ratio N, qt/relu (≤ 1.3×) at each.

    ``value`` divides medians; ``value_from_min`` divides minima (less sensitive to a busy machine).
    A ratio whose inputs were not measured has ``value`` None and a ``reason``.
    """
    by_key = {(r["variant"], r["head_dim"], r["tokens"]): r for r in results}
    d = config.ratio_head_dim
    specs = []
    if config.ratio_tokens:
        specs.append(("sdpa_over_qt_linear", "softmax/sdpa", "qt/linear", config.ratio_tokens[0], ">=", 30.0))
    specs += [("qt_linear_over_relu_linear", "qt/linear", "relu/linear", n, "<=", 1.3)
              for n in config.ratio_tokens]
    ratios = []
    for name, num, den, n, compare, target in specs:
        entry = {"name": name, "numerator": num, "denominator": den, "tokens": n, "head_dim": d,
                 "compare": compare, "target": target, "value": None, "value_from_min": None,
                 "met": None, "reason": None}
        a, b = by_key.get((num, d, n)), by_key.get((den, d, n))
        missing = [v for v, r in ((num, a), (den, b)) if r is None or r["status"] != "ok"]
        if missing:
            entry["reason"] = f"{', '.join(missing)} not measured at d={d}, N={n}"
        else:
            value = a["median_ms"] / b["median_ms"]
            entry["value"] = value
            entry["value_from_min"] = a["min_ms"] / b["min_ms"]
            entry["met"] = value >= target if compare == ">=" else value <= target
        ratios.append(entry)
    return ratios


# ------------------------------------------------------------------------------------ output


def _noisy(entry: dict) -> bool:
    """Samples spread too widely for the median to be trusted (a busy machine)."""
    return entry["median_ms"] > 1.5 * entry["min_ms"] or entry["iqr_ms"] > 0.5 * entry["median_ms"]


def _cell(entry: dict | None) -> str:
    if entry is None:
        return "-"
    if entry["status"] == "ok":
        return f"{fmt_ms(entry['median_ms'])}{'*' if _noisy(entry) else ''} | {fmt_mb(entry['peak_mb'])}"
    if entry["status"] == "skipped":
        return f"skip:{entry['skip']}"
    return "error"


def format_header(doc: dict) -> list[str]:
    """The environment and settings as readable lines."""
    cfg = doc["config"]
    mode = "forward + backward" if cfg["backward"] else "forward only (no_grad)"
    if cfg.get("compile"):
        mode += f", torch.compile ({cfg.get('compile_backend', 'inductor')})"
    load = doc["env"].get("load_start")
    load_line = [f"  machine load at the start: {bench_env.format_load(load)}"] if load else []
    return ["qtvit bench attention", *(f"  {line}" for line in bench_env.format_environment(doc["env"])),
            *load_line,
            f"  B={cfg['batch']} H={cfg['heads']}, {mode}, warmup {cfg['warmup']}, repeats "
            f"{cfg['repeats']} (≥ {cfg['min_repeats']} for slow variants), budget {cfg['max_seconds']:g} s",
            f"  memory: {cfg['memory_method']}", ""]


def format_table(doc: dict) -> list[str]:
    """One table per head dim: rows variants, columns N, cells ``median ms | peak MB``."""
    cfg = doc["config"]
    by_key = {(r["variant"], r["head_dim"], r["tokens"]): r for r in doc["results"]}
    lines = []
    for d in cfg["head_dims"]:
        rows = [[name] + [_cell(by_key.get((name, d, n))) for n in cfg["tokens"]] for name in cfg["variants"]]
        header = [f"d={d}"] + [f"N={n}" for n in cfg["tokens"]]
        widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
        lines.append("  ".join(h.ljust(w) if i == 0 else h.rjust(w)
                               for i, (h, w) in enumerate(zip(header, widths, strict=True))))
        for row in rows:
            lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                   for i, (c, w) in enumerate(zip(row, widths, strict=True))))
        lines.append("")
    lines += ["cells: median ms per call | peak MB (MiB) above the inputs; * noisy (median > 1.5× min or "
              "IQR > 50% of median: see min_ms in the JSON).",
              "skip:cap dense N cap; skip:time/memory predicted (or warm-up) over max_call_seconds / "
              "available memory; skip:budget max_seconds spent; skip:failed failed at a smaller N."]
    return lines


def format_ratios(doc: dict) -> list[str]:
    """The target ratios, one line each."""
    lines = ["target ratios (medians; from minima in brackets):"]
    for r in doc["ratios"]:
        what = f"{r['numerator']} ÷ {r['denominator']} at N={r['tokens']}, d={r['head_dim']}"
        target = f"target {r['compare'].replace('>=', '≥').replace('<=', '≤')} {r['target']:g}×"
        if r["value"] is None:
            lines.append(f"  {what}: not measured ({r['reason']}); {target}")
        else:
            verdict = "met" if r["met"] else "NOT met"
            lines.append(f"  {what}: {r['value']:.2f}× ({r['value_from_min']:.2f}×); {target}: {verdict}")
    return lines


def write_json(doc: dict, path: str | Path) -> None:
    """Write ``doc`` to ``path`` atomically (a temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------ CLI


def _add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags; every default is None so ``--quick`` and explicit values can be told apart."""
    d = AttentionBenchConfig()
    p.add_argument("--output", metavar="FILE.json",
                   help="write the results as JSON (updated after each config)")
    p.add_argument("--kernels", metavar="K1,K2", help="comma-separated kernel names (default: all)")
    p.add_argument("--impl", metavar="I1,I2", help=f"comma-separated from {','.join(IMPLS)} (default: all)")
    p.add_argument("--tokens", metavar="N1,N2", help=f"token counts (default {_csv(d.tokens)})")
    p.add_argument("--head-dims", metavar="D1,D2", help=f"head dims (default {_csv(d.head_dims)})")
    p.add_argument("--batch", type=int, help=f"batch size B (default {d.batch})")
    p.add_argument("--heads", type=int, help=f"heads H (default {d.heads})")
    p.add_argument("--dtype", choices=tuple(DTYPES), help=f"input dtype (default {d.dtype})")
    p.add_argument("--device", help=f"cpu or cuda[:i] (default {d.device})")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own choice)")
    p.add_argument("--repeats", type=int, help=f"timed samples per variant (default {d.repeats})")
    p.add_argument("--warmup", type=int, help=f"warm-up calls per variant (default {d.warmup})")
    p.add_argument("--backward", action="store_true", help="time forward + backward")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile every variant (compiled before the warm-up; compile time in the JSON)")
    p.add_argument("--max-seconds", type=float, help=f"budget for the whole run (default {d.max_seconds:g})")
    p.add_argument("--max-call-seconds", type=float,
                   help="skip a variant predicted slower than this per call "
                        f"(default {d.max_call_seconds:g})")
    p.add_argument("--max-dense-tokens", type=int,
                   help=f"largest N for the O(N²) dense paths (default {d.max_dense_tokens})")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke test: kernels {_csv(QUICK.kernels)}, N {_csv(QUICK.tokens)}, "
                        f"d {_csv(QUICK.head_dims)}, {QUICK.repeats} repeats (flags still override)")
    p.add_argument("--system-malloc", action="store_true",
                   help="keep glibc's default malloc thresholds (default: re-run with "
                        "MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ = 4e9, see qtvit/bench/env.py)")
    p.add_argument("--no-progress", action="store_true", help="no progress output on stderr")


def register(bench_subparsers: argparse._SubParsersAction) -> None:
    """Add ``qtvit bench attention``."""
    p = bench_subparsers.add_parser(
        "attention", help="time and peak memory of every attention kernel and of SDPA",
        description="Time and peak memory of every attention kernel (linear and dense paths) and of "
                    "torch's scaled_dot_product_attention; prints a table and the issue's target ratios.")
    _add_arguments(p)
    p.set_defaults(func=run)


def _csv(values) -> str:
    return ",".join(str(v) for v in values)


def _split(flag: str, text: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise QtvitError(f"{flag}: empty list")
    return items


def _ints(flag: str, text: str) -> tuple[int, ...]:
    out = []
    for item in _split(flag, text):
        try:
            value = int(item)
        except ValueError:
            raise QtvitError(f"{flag}: {item!r} is not an integer") from None
        if value < 1:
            raise QtvitError(f"{flag}: {value} must be ≥ 1")
        out.append(value)
    return tuple(out)


def config_from_args(args: argparse.Namespace) -> AttentionBenchConfig:
    """Resolve the flags (explicit value > ``--quick`` > default) into a validated config."""
    base = QUICK if args.quick else AttentionBenchConfig()
    over: dict[str, object] = {}
    if args.kernels is not None:
        names = _split("--kernels", args.kernels)
        if names != ["all"]:
            for name in names:
                try:
                    get_kernel(name)
                except ValueError as err:
                    raise QtvitError(f"--kernels: {err}") from None
        over["kernels"] = None if names == ["all"] else tuple(names)
    if args.impl is not None:
        impls = _split("--impl", args.impl)
        bad = [i for i in impls if i not in IMPLS]
        if bad:
            raise QtvitError(f"--impl: unknown {', '.join(bad)}; valid: {', '.join(IMPLS)}")
        over["impls"] = tuple(impls)
    if args.tokens is not None:
        over["tokens"] = _ints("--tokens", args.tokens)
    if args.head_dims is not None:
        over["head_dims"] = _ints("--head-dims", args.head_dims)
    return bench_env.config_from_flags(
        base, args, ("batch", "heads", "dtype", "device", "threads", "repeats", "warmup", "max_seconds",
                     "max_call_seconds", "max_dense_tokens"),
        **over, backward=args.backward or base.backward, compile=args.compile or base.compile,
        measure_memory=not args.no_memory)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``qtvit bench attention``."""
    config = config_from_args(args)  # bad flags fail here, before any re-run
    code = bench_env.rerun_with_tuned_malloc("attention", args, _add_arguments)
    if code is not None:
        return code
    run_attention_benchmark(config, echo=print, checkpoint=args.output)
    if args.output:
        print(f"\nwrote {args.output}")
    return 0


__all__ = ["AttentionBenchConfig", "QUICK", "Variant", "build_variants", "compute_ratios",
           "config_from_args", "format_ratios", "format_table", "register", "run",
           "run_attention_benchmark", "write_json"]

