"""Timing and peak-memory measurement shared by the benchmarks.

Timing (:func:`time_interleaved`): every variant is warmed up, its inner loop sized so one
sample lasts at least ``min_sample_seconds`` (fast ops are timed over several calls), then the
samples are taken in rounds, each round visiting every variant once in a rotated order, so that
machine noise (other processes, frequency changes) hits all variants alike. Slow variants take
part in fewer rounds (at least ``min_repeats``) so one config stays within its budget. Times are
wall-clock (``time.perf_counter``; or the process's CPU time, ``timer=time.process_time``, which
on a busy CPU leaves out the time spent waiting for a core) around the inner loop, with
``torch.cuda.synchronize`` before
and after on CUDA, so they include launch overhead as a user would see it. Reported: median,
quartiles, IQR, min, mean (ms per call), and minor page faults per call (a diagnostic for the
allocator; see :mod:`qtvit.bench.env`).

Peak memory (:func:`make_peak_meter`): the memory one call needs above what exists when it
starts (inputs included in "exists", the output included in "needs").
  * CUDA: ``torch.cuda.reset_peak_memory_stats`` then ``max_memory_allocated`` minus the
    allocated bytes at the start.
  * CPU on Linux: the process's peak RSS (``VmHWM``) is reset to the current RSS by writing
    ``5`` to ``/proc/self/clear_refs``; the call runs; the peak minus the RSS at the reset is its
    footprint. Freed memory that malloc keeps resident (the benchmark's tuned malloc keeps it all)
    would be reused without raising the RSS, so ``malloc_trim(0)`` first returns every free page
    to the OS: the RSS at the reset is then the live data, and every page the call touches is
    counted. Resolution: the kernel syncs per-thread RSS counters lazily, about 0.25 MB per thread.
    This is memory the process really holds, so heap fragmentation counts too (a loop that frees
    a big temporary per chunk but keeps a small result can make glibc take fresh pages for every
    chunk); it can depend on the malloc settings, which the JSON header records.
  * Elsewhere: not measured (``None``), and the method string says why.
"""

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


