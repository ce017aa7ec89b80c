"""The one sweep runner behind ``qtvit bench attention``, ``models`` and ``pareto``.

A benchmark is a sequence of *steps* (a token count, a resolution and batch, ...); a step is a
set of :class:`Job` s, one per variant, timed together with
:func:`~qtvit.bench.timing.time_interleaved` (rounds in rotated order, so machine noise hits
every variant alike) and then called once more for peak memory. The runner owns what the three
benchmarks share:

* the result document: ``benchmark``, ``schema_version``, ``command`` (when run as ``qtvit
  bench``), ``env`` (the environment header of :mod:`qtvit.bench.env`: git commit and dirty
  flag, machine load at start and end), ``config`` (resolved settings and protocols),
  ``results`` (one entry per job), ``elapsed_seconds`` and ``complete``; written atomically
  after every step when a path is given;
* skipping, with the code and reason in the entry: a variant's time and peak memory per item
  measured so far are fitted as a·x + b·x² in the step's size x (tokens, pixels; the two largest
  sizes; one size: ∝ x, or ∝ x² for quadratic variants) and extrapolated. A job is skipped when
  the prediction exceeds ``max_call_seconds`` (``time``), ``memory_fraction`` of the memory
  available now (``memory``) or what is left of ``max_seconds`` (``budget``), when it failed at
  a smaller size (``failed``), or when the benchmark says so (e.g. ``cap``). A variant whose
  warm-up call alone exceeds ``max_call_seconds`` is dropped too (``time``). Every entry carries
  the prediction (``predicted_ms``, ``predicted_peak_mb``) when there is one;
* ``compile``: every call is made once before the warm-up (its seconds recorded as
  ``compile_seconds``), inside :func:`~qtvit.bench.env.compile_scope`;
* progress on stderr (a tqdm bar when tqdm is installed, else one line per step).
"""

from __future__ import annotations

import dataclasses
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..io import write_json
from . import env as bench_env
from .timing import VARIANT_ERRORS, MiB, PeakMemoryMeter, make_peak_meter, time_interleaved

SCHEMA_VERSION = 2
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16}
TIMING_METHOD = ("interleaved rounds (rotated order) after warm-up; fast calls looped to "
                 "min_sample_seconds per sample; wall clock, CUDA synchronised; ms per call")
Echo = Callable[[str], None]


@dataclass(frozen=True)
class BenchConfig:
    """Settings every benchmark shares; each benchmark's config subclasses it (and its CLI flags
    are generated from the fields, see :mod:`qtvit.bench.cli`)."""

    device: str = "cpu"
    dtype: str = "float32"
    warmup: int = 1
    repeats: int = 10
    # a variant whose `repeats` samples would take longer than `variant_seconds` gets fewer,
    # but never fewer than `min_repeats` (a median of 3 still rejects one outlier)
    min_repeats: int = 3
    variant_seconds: float = 1.0
    # fast calls are looped until one sample lasts this long (timer and launch noise ≪ sample)
    min_sample_seconds: float = 0.01
    max_call_seconds: float = 5.0
    max_seconds: float = 540.0  # budget of the whole run
    memory_fraction: float = 0.8  # of the memory available at the time (the machine may be shared)
    memory: bool = True  # measure peak memory
    # "wall": wall-clock time; "cpu": this process's CPU time (time.process_time), which on a busy
    # machine leaves out the time spent waiting for a core (use with threads=1: it sums threads)
    clock: str = "wall"
    compile: bool = False  # torch.compile every variant
    # intra-op threads (torch.set_num_threads) for the run; None keeps torch's default. On a busy
    # machine fewer threads than cores avoid stalls at OpenMP barriers
    threads: int | None = None
    seed: int = 0
    progress: bool = True
    system_malloc: bool = False  # recorded in the header (the CLI re-runs itself otherwise)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad setting."""
        for name in ("repeats", "min_repeats"):
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
        cpu_device = parse_device(self.device).type == "cpu"
        if self.clock not in ("wall", "cpu") or (self.clock == "cpu" and not cpu_device):
            raise ValueError(f"clock must be wall, or cpu on a CPU device, got {self.clock!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} not supported; choose from {', '.join(DTYPES)}")
        device = parse_device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r}: CUDA is not available in this torch build/machine")


