"""``qtvit bench attention`` and the shared bench machinery: runner (skips, predictions, errors,
document), timing protocol, memory meter, environment header, generated CLI flags, malloc re-run."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import time
import typing
from pathlib import Path

import pytest
import torch

from qtvit.bench import attention, models, pareto
from qtvit.bench import env as bench_env
from qtvit.bench.attention import QUICK, AttentionBenchConfig, build_variants, run_attention_benchmark
from qtvit.bench.cli import argv_from_args, config_from_args, config_helps, field_kind, show_value
from qtvit.bench.runner import BenchConfig, Job, Sweep, fit_predict
from qtvit.bench.timing import RssHighWaterMeter, time_interleaved
from qtvit.cli import main

REPO = Path(__file__).resolve().parents[1]
# A tiny sweep: two token counts, dense capped below the second, samples kept short.
TINY = AttentionBenchConfig(kernels=("relu", "qt", "softmax"), tokens=(32, 64), head_dims=(8,), heads=1,
                            repeats=3, min_repeats=2, min_sample_seconds=1e-3, variant_seconds=0.05,
                            max_dense_tokens=32, progress=False)
FAST = BenchConfig(warmup=1, repeats=2, min_repeats=2, min_sample_seconds=1e-4, variant_seconds=0.01,
                   memory=False, progress=False, max_call_seconds=1.0)


@pytest.fixture(scope="module")
def tiny_doc() -> dict:
    return run_attention_benchmark(TINY)


def test_variants_follow_the_registry_and_impls():
    names = [v.name for v in build_variants(TINY)]
    # softmax has no linear path, and its dense path is SDPA itself, measured once as softmax/sdpa
    assert names == ["softmax/sdpa", "relu/linear", "qt/linear", "relu/dense", "qt/dense"]
    dense_only = build_variants(AttentionBenchConfig(kernels=("softmax",), impls=("dense",)))
    assert [v.name for v in dense_only] == ["softmax/dense"]
    every = build_variants(AttentionBenchConfig())
    from qtvit import get_kernel, list_kernels
    with_linear = {n for n in list_kernels() if get_kernel(n).has_linear}
    assert {v.kernel for v in every if v.impl == "linear"} == with_linear
    assert {v.kernel for v in every if v.impl == "dense"} == set(list_kernels()) - {"softmax"}


def test_result_document_structure_and_values(tiny_doc):
    doc = json.loads(json.dumps(tiny_doc, allow_nan=False))  # plain JSON, no NaN
    env = doc["env"]
    for key in ("date", "torch", "cpu_model", "threads", "device", "device_name", "dtype", "malloc", "git",
                "load_start", "load_end"):
        assert key in env, key
    assert env["dtype"] == "float32" and env["threads"] == torch.get_num_threads()
    assert doc["benchmark"] == "attention" and doc["schema_version"] == 2
    assert doc["config"]["variants"] == [v.name for v in build_variants(TINY)]
    assert len(doc["results"]) == len(doc["config"]["variants"]) * len(TINY.tokens)
    by_key = {(r["variant"], r["tokens"]): r for r in doc["results"]}
    for name in doc["config"]["variants"]:
        first = by_key[(name, 32)]
        assert first["status"] == "ok", first
        assert 0 < first["min_ms"] <= first["median_ms"] <= first["q3_ms"]
        assert first["q1_ms"] <= first["median_ms"] and first["iqr_ms"] >= 0
        assert first["samples"] >= TINY.min_repeats and first["number"] >= 1
        if RssHighWaterMeter.available():
            assert first["peak_mb"] is not None and first["peak_mb"] >= 0
    for name in ("relu/dense", "qt/dense"):  # over max_dense_tokens: recorded, not silently dropped
        skipped = by_key[(name, 64)]
        assert skipped["status"] == "skipped" and skipped["skip"] == "cap" and "32" in skipped["reason"]
    # the second N is predicted from the first before it runs
    assert by_key[("qt/linear", 64)]["status"] == "ok" and by_key[("qt/linear", 64)]["predicted_ms"] > 0
    assert doc["complete"] is True and doc["elapsed_seconds"] > 0


def test_git_commit_is_recorded_from_git_or_the_environment(monkeypatch):
    monkeypatch.delenv(bench_env.GIT_COMMIT_VARIABLE, raising=False)
    git = bench_env.git_commit(REPO)
    if git is not None:  # a checkout: the commit git names, and whether tracked files differ from it
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
        assert git["commit"] == head.strip() and isinstance(git["dirty"], bool) and git["source"] == "git"
    # a tree shipped without .git is told its commit
    monkeypatch.setenv(bench_env.GIT_COMMIT_VARIABLE, "0123456789abcdef-dirty")
    assert bench_env.git_commit("/") == {"commit": "0123456789abcdef", "dirty": True,
                                         "source": bench_env.GIT_COMMIT_VARIABLE}
    env = bench_env.collect_environment(torch.device("cpu"), torch.float32)
    assert env["git"]["dirty"] is True and "(DIRTY TREE)" in bench_env.format_environment(env)[0]
    monkeypatch.setenv(bench_env.GIT_COMMIT_VARIABLE, "0123456789abcdef")
    assert bench_env.git_commit()["dirty"] is False
    assert bench_env.describe_commit({"git": None}) == "no git commit recorded"


def _sleeper(seconds: float):
    return lambda: (lambda: time.sleep(seconds))


def test_runner_predicts_and_skips_by_time_with_the_growth_of_each_variant():
    with Sweep("test", FAST, 2) as sweep:
        first = sweep.run("n=10", [Job("lin", {"v": "lin"}, _sleeper(0.002), size=10),
                                   Job("quad", {"v": "quad"}, _sleeper(0.002), size=10, quadratic=True)])
        assert [e["status"] for e in first] == ["ok", "ok"]
        lin, quad = sweep.run("n=1000", [
            Job("lin", {"v": "lin"}, _sleeper(0.002), size=1000),
            Job("quad", {"v": "quad"}, _sleeper(0.002), size=1000, quadratic=True)])
    # 100× the size: ∝ N predicts ≥ 0.2 s and runs; ∝ N² predicts ≥ 20 s > max_call_seconds (1 s)
    assert lin["status"] == "ok" and 200 <= lin["predicted_ms"] < 1000
    assert quad["status"] == "skipped" and quad["skip"] == "time" and quad["predicted_ms"] > 1000
    assert "max_call_seconds" in quad["reason"]
    assert sweep.doc["complete"] and len(sweep.doc["results"]) == 4


def test_runner_skips_by_budget_memory_failure_and_benchmark_reason(monkeypatch):
    def broken():
        raise ValueError("head dim must be even")

    with Sweep("test", FAST, 3) as sweep:
        sweep.history.add("big", 10, 1, 0.001, 2**30)  # 1 GiB at size 10: 100 GiB at size 1000
        monkeypatch.setattr(bench_env, "available_memory_bytes", lambda device: 8 * 2**30)
        failing, capped, big = sweep.run("step 1", [
            Job("bad", {}, broken, size=10), Job("cap", {}, _sleeper(0), size=10, skip=("cap", "N too big")),
            Job("big", {}, _sleeper(0), size=1000)])
        assert failing["status"] == "error" and "head dim must be even" in failing["reason"]
        assert (capped["skip"], capped["reason"]) == ("cap", "N too big")
        assert big["skip"] == "memory" and big["predicted_peak_mb"] == pytest.approx(100 * 1024)
        (again,) = sweep.run("step 2", [Job("bad", {}, broken, size=20)])
        assert again["skip"] == "failed" and "head dim must be even" in again["reason"]  # not retried
        # a train step with no history of its own is predicted from the forward series (× 3)
        sweep.history.add("fwd", 10, 1, 0.5, None)
        (train,) = sweep.run("step 3", [Job("train", {}, _sleeper(0), size=10, fallback=("fwd", 3.0))])
        assert train["skip"] == "time" and train["predicted_ms"] == pytest.approx(1500)
        (late,) = sweep.run("late", [Job("x", {}, _sleeper(0), size=1)], deadline=time.perf_counter() - 1)
        assert late["skip"] == "budget"
    assert sweep.doc["complete"] is False  # a budget skip: the run did not measure everything


def test_warmup_call_over_the_limit_drops_the_variant_and_seeds_the_prediction():
    config = BenchConfig(**{**FAST.__dict__, "max_call_seconds": 0.01})
    with Sweep("test", config, 2) as sweep:
        (slow,) = sweep.run("a", [Job("s", {}, _sleeper(0.05), size=10)])
        (bigger,) = sweep.run("b", [Job("s", {}, _sleeper(0.05), size=20)])
    assert slow["skip"] == "time" and "warm-up call took" in slow["reason"]
    assert bigger["skip"] == "time" and bigger["predicted_ms"] >= 100


def test_cpu_clock_leaves_out_waiting_and_wall_clock_counts_it():
    def spin_and_sleep():
        end = time.process_time() + 0.01
        while time.process_time() < end:  # 10 ms of CPU work
            pass
        time.sleep(0.03)  # 30 ms waiting (as for a core on a busy machine)

    results = {}
    for clock in ("wall", "cpu"):
        with Sweep("test", BenchConfig(**{**FAST.__dict__, "clock": clock}), 1) as sweep:
            (results[clock],) = sweep.run("x", [Job("s", {}, lambda: spin_and_sleep, size=1)])
    assert results["wall"]["min_ms"] >= 40
    assert 9 <= results["cpu"]["min_ms"] < 25 and sweep.doc["config"]["clock"] == "cpu"
    with pytest.raises(ValueError, match="clock must be wall, or cpu"):
        BenchConfig(clock="gpu").validate()


def test_fit_predict_recovers_linear_and_quadratic_costs():
    # two sizes: the fit decides, not the `quadratic` flag
    assert fit_predict([(100, 2.0), (400, 8.0)], 1600, quadratic=True) == pytest.approx(32.0)
    quad = [(p, 1e-3 * p + 1e-6 * p * p) for p in (100, 400)]
    assert fit_predict(quad, 3200, quadratic=False) == pytest.approx(1e-3 * 3200 + 1e-6 * 3200**2)
    assert fit_predict([(100, 1.0)], 400, quadratic=False) == pytest.approx(4.0)
    assert fit_predict([(100, 1.0)], 400, quadratic=True) == pytest.approx(16.0)
    # a fixed overhead (b < 0 from the fit) falls back to proportional-to-size from the largest point
    assert fit_predict([(100, 5.0), (400, 8.0)], 800, quadratic=True) == pytest.approx(16.0)
    assert fit_predict([], 100, quadratic=True) is None


def test_rounds_are_interleaved_and_slow_variants_sample_less():
    calls: list[str] = []

    def fast():
        calls.append("fast")

    def slow():
        calls.append("slow")
        time.sleep(0.02)

    timed = time_interleaved({"fast": fast, "slow": slow}, device=torch.device("cpu"), warmup=1, repeats=5,
                             min_repeats=2, min_sample_seconds=1e-9, variant_seconds=0.05)
    assert not timed.errors and not timed.dropped
    assert calls[:2] == ["fast", "slow"]  # warm-up
    assert calls[2:4] == ["fast", "slow"] and calls[4:6] == ["slow", "fast"]  # rotated rounds
    assert len(timed.samples["fast"].times) == 5 and len(timed.samples["slow"].times) == 2
    assert min(timed.samples["slow"].times) >= 0.02 and timed.samples["slow"].stats()["median_ms"] >= 20


def test_slow_variants_are_dropped_by_deadline():
    def slow():
        time.sleep(0.05)

    # two samples of `slow` (≥ 100 ms) cannot fit before a deadline ≤ 70 ms after its warm-up
    timed = time_interleaved({"fast": lambda: None, "slow": slow}, device=torch.device("cpu"), repeats=3,
                             min_repeats=2, min_sample_seconds=1e-9, deadline=time.perf_counter() + 0.12)
    assert set(timed.samples) == {"fast"} and timed.dropped["slow"][0] == "budget"
    assert timed.dropped["slow"][2] >= 0.05  # the measured warm-up call, for extrapolation


@pytest.mark.skipif(not RssHighWaterMeter.available(), reason="needs Linux /proc/self/clear_refs")
def test_rss_meter_counts_an_allocation():
    meter = RssHighWaterMeter()
    peak = meter.measure(lambda: torch.ones(16 * 2**20))  # 64 MiB
    assert 60 * 2**20 < peak < 80 * 2**20
    assert meter.measure(lambda: None) < 8 * 2**20


@pytest.mark.skipif(not (RssHighWaterMeter.available() and bench_env.is_glibc()), reason="needs Linux/glibc")
def test_rss_meter_sees_memory_that_tuned_malloc_keeps():
    # Under the benchmark's malloc settings a freed 64 MiB block stays resident; reusing it would
    # not raise the RSS, so without malloc_trim the meter would report ~0.
    script = textwrap.dedent("""
        import torch
        from qtvit.bench.timing import RssHighWaterMeter
        x = torch.ones(16 * 2**20); del x
        print(RssHighWaterMeter().measure(lambda: torch.ones(16 * 2**20)) / 2**20)
    """)
    env = {**os.environ, **bench_env.TUNED_MALLOC, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120,
                         check=True, cwd=REPO)
    assert 60 < float(out.stdout.split()[-1]) < 80


def test_cli_writes_json_and_prints_the_table(tmp_path, capsys, monkeypatch):
    out = tmp_path / "sub" / "bench.json"
    threads = torch.get_num_threads()
    argv = ["bench", "attention", "--quick", "--system-malloc", "--no-progress", "--tokens", "32,64",
            "--head-dims", "8", "--heads", "1", "--repeats", "2", "--threads", "1", "--output", str(out)]
    monkeypatch.setattr(sys, "argv", ["qtvit", *argv])  # as the console script sees it
    assert main(argv) == 0 and torch.get_num_threads() == threads  # restored after the run
    doc = json.loads(out.read_text())
    assert doc["command"] == "qtvit " + " ".join(argv)  # the file says which command wrote it
    assert doc["env"]["threads"] == 1 and doc["config"]["threads"] == 1
    assert doc["config"]["tokens"] == [32, 64] and doc["config"]["kernels"] == ["relu", "qt"]
    assert doc["config"]["impls"] == ["linear", "sdpa"] and doc["config"]["min_repeats"] == 2
    assert doc["env"]["malloc"]["source"].startswith("glibc defaults") or not bench_env.is_glibc() \
        or any(n in os.environ for n in bench_env.TUNED_MALLOC)
    assert {r["status"] for r in doc["results"]} == {"ok"}
    printed = capsys.readouterr().out
    assert "qt/linear" in printed and "N=64" in printed and "git" in printed


@pytest.mark.parametrize(("flags", "message"), [
    (["--kernels", "relu,nope"], "unknown attention kernel 'nope'"),
    (["--impls", "linear,fast"], "impls: fast not valid"),
    (["--tokens", "64,abc"], "--tokens: 'abc' is not an integer"),
    (["--head-dims", "0"], "head_dims must be ≥ 1"),
    (["--repeats", "0"], "repeats must be ≥ 1"),
    (["--threads", "0"], "threads must be ≥ 1"),
    (["--max-seconds", "soon"], "--max-seconds: 'soon' is not a number"),
])
def test_cli_bad_values_fail_with_one_line(flags, message, capsys):
    rc = main(["bench", "attention", "--system-malloc", "--no-progress", *flags])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("module", [attention, models, pareto], ids=lambda m: m.__name__.rsplit(".", 1)[1])
def test_generated_flags_cover_their_fields_and_round_trip(module):
    """Every flag names a config field; giving each its default's text reproduces the default config."""
    config_class = type(module.QUICK)
    parser = module.register(argparse.ArgumentParser().add_subparsers())
    fields, helps = set(config_class.__dataclass_fields__), config_helps(config_class)
    assert set(helps) <= fields
    default, hints = config_class(), typing.get_type_hints(config_class)
    argv = []
    for name in helps:
        value = getattr(default, name)
        kind = field_kind(hints[name])
        if kind != "bool" and value is not None:  # switches only flip a default: below
            argv += ["--" + name.replace("_", "-"), show_value(value, kind)]
    assert config_from_args(default, parser.parse_args(argv), helps) == default
    switches = [name for name in helps if isinstance(getattr(default, name), bool)]
    flipped = config_from_args(default, parser.parse_args(
        [("--no-" if getattr(default, n) else "--") + n.replace("_", "-") for n in switches]), helps)
    assert all(getattr(flipped, n) is not getattr(default, n) for n in switches)


