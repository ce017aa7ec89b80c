"""``qtvit bench models``: variants, extrapolation, skips, ratios, and a quick end-to-end run."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from qtvit.bench.models import (
    QUICK,
    RATIO_SPECS,
    ModelBenchConfig,
    busy_warning,
    compute_ratios,
    fit_predict,
    model_variants,
    parse_sizes,
    run_models_benchmark,
)
from qtvit.cli import main
from qtvit.errors import QtvitError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# The quick run, made smaller still: 48 px, batch 2, two samples; no budget can cut it short.
TINY = replace(QUICK, resolutions=((48, 48),), batch_size=2, warmup=1, repeats=2, min_repeats=2,
               variant_seconds=0.1, min_sample_seconds=0.002, train_repeats=2, sweep=True,
               sweep_sizes=((48, 48), (64, 64)), sweep_repeats=2, ratio_size=(48, 48),
               ratio_sweep_size=(64, 64), max_seconds=900, sweep_max_seconds=900, progress=False,
               count_macs=False)


def test_variants_of_a_qtvit_model_are_its_three_twins_and_timm():
    specs = {s.key: s for s in model_variants("qtvit_1")}
    assert list(specs) == ["qt", "relu", "softmax", "timm"]
    assert all(s.model == "qtvit_b1" for s in specs.values())
    assert specs["qt"].kwargs == {}
    assert specs["relu"].kwargs == {"kernel": "relu", "ape": False, "shortcut": False}
    assert specs["softmax"].kwargs == {"kernel": "softmax"} and specs["softmax"].quadratic
    assert (specs["timm"].source, specs["timm"].arch) == ("timm", "efficientvit_b1")
    assert [s.key for s in model_variants("qtvit_l3", ("qt", "timm"))] == ["qt", "timm"]
    # the plain-ViT micro has no timm twin: left out, not an error
    assert [s.key for s in model_variants("qtvit_vit_micro")] == ["qt", "relu", "softmax"]


def test_bad_model_and_variant_names_raise_listing_the_valid_ones():
    with pytest.raises(ValueError, match="unknown model 'qtvit_9'.*valid models: .*qtvit_b1"):
        model_variants("qtvit_9")
    with pytest.raises(ValueError, match="unknown variant.*flash.*valid: qt, relu, softmax, timm"):
        model_variants("qtvit_1", ("qt", "flash"))
    with pytest.raises(ValueError, match="unknown model"):
        ModelBenchConfig(models=("nope",)).validate()
    with pytest.raises(ValueError, match="'qtvit_vit_micro' has none of the variants timm"):
        ModelBenchConfig(models=("qtvit_vit_micro",), variants=("timm",)).validate()


def test_fit_predict_recovers_linear_and_quadratic_costs():
    lin = [(100, 2.0), (400, 8.0)]
    assert fit_predict(lin, 1600, quadratic=True) == pytest.approx(32.0)  # two points: the fit decides
    quad = [(p, 1e-3 * p + 1e-6 * p * p) for p in (100, 400)]
    assert fit_predict(quad, 3200, quadratic=False) == pytest.approx(1e-3 * 3200 + 1e-6 * 3200**2)
    assert fit_predict([(100, 1.0)], 400, quadratic=False) == pytest.approx(4.0)
    assert fit_predict([(100, 1.0)], 400, quadratic=True) == pytest.approx(16.0)
    # a fixed overhead (b < 0 from the fit) falls back to proportional-to-pixels from the largest point
    assert fit_predict([(100, 5.0), (400, 8.0)], 800, quadratic=True) == pytest.approx(16.0)
    assert fit_predict([], 100, quadratic=True) is None


def test_parse_sizes_and_bad_sizes():
    assert parse_sizes("--r", "224, 1024x2048,512×256") == ((224, 224), (1024, 2048), (512, 256))
    for bad in ("16", "abc", "1x2x3", ""):
        with pytest.raises(QtvitError):
            parse_sizes("--r", bad)


def test_cli_errors_are_one_line(capsys):
    assert main(["bench", "models", "--models", "qtvit_9", "--system-malloc"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown model 'qtvit_9'" in err
    assert main(["bench", "models", "--resolutions", "16", "--system-malloc"]) == 2
    assert "sides ≥ 32" in capsys.readouterr().err
    assert main(["bench", "models", "--variants", "qt,nope", "--system-malloc"]) == 2
    assert "unknown variant(s) nope" in capsys.readouterr().err


def _entry(variant, mode, batch, size, ms=None, mb=None, status="ok", **extra):
    e = {"model": "qtvit_b1", "variant": variant, "mode": mode, "batch": batch, "resolution": list(size),
         "status": status, "skip": None if status == "ok" else "memory",
         "reason": None if status == "ok" else "x"}
    if status == "ok":
        e.update(median_ms=ms, min_ms=ms * 0.9, peak_mb=mb)
    e.update(extra)
    return e


def test_ratios_from_a_hand_made_document():
    cfg = ModelBenchConfig(batch_size=8, train_step=True, sweep=True)
    r224, r2k = (224, 224), (2048, 2048)
    doc = {"models": [{"model": "qtvit_b1"}], "results": [
        _entry("qt", "forward", 1, r224, 11.0), _entry("relu", "forward", 1, r224, 10.0),
        _entry("timm", "forward", 1, r224, 10.0), _entry("qt", "forward", 8, r224, 55.0),
        _entry("relu", "forward", 8, r224, 50.0), _entry("timm", "forward", 8, r224, 40.0),
        _entry("qt", "train", 8, r224, 100.0), _entry("timm", "train", 8, r224, 90.0),
    ], "sweep": [
        _entry("qt", "sweep", 1, r2k, 1000.0, 500.0),
        # softmax too big to run: the ratio uses its prediction and says so
        _entry("softmax", "sweep", 1, r2k, status="skipped", predicted_ms=9000.0, predicted_peak_mb=4000.0),
    ]}
    ratios = {r["name"]: r for r in compute_ratios(doc, cfg)}
    assert set(ratios) == {s.name for s in RATIO_SPECS}
    assert ratios["qt_vs_relu_latency_b1"]["value"] == pytest.approx(1.1)
    assert ratios["qt_vs_relu_latency_b1"]["met"]
    assert ratios["qt_vs_relu_latency_bN"]["value"] == pytest.approx(1.1)
    assert ratios["qt_vs_timm_latency_bN"]["value"] == pytest.approx(1.375)
    assert ratios["qt_vs_timm_latency_bN"]["met"] is False
    assert ratios["qt_vs_timm_train_throughput"]["value"] == pytest.approx(0.9)  # 8/0.1 ÷ 8/0.09
    hires = ratios["softmax_vs_qt_latency_hires"]
    assert hires["value"] == pytest.approx(9.0) and hires["basis"] == "predicted" and hires["met"]
    assert ratios["qt_vs_softmax_peak_hires"]["value"] == pytest.approx(0.125)
    assert all(r["applies"] for r in ratios.values())
    # a main-table target never rests on a prediction: a skipped timm train step leaves it open
    doc["results"][-1] = _entry("timm", "train", 8, r224, status="skipped", predicted_ms=900.0)
    train = {r["name"]: r for r in compute_ratios(doc, cfg)}["qt_vs_timm_train_throughput"]
    assert train["value"] is None and "not measured" in train["reason"]
    # nothing measured: every ratio says why instead of a value
    nothing = {"models": [{"model": "qtvit_b1"}], "results": [], "sweep": []}
    empty = compute_ratios(nothing, ModelBenchConfig())
    assert all(r["value"] is None and r["reason"] for r in empty)
    assert any("--train-step" in r["reason"] for r in empty)


def test_configs_predicted_too_big_or_slow_are_skipped_with_the_prediction():
    base = replace(TINY, models=("qtvit_b0",), variants=("qt",), train_step=False)
    doc = run_models_benchmark(replace(base, max_call_seconds=1e-9))
    first, second = doc["results"]  # batch 1 runs (no history yet); batch 2 is predicted from it
    assert first["status"] == "ok"
    assert second["status"] == "skipped" and second["skip"] == "time" and second["predicted_ms"] > 0
    assert [e["skip"] for e in doc["sweep"]] == ["time", "time"]
    doc = run_models_benchmark(replace(base, memory_fraction=1e-12))
    if doc["results"][0]["peak_mb"] is None:
        pytest.skip("no peak-memory meter on this platform")
    second = doc["results"][1]
    assert second["skip"] == "memory" and second["predicted_peak_mb"] > 0 and "available" in second["reason"]


def test_quick_run_fills_every_table_and_ratio(tmp_path):
    out, png = tmp_path / "models.json", tmp_path / "sweep.png"
    doc = run_models_benchmark(TINY, checkpoint=out)
    loaded = json.loads(out.read_text())
    assert loaded["benchmark"] == "models" and loaded["env"]["torch"] and loaded["complete"]
    assert [v["variant"] for v in loaded["models"][0]["variants"]] == ["qt", "relu", "softmax", "timm"]
    assert all(v["params"] > 1e6 for v in loaded["models"][0]["variants"])
    modes = {(e["variant"], e["mode"], e["batch"]) for e in doc["results"]}
    assert modes == {(v, m, b) for v in ("qt", "relu", "softmax", "timm")
                     for m, b in (("forward", 1), ("forward", 2), ("train", 2))}
    for e in doc["results"] + doc["sweep"]:
        assert e["status"] == "ok", e
        assert e["median_ms"] > 0 and e["min_ms"] <= e["median_ms"] and e["images_per_s"] > 0
        assert e["peak_mb"] is None or e["peak_mb"] >= 0
    assert {tuple(e["resolution"]) for e in doc["sweep"]} == {(48, 48), (64, 64)}
    ratios = [r for r in doc["ratios"] if r["model"] == "qtvit_b1"]
    assert len(ratios) == len(RATIO_SPECS)
    for r in ratios:
        assert r["applies"] and r["basis"] == "measured" and r["value"] > 0 and isinstance(r["met"], bool), r
    from qtvit.bench.models import format_ratios, format_sweep, format_table
    from qtvit.bench.plots import plot_resolution_sweep

    text = "\n".join(format_table(doc) + format_sweep(doc) + format_ratios(doc))
    assert "qtvit_b1 at 48×48" in text and "relu twin (EfficientViT)" in text
    plot_resolution_sweep(doc, png)
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_macs_are_counted_per_variant_and_size():
    cfg = replace(TINY, models=("qtvit_b0",), variants=("qt", "softmax"), count_macs=True, train_step=False,
                  sweep=False, batch_size=1, resolutions=((128, 128),))
    doc = run_models_benchmark(cfg)
    macs = {e["variant"]: e["macs_g"] for e in doc["results"]}
    # the attention matmuls are counted: at 128 px (64 and 16 tokens) softmax's N² products cost more
    assert 0 < macs["qt"] < macs["softmax"] < 0.1


def test_busy_machine_warning():
    quiet = {"device": "cpu", "cpu_usable": 2,
             "load_start": {"loadavg": [0.5, 0.4, 0.3], "cpu_pressure_avg10": 1.0},
             "load_end": {"loadavg": [0.6, 0.5, 0.3], "cpu_pressure_avg10": 2.0}}
    assert busy_warning(quiet) is None
    busy = {**quiet, "load_end": {"loadavg": [5.4, 5.0, 4.0], "cpu_pressure_avg10": 98.0}}
    assert "busy" in busy_warning(busy) and "98%" in busy_warning(busy)
    assert busy_warning({**busy, "device": "cuda"}) is None  # GPU timings do not share the cores
