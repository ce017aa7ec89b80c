"""Segmentation metrics equal mmseg's (one dataset confusion matrix, nanmean) and torchmetrics'."""

import math

import pytest
import torch

from qtvit.tasks.segmentation.metrics import ConfusionMatrix, confusion_matrix, metrics_from_confusion


def random_labels(seed: int, num_classes: int = 12, shape=(3, 29, 41)):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, num_classes - 4, shape, generator=g)  # the last 4 classes never in the labels
    pred = torch.randint(0, num_classes - 3, shape, generator=g)  # …and the last 3 never predicted
    target[torch.rand(shape, generator=g) < 0.2] = 255  # ignored pixels
    pred[target == 0] = 0  # class 0 well predicted: IoUs differ from class to class
    return pred, target


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_miou_and_macc_equal_torchmetrics_macro_with_absent_classes(seed):
    tm = pytest.importorskip("torchmetrics.classification")
    C = 12
    pred, target = random_labels(seed, C)
    cm = ConfusionMatrix(C)
    for p, t in zip(pred, target, strict=True):  # accumulated image by image: still one matrix
        cm.update(p, t)
    result = cm.compute()
    assert math.isnan(result["iou"][-1]) and math.isnan(result["iou"][-2])  # absent from both: excluded
    assert result["iou"][-4] == 0.0  # predicted, never in the labels: counts as 0
    jaccard = tm.MulticlassJaccardIndex(C, average="macro", ignore_index=255)(pred, target)
    recall = tm.MulticlassAccuracy(C, average="none", ignore_index=255)(pred, target)
    pixel = tm.MulticlassAccuracy(C, average="micro", ignore_index=255)(pred, target)
    assert result["miou"] == pytest.approx(float(jaccard), abs=1e-6)
    # mAcc (mmseg): mean recall over the classes in the labels; torchmetrics' macro accuracy would
    # also average the predicted-only class (recall 0/0), so take its per-class values
    in_labels = torch.bincount(target[target != 255], minlength=C) > 0
    assert result["macc"] == pytest.approx(float(recall[in_labels].mean()), abs=1e-6)
    assert result["aacc"] == pytest.approx(float(pixel), abs=1e-6)


def test_hand_computed_example():
    target = torch.tensor([0, 0, 1, 1, 255, 2])
    pred = torch.tensor([0, 1, 1, 1, 0, 0])
    m = metrics_from_confusion(confusion_matrix(pred, target, 4))
    # class 0: TP 1, FP 1, FN 1 → 1/3; class 1: TP 2, FP 1 → 2/3; class 2: FN 1 → 0; class 3 absent
    assert m["iou"][:3] == pytest.approx([1 / 3, 2 / 3, 0.0]) and math.isnan(m["iou"][3])
    assert m["miou"] == pytest.approx(1 / 3)
    assert m["macc"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert m["aacc"] == pytest.approx(3 / 5)


def test_matrices_sum_like_ranks_under_ddp():
    pred, target = random_labels(5)
    whole = confusion_matrix(pred, target, 12)
    parts = confusion_matrix(pred[:1], target[:1], 12) + confusion_matrix(pred[1:], target[1:], 12)
    assert torch.equal(whole, parts)  # all_reduce(SUM) of per-rank matrices = the dataset's matrix
    cm = ConfusionMatrix(12)
    cm.update(pred, target)
    cm.all_reduce()  # no process group: a no-op
    assert torch.equal(cm.matrix, whole)


def test_per_image_averaging_is_a_different_metric():
    # mmseg's dataset-level mIoU is not the mean of per-image mIoUs: guard against "simplifying" to it
    pred, target = random_labels(3)
    pairs = zip(pred, target, strict=True)
    per_image = sum(metrics_from_confusion(confusion_matrix(p, t, 12))["miou"] for p, t in pairs) / 3
    assert metrics_from_confusion(confusion_matrix(pred, target, 12))["miou"] != pytest.approx(per_image)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="out of range"):
        confusion_matrix(torch.tensor([0, 5]), torch.tensor([0, 1]), 4)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(torch.zeros(2, 3), torch.zeros(3, 2), 4)
