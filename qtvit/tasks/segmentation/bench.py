"""``qtvit seg bench``: segmentation models at high resolution, qt vs. its ReLU and softmax twins.

For every input size, the variants (model × kernel) are timed with interleaved rounds
(:func:`qtvit.bench.timing.time_interleaved`: no variant always runs first, so drifting machine
load hits all alike), eager, batch 1, no grad, then one more call of each measures its peak
memory (:func:`qtvit.bench.timing.make_peak_meter`: CUDA allocator peak, or the rise of the
process's peak RSS on Linux CPUs). Kernel variants: ``qt`` (QT-ViT's kernel), ``relu``
(EfficientViT) and ``softmax``, all without APE and value shortcut so that only the kernel
differs. The JSON written to ``--output`` holds every sample and the environment.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

MODELS = {"seghead": "qtvit_1_seghead_ade20k", "upernet": "qtvit_1_upernet_ade20k"}
KERNELS = ("qt", "relu", "softmax")
SIZES = ((512, 512), (512, 2048), (1024, 2048))


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r}: expected HxW, e.g. 1024x2048") from None
    return h, w


def register(sub, name: str = "bench") -> None:
    """Add the benchmark as ``name`` under ``sub`` (``qtvit seg bench`` and ``qtvit bench seg``)."""
    p = sub.add_parser(name, help="time segmentation models at high resolution (qt vs ReLU vs softmax)")
    p.add_argument("--models", default="seghead,upernet", help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--kernels", default=",".join(KERNELS), help="comma list of attention kernels")
    p.add_argument("--sizes", type=lambda s: [_size(t) for t in s.split(",")],
                   default=list(SIZES), help="comma list of HxW (default 512x512,512x2048,1024x2048)")
    p.add_argument("--repeats", type=int, default=5, help="timed samples per variant")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--output", default="seg_bench.json", help="JSON results path")
    p.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    from ...bench.env import collect_environment, machine_load
    from ...bench.timing import fmt_mb, fmt_ms, make_peak_meter, time_interleaved
    from ...io import write_atomic
    from ...models import create_model

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise ValueError(f"unknown model {unknown[0]!r}; valid: {', '.join(MODELS)}")
    kernels = [k.strip() for k in args.kernels.split(",") if k.strip()]
    load_start = machine_load()
    nets = {}
    for m in models:
        for k in kernels:
            torch.manual_seed(0)
            nets[f"{m}/{k}"] = create_model(MODELS[m], kernel=k, ape=False, shortcut=False).to(device).eval()
    meter = make_peak_meter(device)
    rows = []
    print(f"{'size':>10s} {'variant':18s} {'median':>10s} {'IQR':>9s} {'peak mem':>10s}")
    for H, W in args.sizes:
        x = torch.randn(1, 3, H, W, device=device)

        def call(net, x=x):
            def fn():
                with torch.no_grad():
                    return net(x)
            return fn

        fns = {name: call(net) for name, net in nets.items()}
        result = time_interleaved(fns, device=device, warmup=1, repeats=args.repeats, min_repeats=2,
                                  variant_seconds=60.0)
        for name in fns:
            entry = {"size": [H, W], "variant": name, "model": MODELS[name.split("/")[0]],
                     "kernel": name.split("/")[1]}
            if name in result.samples:
                entry.update(result.samples[name].stats())
                entry["peak_bytes"] = meter.measure(fns[name])
                entry["times_s"] = result.samples[name].times
            else:
                entry["error"] = str(result.errors.get(name) or result.dropped.get(name))
            rows.append(entry)
            peak = entry.get("peak_bytes")
            print(f"{H:>4d}x{W:<5d} {name:18s} {fmt_ms(entry.get('median_ms')):>10s} "
                  f"{fmt_ms(entry.get('iqr_ms')):>9s} {fmt_mb(peak / 2**20 if peak else None):>10s}",
                  flush=True)
    ratios = {}
    for r in rows:
        base = next((b for b in rows if b["size"] == r["size"] and b["model"] == r["model"]
                     and b["kernel"] == "qt" and "median_ms" in b), None)
        if base and "median_ms" in r and r["kernel"] != "qt":
            ratios[f"{r['variant']}@{r['size'][0]}x{r['size'][1]}"] = r["median_ms"] / base["median_ms"]
    for key, value in ratios.items():
        print(f"{key}: {value:.2f}× the qt variant's time")
    env = collect_environment(device, torch.float32)
    env.update(load_start=load_start, load_end=machine_load())  # a busy machine makes timings say little
    out = {"benchmark": "seg", "command": " ".join(["qtvit", *sys.argv[1:]]), "env": env,
           "memory_method": meter.method, "rows": rows, "time_ratio_vs_qt": ratios}
    write_atomic(Path(args.output), json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


__all__ = ["KERNELS", "MODELS", "SIZES", "register", "run_bench"]
