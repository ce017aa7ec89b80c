"""Segmentation readers (ADE20K, Cityscapes, folder), their one-line errors, and the joint transforms."""

import numpy as np
import pytest
import torch
from PIL import Image

from qtvit.errors import QtvitError
from qtvit.tasks.segmentation.data import (
    SegmentationDataset,
    ade20k_lut,
    cityscapes_lut,
    read_ade20k,
    read_cityscapes,
    read_dataset,
    read_folder,
)
from qtvit.tasks.segmentation.transforms import EvalTransform, TrainTransform, collate_pairs, rescale_size


def write_image(path, h=20, w=30):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


def write_mask(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


def test_ade20k_shifts_labels_and_ignores_other(tmp_path):
    write_image(tmp_path / "images/validation/a.jpg", 4, 5)
    raw = np.array([[0, 1, 150, 2, 0]] * 4)
    write_mask(tmp_path / "annotations/validation/a.png", raw)
    samples = read_ade20k(tmp_path, "val")
    _, mask = SegmentationDataset(samples, 150, ade20k_lut()).load(0)
    assert mask[0].tolist() == [255, 0, 149, 1, 255]


def test_cityscapes_maps_label_ids_to_train_ids(tmp_path):
    write_image(tmp_path / "leftImg8bit/val/bonn/x_leftImg8bit.png", 2, 4)
    write_mask(tmp_path / "gtFine/val/bonn/x_gtFine_labelIds.png", [[7, 26, 33, 0], [1, 8, 24, 255]])
    samples, classes, lut = read_dataset("cityscapes", tmp_path, "val")
    assert len(classes) == 19 and np.array_equal(lut, cityscapes_lut())
    _, mask = SegmentationDataset(samples, 19, lut).load(0)
    assert mask.tolist() == [[0, 13, 18, 255], [255, 1, 11, 255]]
    assert read_cityscapes(tmp_path, "val")[0].mask.endswith("x_gtFine_labelIds.png")


def test_folder_layout_with_classes_txt(tmp_path):
    write_image(tmp_path / "train/images/p.png", 3, 3)
    write_mask(tmp_path / "train/masks/p.png", [[0, 1, 2]] * 3)
    (tmp_path / "classes.txt").write_text("sky\nroad\ncar\n")
    samples, classes, lut = read_dataset("folder", tmp_path, "train")
    assert classes == ["sky", "road", "car"] and lut is None
    image, mask = SegmentationDataset(samples, 3).load(0)
    assert image.shape == (3, 3, 3) and image.dtype == torch.uint8 and mask[0].tolist() == [0, 1, 2]


# ------------------------------------------------------------------------------ errors (one line each)
def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="ADE20K images folder not found"):
        read_ade20k(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="dataset root folder not found"):
        read_folder(tmp_path / "nope")


def test_image_without_mask(tmp_path):
    write_image(tmp_path / "train/images/a.png")
    (tmp_path / "train/masks").mkdir(parents=True)
    with pytest.raises(QtvitError, match=r"image .*a\.png has no mask \(expected .*masks/a\.png\)"):
        read_folder(tmp_path, "train")


def test_mask_of_another_size(tmp_path):
    write_image(tmp_path / "train/images/a.png", 20, 30)
    write_mask(tmp_path / "train/masks/a.png", np.zeros((20, 31)))
    ds = SegmentationDataset(read_folder(tmp_path), 3)
    with pytest.raises(QtvitError, match="mask .*a.png is 20×31 but its image is 20×30"):
        ds.load(0)


def test_label_outside_class_range(tmp_path):
    write_image(tmp_path / "train/images/a.png", 2, 2)
    write_mask(tmp_path / "train/masks/a.png", [[0, 7], [255, 1]])
    ds = SegmentationDataset(read_folder(tmp_path), 3)
    with pytest.raises(QtvitError, match=r"label 7 outside the class range 0\.\.2"):
        ds.load(0)
    for err in (QtvitError,):
        with pytest.raises(err, match="num_classes"):
            read_dataset("folder", tmp_path, "train")  # no classes.txt and no num_classes


def test_unknown_dataset_and_split():
    with pytest.raises(ValueError, match="unknown segmentation dataset 'voc'"):
        read_dataset("voc", ".", "train")
    with pytest.raises(ValueError, match="unknown ADE20K split 'test'"):
        read_ade20k(".", "test")


# ------------------------------------------------------------------------------ transforms
def test_train_transform_is_joint_and_seeded():
    torch.manual_seed(0)
    # a mask equal to a function of the image: after any joint geometric transform they still agree
    image = torch.zeros(3, 90, 160, dtype=torch.uint8)
    image[:, :, 80:] = 255
    mask = (image[0] > 0).long()
    tf = TrainTransform(64, scale=(160, 90), ratio_range=(0.5, 2.0), photometric=False,
                        mean=(0, 0, 0), std=(1 / 255, 1 / 255, 1 / 255))
    for seed in range(6):
        x, y = tf(image, mask, seed)
        assert x.shape == (3, 64, 64) and y.shape == (64, 64) and y.dtype == torch.int64
        valid = y != 255
        agree = ((x[0][valid] > 127).long() == y[valid]).float().mean()
        assert agree > 0.97  # image and mask moved together (only the interpolated edge column may differ)
        assert ((x[0][~valid]) == 0).all()  # padding: image 0, mask ignored
    a, b = tf(image, mask, 3), tf(image, mask, 3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_eval_transform_keeps_the_label_size_and_collate_handles_sizes():
    image, mask = torch.zeros(3, 300, 400, dtype=torch.uint8), torch.zeros(300, 400, dtype=torch.long)
    x, y = EvalTransform((2048, 512))(image, mask)
    assert x.shape == (3, 512, 683) and y.shape == (300, 400)
    assert rescale_size((1024, 2048), (2048, 512)) == (512, 1024)
    xs, ys = collate_pairs([(x, y), (torch.zeros(3, 8, 8), torch.zeros(8, 8))])
    assert isinstance(xs, list) and len(ys) == 2