def test_rerun_flags_reproduce_the_arguments():
    parser = attention.register(argparse.ArgumentParser().add_subparsers())
    args = parser.parse_args(["--kernels", "relu,qt", "--tokens", "64,128", "--backward", "--repeats", "4",
                              "--max-seconds", "12.5", "--output", "x.json", "--quick", "--no-progress"])
    again = parser.parse_args(argv_from_args(args, parser))
    assert vars(again) == vars(args)


def test_malloc_rerun_decision(monkeypatch):
    for name in bench_env.TUNED_MALLOC:
        monkeypatch.delenv(name, raising=False)
    assert bench_env.needs_malloc_reexec(system_malloc=False) == bench_env.is_glibc()
    assert not bench_env.needs_malloc_reexec(system_malloc=True)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000")
    assert not bench_env.needs_malloc_reexec(system_malloc=False)  # the user's setting wins
    assert bench_env.malloc_settings()["source"] in ("user environment",
                                                     "not glibc: MALLOC_* variables have no effect")


def test_cli_reruns_itself_under_tuned_malloc(monkeypatch, tmp_path):
    calls = []
    for name in bench_env.TUNED_MALLOC:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(bench_env, "is_glibc", lambda: True)
    monkeypatch.setattr("qtvit.bench.cli.subprocess.call", lambda cmd, env: calls.append((cmd, env)) or 0)
    out = tmp_path / "b.json"
    assert main(["bench", "attention", "--quick", "--kernels", "relu", "--output", str(out)]) == 0
    assert not out.exists()  # the child writes it
    (cmd, env), = calls
    assert cmd == [sys.executable, "-m", "qtvit", "bench", "attention", "--output", str(out), "--quick",
                   "--kernels", "relu"]
    assert all(env[k] == v for k, v in bench_env.TUNED_MALLOC.items())
    for k, v in env.items():  # what the child then records in its header
        monkeypatch.setenv(k, v)
    assert not bench_env.needs_malloc_reexec(system_malloc=False)
    malloc = bench_env.malloc_settings()
    assert malloc["tuned"] is True and malloc["source"].startswith("set by qtvit bench")


