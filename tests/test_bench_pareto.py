"""``qtvit bench pareto``: the Pareto front, the model table, and a quick end-to-end run."""

from __future__ import annotations

import csv
import json
import random

import pytest

from qtvit import get_model_card
from qtvit.bench.pareto import PAPER_MODELS, pareto_front, select_models
from qtvit.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] <= b[0] and a[1] >= b[1] and (a[0] < b[0] or a[1] > b[1])


def test_front_of_a_hand_made_list():
    points = [
        (1.0, 70.0),  # 0: front (fastest above 60)
        (2.0, 75.0),  # 1: front
        (2.0, 74.0),  # 2: dominated by 1 (same latency, less accurate)
        (3.0, 75.0),  # 3: dominated by 1 (slower, same accuracy)
        (0.5, 60.0),  # 4: front (fastest of all)
        (4.0, 80.0),  # 5: front
        (4.0, 80.0),  # 6: exact duplicate of 5: neither dominates the other
        (5.0, 79.0),  # 7: dominated by 5
    ]
    assert pareto_front(points) == [4, 0, 1, 5, 6]
    assert pareto_front([]) == []
    assert pareto_front([(3.0, 50.0)]) == [0]


def test_front_members_are_exactly_the_non_dominated_points():
    rng = random.Random(0)
    points = [(rng.uniform(1, 100), rng.uniform(60, 90)) for _ in range(200)]
    front = set(pareto_front(points))
    assert front
    for i, p in enumerate(points):
        dominated = any(_dominates(q, p) for j, q in enumerate(points) if j != i)
        assert dominated == (i not in front)
    lat = [points[i] for i in pareto_front(points)]  # by latency, accuracy must rise along the front
    assert all(a[0] <= b[0] and a[1] < b[1] for a, b in zip(lat, lat[1:], strict=False))


def test_model_table_is_sane_and_buildable_by_name():
    import timm

    names = [m.name for m in PAPER_MODELS]
    assert len(names) == len(set(names))
    known = set(timm.list_models())
    for m in PAPER_MODELS:
        assert 60.0 < m.top1 < 90.0 and m.top1_source and m.top1_size >= 224
        if m.source == "timm":
            assert m.arch in known, m.arch
    qt = [m for m in PAPER_MODELS if m.family == "QT-ViT"]
    assert [m.name for m in qt] == [f"QT-ViT-{i}" for i in range(1, 7)]
    assert all(m.top1 == get_model_card(m.arch).top1 for m in qt)
    # each QT-ViT's twin is the same qtvit builder with EfficientViT's attention; timm's beside it
    twins = [m for m in PAPER_MODELS if m.family == "EfficientViT (qtvit)"]
    assert [t.arch for t in twins] == [m.arch for m in qt]
    assert all(t.kwargs == {"kernel": "relu", "ape": False, "shortcut": False} for t in twins)
    timm_twins = {m.name: m.top1 for m in PAPER_MODELS if m.family == "EfficientViT (timm)"}
    assert [timm_twins[t.name.removesuffix(" (qtvit)")] for t in twins] == [t.top1 for t in twins]
    assert {m.family for m in PAPER_MODELS} >= {"EfficientNet", "ConvNeXt", "Swin", "SwinV2", "PoolFormer",
                                                "MobileViT", "MobileViTv2", "DeiT"}


def test_select_models_by_name_family_and_glob():
    chosen = [m.name for m in select_models(["ConvNeXt-T", "swin"])]
    assert chosen == ["ConvNeXt-T", "Swin-T", "Swin-S", "Swin-B"]
    assert len(select_models(["qt-vit-*"])) == 6
    assert len(select_models(None)) == len(PAPER_MODELS)
    with pytest.raises(ValueError, match="no model matches 'ResNet-50'; names: QT-ViT-1"):
        select_models(["ResNet-50"])


def test_cli_rejects_unknown_models_in_one_line(capsys):
    assert main(["bench", "pareto", "--models", "ResNet-50", "--system-malloc"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no model matches 'ResNet-50'" in err


def test_quick_run_writes_csv_json_png_with_a_valid_front(tmp_path, capsys):
    code = main(["bench", "pareto", "--quick", "--system-malloc", "--no-progress",
                 "--output-dir", str(tmp_path), "--max-seconds", "600"])
    assert code == 0
    doc = json.loads((tmp_path / "pareto.json").read_text())
    assert doc["benchmark"] == "pareto" and doc["env"]["git"] is not None and doc["complete"]
    rows = doc["results"]
    assert [r["name"] for r in rows] == ["QT-ViT-1", "EfficientViT-B1 (qtvit)", "PoolFormer-S12"]
    assert all(r["status"] == "ok" and 0 < r["min_ms"] <= r["median_ms"] for r in rows)
    assert all(r["resolution"] == [64, 64] and not r["top1_at_timed_size"] for r in rows)
    front = [r for r in rows if r["on_front"]]
    assert front and doc["front"]["1"] == [r["name"] for r in sorted(front, key=lambda r: r["median_ms"])]
    points = [(r["median_ms"], r["top1"]) for r in rows]
    for r in rows:
        assert any(_dominates(q, (r["median_ms"], r["top1"])) for q in points) != r["on_front"]
    with open(tmp_path / "pareto.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [t["name"] for t in table] == [r["name"] for r in rows]
    assert all(float(t["median_ms"]) > 0 and t["resolution"] == "64x64" for t in table)
    assert (tmp_path / "pareto_b1.png").read_bytes()[:8] == PNG_MAGIC
    assert "median ms" in capsys.readouterr().out