def synchronizer(device: torch.device) -> Callable[[], None]:
    """A function that waits for ``device`` to finish its queued work (a no-op on CPU)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


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
        if len(ms) >= 2:
            q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive")
        else:
            q1 = q3 = ms[0]
        calls = len(ms) * self.number
        return {
            "median_ms": statistics.median(ms), "q1_ms": q1, "q3_ms": q3, "iqr_ms": q3 - q1,
            "min_ms": ms[0], "mean_ms": statistics.fmean(ms), "samples": len(ms),
            "number": self.number, "page_faults_per_call": self.faults / calls,
        }


def _time_calls(fn: Callable[[], object], number: int, sync: Callable[[], None],
                timer: Callable[[], float] = time.perf_counter) -> tuple[float, int]:
    """Seconds per call over ``number`` calls, and the minor faults they caused."""
    sync()
    faults = minor_faults()
    start = timer()
    for _ in range(number):
        fn()
    sync()
    return (timer() - start) / number, minor_faults() - faults


@dataclass
class Interleaved:
    """What :func:`time_interleaved` measured: samples, exceptions, and variants it dropped (with why)."""

    samples: dict[str, Samples] = field(default_factory=dict)
    errors: dict[str, BaseException] = field(default_factory=dict)
    # name → (code, reason, seconds of its warm-up call); code "time" or "budget"
    dropped: dict[str, tuple[str, str, float]] = field(default_factory=dict)


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    *,
    device: torch.device,
    warmup: int = 1,
    repeats: int = 10,
    min_repeats: int = 3,
    min_sample_seconds: float = 0.01,
    variant_seconds: float = 1.0,
    max_call_seconds: float | None = None,
    deadline: float | None = None,
    extra_calls: int = 0,
    on_progress: Callable[[str], None] | None = None,
    timer: Callable[[], float] = time.perf_counter,
) -> Interleaved:
    """Time every function in ``fns`` with interleaved rounds (see the module docstring).

    Args:
        fns: variant name → zero-argument callable doing one call.
        device: where the work runs (CUDA is synchronised around each sample).
        warmup: untimed rounds first (the last one sizes the inner loop); 0 times single calls.
        repeats: samples per variant.
        min_repeats: fewest samples for a variant whose ``repeats`` samples would exceed
            ``variant_seconds``.
        min_sample_seconds: an inner loop repeats a fast call until a sample lasts this long.
        variant_seconds: timing budget per variant (beyond warm-up).
        max_call_seconds: a variant whose first warm-up call took longer is dropped (code "time").
        deadline: ``time.perf_counter()`` value to finish by: after warm-up, variants are kept in
            order while their planned samples (at least ``min_repeats``) and ``extra_calls`` fit
            before it, the rest are dropped (code "budget"); no round starts after it once every
            variant has ``min_repeats`` samples.
        extra_calls: calls per variant the caller makes afterwards (a memory measurement), planned in.
        on_progress: called with a short phase description.
        timer: the clock of the samples (deadlines stay on ``time.perf_counter``).
    """
    sync = synchronizer(device)
    out = Interleaved()
    last: dict[str, float] = {}
    names = list(fns)
    for round_ in range(warmup):
        if on_progress:
            on_progress(f"warm-up {round_ + 1}/{warmup}")
        for name in names:
            try:
                last[name], _ = _time_calls(fns[name], 1, sync, timer)
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
        per_sample = per_call * number
        fewest = min(repeats, min_repeats)
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
                seconds, faults = _time_calls(fns[name], out.samples[name].number, sync, timer)
            except VARIANT_ERRORS as err:
                out.errors[name] = err
                continue
            out.samples[name].times.append(seconds)
            out.samples[name].faults += faults
    out.samples = {n: s for n, s in out.samples.items() if n not in out.errors}
    return out


# ------------------------------------------------------------------------------ peak memory


class PeakMemoryMeter:
    """Measures the bytes one call needs above what is allocated when it starts."""

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
    """Linux: the rise of the process's peak RSS, reset through ``/proc/self/clear_refs``.

    Free pages are first handed back with ``malloc_trim(0)`` so the call's allocations cannot
    hide in memory malloc kept resident (see the module docstring).
    """

    method = ("peak RSS (VmHWM) above the RSS at the start of the call; VmHWM reset via "
              "/proc/self/clear_refs after gc and malloc_trim(0)")

    def __init__(self) -> None:
        libc_name = ctypes.util.find_library("c")
        libc = ctypes.CDLL(libc_name) if libc_name else None
        self._malloc_trim = getattr(libc, "malloc_trim", None)
        if self._malloc_trim is None:
            self.method += " (malloc_trim unavailable: memory malloc keeps resident is not counted)"

    @staticmethod
    def available() -> bool:
        """True where the peak RSS can be reset and read (Linux ≥ 4.0 with a writable procfs)."""
        if not sys.platform.startswith("linux"):
            return False
        try:
            RssHighWaterMeter._reset()
            _status_kib("VmHWM")
        except (OSError, ValueError):
            return False
        return True

    @staticmethod
    def _reset() -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def measure(self, fn: Callable[[], object]) -> int | None:
        gc.collect()
        if self._malloc_trim is not None:
            self._malloc_trim(0)
        start = _status_kib("VmRSS")
        self._reset()
        result = fn()
        peak = _status_kib("VmHWM")
        del result
        return max(0, peak - start) * 1024


def make_peak_meter(device: torch.device) -> PeakMemoryMeter:
    """The best peak-memory meter for ``device`` (see the module docstring)."""
    if device.type == "cuda":
        return CudaPeakMeter(device)
    if device.type == "cpu" and RssHighWaterMeter.available():
        return RssHighWaterMeter()
    meter = PeakMemoryMeter()
    meter.method = f"not measured: no peak-memory meter for {device.type} on {sys.platform}"
    return meter


def fmt_ms(ms: float | None) -> str:
    """Milliseconds with 3–4 significant digits for tables; "?" when unknown."""
    if ms is None:
        return "?"
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def fmt_mb(mb: float | None) -> str:
    """MiB for tables: one decimal below 10; "?" when not measured."""
    if mb is None:
        return "?"
    return f"{mb:.1f}" if mb < 10 else f"{mb:.0f}"