# command-line help of the BenchConfig fields every benchmark exposes as flags (qtvit.bench.cli)
COMMON_HELPS = {
    "device": "cpu or cuda[:i]", "dtype": "weights/input dtype",
    "threads": "torch intra-op threads (default: torch's choice)", "repeats": "timed samples per variant",
    "warmup": "warm-up calls per variant", "max_seconds": "budget of the run (s)",
    "compile": "torch.compile every variant (compile time in the JSON)",
    "max_call_seconds": "skip variants predicted (or first measured) slower than this per call (s)",
    "memory": "measure peak memory", "progress": "show progress on stderr",
    "clock": "wall (wall-clock) or cpu (process CPU time: robust on a busy machine; use --threads 1)",
    "system_malloc": "keep glibc's malloc thresholds (default: re-run with tuned ones, qtvit/bench/env.py)",
}


def parse_device(text: str) -> torch.device:
    """``torch.device(text)`` limited to cpu and cuda, with a one-line error otherwise."""
    try:
        device = torch.device(text)
    except RuntimeError as err:
        raise ValueError(f"device {text!r} not understood ({err})") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {text!r}: only cpu and cuda are supported")
    return device


def error_text(err: BaseException) -> str:
    """``TypeName: first line of the message`` (at most 300 characters)."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text[:300]}"


# ----------------------------------------------------------------------------- prediction


def fit_predict(points: Sequence[tuple[float, float]], x: float, quadratic: bool) -> float | None:
    """Extrapolate a cost measured at ``points`` = [(size, value)] to size ``x``.

    Two or more sizes: value = a·x + b·x² through the two largest (a, b ≥ 0; a negative
    coefficient is dropped and the other refitted to the largest point). One size: ∝ x, or ∝ x²
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
        return best[sizes[0]] * (x / sizes[0]) ** (2 if quadratic else 1)
    p1, p2 = sizes[-2], sizes[-1]
    v1, v2 = best[p1], best[p2]
    b = (v2 / p2 - v1 / p1) / (p2 - p1)
    a = v1 / p1 - b * p1
    if b < 0:
        a, b = v2 / p2, 0.0
    elif a < 0:
        a, b = 0.0, v2 / (p2 * p2)
    return max(0.0, a * x + b * x * x)


@dataclass
class History:
    """Per series (a variant in one mode): [(size, batch, seconds per item, peak bytes per item)].

    Predictions use the points measured at the batch size asked for, else at the largest batch
    measured (the cost per item falls with the batch, so batch 1 would over-predict batch 32).
    """

    points: dict[str, list[tuple[float, int, float | None, float | None]]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)

    def add(self, series: str, size: float, batch: int, seconds: float | None, peak: float | None) -> None:
        per_item = [None if v is None else v / batch for v in (seconds, peak)]
        self.points.setdefault(series, []).append((size, batch, *per_item))

    def predict(self, series: str, size: float, batch: int, quadratic: bool
                ) -> tuple[float | None, float | None]:
        """(seconds, peak bytes) of one call at ``size`` and ``batch``; None where nothing is known."""
        pts = self.points.get(series, [])
        if not pts:
            return None, None
        use = batch if batch in {p[1] for p in pts} else max(p[1] for p in pts)
        pts = [p for p in pts if p[1] == use]
        out = [fit_predict([(p[0], p[i]) for p in pts if p[i] is not None], size, quadratic) for i in (2, 3)]
        return tuple(None if v is None else v * batch for v in out)


# ----------------------------------------------------------------------------------- jobs


