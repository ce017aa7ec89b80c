"""Plots of the benchmarks' result documents, one PNG each (matplotlib, optional, imported lazily)."""

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
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    _pyplot().close(fig)
    return Path(path)


def plot_resolution_sweep(doc: dict, path: str | Path) -> Path:
    """Log-log latency and peak memory vs megapixels per model, one line per variant, predictions hollow."""
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
                measured, predicted = [p for p in points if p[2]], [p for p in points if not p[2]]
                ax.plot([p[0] for p in measured], [p[1] for p in measured], color=color, marker=marker,
                        label=next((e["label"] for e in rows if e["variant"] == key), key))
                if predicted:  # dotted, from the last measured point
                    line = measured[-1:] + predicted
                    ax.plot([p[0] for p in line], [p[1] for p in line], color=color, linestyle=":",
                            marker=marker, markerfacecolor="none")
            _annotate_softmax(ax, series, metric)
            ax.set(xscale="log", yscale="log", xlabel="input size H×W (pixels on a log scale)",
                   ylabel=unit + ", log", title=f"{model}: {'latency' if metric == 'ms' else 'peak memory'} "
                                                "vs resolution")
            ax.grid(True, which="both", alpha=0.3)
            sizes = sorted({tuple(e["resolution"]) for e in rows}, key=lambda s: s[0] * s[1])
            # non-square sizes (1024×2048) sit on a second row: they fall between square ones on the axis
            ax.set_xticks([h * w / 1e6 for h, w in sizes],
                          [f"\n{h}×{w}" if h != w else str(h) for h, w in sizes], fontsize=7)
            ax.minorticks_off()
        ax_t.legend(fontsize=8, loc="upper left")
    fig.text(0.01, 0.005, "hollow/dotted: predicted (skipped, see JSON for the reason); "
             "labels on softmax points: softmax ÷ qt", fontsize=8)
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    return _save(fig, path)


def _sweep_series(rows: list[dict], metric: str) -> dict[str, list[tuple[float, float, bool]]]:
    """variant → [(megapixels, value, measured?)] sorted by size; values > 0 only."""
    series: dict[str, list[tuple[float, float, bool]]] = {}
    for e in rows:
        h, w = e["resolution"]
        measured = e["status"] == "ok"
        value = e.get({("ms", True): "median_ms", ("mb", True): "peak_mb", ("ms", False): "predicted_ms",
                       ("mb", False): "predicted_peak_mb"}[metric, measured])
        if value is not None and value > 0:
            series.setdefault(e["variant"], []).append((h * w / 1e6, float(value), measured))
    return {key: sorted(points) for key, points in series.items()}


def _annotate_softmax(ax, series: dict, metric: str) -> None:
    soft, qt = series.get("softmax"), series.get("qt")
    if not soft or not qt:
        return
    qt_at = {p[0]: p[1] for p in qt}
    ratios = []
    for mp, value, measured in (p for p in soft if p[0] in qt_at):
        ratios.append((mp, value / qt_at[mp]))
        ax.annotate(f"×{ratios[-1][1]:.1f}" + ("" if measured else "?"), (mp, value), xytext=(4, 6),
                    textcoords="offset points", fontsize=7, color=VARIANT_STYLE["softmax"][0])
    # the smallest size from which softmax stays behind qt at every larger size
    crossed = next((mp for i, (mp, _) in enumerate(ratios) if all(r > 1.0 for _, r in ratios[i:])), None)
    if crossed is not None:
        ax.axvline(crossed, color=VARIANT_STYLE["softmax"][0], alpha=0.3, linestyle="--")
        what = "slower" if metric == "ms" else "more memory"
        ax.text(crossed, 0.02, f" softmax {what}\n from here on", fontsize=7, va="bottom",
                color=VARIANT_STYLE["softmax"][0], transform=ax.get_xaxis_transform())


