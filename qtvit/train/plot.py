"""Training-curve figure (matplotlib, Agg backend: works without a display)."""

from __future__ import annotations

import os
from pathlib import Path

from ..io import atomic_output
from .metrics import read_metrics


def plot_curves(run_dir: str | os.PathLike, output: str | os.PathLike, title: str | None = None,
                metrics: tuple[str, ...] = ("top1", "top5")) -> Path:
    """Plot training loss per logged step and the validation ``metrics`` per evaluation from ``run_dir``.

    Metrics a run did not log are skipped (a task names its own, e.g. ``("miou", "macc")``); the
    classification accuracies (in %) keep the 0–100 axis.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    steps = read_metrics(run_dir, "step")
    evals = read_metrics(run_dir, "eval")
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    if steps:
        ax_loss.plot([r["global_step"] for r in steps], [float(r["loss"]) for r in steps], lw=1.2)
    ax_loss.set(xlabel="optimizer step", ylabel="training loss", title="training loss")
    ax_loss.grid(alpha=0.3)
    shown = [m for m in metrics if evals and all(m in r for r in evals)]
    for i, name in enumerate(shown):
        ax_acc.plot([r["epoch"] for r in evals], [float(r[name]) for r in evals], "os^v"[i % 4] + "-",
                    alpha=1.0 if i == 0 else 0.6, label=name)
    if shown:
        ax_acc.legend(loc="lower right")
    percent = set(shown) <= {"top1", "top5"}
    ax_acc.set(xlabel="epoch", ylabel="validation accuracy (%)" if percent else "validation metric",
               title="held-out metrics")
    if percent:
        ax_acc.set_ylim(0, 100)
    ax_acc.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_acc.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    output = Path(output)
    with atomic_output(output) as tmp:  # the temporary name ends in .tmp: name the format
        fig.savefig(tmp, dpi=110, format=output.suffix.lstrip(".") or "png")
    plt.close(fig)
    return output
