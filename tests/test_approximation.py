"""The kernel approximation study: distances to softmax, their definitions, and the trained-model path."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from qtvit.bench.approximation import (
    QUICK,
    KernelCase,
    attention_distances,
    capture_qkv,
    default_cases,
    parse_case,
    random_study,
    run_approximation_study,
)
from qtvit.cli import main
from qtvit.kernels import list_kernels

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _qkv(scale: float, shape=(2, 2, 48, 16), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    sigma = math.sqrt(scale)
    q, k = (torch.randn(shape, generator=g, dtype=torch.float64) * sigma for _ in range(2))
    return q, k, torch.randn(shape, generator=g, dtype=torch.float64)


def _by(rows, case, scale):
    return next(r for r in rows if r["case"] == case and r["scale"] == scale)


def test_softmax_against_itself_is_zero():
    q, k, v = _qkv(2.0)
    d = attention_distances(q, k, v, KernelCase("softmax"))
    assert d["kind"] == "distribution"
    assert abs(d["kl"]) < 1e-12 and d["tv"] < 1e-12 and d["out_rel_err"] < 1e-12


def test_taylor2_is_close_at_small_scale_and_drifts_with_it():
    cases = [KernelCase("taylor2"), KernelCase("relu"), KernelCase("qt")]
    scales = (0.05, 0.25, 1.0, 4.0)
    rows = random_study(cases, scales, batch=1, heads=2, tokens=64, head_dim=16)
    # random q, k with variance √scale have score std ≈ scale
    assert _by(rows, "taylor2", 1.0)["score_std"] == pytest.approx(1.0, rel=0.2)
    t = [_by(rows, "taylor2", s) for s in scales]
    assert t[0]["tv"] < 1e-3 and t[0]["kl"] < 1e-5 and t[0]["out_rel_err"] < 1e-2
    assert [r["tv"] for r in t] == sorted(r["tv"] for r in t)  # farther from softmax as scores grow
    for s in (0.05, 0.25):  # the Taylor kernel beats ReLU linear attention where its expansion holds
        tay, relu = _by(rows, "taylor2", s), _by(rows, "relu", s)
        assert tay["tv"] < relu["tv"] and tay["kl"] < relu["kl"] and tay["out_rel_err"] < relu["out_rel_err"]
    assert all(r["negative_fraction"] == 0 and r["kind"] == "distribution" for r in t)


def test_unnormalised_and_signed_kernels_report_no_kl_and_say_why():
    q, k, v = _qkv(4.0)
    cos = attention_distances(q, k, v, KernelCase("cosine"))
    assert cos["kind"] == "unnormalised" and cos["kl"] is None and "unnormalised" in cos["kl_note"]
    assert cos["tv"] > 0 and cos["out_rel_err"] > 0
    rnd = attention_distances(q, k, v, KernelCase("taylor2_random"))  # 1 + s + (partial s²)/2 < 0 for s ≈ −4
    assert rnd["negative_fraction"] > 0 and rnd["kind"] == "signed" and rnd["kl"] is None
    assert "negative" in rnd["kl_note"] and math.isfinite(rnd["tv"])


def test_rows_without_relu_weight_are_counted_as_degenerate():
    q, k, v = _qkv(1.0)
    # no positive query entry: every row's ReLU weights sum to 0
    d = attention_distances(-q.abs(), k, v, KernelCase("relu"))
    assert d["degenerate_fraction"] == 1.0
    assert d["kl"] is not None and math.isfinite(d["kl"]) and d["tv"] < 1  # compared as uniform rows


def test_default_cases_cover_every_kernel_and_table3_settings():
    labels = [c.label for c in default_cases()]
    assert {c.kernel for c in default_cases()} == set(list_kernels()) - {"none"}  # the control has no rows
    for label in ("taylor2_pool(pool=2)", "taylor2_pool(pool=4)", "taylor2_chunk(chunks=8)", "qt", "softmax",
                  "taylor2_pool(pool=4, scaling=preserve)", "taylor2_chunk(chunks=2, scaling=preserve)",
                  "taylor2_random(scaling=preserve)", "taylor2_random"):
        assert label in labels
    assert len(labels) == len(set(labels))


def test_parse_case_and_bad_names():
    assert parse_case("taylor2_pool:pool=4") == KernelCase("taylor2_pool", {"pool": 4})
    assert parse_case("qt").params == {}
    with pytest.raises(ValueError, match="unknown attention kernel 'sofmax'; valid kernels: softmax"):
        parse_case("sofmax")
    with pytest.raises(TypeError, match="unknown parameter"):
        parse_case("taylor2_pool:chunks=2")
    with pytest.raises(ValueError, match="name=value"):
        parse_case("taylor2_pool:4")


def test_cli_bad_kernel_is_one_line(capsys):
    assert main(["bench", "approximation", "--kernels", "qt,quartic", "--no-trained"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown attention kernel 'quartic'" in err


TINY = replace(QUICK, cases=tuple(KernelCase(n) for n in ("softmax", "taylor2", "relu", "cosine")),
               scales=(0.1,), tokens=32, head_dim=16, train_steps=4, train_batch=8, train_images=16,
               eval_images=4, image_size=16, progress=False)


def test_trained_model_study_hooks_every_block_and_round_trips_a_checkpoint(tmp_path):
    ckpt = tmp_path / "softmax_vit.pt"
    doc = run_approximation_study(TINY, save_checkpoint=ckpt)
    trained = doc["trained"]
    assert trained["source"] == "trained here" and trained["steps"] == 4 and ckpt.exists()
    assert len(trained["blocks"]) == 4  # qtvit_vit_micro has depth 4
    summary = {r["case"]: r for r in trained["summary"]}
    assert summary["softmax"]["tv"] < 1e-12 and summary["softmax"]["out_rel_err"] < 1e-10
    assert summary["taylor2"]["tv"] < summary["relu"]["tv"]
    assert summary["cosine"]["kl"] is None
    json.dumps(doc, allow_nan=False)  # the JSON file is valid
    again = run_approximation_study(replace(TINY, checkpoint=str(ckpt)))
    assert again["trained"]["source"] == "checkpoint"
    for a, b in zip(trained["summary"], again["trained"]["summary"], strict=True):
        assert a["tv"] == pytest.approx(b["tv"], rel=1e-6, abs=1e-15)


def test_capture_qkv_matches_the_attention_layout():
    from qtvit import create_model

    model = create_model("qtvit_vit_micro", kernel="softmax", num_classes=3, img_size=16, patch_size=4).eval()
    x = torch.randn(2, 3, 16, 16)
    outputs = []
    handle = model.blocks[1].attn.register_forward_hook(lambda _m, _i, out: outputs.append(out))
    captured = capture_qkv(model, x)
    handle.remove()
    assert len(captured) == len(model.blocks)
    q, k, v = captured[1]
    assert q.shape == (2, 3, 17, 32)  # (B, heads, 16 patches + class token, head dim)
    # block 1's attention output recomputed from the captured q/k/v equals the module's
    with torch.no_grad():
        attn = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        got = model.blocks[1].attn.proj(attn.transpose(1, 2).reshape(2, 17, -1))
    torch.testing.assert_close(got, outputs[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="no blocks"):
        capture_qkv(torch.nn.Linear(2, 2), x)


def test_cli_quick_writes_json_and_png(tmp_path, monkeypatch):
    import qtvit.bench.approximation as approx

    monkeypatch.setattr(approx, "QUICK", replace(TINY, progress=True))  # keep the test fast
    out, png = tmp_path / "a.json", tmp_path / "a.png"
    argv = ["bench", "approximation", "--quick", "--no-progress", "--output", str(out), "--plot", str(png)]
    assert main(argv) == 0
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "approximation" and doc["random"] and doc["trained"]["summary"]
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_pair_task_labels_say_whether_the_two_squares_match():
    from qtvit.bench.approximation import pair_images

    x, y = pair_images(40, 16, 4, seed=3)
    assert x.shape == (40, 3, 16, 16) and y.tolist() == [i % 2 for i in range(40)]
    torch.testing.assert_close(pair_images(40, 16, 4, seed=3)[0], x)  # deterministic
    cells = x.unfold(2, 4, 4).unfold(3, 4, 4).reshape(40, 3, 16, 16)  # (n, C, cell, pixel)
    flat = cells.std(dim=-1).sum(dim=1)  # painted cells are constant: zero spread
    for i in range(40):
        painted = (flat[i] == 0).nonzero().flatten()
        assert len(painted) == 2
        a, b = (cells[i, :, c, 0] for c in painted)
        assert bool(torch.equal(a, b)) == bool(y[i])


def _quadratic_gain_vs_taylor2(case: KernelCase, d: int = 32, rho: float = 0.9, n: int = 20_000) -> float:
    """How much the similarity part of the quadratic term, E[Q | ρ] − E[Q | 0], grows compared with
    taylor2's, for q, k ~ N(0, I) with per-channel correlation ρ (float64, common random numbers).

    For taylor2 (Q = (q·k)²/(2d)) this part is (d² + d)ρ²/(2d): it is what makes the weight peak where
    q and k agree. "preserve" keeps it; the mean forms shrink it by about pool⁴, chunks and d.
    """
    from qtvit.kernels import get_kernel

    g = torch.Generator().manual_seed(0)
    q, z = (torch.randn(n, 1, 1, d, generator=g, dtype=torch.float64) for _ in range(2))

    def quadratic(name: str, params: dict, k: torch.Tensor) -> torch.Tensor:
        kern = get_kernel(name)
        w = kern.pairwise(q, k, **kern.resolve_params(params))  # (n, 1, 1, 1): each q with its own k
        return w - 1.0 - (q * k).sum(-1, keepdim=True) / math.sqrt(d)  # the quadratic term Q/2

    def similarity_part(name: str, params: dict) -> float:
        correlated = rho * q + math.sqrt(1 - rho * rho) * z
        return float(quadratic(name, params, correlated).mean() - quadratic(name, params, z).mean())

    return similarity_part(case.kernel, case.params) / similarity_part("taylor2", {})


REDUCTIONS = [KernelCase("taylor2_pool", {"pool": 2}), KernelCase("taylor2_pool", {"pool": 4}),
              KernelCase("taylor2_chunk", {"chunks": 4}), KernelCase("taylor2_chunk", {"chunks": 8}),
              KernelCase("taylor2_random")]


@pytest.mark.parametrize("case", REDUCTIONS, ids=lambda c: c.label)
def test_preserving_scaling_keeps_taylor2s_quadratic_term_and_mean_shrinks_it(case):
    preserved = _quadratic_gain_vs_taylor2(replace(case, params={**case.params, "scaling": "preserve"}))
    shrunk = _quadratic_gain_vs_taylor2(replace(case, params={**case.params, "scaling": "mean"}))
    assert preserved == pytest.approx(1.0, rel=0.05), preserved
    factor = {"taylor2_pool": case.params.get("pool", 2) ** 4, "taylor2_chunk": case.params.get("chunks"),
              "taylor2_random": 32}[case.kernel]
    assert shrunk * factor == pytest.approx(1.0, rel=0.25), (shrunk, factor)  # (d + p)/(d + 1) ≤ 1.22


def test_unknown_scaling_is_named():
    with pytest.raises(ValueError, match="unknown scaling 'sum'; valid: mean, preserve"):
        attention_distances(*_qkv(1.0), KernelCase("taylor2_pool", {"scaling": "sum"}))


def test_distance_to_taylor2s_rows_is_reported():
    q, k, v = _qkv(1.0)
    assert attention_distances(q, k, v, KernelCase("taylor2"))["tv_taylor2"] < 1e-12
    pooled = attention_distances(q, k, v, KernelCase("taylor2_pool", {"pool": 4}))
    assert 0 < pooled["tv_taylor2"] < 1 and pooled["negative_fraction"] > 0
