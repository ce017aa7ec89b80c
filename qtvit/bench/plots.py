"""Plots of the model benchmarks (matplotlib with the Agg backend, imported lazily).

Each function takes the result document a benchmark returned (or a part of it) and writes one
PNG; none of them measures anything. matplotlib is an optional dependency (``qtvit[train]``):
a missing install raises a one-line error naming the package.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from ..io import atomic_output

# One colour and marker per model-benchmark variant, kept fixed across plots.
VARIANT_STYLE = {"qt": ("tab:red", "o"), "relu": ("tab:blue", "s"), "softmax": ("tab:green", "^"),
                 "timm": ("tab:purple", "D")}


def _pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install matplotlib (or qtvit[train])") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    """Write ``fig`` as PNG atomically, close it, return the path."""
    import matplotlib.pyplot as plt

    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def plot_resolution_sweep(doc: dict, path: str | Path) -> Path:
    """Log-log latency and peak memory vs megapixels, one line per variant, per model.

    Measured points are filled; skipped points that have a predicted value (extrapolated from
    the smaller sizes, see :mod:`qtvit.bench.models`) are hollow on a dotted line. Each softmax
    point is annotated with softmax ÷ qt (latency; memory on the right panel) where both exist,
    and a vertical line marks the first size at which softmax is slower than qt.
    """
    plt = _pyplot()
    entries = [e for e in doc.get("results", []) if e["mode"] == "sweep"]
    models = list(dict.fromkeys(e["model"] for e in entries))
    if not models:
        raise ValueError("no resolution-sweep entries to plot (run with --sweep)")
    fig, axes = plt.subplots(len(models), 2, figsize=(12, 4.6 * len(models)), squeeze=False)
    for row, model in enumerate(models):
        rows = [e for e in entries if e["model"] == model]
        ax_t, ax_m = axes[row]
        for metric, ax, unit in (("ms", ax_t, "latency, batch 1 (ms)"), ("mb", ax_m, "peak memory (MiB)")):
            series = _sweep_series(rows, metric)
            for key, points in series.items():
                color, marker = VARIANT_STYLE.get(key, ("black", "x"))
                label = next((e["label"] for e in rows if e["variant"] == key), key)
                xs = [p[0] for p in points if p[2]]
                ys = [p[1] for p in points if p[2]]
                ax.plot(xs, ys, color=color, marker=marker, label=label)
                pred = [p for p in points if not p[2]]
                if pred:
                    last = [p for p in points if p[2]][-1:]  # connect the last measured point
                    ax.plot([q[0] for q in last + pred], [q[1] for q in last + pred], color=color,
                            linestyle=":", marker=marker, markerfacecolor="none")
            _annotate_softmax(ax, series, metric)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("input size H×W (pixels on a log scale)")
            ax.set_ylabel(unit + ", log")
            ax.grid(True, which="both", alpha=0.3)
            ax.set_title(f"{model}: {'latency' if metric == 'ms' else 'peak memory'} vs resolution")
            _size_ticks(ax, rows)
        ax_t.legend(fontsize=8, loc="upper left")
    fig.text(0.01, 0.005, "hollow/dotted: predicted (skipped, see JSON for the reason); "
             "labels on softmax points: softmax ÷ qt", fontsize=8)
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    return _save(fig, path)


def _sweep_series(rows: list[dict], metric: str) -> dict[str, list[tuple[float, float, bool, str]]]:
    """variant → [(megapixels, value, measured?, size label)] sorted by size; values > 0 only."""
    series: dict[str, list[tuple[float, float, bool, str]]] = {}
    for e in rows:
        h, w = e["resolution"]
        mp = h * w / 1e6
        if e["status"] == "ok":
            value = e["median_ms"] if metric == "ms" else e.get("peak_mb")
            measured = True
        else:
            value = e.get("predicted_ms") if metric == "ms" else e.get("predicted_peak_mb")
            measured = False
        if value is None or not value > 0:
            continue
        series.setdefault(e["variant"], []).append((mp, float(value), measured, f"{h}×{w}"))
    for points in series.values():
        points.sort()
    return series


def _annotate_softmax(ax, series: dict, metric: str) -> None:
    soft, qt = series.get("softmax"), series.get("qt")
    if not soft or not qt:
        return
    qt_at = {p[0]: p[1] for p in qt}
    ratios = []
    for mp, value, measured, _ in soft:
        if mp not in qt_at:
            continue
        ratio = value / qt_at[mp]
        ratios.append((mp, ratio))
        ax.annotate(f"×{ratio:.1f}" + ("" if measured else "?"), (mp, value), textcoords="offset points",
                    xytext=(4, 6), fontsize=7, color=VARIANT_STYLE["softmax"][0])
    # the smallest size from which softmax stays behind qt at every larger size
    crossed = None
    for mp, ratio in reversed(ratios):
        if ratio <= 1.0:
            break
        crossed = mp
    if crossed is not None:
        ax.axvline(crossed, color=VARIANT_STYLE["softmax"][0], alpha=0.3, linestyle="--")
        what = "slower" if metric == "ms" else "more memory"
        ax.text(crossed, 0.02, f" softmax {what}\n from here on", fontsize=7, va="bottom",
                color=VARIANT_STYLE["softmax"][0], transform=ax.get_xaxis_transform())


def _size_ticks(ax, rows: list[dict]) -> None:
    sizes = sorted({tuple(e["resolution"]) for e in rows}, key=lambda s: s[0] * s[1])
    ticks = [h * w / 1e6 for h, w in sizes]
    ax.set_xticks(ticks)
    # non-square sizes (1024×2048) sit on a second row: they fall between square ones on the axis
    ax.set_xticklabels([f"\n{h}×{w}" if h != w else str(h) for h, w in sizes], fontsize=7)
    ax.minorticks_off()


def plot_model_bars(doc: dict, path: str | Path) -> Path:
    """Bar chart of the main table: batch-1 latency per variant, one group per model and resolution."""
    plt = _pyplot()
    rows = [e for e in doc.get("results", []) if e["mode"] == "forward" and e["batch"] == 1]
    groups = list(dict.fromkeys((e["model"], tuple(e["resolution"])) for e in rows))
    if not groups:
        raise ValueError("no batch-1 forward results to plot")
    keys = list(dict.fromkeys(e["variant"] for e in rows))
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(groups)), 4))
    width = 0.8 / max(1, len(keys))
    for i, key in enumerate(keys):
        color, _ = VARIANT_STYLE.get(key, ("gray", "x"))
        vals = []
        for model, res in groups:
            e = next((r for r in rows if r["model"] == model and tuple(r["resolution"]) == res
                      and r["variant"] == key), None)
            vals.append(e["median_ms"] if e and e["status"] == "ok" else 0.0)
        ax.bar([g + i * width for g in range(len(groups))], vals, width, label=key, color=color)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
    ax.set_xticklabels([f"{m}\n{r[0]}×{r[1]}" for m, r in groups], fontsize=8)
    ax.set_ylabel("batch-1 latency (ms, median)")
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, path)


def plot_pareto(rows: Sequence[dict], path: str | Path, batch: int, title: str = "") -> Path:
    """Latency (log x) vs ImageNet top-1, one marker per family, the Pareto front as a step line.

    ``rows`` are the pareto benchmark's result rows of one batch size (``median_ms``, ``top1``,
    ``name``, ``family``, ``on_front``).
    """
    plt = _pyplot()
    ok = [r for r in rows if r.get("median_ms") is not None and r.get("top1") is not None]
    if not ok:
        raise ValueError("no measured models to plot")
    fig, ax = plt.subplots(figsize=(10, 6.5))
    families = list(dict.fromkeys(r["family"] for r in ok))
    cmap = plt.get_cmap("tab20")
    markers = "o^sDvP*Xh<>p"
    for i, fam in enumerate(families):
        pts = [r for r in ok if r["family"] == fam]
        ours = fam == "QT-ViT"
        ax.plot([r["median_ms"] for r in pts], [r["top1"] for r in pts],
                marker="*" if ours else markers[i % len(markers)], markersize=13 if ours else 7,
                linestyle="-", linewidth=1.8 if ours else 0.8, alpha=0.95 if ours else 0.75,
                color="tab:red" if ours else cmap(i % 20), label=fam)
        for r in pts:
            ax.annotate(r["name"], (r["median_ms"], r["top1"]), textcoords="offset points", xytext=(3, 3),
                        fontsize=6.5)
    front = sorted((r for r in ok if r.get("on_front")), key=lambda r: r["median_ms"])
    if front:
        xs, ys = [], []
        for r in front:  # staircase: accuracy holds until the next front point
            if xs:
                xs.append(r["median_ms"])
                ys.append(ys[-1])
            xs.append(r["median_ms"])
            ys.append(r["top1"])
        ax.plot(xs, ys, color="black", linewidth=2.5, alpha=0.35, zorder=0, label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel(f"latency at batch {batch} (ms, median, log scale)")
    ax.set_ylabel("published ImageNet-1k top-1 (%)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    ax.set_title(title or f"accuracy vs latency, batch {batch}")
    return _save(fig, path)


def plot_approximation(doc: dict, path: str | Path) -> Path:
    """The kernel approximation study: distance to softmax vs score scale (random q/k), and per
    kernel on the trained model's q/k (bars), for total variation and relative output error."""
    plt = _pyplot()
    random_rows = doc.get("random") or []
    trained = doc.get("trained") or {}
    trained_rows = trained.get("summary") or []
    has_trained = bool(trained_rows)
    fig, axes = plt.subplots(2, 2 if has_trained else 1, figsize=(15 if has_trained else 8, 9), squeeze=False)
    # softmax against itself is the reference (zero up to rounding): left out of the plots
    random_rows = [r for r in random_rows if r["kernel"] != "softmax"]
    trained_rows = [r for r in trained_rows if r["kernel"] != "softmax"]
    cases = list(dict.fromkeys(r["case"] for r in random_rows + trained_rows))
    cmap = plt.get_cmap("tab20")
    color = {c: cmap(i % 20) for i, c in enumerate(cases)}
    for row, (metric, title) in enumerate((("tv", "total variation ½Σ|p−a| (signed rows: L1/2)"),
                                          ("out_rel_err", "relative output error ‖AV−PV‖/‖PV‖"))):
        ax = axes[row][0]
        for case in cases:
            pts = sorted((r["score_std"], r[metric]) for r in random_rows
                         if r["case"] == case and r.get(metric) is not None and r[metric] > 0)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=case,
                        color=color[case], linewidth=2.2 if case in ("qt", "taylor2") else 1)
        std = trained.get("score_std_mean")
        if std is not None and math.isfinite(std) and std > 0:  # where the trained model's scores sit
            ax.axvline(std, color="black", alpha=0.4, linestyle="--")
            ax.text(std, 0.98, " trained model", transform=ax.get_xaxis_transform(), fontsize=7, va="top")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("std of the scores s = q·k/√d (random q, k; log)")
        ax.set_ylabel(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.set_title(f"random q/k: {metric}")
        if row == 0:
            ax.legend(fontsize=7, ncol=2)
        if has_trained:
            ax = axes[row][1]
            vals = [(r["case"], r.get(metric)) for r in trained_rows]
            vals = [(c, v) for c, v in vals if v is not None]
            ax.barh([c for c, _ in vals], [max(v, 1e-12) for _, v in vals],
                    color=[color[c] for c, _ in vals])
            ax.set_xscale("log")
            ax.invert_yaxis()
            ax.set_xlabel(title + " (log)")
            ax.grid(True, axis="x", which="both", alpha=0.3)
            std = trained.get("score_std_mean")
            ax.set_title(f"trained softmax {trained.get('model', 'ViT')} q/k (mean over blocks"
                         + (f", score std ≈ {std:.2g})" if std is not None and math.isfinite(std) else ")"))
    fig.tight_layout()
    return _save(fig, path)


__all__ = ["VARIANT_STYLE", "plot_approximation", "plot_model_bars", "plot_pareto", "plot_resolution_sweep"]
