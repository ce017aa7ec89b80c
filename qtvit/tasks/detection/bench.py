"""Speed of the detection backbone: QT-ViT-1 body + FPN at COCO resolution, qt vs its ReLU and
softmax twins (same widths; the twins drop the APE and the value shortcut as EfficientViT does).

Variants are timed interleaved (variant A, B, C, A, B, C, ...) so machine noise hits all of them
alike; the ratios to the ReLU twin are the meaningful numbers. Timing and peak memory use
the shared benchmark helpers (:mod:`qtvit.bench.timing`): on CUDA the allocator's peak during one
forward, on a Linux CPU the rise of the process's peak resident set (reset before each variant).
"""

from __future__ import annotations

import statistics

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


def benchmark(backbone: str = "qtvit_b1", size: tuple[int, int] = (800, 1333), repeats: int = 5,
              warmup: int = 1, device: str = "cpu", variants=tuple(VARIANTS)) -> dict:
    """Median forward seconds per variant (interleaved), ratios to ``relu`` and peak memory."""
    from ...bench.timing import make_peak_meter, time_interleaved

    dev = torch.device(device)
    models = {v: build(v, backbone).to(dev) for v in variants}
    x = torch.rand(1, 3, *size, device=dev)

    def call(model):
        def forward():
            with torch.no_grad():
                return model(x)
        return forward

    fns = {v: call(m) for v, m in models.items()}
    load_start = machine_load()
    # every variant gets `repeats` single-call samples, whatever they cost (variant_seconds huge)
    timed = time_interleaved(fns, device=dev, warmup=warmup, repeats=repeats, min_repeats=repeats,
                             min_sample_seconds=0.0, variant_seconds=1e9)
    meter = make_peak_meter(dev)  # allocator peak on CUDA; rise of the peak RSS on a Linux CPU
    rows = {}
    for v in variants:
        times = timed.samples[v].times
        peak = meter.measure(fns[v])
        rows[v] = {"median_s": statistics.median(times), "times_s": times,
                   "peak_mib": peak / 2**20 if peak is not None else None}
    for v in variants:
        rows[v]["ratio_to_relu"] = rows[v]["median_s"] / rows["relu"]["median_s"] if "relu" in rows else None
    env = collect_environment(dev, torch.float32)  # git commit + dirty flag, machine, threads
    env.update(load_start=load_start, load_end=machine_load())
    return {"backbone": backbone, "input": list(size), "repeats": repeats, "device": str(dev),
            "threads": torch.get_num_threads(), "memory_method": meter.method, "env": env,
            "variants": rows}


__all__ = ["VARIANTS", "benchmark", "build"]