@dataclass
class Job:
    """One variant at one step: how to build its call and what the result entry says about it."""

    series: str  # history key: the same variant measured at growing sizes
    entry: dict  # fields of the result entry (variant, size, batch, ...)
    build: Callable[[], Callable[[], object]]  # the zero-argument call; built only if the job runs
    size: float  # what the cost grows with (tokens, pixels)
    batch: int = 1
    quadratic: bool = False  # cost ∝ size² (used when one size has been measured)
    # (series, factor) to predict from while this series has no history (a train step ≈ 3 forwards)
    fallback: tuple[str, float] | None = None
    skip: tuple[str, str] | None = None  # (code, reason) decided by the benchmark itself
    extra_bytes: int = 0  # memory the call needs beyond the prediction (optimizer state)


class Progress:
    """Progress on stderr: a tqdm bar over steps if tqdm is installed, plain lines otherwise."""

    def __init__(self, total: int, enabled: bool, name: str) -> None:
        self.total, self.enabled, self.done, self.bar, self.name = total, enabled, 0, None, name
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, unit="step", file=sys.stderr, dynamic_ncols=True)

    def start(self, label: str) -> None:
        if self.bar is not None:
            self.bar.set_description(label)
        elif self.enabled:
            print(f"[{self.name} {self.done + 1}/{self.total}] {label} ...", file=sys.stderr, flush=True)

    def phase(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=True)

    def finish(self, summary: str) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        elif self.enabled:
            print(f"[{self.name} {self.done}/{self.total}] {summary}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Sweep:
    """Runs the steps of one benchmark and keeps its result document (see the module docstring).

    Use as a context manager: the environment header is taken on construction; on exit the
    machine load at the end, ``complete`` and the final JSON are written (also after an error,
    so an interrupted run keeps what it measured, marked incomplete).
    """

    def __init__(self, name: str, config: BenchConfig, steps: int, checkpoint: str | Path | None = None,
                 **config_extra: object) -> None:
        config.validate()
        self.config, self.checkpoint = config, checkpoint
        self.device, self.dtype = parse_device(config.device), DTYPES[config.dtype]
        self.meter = make_peak_meter(self.device) if config.memory else PeakMemoryMeter()
        self.history = History()
        self.progress = Progress(steps, config.progress, name)
        self.doc = {
            "benchmark": name, "schema_version": SCHEMA_VERSION,
            "env": bench_env.collect_environment(self.device, self.dtype, config.system_malloc),
            "config": {**dataclasses.asdict(config), "memory_method": self.meter.method,
                       "timing_method": TIMING_METHOD, **config_extra},
            "results": [], "elapsed_seconds": 0.0, "complete": False,
        }
        self.doc["env"]["load_start"] = bench_env.machine_load()
        if sys.argv[1:3] == ["bench", name]:  # run from the command line: record the command
            self.doc["command"] = "qtvit " + shlex.join(sys.argv[1:])
        self.start = time.perf_counter()
        self.deadline = self.start + config.max_seconds

    def __enter__(self) -> Sweep:
        self._threads = torch.get_num_threads()
        if self.config.threads is not None:
            torch.set_num_threads(self.config.threads)
        self.doc["env"]["threads"] = torch.get_num_threads()
        return self

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self._threads)
        self.progress.close()
        self.doc["env"]["load_end"] = bench_env.machine_load()
        self.doc["elapsed_seconds"] = round(time.perf_counter() - self.start, 2)
        budget_skips = any(e["skip"] == "budget" for e in self.doc["results"])
        self.doc["complete"] = exc[0] is None and not budget_skips
        self.save()

    def save(self) -> None:
        if self.checkpoint is not None:
            write_json(self.doc, self.checkpoint)

    # ------------------------------------------------------------------------- one step
    def run(self, label: str, jobs: Sequence[Job], deadline: float | None = None, **timing: object
            ) -> list[dict]:
        """Measure ``jobs`` together; append their entries to the document and return them.

        ``timing`` overrides the config's warmup/repeats/min_repeats/variant_seconds for this step,
        ``deadline`` (a ``perf_counter`` time) the run's.
        """
        cfg = self.config
        t = {k: timing.get(k, getattr(cfg, k))
             for k in ("warmup", "repeats", "min_repeats", "variant_seconds")}
        t["min_repeats"] = min(t["min_repeats"], t["repeats"])
        deadline = self.deadline if deadline is None else deadline
        self.progress.start(label)
        remaining = deadline - time.perf_counter()
        available = bench_env.available_memory_bytes(self.device)
        entries, active = [], []
        for job in jobs:  # in order, so the last variants are the first to go when time is short
            entry = {**job.entry, "status": "skipped", "skip": None, "reason": None,
                     "predicted_ms": None, "predicted_peak_mb": None}
            entries.append(entry)
            code, reason, cost = self._skip(job, entry, remaining, available, t)
            if code:
                entry.update(skip=code, reason=reason)
            else:
                active.append((job, entry))
                remaining -= cost
        if active:
            self._measure(active, deadline, t)
        self.doc["results"] += entries
        self.doc["elapsed_seconds"] = round(time.perf_counter() - self.start, 2)
        counts = {s: sum(e["status"] == s for e in entries) for s in ("ok", "skipped", "error")}
        self.progress.finish(f"{label}: " + ", ".join(f"{c} {s}" for s, c in counts.items() if c)
                             + f" ({self.doc['elapsed_seconds']:.0f} s so far)")
        self.save()
        return entries

    def _skip(self, job: Job, entry: dict, remaining: float, available: int | None, t: dict
              ) -> tuple[str, str, float]:
        """(code, reason, predicted seconds of the job); code "" means: run it."""
        cfg = self.config
        if job.skip is not None:
            return (*job.skip, 0.0)
        fallback, factor = job.fallback or (job.series, 1.0)
        failed = self.history.failed.get(job.series) or self.history.failed.get(fallback)
        if failed:
            return "failed", failed, 0.0
        seconds, peak = self.history.predict(job.series, job.size, job.batch, job.quadratic)
        if seconds is None and job.fallback is not None:
            seconds, peak = (None if v is None else v * factor
                             for v in self.history.predict(fallback, job.size, job.batch, job.quadratic))
        entry.update(predicted_ms=None if seconds is None else seconds * 1e3,
                     predicted_peak_mb=None if peak is None else peak / MiB)
        if seconds is not None and seconds > cfg.max_call_seconds:
            limit = cfg.max_call_seconds
            return "time", f"predicted {seconds:.3g} s per call > max_call_seconds {limit:g}", 0.0
        cost = 0.0
        if seconds is not None:
            per_sample = max(seconds, cfg.min_sample_seconds)  # fast calls are looped to fill a sample
            samples = min(t["repeats"], max(t["min_repeats"], int(t["variant_seconds"] // per_sample)))
            cost = seconds * (t["warmup"] + cfg.memory + cfg.compile) + per_sample * samples
        if remaining <= 0 or cost > remaining:
            return "budget", f"predicted {cost:.3g} s > the {max(remaining, 0):.3g} s left of the budget", 0.0
        need = None if peak is None else peak + job.extra_bytes
        if available is not None and need is not None and need > cfg.memory_fraction * available:
            return "memory", (f"predicted peak {need / MiB:.0f} MiB > {cfg.memory_fraction:.0%} of available "
                              f"{available / MiB:.0f} MiB"), 0.0
        return "", "", cost

    def _measure(self, active: list[tuple[Job, dict]], deadline: float, t: dict) -> None:
        cfg = self.config
        calls: dict[int, Callable[[], object]] = {}
        errors: dict[int, BaseException] = {}
        with bench_env.compile_scope(cfg.compile, 3 * len(active)):
            for i, (job, entry) in enumerate(active):
                torch.manual_seed(cfg.seed)
                try:
                    calls[i] = job.build()
                    if cfg.compile:  # the first call compiles: timed apart from the samples
                        self.progress.phase(f"compiling {job.series}")
                        start = time.perf_counter()
                        calls[i]()
                        entry["compile_seconds"] = round(time.perf_counter() - start, 3)
                except (*VARIANT_ERRORS, ImportError) as err:
                    errors[i] = err
                except Exception as err:  # noqa: BLE001  (inductor raises many types: recorded per variant)
                    if not cfg.compile:
                        raise
                    errors[i] = err
            timed = time_interleaved(
                {i: c for i, c in calls.items() if i not in errors}, device=self.device, warmup=t["warmup"],
                repeats=t["repeats"], min_repeats=t["min_repeats"], min_sample_seconds=cfg.min_sample_seconds,
                variant_seconds=t["variant_seconds"], max_call_seconds=cfg.max_call_seconds,
                deadline=deadline, extra_calls=int(cfg.memory), on_progress=self.progress.phase,
                timer=time.process_time if cfg.clock == "cpu" else time.perf_counter)
            errors.update(timed.errors)
            peaks: dict[int, int | None] = {}
            self.progress.phase("memory")
            for i in timed.samples:
                try:
                    peaks[i] = self.meter.measure(calls[i])
                except VARIANT_ERRORS as err:
                    errors[i] = err
        del calls
        for i, (job, entry) in enumerate(active):
            if i in errors:
                text = error_text(errors[i])
                entry.update(status="error", reason=text)
                self.history.failed[job.series] = f"failed at size {job.size:g}, batch {job.batch}: {text}"
            elif i in timed.dropped:
                code, reason, seconds = timed.dropped[i]
                entry.update(skip=code, reason=reason)
                self.history.add(job.series, job.size, job.batch, seconds, None)  # the next size predicts
            else:
                stats = timed.samples[i].stats()
                peak = peaks.get(i)
                entry.update(status="ok", **stats, per_s=job.batch / (stats["median_ms"] / 1e3),
                             peak_mb=None if peak is None else peak / MiB)
                self.history.add(job.series, job.size, job.batch, stats["median_ms"] / 1e3, peak)


# --------------------------------------------------------------------------------- output


def format_grid(header: list[str], rows: list[list[str]]) -> list[str]:
    """A plain-text table: first column left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                      for i, (c, w) in enumerate(zip(r, widths, strict=True))) for r in [header, *rows]]


def status_cell(entry: dict | None) -> str | None:
    """``-`` (not run), ``skip:<code>``, ``error``, or None for a measured entry."""
    if entry is None:
        return "-"
    if entry["status"] == "skipped":
        return f"skip:{entry['skip']}"
    return "error" if entry["status"] == "error" else None


def format_header(doc: dict, settings: str) -> list[str]:
    """The benchmark's name, the environment, the load at the start and ``settings``, as lines."""
    load = doc["env"].get("load_start")
    env_lines = bench_env.format_environment(doc["env"])
    return [f"qtvit bench {doc['benchmark']}", *(f"  {line}" for line in env_lines),
            *([f"  machine load at the start: {bench_env.format_load(load)}"] if load else []),
            f"  {settings}", f"  memory: {doc['config']['memory_method']}", ""]


def format_footer(doc: dict) -> list[str]:
    """Load at the end, elapsed time, and warnings (busy machine, dirty tree)."""
    lines = [f"machine load at the end: {bench_env.format_load(doc['env'].get('load_end') or {})}; "
             f"{doc['elapsed_seconds']:.0f} s"]
    warning = bench_env.busy_warning(doc["env"])
    if warning:
        lines.append(warning)
    if (doc["env"].get("git") or {}).get("dirty"):
        lines.append("warning: run from a DIRTY git tree: the numbers belong to no commit")
    return lines


__all__ = ["BenchConfig", "DTYPES", "History", "Job", "Sweep", "error_text", "fit_predict", "format_footer",
           "format_grid", "format_header", "parse_device", "status_cell"]
