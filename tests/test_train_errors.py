"""Every user error of train/eval/demo is one line on stderr (no traceback) naming the bad path or value."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from test_train_support import TINY_RUN, run

from qtvit.cli import main
from qtvit.models.checkpoint import save_state_dict

# The tiny run on folder data (the folder tests below point data.path somewhere).
FOLDER_RUN = [o for o in TINY_RUN if not o.startswith("data.dataset")] + [
    "data.dataset=folder", "train.epochs=1", "train.batch_size=2"]


def cli_error(capsys, *argv: str) -> str:
    """Run the CLI, expect exit code 2 and exactly one line on stderr; return it."""
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "\n" not in err and "Traceback" not in err, err
    return err


def _folder(root, classes=("a", "b"), n=2, size=32):
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(np.full((size, size, 3), 60 * i, dtype=np.uint8)).save(root / c / f"{i}.png")


def test_missing_and_empty_data_folders(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    err = cli_error(capsys, "train", "--output", str(tmp_path / "r1"), "--data", str(missing), *FOLDER_RUN)
    assert f"data folder not found: {missing}" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    err = cli_error(capsys, "train", "--output", str(tmp_path / "r2"), "--data", str(empty), *FOLDER_RUN)
    assert f"data folder is empty: {empty}" in err
    (tmp_path / "noimg" / "train" / "cat").mkdir(parents=True)
    err = cli_error(capsys, "train", "--output", str(tmp_path / "r3"), "--data", str(tmp_path / "noimg"),
                    *FOLDER_RUN)
    assert f"class folder has no images: {tmp_path / 'noimg' / 'train' / 'cat'}" in err
    _folder(tmp_path / "noval" / "train")
    err = cli_error(capsys, "train", "--output", str(tmp_path / "r4"), "--data", str(tmp_path / "noval"),
                    *FOLDER_RUN)
    assert f"validation folder not found: {tmp_path / 'noval' / 'val'}" in err


def test_class_mismatch_between_train_and_val(tmp_path, capsys):
    _folder(tmp_path / "d" / "train", ("cat", "dog", "eel"))
    _folder(tmp_path / "d" / "val", ("cat", "dog", "fox"))
    err = cli_error(capsys, "train", "--output", str(tmp_path / "r"), "--data", str(tmp_path / "d"),
                    *FOLDER_RUN)
    assert "class mismatch between" in err and str(tmp_path / "d" / "train") in err
    assert "only in train: eel" in err and "only in val: fox" in err


def test_corrupt_image_is_named_or_skipped_with_flag(tmp_path, capsys):
    _folder(tmp_path / "d" / "train", n=4)
    _folder(tmp_path / "d" / "val", n=2)
    bad = tmp_path / "d" / "train" / "b" / "2.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    err = cli_error(capsys, "train", "--output", str(tmp_path / "r"), "--data", str(tmp_path / "d"),
                    *FOLDER_RUN)
    assert f"cannot read image {bad}" in err
    code = main(["train", "--output", str(tmp_path / "r"), "--overwrite", "--skip-bad-images",
                 "--data", str(tmp_path / "d"), *FOLDER_RUN])
    assert code == 0, capsys.readouterr().err
    steps = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r.get("bad_images", 0) for r in steps if r["kind"] == "step") == 1  # seen once in one epoch


@pytest.mark.parametrize(("override", "expected"), [
    ("model.name=qtvit_nope", "unknown model 'qtvit_nope'; valid models: qtvit_b0"),
    ("model.kernel=quartic", "quartic"),
    ("optim.lrr=1", "unknown key optim.lrr; valid keys in optim: opt, lr, base_lr"),
    ("optimizer.lr=1", "unknown config section 'optimizer'; valid sections: model, data, aug, optim, train"),
    ("train.epochs=many", "train.epochs: expected int, got 'many'"),
    ("train.amp=fp8", "train.amp='fp8' is not valid; choose from none, bf16, fp16"),
    ("train.batch_size=3", "must be even when mixup/cutmix is on"),
    ("lr=1", "bad override 'lr=1': expected section.key=value"),
])
def test_bad_names_keys_and_values(tmp_path, capsys, override, expected):
    extra = ["aug.mixup_alpha=0.1"] if "batch_size" in override else []
    err = cli_error(capsys, "train", "--output", str(tmp_path / "r"), *TINY_RUN, *extra, override)
    assert expected in err
    if "kernel" in override:
        assert "valid" in err and "qt" in err  # lists the valid kernels


def test_bad_recipe_file(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim:\n  lr: 0.1\n  warmup: 3\n")
    err = cli_error(capsys, "train", "--config", str(recipe))
    assert f"{recipe}: unknown key optim.warmup; valid keys in optim:" in err and "warmup_epochs" in err
    err = cli_error(capsys, "train", "--config", "qtvit_99")
    assert "config not found: qtvit_99" in err and "qtvit_1" in err


def test_checkpoint_for_another_model(tmp_path, capsys):
    run(tmp_path / "r", "train.epochs=1")
    ckpt = tmp_path / "r" / "last.pt"
    err = cli_error(capsys, "eval", "--model", "qtvit_b1", "--checkpoint", str(ckpt), "--dataset", "demo")
    assert f"checkpoint {ckpt} is for model qtvit_b0, not qtvit_b1" in err
    import qtvit

    weights = tmp_path / "b0.safetensors"
    save_state_dict(qtvit.create_model("qtvit_b0", num_classes=10), weights)
    _folder(tmp_path / "val", classes=tuple("abcdefghij"), n=1)
    err = cli_error(capsys, "eval", "--model", "qtvit_b1", "--checkpoint", str(weights), "--data",
                    str(tmp_path / "val"), "--workers", "0")
    assert str(weights) in err and "qtvit_b0" in err and "qtvit_b1" in err


def test_run_folder_and_resume_errors(tmp_path, capsys):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "x").write_text("")
    err = cli_error(capsys, "train", "--output", str(tmp_path / "r"), *TINY_RUN)
    assert f"run folder {tmp_path / 'r'} already exists" in err
    err = cli_error(capsys, "train", "--output", str(tmp_path / "r"), "--resume")
    assert f"nothing to resume: {tmp_path / 'r' / 'last.pt'} does not exist" in err
    err = cli_error(capsys, "train", "--resume")
    assert "--resume needs --output" in err
