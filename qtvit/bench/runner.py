"""The one sweep runner behind ``qtvit bench attention``, ``models`` and ``pareto``: steps of jobs timed
together, skips with predictions, the result document (method and fields: docs/BENCHMARKS.md)."""

from __future__ import annotations

import contextlib
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
from .cli import flag
from .timing import VARIANT_ERRORS, MiB, PeakMemoryMeter, make_peak_meter, time_interleaved

SCHEMA_VERSION = 2
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16}
TIMING_METHOD = ("interleaved rounds (rotated order) after warm-up; fast calls looped to "
                 "min_sample_seconds per sample; wall clock, CUDA synchronised; ms per call")
Echo = Callable[[str], None]


def check(config: object, rule: str, *names: str) -> None:
    """Raise ``ValueError`` for the first of ``names`` breaking ``rule`` (``≥ 1``, ``> 0``): a number, or a
    non-empty tuple of them (None passes)."""
    op, bound = rule.split()
    for name in names:
        value = getattr(config, name)
        items = value if isinstance(value, tuple) else () if value is None else (value,)
        if value == () or not all(v >= float(bound) if op == "≥" else v > float(bound) for v in items):
            raise ValueError(f"{name} must be {rule}, got {value!r}")


@dataclass(frozen=True)
class BenchConfig:
    """Settings every benchmark shares; each benchmark's config subclasses it (the fields declared
    with :func:`~qtvit.bench.cli.flag` are its command-line flags; their meaning: docs/BENCHMARKS.md)."""

    device: str = flag("cpu", "cpu or cuda[:i]")
    dtype: str = flag("float32", "weights/input dtype")
    warmup: int = flag(1, "warm-up calls per variant")
    repeats: int = flag(10, "timed samples per variant")
    min_repeats: int = 3  # fewest samples of a variant whose `repeats` would exceed `variant_seconds`
    variant_seconds: float = 1.0
    min_sample_seconds: float = 0.01  # fast calls are looped until one sample lasts this long
    max_call_seconds: float = flag(5.0, "skip variants predicted (or first measured) slower than this per "
                                        "call (s)")
    max_seconds: float = flag(540.0, "budget of the run (s)")
    memory_fraction: float = 0.8  # of the memory available at the time
    memory: bool = flag(True, "measure peak memory")
    clock: str = flag("wall", "wall (wall-clock) or cpu (process CPU time: robust on a busy machine; use "
                              "--threads 1)")
    compile: bool = flag(False, "torch.compile every variant (compile time in the JSON)")
    threads: int | None = flag(None, "torch intra-op threads (default: torch's choice)")
    seed: int = 0
    progress: bool = flag(True, "show progress on stderr")
    system_malloc: bool = flag(False, "keep glibc's malloc thresholds (default: re-run with tuned ones, "
                                      "docs/BENCHMARKS.md)")

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad setting."""
        check(self, "≥ 1", "repeats", "min_repeats", "threads")
        check(self, "≥ 0", "warmup")
        check(self, "> 0", "variant_seconds", "min_sample_seconds", "max_call_seconds", "max_seconds")
        if not 0 < self.memory_fraction <= 1:
            raise ValueError(f"memory_fraction must be in (0, 1], got {self.memory_fraction}")
        device = parse_device(self.device)
        if self.clock not in ("wall", "cpu") or (self.clock == "cpu" and device.type != "cpu"):
            raise ValueError(f"clock must be wall, or cpu on a CPU device, got {self.clock!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} not supported; choose from {', '.join(DTYPES)}")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r}: CUDA is not available in this torch build/machine")


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


def fit_predict(points: Sequence[tuple[float, float]], x: float, quadratic: bool) -> float | None:
    """Extrapolate a cost measured at ``points`` = [(size, value)] to size ``x`` (None without points):
    a·x + b·x² (a, b ≥ 0) through the two largest sizes; from one size ∝ x, or ∝ x² when ``quadratic``."""
    best: dict[float, float] = {}
    for p, v in points:
        if v is not None and p > 0:
            best[p] = max(v, best.get(p, 0.0))  # the worse of repeated measurements
    if not best:
        return None
    sizes = sorted(best)
    if len(sizes) == 1:
        return best[sizes[0]] * (x / sizes[0]) ** (2 if quadratic else 1)
    (p1, v1), (p2, v2) = ((p, best[p]) for p in sizes[-2:])
    b = (v2 / p2 - v1 / p1) / (p2 - p1)
    a = v1 / p1 - b * p1
    if b < 0:
        a, b = v2 / p2, 0.0
    elif a < 0:
        a, b = 0.0, v2 / (p2 * p2)
    return max(0.0, a * x + b * x * x)


@dataclass
class History:
    """Per series (a variant in one mode): [(size, batch, seconds per item, peak bytes per item)]."""

    points: dict[str, list[tuple[float, int, float | None, float | None]]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)

    def add(self, series: str, size: float, batch: int, seconds: float | None, peak: float | None) -> None:
        per_item = [None if v is None else v / batch for v in (seconds, peak)]
        self.points.setdefault(series, []).append((size, batch, *per_item))

    def predict(self, series: str, size: float, batch: int, quadratic: bool, factor: float = 1.0
                ) -> tuple[float | None, float | None]:
        """(seconds, peak bytes) of one call at ``size`` and ``batch`` (× ``factor``); None where unknown."""
        pts = self.points.get(series, [])
        if not pts:
            return None, None
        use = batch if batch in {p[1] for p in pts} else max(p[1] for p in pts)
        pts = [p for p in pts if p[1] == use]
        out = [fit_predict([(p[0], p[i]) for p in pts if p[i] is not None], size, quadratic) for i in (2, 3)]
        return tuple(None if v is None else v * batch * factor for v in out)


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


class Sweep:
    """Runs the steps of one benchmark and keeps its result document; a context manager whose exit
    writes the JSON (after an error too, marked incomplete)."""

    def __init__(self, name: str, config: BenchConfig, steps: int, checkpoint: str | Path | None = None,
                 echo: Echo | None = None, settings: str = "", **config_extra: object) -> None:
        config.validate()
        self.config, self.checkpoint, self.echo, self.settings = config, checkpoint, echo, settings
        self.device, self.dtype = parse_device(config.device), DTYPES[config.dtype]
        self.meter = make_peak_meter(self.device) if config.memory else PeakMemoryMeter()
        self.history, self.steps, self.done, self.bar = History(), steps, 0, None
        if config.progress:
            with contextlib.suppress(ImportError):
                from tqdm import tqdm

                self.bar = tqdm(total=steps, unit="step", file=sys.stderr, dynamic_ncols=True)
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
        self._threads, env = torch.get_num_threads(), self.doc["env"]
        if self.config.threads is not None:
            torch.set_num_threads(self.config.threads)
        env["threads"] = torch.get_num_threads()
        self.report([f"qtvit bench {self.doc['benchmark']}",
                     *(f"  {line}" for line in bench_env.format_environment(env)),
                     f"  machine load at the start: {bench_env.format_load(env['load_start'])}",
                     f"  {self.settings}", f"  memory: {self.meter.method}", ""], footer=False)
        return self

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self._threads)
        if self.bar is not None:
            self.bar.close()
        self.doc["env"]["load_end"] = bench_env.machine_load()
        self.doc["elapsed_seconds"] = round(time.perf_counter() - self.start, 2)
        self.doc["complete"] = exc[0] is None and not any(e["skip"] == "budget" for e in self.doc["results"])
        self.save()

    def save(self) -> None:
        if self.checkpoint is not None:
            write_json(self.doc, self.checkpoint)

    def _line(self, n: int, text: str) -> None:  # a progress line on stderr, without a tqdm bar
        if self.config.progress and self.bar is None:
            print(f"[{self.doc['benchmark']} {n}/{self.steps}] {text}", file=sys.stderr, flush=True)

    def _phase(self, text: str) -> None:  # the stage of the current step, on the tqdm bar
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=True)

    def report(self, lines: list[str], footer: bool = True) -> None:
        """Print ``lines`` through ``echo``, then (``footer``) the load at the end, elapsed time, warnings."""
        env, warning = self.doc["env"], bench_env.busy_warning(self.doc["env"])
        if footer:
            lines = [*lines, f"machine load at the end: {bench_env.format_load(env.get('load_end') or {})}; "
                     f"{self.doc['elapsed_seconds']:.0f} s", *([warning] if warning else []),
                     *(["warning: run from a DIRTY git tree: the numbers belong to no commit"]
                       if (env.get("git") or {}).get("dirty") else [])]
        for line in lines if self.echo else []:
            self.echo(line)

    def run(self, label: str, jobs: Sequence[Job], deadline: float | None = None, **timing: object
            ) -> list[dict]:
        """Measure ``jobs`` together; append their entries to the document and return them. ``timing``
        overrides the config's warmup/repeats/min_repeats/variant_seconds, ``deadline`` the run's."""
        t = {k: timing.get(k, getattr(self.config, k)) for k in ("warmup", "repeats", "min_repeats",
                                                                  "variant_seconds")}
        t["min_repeats"] = min(t["min_repeats"], t["repeats"])
        deadline = self.deadline if deadline is None else deadline
        self._line(self.done + 1, f"{label} ...")
        if self.bar is not None:
            self.bar.set_description(label)
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
        self.done += 1
        self._line(self.done, f"{label}: " + ", ".join(f"{c} {s}" for s, c in counts.items() if c)
                   + f" ({self.doc['elapsed_seconds']:.0f} s so far)")
        if self.bar is not None:
            self.bar.update(1)
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
            seconds, peak = self.history.predict(fallback, job.size, job.batch, job.quadratic, factor)
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
                        self._phase(f"compiling {job.series}")
                        start = time.perf_counter()
                        calls[i]()
                        entry["compile_seconds"] = round(time.perf_counter() - start, 3)
                except Exception as err:  # noqa: BLE001  (inductor raises many types: recorded per variant)
                    if not (cfg.compile or isinstance(err, (*VARIANT_ERRORS, ImportError))):
                        raise
                    errors[i] = err
            timed = time_interleaved(
                {i: c for i, c in calls.items() if i not in errors}, device=self.device, warmup=t["warmup"],
                repeats=t["repeats"], min_repeats=t["min_repeats"], min_sample_seconds=cfg.min_sample_seconds,
                variant_seconds=t["variant_seconds"], max_call_seconds=cfg.max_call_seconds,
                deadline=deadline, extra_calls=int(cfg.memory), on_progress=self._phase,
                timer=time.process_time if cfg.clock == "cpu" else time.perf_counter)
            errors.update(timed.errors)
            peaks: dict[int, int | None] = {}
            self._phase("memory")
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


def format_grid(header: list[str], rows: list[list[str]]) -> list[str]:
    """A plain-text table: first column left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                      for i, (c, w) in enumerate(zip(r, widths, strict=True))) for r in [header, *rows]]


def status_cell(entry: dict | None) -> str | None:
    """``-`` (not run), ``skip:<code>``, ``error``, or None for a measured entry."""
    if entry is None or entry["status"] != "ok":
        return "-" if entry is None else "error" if entry["status"] == "error" else f"skip:{entry['skip']}"
    return None