def test_quick_config_is_small():
    assert len(build_variants(QUICK)) <= 3 and len(QUICK.tokens) * len(QUICK.head_dims) <= 3
    assert QUICK.max_seconds <= 60


def test_compiled_variants_each_get_their_own_graph():
    """More variants than dynamo's default recompile limit (8): none may fall back to eager."""
    from torch._dynamo.utils import counters

    counters.clear()
    config = AttentionBenchConfig(impls=("linear",), tokens=(32,), head_dims=(8,), heads=1, repeats=2,
                                  min_repeats=1, min_sample_seconds=1e-4, variant_seconds=0.01, memory=False,
                                  compile=True, compile_backend="eager", progress=False)
    doc = run_attention_benchmark(config)
    ok = [r for r in doc["results"] if r["status"] == "ok"]
    assert len(ok) == len(doc["config"]["variants"]) > 8
    assert all(r["compile_seconds"] > 0 for r in ok)
    assert counters["stats"]["unique_graphs"] >= len(ok)


def test_a_variant_that_fails_to_compile_is_an_error_row(monkeypatch):
    def broken_compile(fn, **kwargs):
        def call(*args):
            raise RuntimeError("no C++ compiler found")
        return call

    monkeypatch.setattr(torch, "compile", broken_compile)
    config = AttentionBenchConfig(kernels=("relu",), impls=("linear",), tokens=(32,), head_dims=(8,),
                                  heads=1, repeats=2, memory=False, compile=True, progress=False)
    (entry,) = run_attention_benchmark(config)["results"]
    assert entry["status"] == "error" and "no C++ compiler found" in entry["reason"]


