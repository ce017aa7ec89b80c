"""Cascade mechanics without training: per-stage IoU thresholds, each stage decoding the previous
stage's boxes, stage loss weights and the test-time score averaging, on a fixed hand-made case."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("torchvision")

from torchvision.ops import box_iou  # noqa: E402

from qtvit.models.detection.cascade import CascadeRoIHeads  # noqa: E402

C = 4  # feature channels
IMAGE = (128, 128)
GT = torch.tensor([[40.0, 40.0, 80.0, 80.0]])  # one 40×40 object of class 1
# 40×40 proposals shifted right by d px: IoU (40 − d) / (40 + d) = 0.818, 0.667, 0.538, 0.429, 0.212
SHIFTS = torch.tensor([4.0, 8.0, 12.0, 16.0, 26.0])
PROPOSALS = GT.repeat(len(SHIFTS), 1) + SHIFTS[:, None] * torch.tensor([1.0, 0.0, 1.0, 0.0])
# Every stage's regressor moves boxes left by a fixed number of pixels: 8, then 4, then 2; boxes
# shifted right by 15 px or more end up closer to the object after every stage (never past it).
MOVES = (8.0, 4.0, 2.0)
FAR = GT.repeat(4, 1) + torch.tensor([15.0, 18.0, 21.0, 24.0])[:, None] * torch.tensor([1.0, 0.0, 1.0, 0.0])


def features() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {str(i): torch.randn(1, C, IMAGE[0] >> (i + 2), IMAGE[1] >> (i + 2), generator=g)
            for i in range(4)}


def heads(**kwargs) -> CascadeRoIHeads:
    """Tiny cascade whose regressors ignore the features and output the delta of a fixed left move.

    A 40-px-wide box moved by m px has dx = −m / 40, stored multiplied by the stage's weight 1/std_x.
    """
    torch.manual_seed(0)
    h = CascadeRoIHeads(C, num_classes=2, representation=8, mask_layers=(4,), batch_size_per_image=64,
                        **kwargs)
    with torch.no_grad():
        for s, stage in enumerate(h.box_stages):
            stage.bbox_pred.weight.zero_()
            stage.bbox_pred.bias.copy_(torch.tensor([-MOVES[s] / 40 * h.box_coders[s].weights[0], 0, 0, 0]))
    return h


def targets() -> list[dict[str, torch.Tensor]]:
    masks = torch.zeros(1, *IMAGE, dtype=torch.uint8)
    masks[0, 40:80, 40:80] = 1
    return [dict(boxes=GT.clone(), labels=torch.tensor([1]), masks=masks)]


def test_each_stage_samples_with_its_own_iou_threshold():
    h = heads()
    ious = box_iou(PROPOSALS, GT)[:, 0]
    for s, threshold in enumerate((0.5, 0.6, 0.7)):
        rois, labels, _, reg_targets, is_gt = h.sample(s, [PROPOSALS], targets())
        positive = {tuple(r.tolist()) for r, lab in zip(rois[0], labels[0], strict=True) if lab > 0}
        expected = {tuple(p.tolist()) for p, iou in zip(PROPOSALS, ious, strict=True) if iou >= threshold}
        assert positive == expected | {tuple(GT[0].tolist())}  # the ground truth is added as an RoI
        assert is_gt[0].sum() == 1 and labels[0][is_gt[0]].item() == 1
        # regression targets in the stage's own normalisation: dx·(1/std_x) for a right shift d
        pos = labels[0] > 0
        shift = rois[0][pos, 0] - GT[0, 0]
        torch.testing.assert_close(reg_targets[0][pos, 0], -shift / 40 * h.box_coders[s].weights[0])


def record_rois(h: CascadeRoIHeads) -> list[list[torch.Tensor]]:
    """Wrap the box RoI pooling so every call's boxes are kept (one entry per stage)."""
    seen: list[list[torch.Tensor]] = []
    pool = h.box_roi_pool.forward

    def recording(feats, boxes, image_shapes):
        seen.append([b.clone() for b in boxes])
        return pool(feats, boxes, image_shapes)

    h.box_roi_pool.forward = recording
    return seen


def test_training_stages_decode_the_previous_stage_boxes_and_overlap_more():
    h = heads().train()
    seen = record_rois(h)
    h(features(), [FAR.clone()], [IMAGE], targets())
    assert len(seen) == 3
    gt_row = (seen[0][0] == GT).all(dim=1)
    # stage s+1 sees stage s's RoIs (ground truth removed) moved left by stage s's regression
    for s in range(2):
        prev = seen[s][0][~(seen[s][0] == GT).all(dim=1)]
        moved = prev - torch.tensor([MOVES[s], 0, MOVES[s], 0])
        current = seen[s + 1][0][~(seen[s + 1][0] == GT).all(dim=1)]
        torch.testing.assert_close(current.sort(dim=0).values, moved.sort(dim=0).values)
    mean_iou = [box_iou(r[0][~(r[0] == GT).all(dim=1)], GT).mean().item() for r in seen]
    assert mean_iou[0] < mean_iou[1] < mean_iou[2], mean_iou
    assert gt_row.sum() == 1  # the ground truth enters every stage's sampling once


def test_stage_losses_are_weighted_one_half_quarter():
    feats = features()
    weighted = heads().train()(feats, [FAR.clone()], [IMAGE], targets())[1]
    plain = heads(stage_loss_weights=(1.0, 1.0, 1.0)).train()(feats, [FAR.clone()], [IMAGE], targets())[1]
    for s, w in enumerate((1.0, 0.5, 0.25)):
        for kind in ("classifier", "box_reg", "mask"):
            key = f"s{s}_loss_{kind}"
            torch.testing.assert_close(weighted[key], w * plain[key])
            assert plain[key] > 0


def test_test_time_refines_through_every_stage_and_averages_the_logits():
    h = heads(score_thresh=0.0).eval()
    with torch.no_grad():
        for s, stage in enumerate(h.box_stages):  # stage s's logits: constant (0, s, 2s)
            stage.cls_score.weight.zero_()
            stage.cls_score.bias.copy_(torch.tensor([0.0, s, 2 * s]))
        history, logits = h.refine(features(), [FAR.clone()], [IMAGE])
        results = h(features(), [FAR.clone()], [IMAGE])[0]
    assert len(history) == 4  # proposals, then each stage's output
    ious = [box_iou(boxes[0], GT)[:, 0] for boxes in history]
    for before, after in zip(ious[:-1], ious[1:], strict=True):
        assert (after > before).all()
    total = 0.0
    for s, move in enumerate(MOVES):
        total += move
        torch.testing.assert_close(history[s + 1][0], FAR - torch.tensor([total, 0, total, 0]))
    torch.testing.assert_close(logits, torch.tensor([0.0, 1.0, 2.0]).expand(len(FAR), 3))
    # scores = softmax of the mean logits; boxes = the last stage's; per-class NMS keeps the best box
    expected = torch.softmax(torch.tensor([0.0, 1.0, 2.0]), 0)
    best = results[0]
    for label in (1, 2):
        rows = best["labels"] == label
        torch.testing.assert_close(best["scores"][rows].max(), expected[label])
    final = history[-1][0]
    assert all((final == b).all(dim=1).any() for b in best["boxes"])
    assert best["masks"].shape[1:] == (1, 28, 28)
