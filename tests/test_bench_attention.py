"""``qtvit bench attention``: result structure, skips, errors, timing protocol, memory meter, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from qtvit.bench import env as bench_env
from qtvit.bench.attention import (
    QUICK,
    AttentionBenchConfig,
    Variant,
    _add_arguments,
    _Previous,
    _skip_reason,
    build_variants,
    run_attention_benchmark,
)
from qtvit.bench.env import argv_from_args
from qtvit.bench.timing import RssHighWaterMeter, time_interleaved
from qtvit.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]
# A tiny sweep: two token counts, dense capped below the second, samples kept short.
TINY = AttentionBenchConfig(kernels=("relu", "qt", "softmax"), tokens=(64, 128), head_dims=(16,), heads=2,
                            repeats=3, min_repeats=2, min_sample_seconds=1e-3, variant_seconds=0.05,
                            max_dense_tokens=64, ratio_tokens=(64, 128), progress=False)


@pytest.fixture(scope="module")
def tiny_doc() -> dict:
    return run_attention_benchmark(TINY)


def test_variants_follow_the_registry_and_impls():
    names = [v.name for v in build_variants(TINY)]
    # softmax has no linear path, and its dense path is SDPA itself, measured once as softmax/sdpa
    assert names == ["softmax/sdpa", "relu/linear", "qt/linear", "relu/dense", "qt/dense"]
    dense_only = [v.name for v in build_variants(AttentionBenchConfig(kernels=("softmax",),
                                                                       impls=("dense",)))]
    assert dense_only == ["softmax/dense"]
    every = build_variants(AttentionBenchConfig())
    from qtvit import get_kernel, list_kernels
    with_linear = {n for n in list_kernels() if get_kernel(n).has_linear}
    assert {v.kernel for v in every if v.impl == "linear"} == with_linear
    assert {v.kernel for v in every if v.impl == "dense"} == set(list_kernels()) - {"softmax"}


def test_result_document_structure_and_values(tiny_doc):
    doc = json.loads(json.dumps(tiny_doc, allow_nan=False))  # plain JSON, no NaN
    env = doc["env"]
    for key in ("date", "torch", "cpu_model", "threads", "device", "device_name", "dtype", "malloc", "git"):
        assert key in env, key
    assert env["dtype"] == "float32" and env["threads"] == torch.get_num_threads()
    assert doc["config"]["variants"] == [v.name for v in build_variants(TINY)]
    assert len(doc["results"]) == len(doc["config"]["variants"]) * len(TINY.tokens)
    by_key = {(r["variant"], r["tokens"]): r for r in doc["results"]}
    for name in doc["config"]["variants"]:
        first = by_key[(name, 64)]
        assert first["status"] == "ok", first
        assert 0 < first["min_ms"] <= first["median_ms"] <= first["q3_ms"]
        assert first["q1_ms"] <= first["median_ms"] and first["iqr_ms"] >= 0
        assert first["samples"] >= TINY.min_repeats and first["number"] >= 1
        if RssHighWaterMeter.available():
            assert first["peak_mb"] is not None and first["peak_mb"] >= 0
    for name in ("relu/dense", "qt/dense"):  # over max_dense_tokens: recorded, not silently dropped
        skipped = by_key[(name, 128)]
        assert skipped["status"] == "skipped" and skipped["skip"] == "cap"
        assert "64" in skipped["reason"]
    assert by_key[("qt/linear", 128)]["status"] == "ok"
    assert doc["complete"] is True and doc["elapsed_seconds"] > 0


def test_ratios_are_computed_from_the_run(tiny_doc):
    ratios = {(r["name"], r["tokens"]): r for r in tiny_doc["ratios"]}
    assert set(ratios) == {("sdpa_over_qt_linear", 64), ("qt_linear_over_relu_linear", 64),
                           ("qt_linear_over_relu_linear", 128)}
    by_key = {(r["variant"], r["tokens"]): r for r in tiny_doc["results"]}
    r = ratios[("qt_linear_over_relu_linear", 128)]
    expected = by_key[("qt/linear", 128)]["median_ms"] / by_key[("relu/linear", 128)]["median_ms"]
    assert r["value"] == pytest.approx(expected) and r["value"] > 0
    assert r["met"] == (r["value"] <= 1.3) and r["target"] == 1.3
    s = ratios[("sdpa_over_qt_linear", 64)]
    assert s["value"] > 0 and s["met"] == (s["value"] >= 30)


def test_missing_ratio_inputs_are_reported():
    doc = run_attention_benchmark(AttentionBenchConfig(kernels=("relu",), impls=("linear",), tokens=(32,),
                                                       head_dims=(8,), heads=1, repeats=1, warmup=0,
                                                       measure_memory=False, progress=False))
    assert doc["ratios"] and all(r["value"] is None for r in doc["ratios"])
    assert all("not measured" in r["reason"] for r in doc["ratios"])


def test_slow_variants_are_skipped_with_a_reason():
    config = AttentionBenchConfig(kernels=("relu",), impls=("linear", "dense"), tokens=(32, 64),
                                  head_dims=(8,), heads=1, repeats=1, warmup=1, max_call_seconds=1e-9,
                                  measure_memory=False, progress=False)
    doc = run_attention_benchmark(config)
    by_key = {(r["variant"], r["tokens"]): r for r in doc["results"]}
    for name in ("relu/linear", "relu/dense"):
        first = by_key[(name, 32)]  # nothing to extrapolate from: dropped after its warm-up call
        assert first["status"] == "skipped" and first["skip"] == "time"
        assert "warm-up call took" in first["reason"]
        entry = by_key[(name, 64)]  # extrapolated from that call, not run at all
        assert entry["status"] == "skipped" and entry["skip"] == "time"
        assert "predicted" in entry["reason"] and "max_call_seconds" in entry["reason"]


def test_skip_reasons_extrapolate_by_complexity():
    config = AttentionBenchConfig(max_call_seconds=1.0, max_seconds=100.0, warmup=1, repeats=5, min_repeats=3)
    linear, dense = Variant("relu", "linear"), Variant("relu", "dense")
    prev = _Previous(tokens=1000, seconds=0.1, peak_bytes=2**30)
    assert _skip_reason(linear, 4000, prev, config, 100.0, None)[0] == ""  # 0.4 s: fine
    assert _skip_reason(dense, 4000, prev, config, 100.0, None)[0] == "time"  # 1.6 s > 1 s
    assert _skip_reason(dense, 32768, None, config, 100.0, None)[0] == "cap"
    assert _skip_reason(linear, 4000, prev, config, 0.5, None)[0] == "budget"  # ≥ 4 calls of 0.4 s
    assert _skip_reason(linear, 4000, prev, config, 0.0, None)[0] == "budget"
    assert _skip_reason(linear, 4000, prev, config, 100.0, 4 * 2**30)[0] == "memory"  # 4 GB > 80% of 4 GB
    assert _skip_reason(linear, 4000, _Previous(1000, failed=True), config, 100.0, None)[0] == "failed"


def test_a_failing_variant_is_recorded_and_not_retried():
    # taylor2_pool needs d divisible by pool=2: d=3 raises inside the kernel
    config = AttentionBenchConfig(kernels=("taylor2_pool", "relu"), impls=("linear",), tokens=(16, 32),
                                  head_dims=(3,), heads=1, repeats=1, warmup=1, measure_memory=False,
                                  progress=False)
    doc = run_attention_benchmark(config)
    by_key = {(r["variant"], r["tokens"]): r for r in doc["results"]}
    error = by_key[("taylor2_pool/linear", 16)]
    assert error["status"] == "error" and "divisible" in error["reason"]
    assert by_key[("taylor2_pool/linear", 32)]["skip"] == "failed"
    assert by_key[("relu/linear", 32)]["status"] == "ok"


def test_rounds_are_interleaved_and_slow_variants_sample_less():
    calls: list[str] = []

    def fast():
        calls.append("fast")

    def slow():
        calls.append("slow")
        time.sleep(0.02)

    timed = time_interleaved({"fast": fast, "slow": slow}, device=torch.device("cpu"), warmup=1, repeats=5,
                             min_repeats=2, min_sample_seconds=1e-9, variant_seconds=0.05)
    samples = timed.samples
    assert not timed.errors and not timed.dropped
    assert calls[:2] == ["fast", "slow"]  # warm-up
    assert calls[2:4] == ["fast", "slow"] and calls[4:6] == ["slow", "fast"]  # rotated rounds
    assert len(samples["fast"].times) == 5 and len(samples["slow"].times) == 2
    assert min(samples["slow"].times) >= 0.02
    assert samples["slow"].stats()["median_ms"] >= 20


def test_slow_variants_are_dropped_after_warmup_by_call_limit_and_deadline():
    def slow():
        time.sleep(0.05)

    cpu = torch.device("cpu")
    timed = time_interleaved({"fast": lambda: None, "slow": slow}, device=cpu, repeats=3, min_repeats=2,
                             max_call_seconds=0.01)
    assert set(timed.samples) == {"fast"} and timed.dropped["slow"][0] == "time"
    assert timed.dropped["slow"][2] >= 0.05  # the measured warm-up call, for extrapolation
    # two samples of `slow` (≥ 100 ms) cannot fit before a deadline ≤ 70 ms after its warm-up
    timed = time_interleaved({"fast": lambda: None, "slow": slow}, device=cpu, repeats=3, min_repeats=2,
                             min_sample_seconds=1e-9, deadline=time.perf_counter() + 0.12)
    assert set(timed.samples) == {"fast"} and timed.dropped["slow"][0] == "budget"
    samples, errors = timed  # unpacks like a (samples, errors) pair
    assert samples is timed.samples and errors == {}


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


def test_cli_writes_json_and_prints_the_table(tmp_path, capsys):
    out = tmp_path / "sub" / "bench.json"
    threads = torch.get_num_threads()
    rc = main(["bench", "attention", "--quick", "--system-malloc", "--no-progress", "--tokens", "32,64",
               "--head-dims", "8", "--heads", "1", "--repeats", "2", "--threads", "1", "--output", str(out)])
    assert rc == 0 and torch.get_num_threads() == threads  # restored after the run
    doc = json.loads(out.read_text())
    assert doc["env"]["threads"] == 1 and doc["config"]["threads"] == 1
    assert doc["config"]["tokens"] == [32, 64] and doc["config"]["kernels"] == ["relu", "qt"]
    assert doc["config"]["impls"] == ["linear", "sdpa"]
    assert doc["env"]["malloc"]["source"].startswith("glibc defaults") or not bench_env.is_glibc() \
        or any(n in os.environ for n in bench_env.TUNED_MALLOC)
    assert {r["status"] for r in doc["results"]} == {"ok"}
    printed = capsys.readouterr().out
    assert "qt/linear" in printed and "N=64" in printed and "target ratios" in printed
    assert "not measured" in printed  # --quick reads the ratios at N=4096, not run here


@pytest.mark.parametrize(("flags", "message"), [
    (["--kernels", "relu,nope"], "unknown attention kernel 'nope'"),
    (["--impl", "linear,fast"], "--impl: unknown fast"),
    (["--tokens", "64,abc"], "--tokens: 'abc' is not an integer"),
    (["--head-dims", "0"], "--head-dims: 0 must be ≥ 1"),
    (["--repeats", "0"], "repeats must be ≥ 1"),
    (["--threads", "0"], "threads must be ≥ 1"),
])
def test_cli_bad_values_fail_with_one_line(flags, message, capsys):
    rc = main(["bench", "attention", "--system-malloc", "--no-progress", *flags])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    if "nope" in message:
        assert "valid kernels:" in err and "qt" in err


def test_rerun_flags_reproduce_the_arguments():
    argv = ["bench", "attention", "--kernels", "relu,qt", "--tokens", "64,128", "--backward",
            "--repeats", "4", "--max-seconds", "12.5", "--output", "x.json", "--quick"]
    args = build_parser().parse_args(argv)
    again = build_parser().parse_args(["bench", "attention", *argv_from_args(args, _add_arguments)])
    assert {k: v for k, v in vars(again).items() if k != "func"} == \
        {k: v for k, v in vars(args).items() if k != "func"}


def test_malloc_rerun_decision(monkeypatch):
    for name in bench_env.TUNED_MALLOC:
        monkeypatch.delenv(name, raising=False)
    assert bench_env.needs_malloc_reexec(system_malloc=False) == bench_env.is_glibc()
    assert not bench_env.needs_malloc_reexec(system_malloc=True)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000")
    assert not bench_env.needs_malloc_reexec(system_malloc=False)  # the user's setting wins
    assert bench_env.malloc_settings()["source"] in ("user environment", "not glibc: MALLOC_* variables "
                                                                          "have no effect")


def test_cli_reruns_itself_under_tuned_malloc(monkeypatch, tmp_path):
    calls = []

    def fake_call(cmd, env):
        calls.append((cmd, env))
        return 0

    for name in bench_env.TUNED_MALLOC:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(bench_env, "is_glibc", lambda: True)
    monkeypatch.setattr("qtvit.bench.env.subprocess.call", fake_call)
    out = tmp_path / "b.json"
    assert main(["bench", "attention", "--quick", "--kernels", "relu", "--output", str(out)]) == 0
    assert not out.exists()  # the child writes it
    (cmd, env), = calls
    assert cmd[:5] == [sys.executable, "-m", "qtvit", "bench", "attention"]
    assert cmd[5:] == ["--output", str(out), "--kernels", "relu", "--quick"]
    assert all(env[k] == v for k, v in bench_env.TUNED_MALLOC.items())
    # what the child then records in its header
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert not bench_env.needs_malloc_reexec(system_malloc=False)
    malloc = bench_env.malloc_settings()
    assert malloc["tuned"] is True and malloc["source"].startswith("set by qtvit bench")


def test_quick_config_is_small():
    variants = build_variants(QUICK)
    assert len(variants) <= 3 and len(QUICK.tokens) * len(QUICK.head_dims) <= 3
    assert QUICK.max_seconds <= 60 and QUICK.ratio_tokens[0] in QUICK.tokens


def test_compiled_variants_each_get_their_own_graph():
    """More variants than dynamo's default recompile limit (8): none may fall back to eager."""
    from torch._dynamo.utils import counters

    counters.clear()
    config = AttentionBenchConfig(impls=("linear",), tokens=(32,), head_dims=(8,), heads=1, repeats=2,
                                  min_repeats=1, min_sample_seconds=1e-4, variant_seconds=0.01,
                                  measure_memory=False, compile=True, compile_backend="eager",
                                  progress=False)
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
                                  heads=1, repeats=2, measure_memory=False, compile=True, progress=False)
    (entry,) = run_attention_benchmark(config)["results"]
    assert entry["status"] == "error" and "no C++ compiler found" in entry["reason"]


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

    assert graphs_compiled(True) == 12
    assert graphs_compiled(False) <= 8  # the rest ran eagerly: what the scope prevents
    torch.compiler.reset()
