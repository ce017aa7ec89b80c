"""Checkpoint reading, layout conversion (native ↔ official ↔ timm), strict checks, errors, saving,
and the ``qtvit convert`` command."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import qtvit
from qtvit import cli
from qtvit.errors import QtvitError
from qtvit.models import checkpoint as ckpt
from qtvit.models.checkpoint import (
    CheckpointError,
    CheckpointMismatchError,
    convert_checkpoint,
    convert_state_dict,
    detect_layout,
    infer_model_name,
    is_qt_key,
    load_checkpoint,
    native_to_official,
    native_to_timm,
    official_to_native,
    read_metadata,
    read_state_dict,
    save_state_dict,
)
from qtvit.train.evaluate import classifier_prefixes, load_weights

FIXTURE = Path(__file__).parent / "fixtures" / "official_qtvit_b1.json"
EVIT = dict(kernel="relu", ape=False, shortcut=False)  # plain EfficientViT


def randomized(name: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    """A model whose every tensor (APE, const, BN statistics included) is random and distinct."""
    model = qtvit.create_model(name, **kwargs).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, t in model.state_dict().items():
            if t.is_floating_point():
                r = torch.randn(t.shape, generator=g)
                t.copy_(0.5 + r.abs() if key.endswith("running_var") else r * 0.1 + (t.dim() <= 1))
    return model


def meta_state(name: str, **kwargs) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return qtvit.create_model(name, **kwargs).state_dict()


def shapes(sd) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def assert_same_state(a: torch.nn.Module | dict, b: torch.nn.Module | dict) -> None:
    sa = a.state_dict() if isinstance(a, torch.nn.Module) else a
    sb = b.state_dict() if isinstance(b, torch.nn.Module) else b
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.fixture(scope="module")
def b0() -> torch.nn.Module:
    return randomized("qtvit_b0", seed=1)


# ------------------------------------------------------------------------------------ layouts


def test_official_fixture_layout_converts_to_exactly_the_model_keys():
    keys = json.loads(FIXTURE.read_text())["keys"]
    official = {k: torch.empty(s, device="meta") for k, s, _ in keys}
    assert detect_layout(official) == "official_qtvit"
    native = convert_state_dict(official)
    assert shapes(native) == shapes(meta_state("qtvit_b1"))
    assert detect_layout(native) == "native"
    # and back: the official names, one for one
    assert list(native_to_official(native)) == list(official)


@pytest.mark.parametrize("name, timm_name", [("qtvit_b0", "efficientvit_b0"),
                                             ("qtvit_l1", "efficientvit_l1")])
def test_round_trips_native_official_timm(name, timm_name):
    timm = pytest.importorskip("timm")
    native = meta_state(name)
    official = native_to_official(native)
    assert all(k.startswith(("backbone.", "head.op_list.")) for k in official)
    stem = "backbone.stages.0.op_list.0." if name.startswith("qtvit_l") else "backbone.input_stem.op_list.0."
    assert f"{stem}conv.weight" in official
    assert any(k.endswith("context_module.main.positional_encoding") for k in official)
    assert any(k.endswith("context_module.main.ones_scale1") for k in official)
    assert detect_layout(official) == "official_qtvit"
    assert shapes(official_to_native(official)) == shapes(native)

    with torch.device("meta"):
        theirs = timm.create_model(timm_name).state_dict()
    timm_sd = native_to_timm(native, drop_qt=True)
    assert list(timm_sd) == list(theirs) and shapes(timm_sd) == shapes(theirs)
    assert detect_layout(theirs) == "timm"
    mit = native_to_official(theirs)  # MIT EfficientViT = official minus the QT keys
    assert detect_layout(mit) == "mit_efficientvit"
    assert shapes(convert_state_dict(mit)) == shapes(theirs)
    assert shapes(meta_state(name, **EVIT)) == shapes(theirs)
    with pytest.raises(CheckpointError, match="drop_qt"):
        native_to_timm(native)


def test_every_layout_loads_the_same_tensors(b0, tmp_path):
    official = native_to_official(b0.state_dict())
    for source in (b0.state_dict(), official, {"state_dict": official}, {"model": b0.state_dict()}):
        fresh = qtvit.create_model("qtvit_b0")
        report = load_checkpoint(fresh, source)
        assert report.ok and not report.resized
        assert_same_state(fresh, b0)
    plain = randomized("qtvit_b0", seed=2, **EVIT)
    mit = native_to_official(plain.state_dict())
    assert detect_layout(mit) == "mit_efficientvit"
    torch.save({"state_dict": mit, "epoch": 3}, tmp_path / "mit.pth")
    fresh = qtvit.create_model("qtvit_b0", checkpoint=tmp_path / "mit.pth", **EVIT)
    assert_same_state(fresh, plain)


def test_wrappers_prefixes_and_ema(b0, tmp_path):
    other = randomized("qtvit_b0", seed=5)
    sd = {f"module.{k}": v for k, v in b0.state_dict().items()}
    assert read_state_dict({"model": sd}).keys() == b0.state_dict().keys()
    both = {"state_dict": b0.state_dict(), "state_dict_ema": other.state_dict()}
    assert_same_state(read_state_dict(both), b0)
    assert_same_state(read_state_dict(both, use_ema=True), other)
    torch.save({"model_ema": {"module": other.state_dict()}}, tmp_path / "pytorch_model.bin")
    assert_same_state(read_state_dict(tmp_path / "pytorch_model.bin"), other)


def test_timm_parity_b1():
    """A random timm efficientvit_b1 state dict gives timm's logits in qtvit_b1(relu, no QT extras)."""
    timm = pytest.importorskip("timm")
    from timm.models.efficientvit_mit import LiteMLA

    theirs = timm.create_model("efficientvit_b1").eval()
    _randomize_norms(theirs)
    ours = qtvit.create_model("qtvit_b1", checkpoint=theirs.state_dict(), **EVIT).eval()
    x = torch.randn(2, 3, 160, 224)
    for m in theirs.modules():  # timm's normaliser eps is 1e-5, the authors' (and ours) 1e-15
        if isinstance(m, LiteMLA):
            m.eps = 1e-15
    with torch.no_grad():
        want, got = theirs(x), ours(x)
    torch.testing.assert_close(got, want, atol=1e-5 * want.abs().max().item(), rtol=0)


