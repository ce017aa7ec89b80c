"""COCO reader (boxes, labels, polygon and RLE masks, crowd regions, errors) and COCO evaluation
(ground truth fed back scores AP 1; a small hand-computed case)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("pycocotools")

from qtvit.errors import QtvitError  # noqa: E402
from qtvit.tasks.detection.coco import CocoDetection, encode_mask  # noqa: E402
from qtvit.tasks.detection.evaluation import coco_evaluate, to_coco_results  # noqa: E402


def write_image(path, w, h):
    from PIL import Image

    Image.fromarray(np.full((h, w, 3), 127, dtype=np.uint8)).save(path)


def coco_files(tmp_path, annotations=None, images=None):
    """A two-image dataset: image 1 (40×30) with a polygon object, an RLE object and a crowd region;
    image 2 (20×20) with one object. Categories have ids 3 and 7 (→ labels 1 and 2)."""
    (tmp_path / "img").mkdir(exist_ok=True)
    write_image(tmp_path / "img" / "a.png", 40, 30)
    write_image(tmp_path / "img" / "b.png", 20, 20)
    rle_mask = np.zeros((30, 40), dtype=np.uint8)
    rle_mask[20:28, 25:35] = 1
    data = {
        "images": images or [{"id": 1, "file_name": "a.png", "width": 40, "height": 30},
                             {"id": 2, "file_name": "b.png", "width": 20, "height": 20}],
        "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}],
        "annotations": annotations or [
            {"id": 10, "image_id": 1, "category_id": 3, "bbox": [2, 3, 10, 8], "iscrowd": 0, "area": 80,
             "segmentation": [[2, 3, 12, 3, 12, 11, 2, 11]]},
            {"id": 11, "image_id": 1, "category_id": 7, "bbox": [25, 20, 10, 8], "iscrowd": 0, "area": 80,
             "segmentation": encode_mask(rle_mask)},
            {"id": 12, "image_id": 1, "category_id": 7, "bbox": [0, 0, 5, 5], "iscrowd": 1, "area": 25,
             "segmentation": {"size": [30, 40], "counts": [0, 5, 25, 5, 25, 5, 25, 5, 25, 5, 1050]}},
            {"id": 13, "image_id": 2, "category_id": 3, "bbox": [5, 5, 10, 10], "iscrowd": 0, "area": 100,
             "segmentation": [[5, 5, 15, 5, 15, 15, 5, 15]]},
        ],
    }
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps(data))
    return tmp_path / "img", ann


def test_reader_boxes_labels_masks_and_crowd(tmp_path):
    ds = CocoDetection(*coco_files(tmp_path))
    assert len(ds) == 2 and ds.classes == ["cat", "dog"] and ds.label_to_cat_id == [3, 7]
    image, target = ds[0]
    assert image.shape == (3, 30, 40) and image.dtype == torch.float32
    torch.testing.assert_close(image[0, 0, 0], torch.tensor(127 / 255))
    assert target["image_id"].item() == 1
    # the crowd region (id 12) is not a target
    torch.testing.assert_close(target["boxes"], torch.tensor([[2.0, 3, 12, 11], [25, 20, 35, 28]]))
    assert target["labels"].tolist() == [1, 2]
    masks = target["masks"]
    assert masks.shape == (2, 30, 40) and masks.dtype == torch.uint8
    assert masks[1].sum() == 80 and masks[1, 20:28, 25:35].all()  # RLE decoded exactly
    ys, xs = torch.where(masks[0] > 0)  # polygon rasterised inside its box
    assert ys.min() >= 3 and ys.max() <= 11 and xs.min() >= 2 and xs.max() <= 12 and masks[0].sum() >= 60


def test_reader_errors_are_one_line(tmp_path):
    img_dir, ann = coco_files(tmp_path)
    with pytest.raises(FileNotFoundError, match="COCO annotation file not found: .*nope.json"):
        CocoDetection(img_dir, tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="COCO image folder not found"):
        CocoDetection(tmp_path / "missing", ann)
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [1, 2,')
    with pytest.raises(QtvitError, match=r"bad.json: not valid JSON \(.* at line 1"):
        CocoDetection(img_dir, bad)
    bad.write_text('{"images": []}')
    with pytest.raises(QtvitError, match="not a COCO instances file \\(missing annotations, categories\\)"):
        CocoDetection(img_dir, bad)
    outside = [{"id": 5, "image_id": 2, "category_id": 3, "bbox": [15, 5, 10, 10], "iscrowd": 0}]
    (tmp_path / "o").mkdir()
    with pytest.raises(QtvitError, match=r"annotation 5 \(image 2\) box .* lies outside the 20×20 image"):
        CocoDetection(*coco_files(tmp_path / "o", annotations=outside))
    unknown = [{"id": 6, "image_id": 9, "category_id": 3, "bbox": [1, 1, 2, 2]}]
    (tmp_path / "u").mkdir()
    with pytest.raises(QtvitError, match="annotation 6 refers to unknown image 9"):
        CocoDetection(*coco_files(tmp_path / "u", annotations=unknown))
    ds = CocoDetection(img_dir, ann)
    (img_dir / "b.png").unlink()
    with pytest.raises(FileNotFoundError, match="image file not found: .*b.png \\(image id 2"):
        ds[1]


def ground_truth_outputs(ds: CocoDetection) -> list[dict[str, torch.Tensor]]:
    outputs = []
    for i in range(len(ds)):
        _, t = ds[i]
        n = len(t["boxes"])
        outputs.append({"boxes": t["boxes"], "labels": t["labels"], "scores": torch.ones(n),
                        "masks": t["masks"][:, None].float()})
    return outputs


def test_ground_truth_fed_back_scores_ap_one(tmp_path):
    ds = CocoDetection(*coco_files(tmp_path))
    boxes, masks = to_coco_results(ground_truth_outputs(ds), ds.ids, ds.label_to_cat_id)
    assert {r["category_id"] for r in boxes} == {3, 7}  # labels mapped back to category ids
    metrics = coco_evaluate(ds.data, boxes, masks)
    for key in ("bbox_ap", "bbox_ap50", "bbox_ap75", "bbox_aps", "segm_ap", "segm_ap50", "segm_ap75"):
        assert metrics[key] == pytest.approx(1.0), key
    assert metrics["bbox_apl"] == -1.0  # no large objects: COCO's "undefined"
    # control: shifted boxes score less
    shifted = [{**o, "boxes": o["boxes"] + 3.0} for o in ground_truth_outputs(ds)]
    assert coco_evaluate(ds.data, to_coco_results(shifted, ds.ids, ds.label_to_cat_id)[0])["bbox_ap"] < 0.9


def test_hand_computed_ap_of_a_small_case():
    # One image, one class, two objects A = [0, 0, 30, 30] and B = [50, 50, 80, 80] (both "small").
    # Detections by score: d1 = A exactly (TP), d2 far from both (FP), d3 = [50, 50, 80, 70]
    # with IoU(d3, B) = 600 / 900 = 2/3: a TP at IoU thresholds 0.50 … 0.65 (4 of 10), else an FP.
    # TP at d3: precision/recall (1, 1/2), (1/2, 1/2), (2/3, 1); COCO's envelope gives precision 1 for
    # the 51 recall points 0.00 … 0.50 and 2/3 for the 50 points 0.51 … 1.00:
    #   AP(t) = (51 + 50 · 2/3) / 101.   FP at d3: recall stops at 1/2:  AP(t) = 51 / 101.
    gt = {"images": [{"id": 1, "width": 100, "height": 100}], "categories": [{"id": 1, "name": "x"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 30, 30], "area": 900,
                           "iscrowd": 0},
                          {"id": 2, "image_id": 1, "category_id": 1, "bbox": [50, 50, 30, 30], "area": 900,
                           "iscrowd": 0}]}
    out = {"boxes": torch.tensor([[0.0, 0, 30, 30], [85, 0, 95, 10], [50, 50, 80, 70]]),
           "scores": torch.tensor([0.9, 0.8, 0.7]), "labels": torch.tensor([1, 1, 1])}
    boxes, _ = to_coco_results([out], [1], [1])
    m = coco_evaluate(gt, boxes)
    tp_ap, fp_ap = (51 + 50 * 2 / 3) / 101, 51 / 101
    assert m["bbox_ap50"] == pytest.approx(tp_ap, abs=1e-6)
    assert m["bbox_ap75"] == pytest.approx(fp_ap, abs=1e-6)
    assert m["bbox_ap"] == pytest.approx((4 * tp_ap + 6 * fp_ap) / 10, abs=1e-6)
    assert m["bbox_aps"] == pytest.approx(m["bbox_ap"]) and m["bbox_apm"] == -1.0


def test_results_conversion_checks_labels_and_empty_results():
    with pytest.raises(ValueError, match="label 0 outside 1..2"):
        to_coco_results([{"boxes": torch.zeros(1, 4), "scores": torch.ones(1), "labels": torch.tensor([0])}],
                        [1], [5, 6])
    with pytest.raises(ValueError, match="2 outputs but 1 image ids"):
        to_coco_results([{}, {}], [1], [5])
    gt = {"images": [{"id": 1, "width": 10, "height": 10}], "categories": [{"id": 1}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5], "area": 25,
                           "iscrowd": 0}]}
    assert coco_evaluate(gt, [], [])["bbox_ap"] == 0.0
