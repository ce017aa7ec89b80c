"""Data: the demo set's rule, determinism and balance; the IDX reader; folder checks; transforms."""

from __future__ import annotations

import gzip
import struct
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from qtvit.data import (
    AugmentedDataset,
    BadImageError,
    FashionMNIST,
    RelationalShapes,
    TrainAugment,
    build_datasets,
    read_idx,
    seeded,
    train_transforms,
)
from qtvit.data.demo import NUM_CLASSES, RADII, SEP, TOL, label_of
from qtvit.errors import QtvitError


def test_demo_is_deterministic_and_split_specific():
    a, b = RelationalShapes("train", 64, 32, seed=0), RelationalShapes("train", 64, 32, seed=0)
    assert all(np.array_equal(a.render(i), b.render(i)) for i in (0, 17, 63))
    assert not np.array_equal(a.render(5), RelationalShapes("val", 64, 32).render(5))
    assert not np.array_equal(a.render(5), RelationalShapes("train", 64, 32, seed=1).render(5))
    image, label = a[17]
    assert isinstance(image, Image.Image) and image.size == (32, 32) and label == 17 % NUM_CLASSES


def test_demo_classes_are_balanced_with_chance_at_most_ten_percent():
    ds = RelationalShapes("train", 160, 32)
    counts = Counter(ds.targets)
    assert len(ds.classes) == NUM_CLASSES == 4
    assert set(counts.values()) == {160 // NUM_CLASSES}  # exactly balanced


def test_demo_label_is_the_alignment_of_two_distant_objects():
    ds = RelationalShapes("val", 400, 64)
    for i in range(400):
        s = ds.describe(i)
        (x1, y1), (x2, y2) = s["centres"]
        dx, dy = abs(x1 - x2), abs(y1 - y2)
        assert (dx * dx + dy * dy) ** 0.5 >= SEP - 1e-9  # far apart
        aligned = (dy <= TOL, dx <= TOL, abs(dx - dy) <= TOL)
        assert label_of(s["centres"]) == s["label"] and sum(aligned) <= 1
        assert s["label"] == (aligned.index(True) if any(aligned) else 3)
        assert set(s["radii"]) <= set(RADII)


def test_demo_class_is_not_revealed_by_one_object():
    """A Bayes classifier on one object's centre (8×8 bins) or its appearance stays near chance (25%);
    on both centres the rule is exact."""
    train, held = RelationalShapes("train", 6000, 64), RelationalShapes("val", 3000, 64)
    scenes = [[d.describe(i) for i in range(len(d))] for d in (train, held)]

    def accuracy(feature) -> float:
        counts = Counter((feature(s, i % 2), s["label"]) for i, s in enumerate(scenes[0]))
        best = {}
        for (f, label), n in counts.items():
            if n > counts.get((f, best.get(f)), -1):
                best[f] = label
        hits = [best.get(feature(s, i % 2)) == s["label"] for i, s in enumerate(scenes[1])]
        return sum(hits) / len(hits)

    position = accuracy(lambda s, j: tuple(min(int(c * 8), 7) for c in s["centres"][j]))
    appearance = accuracy(lambda s, j: (s["shapes"][j], s["hues"][j], s["radii"][j], s["brightness"][j]))
    assert position < 0.42 and appearance < 0.32, (position, appearance)
    assert all(label_of(s["centres"]) == s["label"] for s in scenes[1])


def test_demo_renders_the_same_scene_at_any_resolution():
    small, large = RelationalShapes("train", 16, 32), RelationalShapes("train", 16, 128)
    for i in range(16):
        assert small.describe(i)["label"] == large.describe(i)["label"]
        down = np.asarray(Image.fromarray(large.render(i)).resize((32, 32), Image.BILINEAR), dtype=np.float32)
        assert np.abs(down - small.render(i).astype(np.float32)).mean() < 20  # same picture, other noise


def _write_idx(path, array: np.ndarray, code: int = 0x08, compress: bool = False) -> None:
    header = bytes([0, 0, code, array.ndim]) + b"".join(struct.pack(">I", n) for n in array.shape)
    data = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


def test_idx_reader_roundtrips_types_and_compression(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a-idx3-ubyte", images)
    _write_idx(tmp_path / "a-idx3-ubyte.gz", images, compress=True)
    ints = np.array([-5, 70000, 3], dtype=np.int32)
    _write_idx(tmp_path / "b-idx1-int", ints, code=0x0C)
    assert np.array_equal(read_idx(tmp_path / "a-idx3-ubyte"), images)
    assert np.array_equal(read_idx(tmp_path / "a-idx3-ubyte.gz"), images)
    assert np.array_equal(read_idx(tmp_path / "b-idx1-int"), ints)
    (tmp_path / "bad").write_bytes(b"\x12\x34\x56\x78junk")
    with pytest.raises(QtvitError, match=r"not an IDX file: .*bad \(bad magic number 12345678\)"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes((tmp_path / "a-idx3-ubyte").read_bytes()[:-3])
    with pytest.raises(QtvitError, match=r"corrupt IDX file .*short.*\(2, 3, 4\)"):
        read_idx(tmp_path / "short")


def test_fashion_mnist_reads_a_tiny_generated_copy(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("t10k", 5)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", images, compress=True)
        labels = np.arange(n, dtype=np.uint8) % 10
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", labels, compress=True)
    train, val, classes = build_datasets("fashion_mnist", tmp_path)
    assert (len(train), len(val), len(classes)) == (12, 5, 10)
    image, label = train[11]
    assert image.mode == "RGB" and image.size == (28, 28) and label == 1
    with pytest.raises(FileNotFoundError, match="Fashion-MNIST folder not found"):
        FashionMNIST(tmp_path / "missing")


def _image_folder(root, classes=("cat", "dog"), n=3, size=12):
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            pixels = np.full((size, size, 3), (25 * i) % 256, dtype=np.uint8)
            Image.fromarray(pixels).save(root / c / f"{i}.png")


def test_folder_without_train_subfolder_holds_out_a_fixed_validation_split(tmp_path):
    _image_folder(tmp_path, n=10)
    train, val, classes = build_datasets("folder", tmp_path, val_fraction=0.2, seed=3)
    assert classes == ["cat", "dog"] and (len(train), len(val)) == (16, 4)
    again = build_datasets("folder", tmp_path, val_fraction=0.2, seed=3)[1]
    assert val.indices == again.indices and not set(val.indices) & set(train.indices)


def test_bad_image_is_named_or_skipped_and_counted(tmp_path):
    _image_folder(tmp_path / "train")
    bad = tmp_path / "train" / "cat" / "1.png"
    bad.write_bytes(b"not a png at all")
    ds, _, _ = build_datasets("folder", tmp_path / "train", val_fraction=0.2)
    base = ds.dataset
    tf = {12: lambda img: torch.zeros(1)}
    strict = AugmentedDataset(base, tf)
    index = [p for p, _ in base.samples].index(str(bad))
    with pytest.raises(BadImageError, match=f"cannot read image {bad}"):
        strict[(index, 12, 0)]
    lenient = AugmentedDataset(base, tf, skip_bad_images=True)
    _, target, n_bad = lenient[(index, 12, 0)]
    assert n_bad == 1 and target == base.targets[index + 1]
    # The message survives a DataLoader worker (which re-raises with the traceback as text).
    loader = torch.utils.data.DataLoader(strict, batch_size=1, sampler=[(index, 12, 0)], num_workers=1)
    with pytest.raises(BadImageError) as info:
        next(iter(loader))
    assert str(info.value) .startswith(f"cannot read image {bad}") and "\n" not in str(info.value)


def test_seeded_transforms_are_reproducible_and_leave_global_rng_alone():
    cfg = dict(mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bicubic")
    tfs = train_transforms(cfg, [24, 32], TrainAugment(randaug="rand-m9-n2-mstd0.5", re_prob=0.5))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    torch.manual_seed(123)
    state = torch.get_rng_state()
    with seeded(7):
        a = tfs[32](image)
    with seeded(7):
        b = tfs[32](image)
    with seeded(8):
        c = tfs[32](image)
        assert tfs[24](image).shape == (3, 24, 24)
    assert torch.equal(a, b) and not torch.equal(a, c) and a.shape == (3, 32, 32)
    assert torch.equal(torch.get_rng_state(), state)


def test_randaugment_survives_zero_bit_posterize():
    """timm draws 0..4 posterize bits; Pillow >= 11 rejects 0. The recipe's m=3 with noise hits it."""
    cfg = dict(mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bicubic")
    tf = train_transforms(cfg, [16], TrainAugment(randaug="rand-m1-n3-mstd0"))[16]
    (ra,) = [t for t in tf.transforms if type(t).__name__ == "RandAugment"]
    posterize = [op for op in ra.ops if op.name == "Posterize"][0]
    assert posterize.level_fn(posterize.magnitude, posterize.hparams)[0] == 0  # 0 bits at m=1
    black = posterize.aug_fn(Image.new("RGB", (4, 4), (200, 100, 50)), 0)
    assert np.asarray(black).max() == 0