@pytest.mark.slow
@pytest.mark.skipif(not any(map(__import__("shutil").which, ("c++", "g++"))),
                    reason="inductor needs a C++ compiler on CPU")
def test_cli_compile_times_inductor_code(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["bench", "attention", "--quick", "--compile", "--system-malloc", "--no-progress", "--tokens",
               "64", "--head-dims", "8", "--heads", "1", "--repeats", "2", "--output", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["config"]["compile"] is True and doc["config"]["compile_backend"] == "inductor"
    assert {r["status"] for r in doc["results"]} == {"ok"}
    assert all(r["compile_seconds"] > 0 for r in doc["results"])
    assert "torch.compile (inductor)" in capsys.readouterr().out


def test_compile_scope_lifts_dynamo_recompile_limit():
    """12 shapes of one function: 12 graphs inside the scope; dynamo's default stops at 8."""
    from torch._dynamo.utils import counters

    def graphs_compiled(enabled: bool) -> int:
        torch.compiler.reset()
        counters.clear()
        with bench_env.compile_scope(enabled, graphs=12):
            f = torch.compile(lambda x: x * 2, backend="eager", dynamic=False)
            for n in range(1, 13):
                assert torch.equal(f(torch.ones(n)), torch.full((n,), 2.0))
        return counters["stats"]["unique_graphs"]

    import torch._dynamo

    # dynamo's default limit, pinned: other code in the process may have raised the global value
    with torch._dynamo.config.patch(recompile_limit=8):
        assert graphs_compiled(True) == 12
        assert graphs_compiled(False) <= 8  # the rest ran eagerly: what the scope prevents
    torch.compiler.reset()
