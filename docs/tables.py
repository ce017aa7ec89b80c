"""The Markdown tables README.md and docs/RESULTS.md quote, rendered from the JSON in docs/results/.

    python docs/tables.py              # every block
    python docs/tables.py attention    # one block

Each block names its source file, the command that wrote it (kept here, beside the file name),
the git commit of that run (``DIRTY TREE`` when the tree differed from it), the machine and its
load. The docs paste the output between ``<!-- begin generated: python docs/tables.py NAME -->``
and ``<!-- end generated -->``; tests/test_docs_sources.py fails when a pasted block differs from
what this prints.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

# block name → (file under docs/results, the command that wrote it)
SOURCES = {
    "attention": ("attention_targets.json",
                  "qtvit bench attention --kernels relu,qt --impls linear,sdpa --tokens 4096,65536 "
                  "--head-dims 16 --repeats 40 --threads 1 --clock cpu --max-call-seconds 20 "
                  "--output docs/results/attention_targets.json"),
    "models": ("models_cpu.json",
               "qtvit bench models --models qtvit_1 --batch-size 32 --repeats 7 --threads 1 --clock cpu "
               "--output docs/results/models_cpu.json"),
    "pareto": ("pareto_cpu/pareto.json",
               "qtvit bench pareto --models '<selection>' --batch-sizes 1 --threads 1 --clock cpu "
               "--output-dir docs/results/pareto_cpu"),
}


def _ms(ms: float) -> str:
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def _ratio(x: float) -> str:
    return f"{x:.2f}×" if x < 10 else f"{x:.0f}×"


def _source(name: str, doc: dict) -> str:
    env, (file, command) = doc["env"], SOURCES[name]
    command = doc.get("command", command)  # what the file says wrote it, when it says
    git = env.get("git")
    commit = "no git commit recorded" if not git else \
        f"git `{git['commit'][:10]}`" + (" (**DIRTY TREE**: not a committed state)" if git["dirty"] else "")
    load = (env.get("load_start") or {}).get("loadavg")
    threads = f"{env['threads']} thread{'s' if env['threads'] > 1 else ''}"
    where = env["device_name"] if env["device"] != "cpu" else f"{env['cpu_model']}, {threads}"
    clock = "process CPU time" if doc["config"].get("clock") == "cpu" else "wall clock"
    return (f"Source: `docs/results/{file}`, written by `{command}`; {commit}, "
            f"{env['date'][:10]}, {where}, {env['dtype']}, timed by {clock}, load average at start "
            f"{' / '.join(f'{x:g}' for x in load) if load else 'unknown'}"
            f"{'' if doc.get('complete') else '; INCOMPLETE run'}.")


def attention_table(doc: dict) -> list[str]:
    """Median (min) ms per call of SDPA and the relu/qt linear paths, and the ratios, per N."""
    tokens, d = doc["config"]["tokens"], doc["config"]["head_dims"][0]
    ok = {(r["variant"], r["tokens"]): r for r in doc["results"]
          if r["status"] == "ok" and r["head_dim"] == d}
    cfg = doc["config"]
    lines = [f"| B={cfg['batch']}, H={cfg['heads']}, d={d}, forward | " + " | ".join(f"N={n}" for n in tokens)
             + " |", "|---" * (len(tokens) + 1) + "|"]
    names = {"softmax/sdpa": "softmax (SDPA)", "relu/linear": "relu linear", "qt/linear": "qt linear"}
    for variant, label in names.items():
        cells = [f"{_ms(ok[variant, n]['median_ms'])} ms ({_ms(ok[variant, n]['min_ms'])})"
                 if (variant, n) in ok else "not run (predicted too slow)" for n in tokens]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for num, den, label in (("qt/linear", "relu/linear", "qt ÷ relu"),
                            ("softmax/sdpa", "qt/linear", "SDPA ÷ qt")):
        cells = [f"{_ratio(ok[num, n]['median_ms'] / ok[den, n]['median_ms'])} "
                 f"({_ratio(ok[num, n]['min_ms'] / ok[den, n]['min_ms'])})"
                 if (num, n) in ok and (den, n) in ok else "–" for n in tokens]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines + ["", "Cells: median ms per call (minimum in brackets); ratios of medians (of minima)."]


def models_table(doc: dict) -> list[str]:
    """Per variant: batch-1 and batch-N median (min) latency, throughput, and qt ÷ variant."""
    n, (h, w) = doc["config"]["batch_size"], doc["config"]["resolutions"][0]
    ok = {(r["variant"], r["batch"]): r for r in doc["results"]
          if r["status"] == "ok" and r["mode"] == "forward" and r["resolution"] == [h, w]}
    lines = [f"| {doc['models'][0]['model']} at {h}×{w} | batch-1 ms | batch-{n} ms | batch-{n} img/s "
             "| qt ÷ this, batch 1 / batch " f"{n} |", "|---|---:|---:|---:|---:|"]
    for v in doc["models"][0]["variants"]:
        key = v["variant"]
        cells = []
        for batch in (1, n):
            e = ok.get((key, batch))
            cells.append("not run" if e is None else f"{_ms(e['median_ms'])} ({_ms(e['min_ms'])})")
        bn = ok.get((key, n))
        cells.append("–" if bn is None else f"{bn['per_s']:.1f}")
        ratios = [f"{ok['qt', b]['median_ms'] / ok[key, b]['median_ms']:.2f}"
                  if ("qt", b) in ok and (key, b) in ok else "–" for b in (1, n)]
        cells.append(" / ".join(ratios))
        lines.append(f"| {key}: {v['label']} | " + " | ".join(cells) + " |")
    return lines + ["", "Cells: median ms per call (minimum in brackets); ratios of medians."]


def pareto_table(doc: dict) -> list[str]:
    """Per model (by median latency): family, timed size, median (min) ms, published top-1, front."""
    lines = []
    for batch in doc["config"]["batch_sizes"]:
        rows = sorted((r for r in doc["results"] if r["batch"] == batch and r["status"] == "ok"),
                      key=lambda r: r["median_ms"])
        lines += [f"| batch {batch} | family | timed at | median ms (min) | top-1 (paper) | Pareto front |",
                  "|---|---|---:|---:|---:|:---:|"]
        lines += [f"| {r['name']} | {r['family']} | {r['resolution'][0]} | {_ms(r['median_ms'])} "
                  f"({_ms(r['min_ms'])}) | {r['top1']:.1f}{'' if r['top1_at_timed_size'] else ' †'} "
                  f"| {'★' if r['on_front'] else ''} |" for r in rows]
        missing = [r["name"] for r in doc["results"] if r["batch"] == batch and r["status"] != "ok"]
        lines += [""] + ([f"Not measured: {', '.join(missing)} (reasons in the JSON)."] if missing else [])
    return lines + ["Front: no other model is both faster (median) and more accurate; † top-1 published "
                    "at another resolution."]


RENDERERS = {"attention": attention_table, "models": models_table, "pareto": pareto_table}


def render(name: str, results: Path = RESULTS) -> str:
    """The block ``name`` as Markdown (table, then its source line)."""
    doc = json.loads((results / SOURCES[name][0]).read_text())
    return "\n".join(RENDERERS[name](doc) + ["", _source(name, doc)])


if __name__ == "__main__":
    for block in sys.argv[1:] or list(SOURCES):
        print(render(block) + "\n")
