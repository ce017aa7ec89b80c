"""``qtvit bench models``: variants, MACs, skips with predictions, and a quick end-to-end run."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from qtvit.bench import env as bench_env
from qtvit.bench.cli import parse_value
from qtvit.bench.models import QUICK, ModelBenchConfig, count_macs_g, model_variants, run_models_benchmark
from qtvit.cli import main
from qtvit.errors import QtvitError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# The quick run, made smaller still: the smallest model, 48 px, batch 2, two samples.
TINY = replace(QUICK, models=("qtvit_b0",), resolutions=((48, 48),), batch_size=2, warmup=1, repeats=2,
               min_repeats=2, variant_seconds=0.1, min_sample_seconds=0.002, train_repeats=2, sweep=True,
               sweep_sizes=((48, 48), (64, 64)), sweep_repeats=2, max_seconds=900, sweep_max_seconds=900,
               progress=False, macs=False)


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


def test_size_flags_parse_and_bad_sizes_fail():
    assert parse_value("--r", "sizes", "224, 1024x2048,512×256") == ((224, 224), (1024, 2048), (512, 256))
    for bad in ("16", "abc", "1x2x3", ""):
        with pytest.raises(QtvitError):
            parse_value("--r", "sizes", bad)


def test_cli_errors_are_one_line(capsys):
    assert main(["bench", "models", "--models", "qtvit_9", "--system-malloc"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown model 'qtvit_9'" in err
    assert main(["bench", "models", "--resolutions", "16", "--system-malloc"]) == 2
    assert "sides ≥ 32" in capsys.readouterr().err
    assert main(["bench", "models", "--variants", "qt,nope", "--system-malloc"]) == 2
    assert "unknown variant(s) nope" in capsys.readouterr().err


def test_macs_are_counted_per_variant_and_size():
    qt, softmax = model_variants("qtvit_b0", ("qt", "softmax"))
    # the attention matmuls are counted: at 128 px (64 and 16 tokens) softmax's N² products cost more
    assert 0 < count_macs_g(qt.build, (128, 128)) < count_macs_g(softmax.build, (128, 128)) < 0.1
    # linear attention: MACs ∝ pixels, up to the classifier head's fixed cost
    small, large = count_macs_g(qt.build, (256, 256)), count_macs_g(qt.build, (512, 512))
    assert large == pytest.approx(4 * small, rel=0.03)


def test_configs_predicted_too_slow_are_skipped_with_the_prediction():
    doc = run_models_benchmark(replace(TINY, variants=("qt",), train_step=False, sweep=False,
                                       max_call_seconds=1e-9))
    first, second = doc["results"]  # batch 1: dropped after its warm-up call; batch 2 predicted from it
    assert first["skip"] == "time" and "warm-up call took" in first["reason"]
    assert second["status"] == "skipped" and second["skip"] == "time" and second["predicted_ms"] > 0
    assert "predicted" in second["reason"]


def test_quick_run_fills_every_table(tmp_path):
    out, png = tmp_path / "models.json", tmp_path / "sweep.png"
    doc = run_models_benchmark(replace(TINY, variants=("qt", "timm")), checkpoint=out)  # both builders
    loaded = json.loads(out.read_text())
    assert loaded == json.loads(json.dumps(doc)) and loaded["benchmark"] == "models" and loaded["complete"]
    assert [v["variant"] for v in loaded["models"][0]["variants"]] == ["qt", "timm"]
    assert all(v["params"] > 1e6 for v in loaded["models"][0]["variants"])
    modes = {(e["variant"], e["mode"], e["batch"], tuple(e["resolution"])) for e in doc["results"]}
    steps = (("forward", 1, (48, 48)), ("forward", 2, (48, 48)), ("train", 2, (48, 48)),
             ("sweep", 1, (48, 48)), ("sweep", 1, (64, 64)))
    assert modes == {(v, *step) for v in ("qt", "timm") for step in steps}
    for e in doc["results"]:
        assert e["status"] == "ok", e
        assert e["median_ms"] > 0 and e["min_ms"] <= e["median_ms"]
        assert e["per_s"] == pytest.approx(e["batch"] * 1e3 / e["median_ms"])
        assert e["peak_mb"] is None or e["peak_mb"] >= 0
    from qtvit.bench.models import format_sweep, format_table
    from qtvit.bench.plots import plot_model_bars, plot_resolution_sweep

    text = "\n".join(format_table(doc) + format_sweep(doc))
    assert "qtvit_b0 at 48×48" in text and "timm efficientvit_b0" in text and "64×64" in text
    plot_resolution_sweep(doc, png)
    assert png.read_bytes()[:8] == PNG_MAGIC
    plot_model_bars(doc, png)
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_busy_machine_warning():
    quiet = {"device": "cpu", "cpu_usable": 2,
             "load_start": {"loadavg": [0.5, 0.4, 0.3], "cpu_pressure_avg10": 1.0},
             "load_end": {"loadavg": [0.6, 0.5, 0.3], "cpu_pressure_avg10": 2.0}}
    assert bench_env.busy_warning(quiet) is None
    busy = {**quiet, "load_end": {"loadavg": [5.4, 5.0, 4.0], "cpu_pressure_avg10": 98.0}}
    assert "busy" in bench_env.busy_warning(busy) and "98%" in bench_env.busy_warning(busy)
    assert bench_env.busy_warning({**busy, "device": "cuda"}) is None  # GPU timings do not share the cores
