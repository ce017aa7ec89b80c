"""Timing (:func:`time_interleaved`) and peak-memory meters (:func:`make_peak_meter`) shared by the
benchmarks; how they measure: docs/BENCHMARKS.md."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

MiB = 2**20

# Exceptions a variant may raise that are recorded against it instead of aborting the benchmark
# (out of memory, a kernel parameter the head dim does not allow, ...).
VARIANT_ERRORS = (RuntimeError, ValueError, TypeError, MemoryError)


def minor_faults() -> int:
    """Minor page faults of this process so far (0 where ``resource`` does not exist)."""
    try:
        import resource
    except ImportError:  # Windows
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


@dataclass
class Samples:
    """Timed samples of one variant. ``times`` are seconds per call, one entry per sample."""

    number: int = 1
    times: list[float] = field(default_factory=list)
    faults: int = 0

    def stats(self) -> dict[str, float | int]:
        """Median, quartiles, IQR, min, mean in ms per call; sample count; faults per call."""
        ms = sorted(t * 1e3 for t in self.times)
        q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) >= 2 else ms * 3
        return {"median_ms": statistics.median(ms), "q1_ms": q1, "q3_ms": q3, "iqr_ms": q3 - q1,
                "min_ms": ms[0], "mean_ms": statistics.fmean(ms), "samples": len(ms), "number": self.number,
                "page_faults_per_call": self.faults / (len(ms) * self.number)}


@dataclass
class Interleaved:
    """What :func:`time_interleaved` measured: samples, exceptions, and variants it dropped (with why)."""

    samples: dict[str, Samples] = field(default_factory=dict)
    errors: dict[str, BaseException] = field(default_factory=dict)
    # name → (code, reason, seconds of its warm-up call); code "time" or "budget"
    dropped: dict[str, tuple[str, str, float]] = field(default_factory=dict)


def time_interleaved(fns: dict[str, Callable[[], object]], *, device: torch.device, warmup: int = 1,
                     repeats: int = 10, min_repeats: int = 3, min_sample_seconds: float = 0.01,
                     variant_seconds: float = 1.0, max_call_seconds: float | None = None,
                     deadline: float | None = None, extra_calls: int = 0,
                     on_progress: Callable[[str], None] | None = None,
                     timer: Callable[[], float] = time.perf_counter) -> Interleaved:
    """Time each zero-argument call of ``fns`` (name → call) in interleaved rounds (docs/BENCHMARKS.md):
    ``warmup`` untimed rounds (0: single calls), ``repeats`` samples, ≥ ``min_repeats`` past
    ``variant_seconds``; drops variants slower than ``max_call_seconds`` ("time") or missing ``deadline``
    (a ``perf_counter`` value) with their samples and the caller's ``extra_calls`` ("budget")."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    def time_calls(fn: Callable[[], object], number: int) -> tuple[float, int]:
        sync()
        faults, start = minor_faults(), timer()
        for _ in range(number):
            fn()
        sync()
        return (timer() - start) / number, minor_faults() - faults

    out, last, names = Interleaved(), {}, list(fns)
    for round_ in range(warmup):
        if on_progress:
            on_progress(f"warm-up {round_ + 1}/{warmup}")
        for name in names:
            try:
                last[name], _ = time_calls(fns[name], 1)
            except VARIANT_ERRORS as err:
                out.errors[name] = err
                continue
            if round_ == 0 and max_call_seconds is not None and last[name] > max_call_seconds:
                out.dropped[name] = ("time", f"warm-up call took {last[name]:.2g} s > max_call_seconds "
                                             f"{max_call_seconds:g}", last[name])
        names = [n for n in names if n not in out.errors and n not in out.dropped]
    left = math.inf if deadline is None else deadline - time.perf_counter()
    rounds: dict[str, int] = {}
    for name in names:
        per_call = last.get(name)
        if per_call is None:  # no warm-up: single calls, as many samples as asked
            out.samples[name], rounds[name] = Samples(number=1), repeats
            continue
        number = max(1, min(10_000, math.ceil(min_sample_seconds / max(per_call, 1e-9))))
        per_sample, fewest = per_call * number, min(repeats, min_repeats)
        planned = max(fewest, min(repeats, int(variant_seconds // per_sample)))
        extra = per_call * extra_calls
        if planned * per_sample + extra > left:  # not enough time left: fewer samples, or none
            planned = fewest
        if planned * per_sample + extra > left:
            out.dropped[name] = ("budget", f"{(planned * per_sample + extra):.2g} s needed, "
                                           f"{max(left, 0):.2g} s left of the time budget", per_call)
            continue
        left -= planned * per_sample + extra
        out.samples[name], rounds[name] = Samples(number=number), planned
    names = list(out.samples)
    total_rounds = max(rounds.values(), default=0)
    for round_ in range(total_rounds):
        if (deadline is not None and time.perf_counter() > deadline
                and all(len(out.samples[n].times) >= min(rounds[n], min_repeats) for n in names)):
            break
        if on_progress:
            on_progress(f"round {round_ + 1}/{total_rounds}")
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:  # rotate: no variant always runs first
            if name in out.errors or rounds[name] <= round_:
                continue
            try:
                seconds, faults = time_calls(fns[name], out.samples[name].number)
            except VARIANT_ERRORS as err:
                out.errors[name] = err
                continue
            out.samples[name].times.append(seconds)
            out.samples[name].faults += faults
    out.samples = {n: s for n, s in out.samples.items() if n not in out.errors}
    return out


class PeakMemoryMeter:
    """Measures the bytes one call needs above what is allocated when it starts (here: not at all)."""

    method: str = "not measured"

    def measure(self, fn: Callable[[], object]) -> int | None:
        """Run ``fn`` once and return its peak footprint in bytes (None if not measurable)."""
        fn()
        return None


class CudaPeakMeter(PeakMemoryMeter):
    """CUDA caching-allocator statistics: peak allocated bytes minus allocated bytes at the start."""

    method = "torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus allocated at start"

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def measure(self, fn: Callable[[], object]) -> int | None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        start = torch.cuda.memory_allocated(self.device)
        fn()
        torch.cuda.synchronize(self.device)
        return max(0, torch.cuda.max_memory_allocated(self.device) - start)


def _status_kib(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field_name} line")


class RssHighWaterMeter(PeakMemoryMeter):
    """Linux: the rise of the process's peak RSS, reset through ``/proc/self/clear_refs``."""

    method = ("peak RSS (VmHWM) above the RSS at the start of the call; VmHWM reset via "
              "/proc/self/clear_refs after gc and malloc_trim(0)")

    def __init__(self) -> None:
        libc_name = ctypes.util.find_library("c")
        self._malloc_trim = getattr(ctypes.CDLL(libc_name) if libc_name else None, "malloc_trim", None)
        if self._malloc_trim is None:
            self.method += " (malloc_trim unavailable: memory malloc keeps resident is not counted)"

    @staticmethod
    def available() -> bool:
        """True where the peak RSS can be reset and read (Linux ≥ 4.0 with a writable procfs)."""
        try:
            Path("/proc/self/clear_refs").write_text("5")
            _status_kib("VmHWM")
        except (OSError, ValueError):
            return False
        return sys.platform.startswith("linux")

    def measure(self, fn: Callable[[], object]) -> int | None:
        gc.collect()
        if self._malloc_trim is not None:
            self._malloc_trim(0)
        start = _status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        result = fn()
        peak = _status_kib("VmHWM")
        del result
        return max(0, peak - start) * 1024


def make_peak_meter(device: torch.device) -> PeakMemoryMeter:
    """The best peak-memory meter for ``device``."""
    if device.type == "cuda":
        return CudaPeakMeter(device)
    if device.type == "cpu" and RssHighWaterMeter.available():
        return RssHighWaterMeter()
    meter = PeakMemoryMeter()
    meter.method = f"not measured: no peak-memory meter for {device.type} on {sys.platform}"
    return meter


def fmt_ms(ms: float | None) -> str:
    """Milliseconds with 3–4 significant digits for tables; "?" when unknown."""
    return "?" if ms is None else f"{ms:.{0 if ms >= 100 else 1 if ms >= 10 else 2 if ms >= 1 else 3}f}"


def fmt_mb(mb: float | None) -> str:
    """MiB for tables: one decimal below 10; "?" when not measured."""
    return "?" if mb is None else f"{mb:.1f}" if mb < 10 else f"{mb:.0f}"


def train_step(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, loss_fn: Callable,
               amp: torch.dtype | None = None, lr: float = 1e-8) -> Callable[[], None]:
    """One timed training step on the fixed batch ``x``: forward (under AMP when ``amp`` is a half
    type), ``loss_fn`` in float32, backward, AdamW (the tiny default lr keeps random weights finite)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    half = amp not in (None, torch.float32)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=amp if half else torch.bfloat16, enabled=half):
            out = model(x)
        loss_fn(out.float(), target).backward()
        opt.step()
    return step
