"""The environment a benchmark ran in (the JSON header) and the malloc settings it runs under (why:
docs/BENCHMARKS.md)."""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import platform
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

# glibc allocator settings the benchmarks run under by default
TUNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "4000000000", "MALLOC_TRIM_THRESHOLD_": "4000000000"}
# Set in the re-run process so its header can say who chose the settings.
_REEXEC_MARK = "QTVIT_BENCH_MALLOC"
# the commit, for a tree copied without .git: "<sha>" or "<sha>-dirty" (docs/BENCHMARKS.md)
GIT_COMMIT_VARIABLE = "QTVIT_GIT_COMMIT"


def is_glibc() -> bool:
    """True where the C library is glibc (the only one that reads the ``MALLOC_*_`` variables)."""
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def needs_malloc_reexec(system_malloc: bool) -> bool:
    """Whether to re-run with :data:`TUNED_MALLOC`: on glibc, without ``system_malloc`` or a variable set."""
    return not system_malloc and is_glibc() and not any(name in os.environ for name in TUNED_MALLOC)


def tuned_environ() -> dict[str, str]:
    """A copy of ``os.environ`` with :data:`TUNED_MALLOC` added, for the re-run child."""
    return {**os.environ, **TUNED_MALLOC, _REEXEC_MARK: "tuned"}


def malloc_settings(system_malloc: bool = False) -> dict[str, object]:
    """The allocator settings of this process, for the header: variables, who set them, libc."""
    values = {name: os.environ.get(name) for name in TUNED_MALLOC}
    if not is_glibc():
        source = "not glibc: MALLOC_* variables have no effect"
    elif os.environ.get(_REEXEC_MARK) == "tuned" and values == TUNED_MALLOC:
        source = "set by qtvit bench (disable with --system-malloc)"
    elif any(v is not None for v in values.values()):
        source = "user environment"
    else:
        source = "glibc defaults (--system-malloc)" if system_malloc else "glibc defaults"
    libc = " ".join(platform.libc_ver()).strip() or None
    return {"tuned": values == TUNED_MALLOC, "source": source, "libc": libc, **values}


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo`` on Linux, else ``platform.processor()``)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def git_commit(path: str | Path | None = None) -> dict[str, object] | None:
    """``{"commit", "dirty", "source"}`` of the code that runs, from ``QTVIT_GIT_COMMIT`` or else the git
    checkout holding ``path`` (default: this package); None when nobody can tell."""
    given = os.environ.get(GIT_COMMIT_VARIABLE, "").strip()
    if given:
        commit = given.removesuffix("-dirty")
        return {"commit": commit, "dirty": commit != given, "source": GIT_COMMIT_VARIABLE}
    where = Path(path) if path is not None else Path(__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=where, capture_output=True, text=True, timeout=10,
                              check=True).stdout

    try:
        commit, status = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit.strip(), "dirty": bool(status.strip()), "source": "git"}


def describe_commit(env: dict) -> str:
    """``git 1a2b3c4d5e``, ``git 1a2b3c4d5e (DIRTY TREE)`` or ``no git commit recorded``, for tables."""
    git = env.get("git")
    dirty = " (DIRTY TREE)" if git and git["dirty"] else ""
    return f"git {git['commit'][:10]}{dirty}" if git else "no git commit recorded"


def available_memory_bytes(device: torch.device) -> int | None:
    """Memory a benchmark may still use: free GPU memory, or ``MemAvailable`` of the host; None if unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def collect_environment(device: torch.device, dtype: torch.dtype, system_malloc: bool = False) -> dict:
    """The environment header: machine, software, threads, device, dtype, malloc, date, git commit."""
    device_name, device_memory = cpu_model(), None
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        device_name = torch.cuda.get_device_name(index)
        device_memory = int(torch.cuda.get_device_properties(index).total_memory)
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        capability = None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git": git_commit(), "host": platform.node(), "platform": platform.platform(),
        "python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
        "cpu_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_capability": capability, "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "device": str(device), "device_name": device_name, "device_memory_bytes": device_memory,
        "dtype": str(dtype).removeprefix("torch."), "malloc": malloc_settings(system_malloc),
    }


def machine_load() -> dict[str, object]:
    """How busy the machine is: load averages and, on Linux, CPU pressure (PSI ``some avg10``, %)."""
    try:
        loadavg = [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        loadavg = None
    pressure = None
    with contextlib.suppress(OSError, ValueError, KeyError, IndexError):
        first = Path("/proc/pressure/cpu").read_text().splitlines()[0]  # "some avg10=1.23 avg60=..."
        pressure = float(dict(kv.split("=") for kv in first.split()[1:])["avg10"])
    return {"loadavg": loadavg, "cpu_pressure_avg10": pressure}


def format_load(load: dict[str, object]) -> str:
    """One line for :func:`machine_load`'s result."""
    parts = []
    if load.get("loadavg") is not None:
        parts.append("loadavg " + " ".join(f"{x:.2f}" for x in load["loadavg"]))
    if load.get("cpu_pressure_avg10") is not None:
        parts.append(f"CPU pressure {load['cpu_pressure_avg10']:.0f}% (PSI some avg10)")
    return ", ".join(parts) or "unknown"


def format_environment(env: dict) -> list[str]:
    """The header as a few readable lines."""
    malloc = env["malloc"]
    malloc_text = (" ".join(f"{n}={malloc.get(n)}" for n in TUNED_MALLOC)
                   if malloc["tuned"] or any(malloc.get(n) for n in TUNED_MALLOC) else "default thresholds")
    device = env["device"] if env["device"] == "cpu" else f"{env['device']} ({env['device_name']})"
    return [
        f"date {env['date']}, {describe_commit(env)}, host {env['host']}",
        f"CPU {env['cpu_model']} ({env['cpu_capability'] or '?'}), {env['cpu_count']} cores "
        f"({env['cpu_usable']} usable), torch {env['torch']}, threads {env['threads']} "
        f"(interop {env['interop_threads']})",
        f"device {device}, dtype {env['dtype']}",
        f"malloc: {malloc_text} [{malloc['source']}; {malloc['libc'] or 'unknown libc'}]",
    ]


@contextlib.contextmanager
def compile_scope(enabled: bool, graphs: int) -> Iterator[None]:
    """Fresh torch.compile caches for one benchmark step, with room for ``graphs`` graphs of one function."""
    if not enabled:
        yield
        return
    import torch._dynamo

    torch.compiler.reset()
    try:
        with torch._dynamo.config.patch(recompile_limit=max(8, graphs + 1)):
            yield
    finally:
        torch.compiler.reset()


def busy_warning(env: dict) -> str | None:
    """A warning line when the CPU was busy at the start or end of the run (docs/BENCHMARKS.md), else None."""
    usable = env.get("cpu_usable") or env.get("cpu_count") or 1
    notes = []
    for when in ("load_start", "load_end"):
        load = env.get(when) or {}
        pressure, loadavg = load.get("cpu_pressure_avg10"), load.get("loadavg")
        if (pressure is not None and pressure > 20) or (loadavg and loadavg[0] > usable):
            notes.append(f"{when.removeprefix('load_')}: {format_load(load)}")
    if not notes or env.get("device", "cpu") != "cpu":
        return None
    return ("warning: the machine was busy (" + "; ".join(notes) + f"; {usable} usable CPUs): "
            "these CPU timings are unreliable, re-run on a quiet machine")


@contextlib.contextmanager
def frozen_gc() -> Iterator[None]:
    """Exclude every object alive now from garbage collection until the block ends (``gc.freeze``)."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