def plot_models(doc: dict, path: str | Path) -> Path:
    """The resolution sweep of ``qtvit bench models`` when it ran one, else its batch-1 bars."""
    sweep = any(e["mode"] == "sweep" for e in doc.get("results", []))
    return (plot_resolution_sweep if sweep else plot_model_bars)(doc, path)


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
        ok = {(r["model"], tuple(r["resolution"])): r["median_ms"] for r in rows
              if r["variant"] == key and r["status"] == "ok"}
        vals = [ok.get(group, 0.0) for group in groups]
        ax.bar([g + i * width for g in range(len(groups))], vals, width, label=key, color=color)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))],
                  [f"{m}\n{r[0]}×{r[1]}" for m, r in groups], fontsize=8)
    ax.set_ylabel("batch-1 latency (ms, median)")
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, path)


def plot_pareto(rows: Sequence[dict], path: str | Path, batch: int, title: str = "") -> Path:
    """Latency (log x) vs ImageNet top-1 of the pareto rows of one batch size, the front as a step line."""
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
    if front:  # a staircase: accuracy holds until the next front point
        xs = [r["median_ms"] for r in front for _ in (0, 1)][1:]
        ys = [r["top1"] for r in front for _ in (0, 1)][:-1]
        ax.plot(xs, ys, color="black", linewidth=2.5, alpha=0.35, zorder=0, label="Pareto front")
    ax.set(xscale="log", xlabel=f"latency at batch {batch} (ms, median, log scale)",
           ylabel="published ImageNet-1k top-1 (%)", title=title or f"accuracy vs latency, batch {batch}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    return _save(fig, path)


def plot_approximation(doc: dict, path: str | Path) -> Path:
    """TV and output error vs score scale (random q/k) and per kernel on the trained model's q/k (bars)."""
    plt = _pyplot()
    trained = doc.get("trained") or {}
    has_trained = bool(trained.get("summary"))
    fig, axes = plt.subplots(2, 2 if has_trained else 1, figsize=(15 if has_trained else 8, 9), squeeze=False)
    # softmax against itself is the reference (zero up to rounding): left out of the plots
    random_rows, trained_rows = ([r for r in rows or [] if r["kernel"] != "softmax"]
                                 for rows in (doc.get("random"), trained.get("summary")))
    cases = list(dict.fromkeys(r["case"] for r in random_rows + trained_rows))
    color = {c: plt.get_cmap("tab20")(i % 20) for i, c in enumerate(cases)}
    std = trained.get("score_std_mean")
    std = std if std is not None and math.isfinite(std) else None
    for row, (metric, title) in enumerate((("tv", "total variation ½Σ|p−a| (signed rows: L1/2)"),
                                          ("out_rel_err", "relative output error ‖AV−PV‖/‖PV‖"))):
        ax = axes[row][0]
        for case in cases:
            pts = sorted((r["score_std"], r[metric]) for r in random_rows
                         if r["case"] == case and r.get(metric) is not None and r[metric] > 0)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=case,
                        color=color[case], linewidth=2.2 if case in ("qt", "taylor2") else 1)
        if std is not None and std > 0:  # where the trained model's scores sit
            ax.axvline(std, color="black", alpha=0.4, linestyle="--")
            ax.text(std, 0.98, " trained model", transform=ax.get_xaxis_transform(), fontsize=7, va="top")
        ax.set(xscale="log", yscale="log", xlabel="std of the scores s = q·k/√d (random q, k; log)",
               ylabel=title, title=f"random q/k: {metric}")
        ax.grid(True, which="both", alpha=0.3)
        if row == 0:
            ax.legend(fontsize=7, ncol=2)
        if has_trained:
            ax = axes[row][1]
            vals = [(r["case"], r[metric]) for r in trained_rows if r.get(metric) is not None]
            ax.barh([c for c, _ in vals], [max(v, 1e-12) for _, v in vals],
                    color=[color[c] for c, _ in vals])
            ax.invert_yaxis()
            ax.grid(True, axis="x", which="both", alpha=0.3)
            ax.set(xscale="log", xlabel=title + " (log)",
                   title=f"trained softmax {trained.get('model', 'ViT')} q/k (mean over blocks"
                   + (f", score std ≈ {std:.2g})" if std is not None else ")"))
    fig.tight_layout()
    return _save(fig, path)