def test_timm_parity_l1():
    timm = pytest.importorskip("timm")
    from timm.models.efficientvit_mit import LiteMLA

    theirs = timm.create_model("efficientvit_l1").eval()
    _randomize_norms(theirs)
    for m in theirs.modules():
        if isinstance(m, LiteMLA):
            m.eps = 1e-15
    ours = qtvit.create_model("qtvit_l1", **EVIT).eval()
    assert load_checkpoint(ours, theirs.state_dict()).ok
    del theirs.head  # keep peak memory down: compare backbone features (the head is B1-tested)
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        want, got = theirs.forward_features(x), ours.forward_features(x)
    torch.testing.assert_close(got, want, atol=1e-5 * want.abs().max().item(), rtol=0)


def _randomize_norms(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
                m.weight.copy_(1 + 0.1 * torch.randn(n, generator=g))
                m.bias.copy_(0.1 * torch.randn(n, generator=g))


# ------------------------------------------------------------------------------------ strictness


def test_strict_mismatch_raises_one_error_and_loads_nothing(b0):
    plain = randomized("qtvit_b0", seed=3, **EVIT).state_dict()  # EfficientViT: no QT keys
    model = qtvit.create_model("qtvit_b0")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as info:
        load_checkpoint(model, plain)
    msg = str(info.value)
    qt_missing = [k for k in model.state_dict() if is_qt_key(k) and not k.endswith("num_batches_tracked")]
    assert f"{len(qt_missing)} missing, 0 unexpected, 0 shape conflicts" in msg
    assert "stages.2.blocks.1.context_module.main.ape" in msg
    assert "allow_missing_qt=True" in msg and "(layout timm)" in msg
    assert sorted(info.value.report.missing) == sorted(qt_missing)
    assert_same_state(model, before)  # no partial load

    unexpected = dict(b0.state_dict(), extra_tensor=torch.zeros(1))
    del unexpected["head.in_conv.conv.weight"]
    pattern = r"1 missing, 1 unexpected.*\n.*head\.in_conv\.conv\.weight(.|\n)*extra_tensor"
    with pytest.raises(CheckpointMismatchError, match=pattern):
        load_checkpoint(model, unexpected)


def test_allow_missing_qt_and_non_strict(b0):
    plain = randomized("qtvit_b0", seed=3, **EVIT)
    model = qtvit.create_model("qtvit_b0")
    report = load_checkpoint(model, plain.state_dict(), allow_missing_qt=True)
    assert report.qt_init and not report.missing and len(report.loaded) == len(plain.state_dict())
    sd = model.state_dict()
    for k, v in plain.state_dict().items():
        assert torch.equal(sd[k], v), k
    lite = model.stages[2].blocks[1].context_module.main
    assert torch.count_nonzero(lite.ape) == 0 and lite.kernel_params.const.item() == 1.0

    model = qtvit.create_model("qtvit_b0")
    with pytest.warns(UserWarning, match="partial checkpoint load"):
        report = load_checkpoint(model, plain.state_dict(), strict=False)
    assert not report.qt_init  # without allow_missing_qt they count as missing
    assert set(report.missing) == {k for k in model.state_dict() if is_qt_key(k)
                                   and not k.endswith("num_batches_tracked")}


def test_other_number_of_classes(b0):
    model = qtvit.create_model("qtvit_b0", num_classes=10)
    with pytest.raises(CheckpointMismatchError, match=r"shape conflicts(.|\n)*head\.classifier\.4\.weight "
                                                      r"\[1000, 1280\] vs \[10, 1280\](.|\n)*strict=False"):
        load_checkpoint(model, b0.state_dict())
    with pytest.warns(UserWarning):
        report = load_checkpoint(model, b0.state_dict(), strict=False)
    assert [k for k, _, _ in report.mismatched] == ["head.classifier.4.weight", "head.classifier.4.bias"]
    assert torch.equal(model.head.in_conv.conv.weight, b0.head.in_conv.conv.weight)


def _smallest_model_per_family() -> list[str]:
    """For every classification model class in the registry, its registered model with the fewest
    parameters (dense-prediction models name their task in ``pretrained_cfg`` and are tested there)."""
    best: dict[type, tuple[int, str]] = {}
    for name in qtvit.list_models():
        if qtvit.get_model_card(name).pretrained_cfg.get("task", "classification") != "classification":
            continue
        with torch.device("meta"):
            family = type(qtvit.create_model(name))
        params = qtvit.get_model_card(name).params
        if family not in best or params < best[family][0]:
            best[family] = (params, name)
    return [name for _, name in best.values()]


FAMILIES = _smallest_model_per_family()


def test_every_family_is_covered():
    assert {"qtvit_b0", "qtvit_vit_micro"} <= set(FAMILIES)


@pytest.mark.parametrize("name", FAMILIES)
def test_fine_tune_onto_a_new_class_count(name, tmp_path):
    """A 1000-class checkpoint initialises a 7-class model: backbone loaded, classifier left fresh.

    The classifier is found through the model's ``pretrained_cfg["classifier"]`` (an EfficientViT's
    ``head.classifier.4``, a ViT's ``head``), as the trainer's ``model.init_checkpoint`` does."""
    source = randomized(name, seed=5)
    path = tmp_path / "imagenet.pt"
    torch.save(source.state_dict(), path)
    torch.manual_seed(11)
    fresh = qtvit.create_model(name, num_classes=7).state_dict()
    torch.manual_seed(11)  # the same initial weights as ``fresh``
    model = qtvit.create_model(name, num_classes=7)
    load_weights(model, path, new_classifier_ok=True)

    prefixes = classifier_prefixes(model)
    assert prefixes == (model.pretrained_cfg["classifier"] + ".",)
    loaded, src = model.state_dict(), source.state_dict()
    head = [k for k in loaded if k.startswith(prefixes)]
    assert head and all(loaded[k].shape[0] == 7 for k in head)
    for key, value in loaded.items():
        if key in head:
            assert torch.equal(value, fresh[key]), f"{key}: the new classifier was overwritten"
        else:
            assert torch.equal(value, src[key]), f"{key}: not loaded from the checkpoint"
    assert not torch.equal(loaded[head[0]], src[head[0]][:7])
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 7)

    # without the flag the same checkpoint is refused with one line naming the model
    with pytest.raises(QtvitError, match=r"does not fit the model|holds .* weights"):
        load_weights(qtvit.create_model(name, num_classes=7), path)


