"""Speed of the detection backbone: QT-ViT-1 body + FPN at COCO resolution, qt vs its ReLU and
softmax twins (same widths; the twins drop the APE and the value shortcut as EfficientViT does).

Variants are timed interleaved (variant A, B, C, A, B, C, ...) so machine noise hits all of them
alike; the ratios to the ReLU twin are the meaningful numbers. Peak memory: on CUDA the allocator's
peak during one forward; on CPU the growth of the process's peak resident set during one forward,
measured in a fresh process per variant.
"""

from __future__ import annotations

import multiprocessing
import resource
import statistics
import time

import torch

from ...bench.env import collect_environment, machine_load

VARIANTS = {
    "qt": dict(kernel="qt", ape=True, shortcut=True),
    "relu": dict(kernel="relu", ape=False, shortcut=False),
    "softmax": dict(kernel="softmax", ape=False, shortcut=False),
}


def build(variant: str, backbone: str = "qtvit_b1") -> torch.nn.Module:
    from ...models.detection.backbone import build_fpn_backbone

    torch.manual_seed(0)
    return build_fpn_backbone(backbone, **VARIANTS[variant]).eval()


def _cpu_peak(variant: str, backbone: str, size: tuple[int, int], queue) -> None:
    model = build(variant, backbone)
    x = torch.rand(1, 3, *size)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.no_grad():
        model(x)
    queue.put((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)  # KiB → MiB


def peak_memory_mib(variant: str, backbone: str, size: tuple[int, int], device: torch.device) -> float:
    if device.type == "cuda":
        model = build(variant, backbone).to(device)
        x = torch.rand(1, 3, *size, device=device)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        with torch.no_grad():
            model(x)
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_cpu_peak, args=(variant, backbone, size, queue))
    proc.start()
    value = queue.get()
    proc.join()
    return float(value)


def benchmark(backbone: str = "qtvit_b1", size: tuple[int, int] = (800, 1333), repeats: int = 5,
              warmup: int = 1, device: str = "cpu", variants=tuple(VARIANTS)) -> dict:
    """Median forward seconds per variant (interleaved), ratios to ``relu`` and peak memory."""
    dev = torch.device(device)
    models = {v: build(v, backbone).to(dev) for v in variants}
    x = torch.rand(1, 3, *size, device=dev)
    times: dict[str, list[float]] = {v: [] for v in variants}

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    load_start = machine_load()
    with torch.no_grad():
        for r in range(warmup + repeats):
            for v in variants:
                sync()
                t0 = time.perf_counter()
                models[v](x)
                sync()
                if r >= warmup:
                    times[v].append(time.perf_counter() - t0)
    del models
    rows = {}
    for v in variants:
        rows[v] = {"median_s": statistics.median(times[v]), "times_s": times[v],
                   "peak_mib": peak_memory_mib(v, backbone, size, dev)}
    for v in variants:
        rows[v]["ratio_to_relu"] = rows[v]["median_s"] / rows["relu"]["median_s"] if "relu" in rows else None
    env = collect_environment(dev, torch.float32)  # git commit + dirty flag, machine, threads
    env.update(load_start=load_start, load_end=machine_load())
    return {"backbone": backbone, "input": list(size), "repeats": repeats, "device": str(dev),
            "threads": torch.get_num_threads(), "env": env, "variants": rows}


__all__ = ["VARIANTS", "benchmark", "build"]
