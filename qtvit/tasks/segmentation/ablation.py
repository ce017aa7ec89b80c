"""``qtvit seg ablation``: the kernel ablation (the paper's Table 2 question) on the synthetic cue set.

The classification ablations (``qtvit reproduce kernels``) cannot separate the kernels on the
built-in demo set: the convolutions around each attention block, with zero padding and global
pooling, relate its two objects without attention (docs/RESULTS.md, section 3). The cue set of
``qtvit seg demo`` removes that route by construction: every pixel must be labelled with the
colour of a cue 32–120 px away, and no pooling stands between the attention and the per-pixel
answer. This command trains the ``qtvit seg demo`` recipe once per kernel and seed (the ``none``
control included: attention output zero, every convolution kept) and writes one JSON and one
Markdown table with mean ± sample std of the validation mIoU and each kernel's gap to the control.

Layout of ``--output-dir``: ``KERNEL/seedN/`` run folders (the demo's files) and
``seg_ablation.{json,md}``. A run folder that already holds a finished ``metrics.json`` is reused
with ``--resume``; without it an existing folder is refused (nothing is overwritten silently).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from ...errors import QtvitError
from ...io import write_atomic, write_json

CONTROL = "none"
# the kernels of `qtvit reproduce kernels` (Table 2), control last
DEFAULT_KERNELS = ("softmax", "relu", "cosine", "mean", "sigmoid_softmax", "angular", "taylor1", "qt",
                   CONTROL)
DEFAULT_SEEDS = (0, 1, 2)


def run_ablation(output_dir: str | Path, kernels=DEFAULT_KERNELS, seeds=DEFAULT_SEEDS,
                 overrides: list[str] | tuple[str, ...] = (), resume: bool = False,
                 command: str | None = None, echo=print) -> dict:
    """Train the demo recipe for every (kernel, seed); returns (and writes) the result document."""
    from ...bench.env import collect_environment, machine_load
    from ...kernels import get_kernel
    from .demo import run_demo

    kernels, seeds = list(dict.fromkeys(kernels)), list(dict.fromkeys(int(s) for s in seeds))
    if not kernels or not seeds:
        raise QtvitError("seg ablation needs at least one kernel and one seed")
    for name in kernels:
        get_kernel(name)  # an unknown name fails here (one line listing the valid ones), before training
    out = Path(output_dir)
    if out.is_dir() and any(out.iterdir()) and not resume:
        raise QtvitError(f"output folder {out} is not empty; pass --resume to continue it or choose another")
    out.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": "seg_ablation", "schema_version": 1, "command": command,
           "env": collect_environment(torch.device("cpu"), torch.float32), "load_at_start": machine_load(),
           "settings": {"recipe": "qtvit.tasks.segmentation.demo.DEMO_RECIPE", "kernels": kernels,
                        "seeds": seeds, "overrides": list(overrides)},
           "runs": {}}
    start = time.perf_counter()
    total, done = len(kernels) * len(seeds), 0
    for kernel in kernels:
        for seed in seeds:
            done += 1
            run_dir = out / kernel / f"seed{seed}"
            finished = run_dir / "metrics.json"
            metrics = json.loads(finished.read_text()) if resume and finished.is_file() else None
            if metrics is not None and "wall_seconds" in metrics:  # written once run_demo finished
                echo(f"[{done}/{total}] {kernel} · seed {seed}: done before, mIoU {metrics['miou']:.3f}")
            else:
                echo(f"[{done}/{total}] {kernel} · seed {seed}: training")
                metrics = run_demo(run_dir, overrides=[f"model.kernel={kernel}", f"train.seed={seed}",
                                                       *overrides], resume=(run_dir / "last.pt").is_file())
                if metrics["status"] != "done":
                    raise QtvitError(f"run {run_dir} stopped ({metrics['status']}); rerun with --resume")
                echo(f"[{done}/{total}] {kernel} · seed {seed}: mIoU {metrics['miou']:.3f}")
            doc["runs"].setdefault(kernel, {})[str(seed)] = {
                k: metrics[k] for k in ("miou", "macc", "aacc", "wall_seconds") if k in metrics}
    doc["summary"] = summarize(doc["runs"])
    doc["wall_seconds"] = round(time.perf_counter() - start, 1)
    doc["load_at_end"] = machine_load()
    write_json(doc, out / "seg_ablation.json")
    write_atomic(out / "seg_ablation.md", markdown(doc))
    return doc


def summarize(runs: dict[str, dict[str, dict]]) -> dict[str, dict]:
    """Per kernel: mIoU mean, sample std (0 for one seed), seeds, and the mean minus the control's."""
    summary = {}
    for kernel, by_seed in runs.items():
        values = [r["miou"] for r in by_seed.values()]
        summary[kernel] = {"miou_mean": statistics.fmean(values),
                           "miou_std": statistics.stdev(values) if len(values) > 1 else 0.0,
                           "miou_min": min(values), "miou_max": max(values), "seeds": len(values)}
    if CONTROL in summary:
        for row in summary.values():
            row["vs_none"] = row["miou_mean"] - summary[CONTROL]["miou_mean"]
    return summary


def markdown(doc: dict) -> str:
    """The table of a result document (mIoU in points, i.e. × 100)."""
    from ...bench.env import describe_commit

    seeds = doc["settings"]["seeds"]
    lines = ["### Kernel ablation on the synthetic cue set (qtvit seg ablation)", "",
             f"Regenerate: `{doc['command']}` ({describe_commit(doc['env'])})" if doc.get("command")
             else f"Source: {describe_commit(doc['env'])}", "",
             "| kernel | " + " | ".join(f"seed {s}" for s in seeds) + " | mIoU mean ± std | min | vs none |",
             "|---|" + "---:|" * (len(seeds) + 3)]
    for kernel, row in doc["summary"].items():
        per_seed = [doc["runs"][kernel].get(str(s), {}).get("miou") for s in seeds]
        gap = f"{100 * row['vs_none']:+.1f}" if "vs_none" in row else "–"
        gap = "control" if kernel == CONTROL else gap
        lines.append(f"| {kernel} | " + " | ".join("–" if v is None else f"{100 * v:.1f}" for v in per_seed)
                     + f" | {100 * row['miou_mean']:.1f} ± {100 * row['miou_std']:.1f}"
                     + f" | {100 * row['miou_min']:.1f} | {gap} |")
    lines += ["", "mIoU on the recipe's validation images after its 200 steps, in points; std is the sample "
              "standard deviation over the seeds (each seed fixes the weights, the data order and the "
              "images); vs none: mean minus the `none` control's (attention output zero, every "
              "convolution kept)."]
    return "\n".join(lines) + "\n"


__all__ = ["CONTROL", "DEFAULT_KERNELS", "markdown", "run_ablation", "summarize"]