def test_recipe_init_checkpoint_fine_tunes(tmp_path):
    """``model.init_checkpoint`` in a recipe goes through the same path: backbone loaded, head fresh."""
    from qtvit.train.classification import ClassificationTask
    from qtvit.train.config import load_config
    from qtvit.train.distributed import DistInfo

    source = randomized("qtvit_vit_micro", seed=6)
    path = tmp_path / "pretrained.safetensors"
    save_state_dict(source, path)
    cfg = load_config(None, ["model.name=qtvit_vit_micro", "model.drop_path_rate=0.0",
                             f"model.init_checkpoint={path}"])
    model = ClassificationTask(cfg, DistInfo()).build_model(7)
    assert model.head.weight.shape == (7, 96)
    assert not torch.equal(model.head.weight, source.head.weight[:7])
    assert torch.equal(model.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    assert torch.equal(model.pos_embed, source.pos_embed)


def test_new_classifier_ok_refuses_backbone_conflicts(b0):
    other = qtvit.create_model("qtvit_b0", num_classes=7, **EVIT)  # no QT keys: not a head-only conflict
    with pytest.raises(QtvitError):
        load_weights(other, b0.state_dict(), new_classifier_ok=True)


def test_wrong_model_names_both(b0):
    model = qtvit.create_model("qtvit_b1")
    with pytest.raises(CheckpointMismatchError, match="holds qtvit_b0 weights but the model is qtvit_b1"):
        load_checkpoint(model, native_to_official(b0.state_dict()))
    assert infer_model_name(b0.state_dict()) == "qtvit_b0"
    assert infer_model_name(native_to_timm(meta_state("qtvit_l2"), drop_qt=True)) == "qtvit_l2"
    assert infer_model_name({"foo": torch.zeros(2)}) is None


def test_ape_from_256px_checkpoint_is_resized(tmp_path):
    trained = randomized("qtvit_b0", seed=4, img_size=256)
    path = save_state_dict(trained, tmp_path / "b0_256.safetensors")
    model = qtvit.create_model("qtvit_b0").eval()
    report = load_checkpoint(model, path)
    keys = [k for k in model.state_dict() if k.endswith(".ape")]
    assert sorted(k for k, _, _ in report.resized) == sorted(keys)
    for key in keys:
        old, new = trained.state_dict()[key], model.state_dict()[key]
        assert old.shape[-2:] != new.shape[-2:]
        want = F.interpolate(old, size=new.shape[-2:], mode="bicubic", align_corners=False)
        torch.testing.assert_close(new, want)
    assert torch.isfinite(model(torch.randn(1, 3, 224, 224))).all()


# ------------------------------------------------------------------------------------ file errors


def test_missing_corrupt_and_non_checkpoint_files(b0, tmp_path):
    def error(path, **kw) -> str:
        with pytest.raises(CheckpointError) as info:
            read_state_dict(path, **kw)
        msg = str(info.value)
        assert str(path) in msg and "\n" not in msg
        return msg

    assert "not found" in error(tmp_path / "nope.pt")
    (tmp_path / "garbage.pt").write_bytes(b"\x00not a checkpoint\xff" * 50)
    assert "cannot read checkpoint" in error(tmp_path / "garbage.pt")
    (tmp_path / "notes.txt").write_text("hello world\n")
    assert "not a PyTorch or safetensors file" in error(tmp_path / "notes.txt")
    (tmp_path / "empty.pth").write_bytes(b"")
    assert "empty" in error(tmp_path / "empty.pth")
    good = save_state_dict(b0, tmp_path / "good.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert "corrupt" in error(tmp_path / "cut.safetensors")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    assert "holds a list" in error(tmp_path / "list.pt")
    torch.save({"epoch": 3, "weights": {"a": 1}}, tmp_path / "meta.pt")
    assert "no state dict found" in error(tmp_path / "meta.pt") and "weights" in error(tmp_path / "meta.pt")
    assert "directory" in error(tmp_path)


def test_pickle_needing_file_is_refused_unless_trusted(b0, tmp_path):
    path = tmp_path / "train.pt"
    torch.save({"state_dict": b0.state_dict(), "args": argparse.Namespace(lr=0.1)}, path)
    pattern = r"refusing to unpickle .*train\.pt.*argparse\.Namespace.*trust_pickle=True"
    with pytest.raises(CheckpointError, match=pattern):
        qtvit.create_model("qtvit_b0", checkpoint=path)
    model = qtvit.create_model("qtvit_b0", checkpoint=path, trust_pickle=True)
    assert_same_state(model, b0)


# ------------------------------------------------------------------------------------ saving


def test_save_is_atomic_with_metadata(b0, tmp_path, monkeypatch):
    path = save_state_dict(b0, tmp_path / "sub" / "b0.safetensors")
    meta = read_metadata(path)
    assert meta["qtvit_model"] == "qtvit_b0" and meta["qtvit_layout"] == "native"
    assert meta["qtvit_layout_version"] == ckpt.LAYOUT_VERSION
    assert_same_state(read_state_dict(path), b0)
    with pytest.raises(CheckpointError, match=r"\.safetensors"):
        save_state_dict(b0, tmp_path / "b0.pt")

    import safetensors.torch

    def broken(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half-written")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_state_dict(b0.state_dict(), path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["b0.safetensors"]  # no temp left
    assert_same_state(read_state_dict(path), b0)  # the old file is intact


# ------------------------------------------------------------------------------------ convert


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="qtvit")
    parser.add_argument("--debug", action="store_true")
    from qtvit.models import convert_cli

    convert_cli.register(parser.add_subparsers(dest="command"))
    original = cli.build_parser
    cli.build_parser = lambda: parser  # main's error handling, with the convert subcommand
    try:
        return cli.main(list(argv))
    finally:
        cli.build_parser = original


def test_convert_cli_end_to_end(b0, tmp_path, capsys):
    src = tmp_path / "official.pt"
    torch.save({"state_dict": native_to_official(b0.state_dict())}, src)
    dst = tmp_path / "b0.safetensors"
    assert run_cli("convert", str(src), str(dst)) == 0
    out = capsys.readouterr().out
    assert "official_qtvit" in out and "qtvit_b0" in out
    meta = read_metadata(dst)
    assert meta["qtvit_model"] == "qtvit_b0" and meta["source_layout"] == "official_qtvit"
    assert json.loads(meta["qtvit_model_kwargs"]) == {"ape": True, "kernel": "qt", "num_classes": 1000,
                                                      "shortcut": True}
    assert_same_state(qtvit.create_model("qtvit_b0", checkpoint=dst), b0)

    assert run_cli("convert", str(src), str(tmp_path / "x.safetensors"), "--model", "qtvit_1") == 2
    err = capsys.readouterr().err
    assert "holds qtvit_b0 weights but the model is qtvit_b1" in err
    assert run_cli("convert", str(src), str(tmp_path / "x.pt")) == 2
    assert "must be a .safetensors file" in capsys.readouterr().err
    assert run_cli("convert", str(tmp_path / "missing.pt"), str(dst)) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_convert_infers_plain_efficientvit_and_refuses_unknown(tmp_path):
    timm_sd = randomized("qtvit_b0", seed=6, **EVIT, num_classes=10).state_dict()
    result = convert_checkpoint(timm_sd, tmp_path / "evit.safetensors")
    assert result.model == "qtvit_b0" and result.report.layout == "timm"
    assert result.model_kwargs == {"kernel": "relu", "ape": False, "shortcut": False, "num_classes": 10}
    model = qtvit.create_model("qtvit_b0", checkpoint=result.path, **result.model_kwargs)
    assert_same_state(model, timm_sd)
    with pytest.raises(CheckpointError, match="cannot tell which model .* pass --model NAME"):
        convert_checkpoint({"stem.in_conv.conv.weight": torch.zeros(5, 3, 3, 3)}, tmp_path / "x.safetensors")
