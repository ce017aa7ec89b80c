"""`qtvit reproduce kernels|reductions`: the Table 2/3 ablations, end to end at a tiny budget."""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch

from qtvit.bench import reproduce as rp
from qtvit.bench.approximation import KernelCase, parse_case
from qtvit.cli import main
from qtvit.errors import QtvitError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# The paper's ImageNet top-1 per Table 2/3 setting (restated in docs/DESIGN.md).
PAPER = {"softmax": 79.8, "relu": 79.4, "cosine": 79.1, "mean": 78.8, "sigmoid_softmax": 78.9,
         "angular": 79.1, "taylor1": 78.5, "qt": 79.6, "taylor2": 79.7, "taylor2_pool(pool=2)": 79.3,
         "taylor2_pool(pool=4)": 79.1, "taylor2_chunk(chunks=2)": 79.4, "taylor2_chunk(chunks=4)": 79.3,
         "taylor2_chunk(chunks=8)": 79.1, "taylor2_random": 61.8, "none": None}  # none: the control
KERNELS = "relu,qt"
SEEDS = (0, 1, 2)


def _write_idx(path: Path, array: np.ndarray) -> None:
    """An uncompressed IDX file of unsigned bytes (magic 0x0000 08 ndim, big-endian sizes)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def fashion_dir(tmp_path_factory) -> Path:
    """A tiny Fashion-MNIST (10 classes, 28×28) in IDX format: class k is a bright bar at row 2k."""
    root = tmp_path_factory.mktemp("fashion")
    rng = np.random.default_rng(0)
    for images, labels, n in (("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 80),
                              ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 40)):
        y = np.arange(n) % 10
        x = rng.integers(0, 60, size=(n, 28, 28))
        for i, k in enumerate(y):
            x[i, 2 * k + 4: 2 * k + 7, 4:24] = 250
        _write_idx(root / images, x)
        _write_idx(root / labels, y)
    return root


def _run(argv: list[str]) -> int:
    return main(["reproduce", *argv, "--no-progress"])


@pytest.fixture(scope="module")
def study(tmp_path_factory, fashion_dir) -> tuple[Path, dict]:
    """One quick `kernels` study: 2 kernels × 3 seeds × (demo, tiny Fashion-MNIST)."""
    out = tmp_path_factory.mktemp("repro") / "kernels"
    threads = torch.get_num_threads()
    assert _run(["kernels", "--quick", "--kernels", KERNELS, "--seeds", "0,1,2", "--data",
                 f"demo,fashion-mnist:{fashion_dir}", "--output-dir", str(out)]) == 0
    assert torch.get_num_threads() == threads  # restored after the study
    return out, json.loads((out / "reproduce.json").read_text())


def test_paper_numbers_come_from_the_kernel_references():
    for study in rp.STUDIES.values():
        for text in study["variants"]:
            case = parse_case(text)
            assert rp.paper_top1(case) == PAPER[case.label], case.label
    assert rp.paper_top1(KernelCase("taylor2_chunk", {"chunks": 16})) is None  # not in the paper
    assert rp.paper_top1(KernelCase("taylor2_pool")) == 79.3  # the default pool=2


def test_quick_study_writes_json_markdown_and_png(study):
    out, doc = study
    assert doc["study"] == "kernels" and doc["table"] == "Table 2" and doc["complete"] is True
    assert doc["env"]["cpu_count"] and doc["wall_seconds"] > 0
    (run,) = doc["invocations"]
    assert run["load_start"]["loadavg"] is not None and run["load_end"] is not None and run["seconds"] > 0
    assert [e["slug"] for e in doc["datasets"]] == ["demo", "fashion-mnist"]
    for entry in doc["datasets"]:
        assert entry["setup"]["classes"] == (4 if entry["slug"] == "demo" else 10)
        assert [v["label"] for v in entry["variants"]] == KERNELS.split(",")
        for v in entry["variants"]:
            top1 = [r["top1"] for r in v["runs"]]
            assert sorted(r["seed"] for r in v["runs"]) == list(SEEDS) and v["n"] == 3
            assert v["top1_mean"] == pytest.approx(statistics.fmean(top1))
            assert v["top1_std"] == pytest.approx(statistics.stdev(top1))
            assert v["paper_top1"] == PAPER[v["label"]] and v["paper_reference"]
            assert v["macs"] > 0 and v["macs_linear"] > 0 and v["params_count"] > 0
            assert v["step"]["median_ms"] > 0
            for r in v["runs"]:
                assert r["steps"] == 2 and r["val_images"] == 32
                saved = json.loads((Path(r["run_dir"]) / "result.json").read_text())
                assert saved == r  # each (kernel, seed) is saved on its own, as it finishes
                assert not (Path(r["run_dir"]) / "last.pt").exists()  # checkpoints dropped by default
    table = (out / "table.md").read_text()
    assert table.startswith("### Table 2: attention kernels")
    assert "qtvit reproduce kernels --kernels relu,qt" in table and "--quick" in table
    for entry in doc["datasets"]:
        for v in entry["variants"]:
            row = (f"| {v['label']} | {v['top1_mean']:.2f} ± {v['top1_std']:.2f} | 3 | – | "
                   f"{v['paper_top1']:.1f} |")
            assert row in table
    assert (out / "kernels.png").read_bytes()[:8] == PNG_MAGIC


def test_seeds_differ_and_the_same_seed_reproduces(study, tmp_path):
    out, doc = study
    runs = {r["seed"]: r for r in doc["datasets"][0]["variants"][1]["runs"]}  # demo, qt
    assert len({runs[s]["loss"] for s in SEEDS}) == 3  # different seeds, different models
    again = tmp_path / "again"
    assert _run(["kernels", "--quick", "--kernels", "qt", "--seeds", "1", "--data", "demo",
                 "--no-timing", "--output-dir", str(again)]) == 0
    (rerun,) = json.loads((again / "reproduce.json").read_text())["datasets"][0]["variants"][0]["runs"]
    assert (rerun["top1"], rerun["loss"]) == (runs[1]["top1"], runs[1]["loss"])


def test_resume_trains_only_what_is_missing(study, fashion_dir, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(study[0], out)
    (out / "demo" / "relu" / "seed2" / "result.json").unlink()  # as if interrupted before it finished
    args = ["kernels", "--quick", "--kernels", KERNELS, "--seeds", "0,1,2", "--data",
            f"demo,fashion-mnist:{fashion_dir}", "--output-dir", str(out)]
    capsys.readouterr()
    assert _run(args) == 2  # an existing study is never reused silently
    assert "--resume" in capsys.readouterr().err
    assert _run([*args, "--resume"]) == 0
    printed = capsys.readouterr().out
    assert printed.count(": training") == 1 and printed.count("done before") == 11
    doc = json.loads((out / "reproduce.json").read_text())
    assert len(doc["invocations"]) == 2 and doc["wall_seconds"] > study[1]["wall_seconds"]
    relu = {r["seed"]: r for r in doc["datasets"][0]["variants"][0]["runs"]}
    before = {r["seed"]: r for r in study[1]["datasets"][0]["variants"][0]["runs"]}
    assert relu[2]["loss"] == before[2]["loss"] and relu[2]["top1"] == before[2]["top1"]
    assert _run([*args, "--resume"]) == 0  # nothing left to do: re-renders, records no new invocation
    again = json.loads((out / "reproduce.json").read_text())
    assert again["invocations"] == doc["invocations"] and again["wall_seconds"] == doc["wall_seconds"]
    assert again["datasets"] == doc["datasets"]
    assert _run([*args, "--resume", "--epochs", "2"]) == 2
    assert "epochs: was None, now 2" in capsys.readouterr().err
    assert _run([*args, "--overwrite", "--kernels", "qt", "--seeds", "0", "--data", "demo",
                 "--no-timing"]) == 0
    assert not (out / "fashion-mnist").exists() and not (out / "demo" / "relu").exists()


def test_an_interrupted_run_continues_from_its_checkpoint(tmp_path, capsys):
    common = ["kernels", "--quick", "--kernels", "qt", "--seeds", "0", "--data", "demo", "--no-timing",
              "train.epochs=2"]
    straight = tmp_path / "straight"
    assert _run([*common, "--output-dir", str(straight)]) == 0
    paused = tmp_path / "paused"
    # train.epochs_per_run stops the trainer after one epoch, as a job time limit would
    assert _run([*common, "train.epochs_per_run=1", "--output-dir", str(paused)]) == 0
    assert "paused" in capsys.readouterr().out
    run_dir = paused / "demo" / "qt" / "seed0"
    assert (run_dir / "last.pt").is_file() and not (run_dir / "result.json").exists()
    assert _run([*common, "train.epochs_per_run=1", "--output-dir", str(paused), "--resume"]) == 0
    (resumed,) = json.loads((paused / "reproduce.json").read_text())["datasets"][0]["variants"][0]["runs"]
    (whole,) = json.loads((straight / "reproduce.json").read_text())["datasets"][0]["variants"][0]["runs"]
    assert resumed["resumed"] and not whole["resumed"] and resumed["steps"] == whole["steps"] == 4
    assert (resumed["top1"], resumed["loss"]) == (whole["top1"], whole["loss"])


@pytest.mark.parametrize("argv, message", [
    (["--kernels", "relu,nonsense"], "unknown attention kernel 'nonsense'; valid kernels: softmax, relu"),
    (["--kernels", "taylor2_pool:poool=2"], "unknown parameter(s) poool; valid: pool, scaling"),
    (["--kernels", "relu,relu"], "a kernel is listed twice"),
    (["--kernels", ""], "--kernels: empty list"),
    (["--seeds", "0,x"], "--seeds: 'x' is not an integer"),
    (["--data", "no/such/folder"], "neither demo, fashion-mnist[:DIR] nor an existing folder"),
    (["--model", "qtvit_b9"], "unknown model 'qtvit_b9'; valid models: "),
    (["train.epochz=3"], "unknown key train.epochz"),
])
def test_bad_settings_fail_with_one_line_before_any_output(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert _run(["kernels", "--quick", "--data", "demo", "--output-dir", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_a_kernel_the_model_cannot_take_is_named(tmp_path):
    rc = rp.ReproConfig(variants=(KernelCase("taylor2_chunk", {"chunks": 5}),),
                        datasets=(rp.Dataset("demo"),), quick=True, output_dir=str(tmp_path / "o"))
    with pytest.raises(QtvitError, match=r"kernel taylor2_chunk\(chunks=5\) does not work in model qtvit_b0"):
        rp.Study(rc)
    assert not (tmp_path / "o").exists()


def test_output_folder_is_never_reused_silently(tmp_path):
    rc = rp.ReproConfig(output_dir=str(tmp_path / "x"))
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    with pytest.raises(QtvitError, match="not a qtvit reproduce folder"):
        rp.prepare_output(rc, resume=False, overwrite=True)
    assert (tmp_path / "x" / "notes.txt").exists()
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        rp.prepare_output(replace_dir(rc, tmp_path / "y"), resume=True, overwrite=False)
    with pytest.raises(QtvitError, match="contradict"):
        rp.prepare_output(rc, resume=True, overwrite=True)


def replace_dir(rc: rp.ReproConfig, path: Path) -> rp.ReproConfig:
    from dataclasses import replace

    return replace(rc, output_dir=str(path))


def test_kernel_parameters_reach_the_attention_of_either_model_family():
    for model in ("qtvit_b0", "qtvit_vit_micro"):
        base = rp.base_config(rp.ReproConfig(model=model, img_size=32, quick=True), rp.Dataset("demo"))
        cfg = rp.variant_config(base, KernelCase("taylor2_pool", {"pool": 4}), 3, Path("unused"))
        assert cfg.train.seed == 3 and cfg.model.kernel == "taylor2_pool"
        from qtvit.train.evaluate import build_model

        with torch.device("meta"):
            net = build_model(cfg.model, 10)
        pools = {m.kernel_params.as_kwargs().get("pool") for m in net.modules()
                 if hasattr(m, "kernel_params")}
        assert pools == {4}, model


def test_the_same_command_scales_up_to_a_folder_with_the_papers_recipe(tmp_path):
    rc = rp.ReproConfig(model="qtvit_1", epochs=300, datasets=(rp.Dataset("folder", str(tmp_path)),))
    base = rp.base_config(rc, rc.datasets[0])
    assert base.model.name == "qtvit_1" and base.data.dataset == "folder" and base.data.path == str(tmp_path)
    assert base.train.epochs == 300 and base.optim.warmup_epochs == 20 and base.optim.base_lr == 2.5e-4
    assert base.aug.multi_res and base.aug.train_sizes == [128, 160, 192, 224] and base.aug.mixup_alpha == 0.1
    cfg = rp.variant_config(base, KernelCase("taylor2_chunk", {"chunks": 4}), 1, tmp_path / "run")
    assert cfg.model.kwargs["kernel_params"] == {"chunks": 4} and cfg.model.kernel == "taylor2_chunk"
    assert rp.resolve_threads(rc, torch.device("cpu")) is None  # torch's default off the CPU recipe
    assert rp.resolve_threads(rp.ReproConfig(), torch.device("cpu")) == 1
    # a recipe of its own for the built-in data is still one of the small CPU studies
    assert rp.resolve_threads(rp.ReproConfig(config="configs/ablation/probes/stride4_64px.yaml"),
                              torch.device("cpu")) == 1
    assert rp.resolve_threads(rp.ReproConfig(threads=2), torch.device("cpu")) == 2
    assert rp.base_config(rp.ReproConfig(datasets=rc.datasets), rc.datasets[0]).model.name == "qtvit_b1"


def test_quick_study_on_an_image_folder_uses_the_papers_recipe(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 4)):
        for name, colour in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
            (tmp_path / "d" / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(rng.normal(colour, 20, (40, 40, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(tmp_path / "d" / split / name / f"{i}.png")
    out = tmp_path / "out"
    assert _run(["reductions", "--quick", "--kernels", "taylor2_chunk:chunks=4", "--seeds", "0", "--data",
                 str(tmp_path / "d"), "--model", "qtvit_1", "--no-timing", "--output-dir", str(out)]) == 0
    doc = json.loads((out / "reproduce.json").read_text())
    (entry,) = doc["datasets"]
    assert entry["slug"] == "d" and entry["setup"]["classes"] == 2 and entry["setup"]["model"] == "qtvit_1"
    assert entry["config"]["aug"]["randaug"] and entry["config"]["aug"]["mixup_alpha"] == 0.1  # qtvit_1.yaml
    (v,) = entry["variants"]
    assert v["label"] == "taylor2_chunk(chunks=4)" and v["paper_top1"] == 79.3 and v["runs"][0]["steps"] == 2
    assert "--data " + str(tmp_path / "d") in doc["command"]


def test_macs_count_softmax_attention_and_the_linear_path():
    rc = rp.ReproConfig(model="qtvit_vit_micro", img_size=64, quick=True)
    base = rp.base_config(rc, rp.Dataset("demo"))
    facts = {k: rp.model_facts(rp.variant_config(base, KernelCase(k), 0, Path("u")), 16)
             for k in ("softmax", "relu", "taylor2")}
    # 65 tokens of d=32: softmax's N² products cost more than relu's d² ones (the fused CPU kernel
    # would be missed off the meta device)
    assert facts["softmax"]["macs"] > facts["relu"]["macs"]
    assert facts["softmax"]["macs_linear"] is None
    # taylor2's 561 features: auto picks dense weights here, the forced O(N) path costs more
    assert facts["taylor2"]["macs_linear"] > facts["taylor2"]["macs"]


def test_summary_statistics():
    assert rp.summarize([]) == {"n": 0, "top1_mean": None, "top1_std": None, "top1_min": None,
                                "top1_max": None}
    one = rp.summarize([{"top1": 50.0}])
    assert one["n"] == 1 and one["top1_mean"] == 50.0 and one["top1_std"] is None
    three = rp.summarize([{"top1": 1.0}, {"top1": 2.0}, {"top1": 6.0}])
    assert three["top1_mean"] == 3.0 and three["top1_std"] == pytest.approx(statistics.stdev([1, 2, 6]))


def _study_model(kernel: str) -> torch.nn.Module:
    from qtvit.train.evaluate import build_model

    base = rp.base_config(rp.ReproConfig(), rp.Dataset("demo"))
    cfg = rp.variant_config(base, KernelCase(kernel), 0, Path("u"))
    torch.manual_seed(0)
    return build_model(cfg.model, 4)


def test_none_control_zeros_the_attention_and_keeps_everything_else(monkeypatch):
    """`none` = the same network whose kernel output is replaced by zeros (patched independently)."""
    from qtvit.layers.attention import KernelParams

    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    control = _study_model("none").train()
    reference = _study_model("qt").train()
    reference.load_state_dict(control.state_dict(), strict=False)  # qt's extra `const` keeps its init
    out = control(x)
    out.square().sum().backward()
    with monkeypatch.context() as m:
        m.setattr(KernelParams, "attend", lambda self, q, k, v, impl: torch.zeros_like(v))
        torch.testing.assert_close(out, reference(x), rtol=1e-5, atol=1e-6)
    named = dict(control.named_parameters())
    apes = [n for n in named if n.endswith(".ape")]
    shortcut_bns = [n for n in named if ".v_norm." in n]
    assert len(apes) == 2 and shortcut_bns  # stage 3 and 4 keep their APE and GELU(BN(v)) shortcut
    assert all(named[n].grad is None or not named[n].grad.any() for n in apes)  # only attention reads APE
    assert all(named[n].grad.abs().sum() > 0 for n in shortcut_bns)
    reference(x).square().sum().backward()  # a real kernel does use the APE
    assert any(p.grad.abs().sum() > 0 for n, p in reference.named_parameters() if n.endswith(".ape"))


def test_study_recipe_gives_attention_8x8_tokens_by_a_finer_stride():
    cfg = rp.base_config(rp.ReproConfig(), rp.Dataset("demo"))
    assert cfg.model.kwargs["img_size"] == 64 and cfg.aug.train_sizes == [64]
    assert cfg.data.demo_image_size == 64
    assert rp.model_facts(cfg, 4)["tokens"] == "8×8, 8×8"
    model = _study_model("qt")
    assert [f["reduction"] for f in model.feature_info] == [4, 8, 8, 8]
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 4)
    from qtvit.models import create_model

    with torch.device("meta"):
        default = create_model("qtvit_b0", num_classes=4)
    assert [f["reduction"] for f in default.feature_info] == [4, 8, 16, 32]
    with pytest.raises(ValueError, match="strides needs 5 entries"):
        create_model("qtvit_b0", num_classes=4, strides=(2, 2, 3, 1, 1))


def test_control_gap_is_each_kernels_mean_minus_the_controls():
    entry = {"variants": [{"kernel": "qt", "top1_mean": 80.0}, {"kernel": "relu", "top1_mean": None},
                          {"kernel": "none", "top1_mean": 50.5}]}
    rp.control_gaps(entry)
    assert [v["gap"] for v in entry["variants"]] == [29.5, None, None]
    assert rp.STUDIES["kernels"]["variants"][-1] == rp.STUDIES["reductions"]["variants"][-1] == "none"


def test_a_seeds_later_runs_read_the_same_transformed_images_from_memory():
    """Deterministic (no_aug) transforms are kept after first use; a second run of the seed gets
    exactly what a fresh, un-memoised ClassificationTask computes, for training and evaluation."""
    from qtvit.models import create_model
    from qtvit.train.classification import ClassificationTask
    from qtvit.train.distributed import DistInfo

    cfg = rp.base_config(rp.ReproConfig(quick=True), rp.Dataset("demo"))
    info = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    model = create_model(cfg.model.name, num_classes=4, **cfg.model.kwargs)
    rp.ReproTask._shared.clear()
    try:
        first = rp.ReproTask(cfg, info)
        first.load_data(0)
        first_train = first.train_dataset(model)
        keys = [(i, 32, 100 + i) for i in range(4)]
        items = [first_train[k] for k in keys]
        second = rp.ReproTask(cfg, info)
        second.load_data(0)
        train, val = second.train_dataset(model), second.val_dataset(model)
        assert isinstance(train, rp.MemoisedDataset) and len(train.store) == len(keys)
        fresh = ClassificationTask(cfg, info)
        fresh.load_data(0)
        fresh_train, fresh_val = fresh.train_dataset(model), fresh.val_dataset(model)
        for key, item in zip(keys, items, strict=True):
            assert train[key] is item  # from memory, whatever the per-sample seed
            torch.testing.assert_close(train[(key[0], 32, 7)][0], fresh_train[key][0], rtol=0, atol=0)
        for i in range(3):
            torch.testing.assert_close(val[i][0], fresh_val[i][0], rtol=0, atol=0)
            assert val[i][1] == fresh_val[i][1]
        third = rp.ReproTask(cfg, info)
        third.load_data(1)  # another seed: other images, an empty store
        assert len(third.train_dataset(model).store) == 0
    finally:
        rp.ReproTask._shared.clear()


def _receptive_field(model: torch.nn.Module, side: int = 512) -> int:
    """Width in pixels of the input region that one central token of the last stage depends on
    (gradient support), with the attention output zeroed (kernel "none"): the convolutions' reach."""
    x = torch.randn(1, 3, side, side, requires_grad=True)
    feats = model.forward_features(x)  # (1, C, side/s, side/s)
    h, w = feats.shape[-2:]
    feats[0, :, h // 2, w // 2].sum().backward()
    cols = torch.nonzero(x.grad.abs().sum((0, 1, 2)) > 0)
    return int(cols.max() - cols.min() + 1)


@pytest.mark.parametrize("recipe, size, grid, reach", [
    ("configs/ablation/demo.yaml", 64, 8, 147),
    ("configs/ablation/probes/stride4_64px.yaml", 64, 16, 83),
    ("configs/ablation/probes/one_block_128px.yaml", 128, 16, 99),
    ("configs/ablation/probes/stride4_128px.yaml", 128, 32, 59),
])
def test_ablation_layouts_token_grid_and_conv_reach(recipe, size, grid, reach):
    """The study recipes' attention grids and the convolutions' reach stated in their comments and in
    docs/RESULTS.md section 3 (why the "none" control can still relate the demo's two objects)."""
    from qtvit.train.config import load_config
    from qtvit.train.evaluate import build_model

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / recipe, ["model.kernel=none"])
    assert cfg.data.demo_image_size == size and cfg.model.kwargs["img_size"] == size
    assert cfg.aug.train_sizes == [size]
    model = build_model(cfg.model, num_classes=4).eval()
    feats = model.forward_features(torch.zeros(1, 3, size, size))
    assert feats.shape[-1] == grid  # the last stage holds the attention grid (stage 4 stride 1)
    assert _receptive_field(model) == reach
