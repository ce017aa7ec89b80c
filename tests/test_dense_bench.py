"""`qtvit seg bench` and `qtvit det bench` on tiny inputs: tables, ratios and provenance in the JSON
(the numbers themselves are benchmarks, not tests)."""

from __future__ import annotations

import json

import pytest

from qtvit.cli import main


@pytest.mark.parametrize("command", [["seg", "bench"], ["bench", "seg"]])
def test_seg_bench_writes_rows_ratios_and_environment(command, tmp_path, capsys):
    out = tmp_path / "seg.json"
    assert main([*command, "--models", "seghead", "--kernels", "qt,relu", "--sizes", "32x64",
                 "--repeats", "2", "--threads", "1", "--output", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert [r["variant"] for r in doc["rows"]] == ["seghead/qt", "seghead/relu"]
    assert all(r["median_ms"] > 0 and r["size"] == [32, 64] for r in doc["rows"])
    ratio = doc["time_ratio_vs_qt"]["seghead/relu@32x64"]
    assert ratio == doc["rows"][1]["median_ms"] / doc["rows"][0]["median_ms"]
    env = doc["env"]
    assert env["threads"] == 1 and "load_start" in env and "load_end" in env
    assert env["git"] is None or set(env["git"]) >= {"commit", "dirty"}
    assert "relu@32x64" in capsys.readouterr().out


def test_det_bench_times_variants_against_relu(tmp_path, capsys):
    out = tmp_path / "det.json"
    assert main(["det", "bench", "--backbone", "qtvit_b0", "--size", "64", "96", "--repeats", "1",
                 "--output", str(out)]) == 0
    doc = json.loads(out.read_text())
    rows = doc["variants"]
    assert set(rows) == {"qt", "relu", "softmax"} and rows["relu"]["ratio_to_relu"] == 1.0
    assert all(r["median_s"] > 0 and len(r["times_s"]) == 1 and r["peak_mib"] >= 0 for r in rows.values())
    assert doc["input"] == [64, 96] and "git" in doc["env"] and "load_end" in doc["env"]
    assert "of relu" in capsys.readouterr().out
