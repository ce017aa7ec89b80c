"""The environment a benchmark ran in (the JSON header) and the malloc settings it runs under.

Why the malloc settings matter: glibc serves blocks above its mmap threshold (dynamic, 128 KiB
to 32 MiB) with fresh ``mmap`` calls and unmaps them on ``free``, and trims the heap top past
128 KiB. Attention on a few thousand tokens allocates exactly such 2–32 MB temporaries, so every
call pays page faults (zeroing fresh pages) and timings become noisy and allocation-dominated:
measured here, ReLU linear attention at N=4096, d=16 takes 0.6 ms with ~30 minor faults per call
when freed memory is kept, and swings 0.6–3 ms with ~1000 faults per call otherwise. Setting
``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` to 4 GB before the process starts
keeps freed memory in the heap (a long-running training or serving process reaches the same
steady state). glibc reads them only at start-up, so the benchmark re-runs itself with them
(:func:`needs_malloc_reexec`) unless ``--system-malloc`` is given or the user set them.
"""

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

# glibc allocator settings the benchmarks run under by default (see the module docstring).
TUNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "4000000000", "MALLOC_TRIM_THRESHOLD_": "4000000000"}
# Set in the re-run process so its header can say who chose the settings.
_REEXEC_MARK = "QTVIT_BENCH_MALLOC"


def is_glibc() -> bool:
    """True where the C library is glibc (the only one that reads the ``MALLOC_*_`` variables)."""
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def needs_malloc_reexec(system_malloc: bool) -> bool:
    """Whether to re-run the benchmark in a child process with :data:`TUNED_MALLOC` set.

    Not when ``system_malloc`` is requested, not off glibc, and not when any of the variables is
    already set (the user's choice wins, and the re-run child has them set).
    """
    if system_malloc or not is_glibc():
        return False
    return not any(name in os.environ for name in TUNED_MALLOC)


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
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def usable_cpus() -> int | None:
    """CPUs this process may run on (affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count()


# A machine that receives the tree without .git (a GPU box) is told the commit instead, e.g.
# QTVIT_GIT_COMMIT=$(git describe --always --dirty --abbrev=40): "<sha>" or "<sha>-dirty".
GIT_COMMIT_VARIABLE = "QTVIT_GIT_COMMIT"


def git_commit(path: str | Path | None = None) -> dict[str, object] | None:
    """``{"commit", "dirty", "source"}`` of the code that runs, or None when nobody can tell.

    ``QTVIT_GIT_COMMIT`` wins when set (``<sha>`` or ``<sha>-dirty``); otherwise the git checkout
    holding ``path`` (default: this package); dirty = tracked files differ from the commit.
    """
    given = os.environ.get(GIT_COMMIT_VARIABLE, "").strip()
    if given:
        commit = given.removesuffix("-dirty")
        return {"commit": commit, "dirty": commit != given, "source": GIT_COMMIT_VARIABLE}
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                                capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(status.strip()), "source": "git"}


def describe_commit(env: dict) -> str:
    """``git 1a2b3c4d5e``, ``git 1a2b3c4d5e (DIRTY TREE)`` or ``no git commit recorded``, for tables."""
    git = env.get("git")
    if not git:
        return "no git commit recorded"
    return f"git {git['commit'][:10]}{' (DIRTY TREE)' if git['dirty'] else ''}"


def available_memory_bytes(device: torch.device) -> int | None:
    """Memory a benchmark may still use: free GPU memory, or ``MemAvailable`` of the host; None if unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def collect_environment(device: torch.device, dtype: torch.dtype, system_malloc: bool = False) -> dict:
    """The environment header: machine, software, threads, device, dtype, malloc, date, git commit."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        device_name = torch.cuda.get_device_name(index)
        props = torch.cuda.get_device_properties(index)
        device_memory = int(props.total_memory)
    else:
        device_name, device_memory = cpu_model(), None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git": git_commit(),
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_usable": usable_cpus(),
        "cpu_capability": _cpu_capability(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "device": str(device),
        "device_name": device_name,
        "device_memory_bytes": device_memory,
        "dtype": str(dtype).removeprefix("torch."),
        "malloc": malloc_settings(system_malloc),
    }


def machine_load() -> dict[str, object]:
    """How busy the machine is: load averages and, on Linux, CPU pressure (PSI ``some avg10``, %).

    Other processes make timings noisy; the header records this at the start and the end of a run.
    """
    try:
        loadavg = [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        loadavg = None
    pressure = None
    try:
        first = Path("/proc/pressure/cpu").read_text().splitlines()[0]  # "some avg10=1.23 avg60=..."
        pressure = float(dict(kv.split("=") for kv in first.split()[1:])["avg10"])
    except (OSError, ValueError, KeyError, IndexError):
        pass
    return {"loadavg": loadavg, "cpu_pressure_avg10": pressure}


def format_load(load: dict[str, object]) -> str:
    """One line for :func:`machine_load`'s result."""
    parts = []
    if load.get("loadavg") is not None:
        parts.append("loadavg " + " ".join(f"{x:.2f}" for x in load["loadavg"]))
    if load.get("cpu_pressure_avg10") is not None:
        parts.append(f"CPU pressure {load['cpu_pressure_avg10']:.0f}% (PSI some avg10)")
    return ", ".join(parts) or "unknown"


def _cpu_capability() -> str | None:
    try:
        return torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        return None


def format_environment(env: dict) -> list[str]:
    """The header as a few readable lines."""
    malloc = env["malloc"]
    if malloc["tuned"] or any(malloc.get(n) for n in TUNED_MALLOC):
        malloc_text = " ".join(f"{n}={malloc.get(n)}" for n in TUNED_MALLOC)
    else:
        malloc_text = "default thresholds"
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
    """Fresh torch.compile caches for one benchmark step, with room for ``graphs`` graphs.

    Benchmarked variants share Python functions (one ``attend`` closure; one model class whose
    qt/relu/softmax twins differ only in their modules), and dynamo stops compiling a function
    after ``recompile_limit`` (8) graphs and silently runs it eagerly from then on: the limit
    must cover every variant, shape and grad mode measured in the step.
    """
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
    """A warning line when the CPU was busy during the run (timings then say little), else None.

    Busy: CPU pressure (PSI ``some avg10``) above 20% at the start or end, or a 1-minute load
    average above the usable CPUs. With every core shared, each OpenMP parallel region can wait
    a scheduler time slice for a descheduled thread, which inflates models of many small ops most.
    """
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
    """Exclude every object alive now from garbage collection until the block ends (``gc.freeze``).

    The peak-memory meter runs ``gc.collect()`` before each measurement; with timm imported a
    full collection scans ~400k objects (0.3 s or more per call). Frozen objects are still
    freed by reference counting; only cycles among them wait until the block ends.
    """
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
