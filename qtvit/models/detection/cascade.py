"""Cascade Mask R-CNN and Mask R-CNN on torchvision's detection building blocks.

torchvision has Mask R-CNN but no cascade. :class:`CascadeRoIHeads` adds it in the configuration of
mmdet's ``cascade-mask-rcnn_r50_fpn`` (what the paper's COCO table used, by its parameter counts):

* three box stages; stage *s* matches its RoIs to the ground truth at IoU ``iou_thresholds[s]``
  (0.5 / 0.6 / 0.7: positive at or above, background below, no low-quality matches), samples 512
  RoIs per image (25% positive, ground-truth boxes added as proposals), pools 7×7 features and
  runs two shared 1024-wide FC layers, a classifier (classes + background) and a class-agnostic
  box regressor whose targets are normalised by the stage's standard deviations
  (0.1/0.1/0.2/0.2, 0.05/0.05/0.1/0.1, 0.033/0.033/0.067/0.067);
* stage *s*+1 starts from stage *s*'s regressed boxes (the sampled RoIs minus the ground-truth
  ones, decoded and clipped to the image, without gradient);
* losses: cross-entropy + smooth-L1 (β = 1, summed over positives / sampled RoIs) per stage,
  a mask head (4 convs + deconv → 28×28, one channel per class) per stage on its positives; all of
  a stage's losses are weighted 1 / 0.5 / 0.25;
* test: the proposals pass through the three stages, each refining the boxes for the next; the
  class scores are the softmax of the three stages' mean logits (mmdet averages the logits), the
  boxes are the last stage's; per-class NMS at IoU 0.5 after a 0.05 score threshold, at most 100
  detections; the masks average the three mask heads' probabilities for the detected class.

Labels follow torchvision: 0 is background, 1..C the classes (C = 80 for COCO). Differences to
mmdet that are deliberate: torchvision's RoIAlign pooling here uses ``aligned=False`` (as all of
torchvision's two-stage detectors) and pre-NMS top-k per FPN level in the RPN.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, BoxCoder, Matcher
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNN, MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import maskrcnn_loss
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign, batched_nms, box_iou, clip_boxes_to_image, remove_small_boxes

from ..efficientvit import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

Tensor = torch.Tensor

# mmdet cascade-mask-rcnn_r50_fpn
IOU_THRESHOLDS = (0.5, 0.6, 0.7)
STAGE_LOSS_WEIGHTS = (1.0, 0.5, 0.25)
TARGET_STDS = ((0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067))
ANCHOR_SIZES = (32, 64, 128, 256, 512)  # one size per FPN level (scale 8 × strides 4..64)
ASPECT_RATIOS = (0.5, 1.0, 2.0)  # 3 anchors per location


class DetectionTransform(GeneralizedRCNNTransform):
    """torchvision's transform (normalise, resize short side to ``min_size`` capped at ``max_size``,
    pad to a multiple of 32, and map outputs back to the input size), with two additions:

    * ``resize_in_training = False`` skips resizing in training, for data pipelines that already
      resized (the detection task draws the step's scale in its sampler);
    * one-line errors for inputs that are not (3, H, W) float images.
    """

    def __init__(self, *args, resize_in_training: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.resize_in_training = resize_in_training

    def resize(self, image: Tensor, target=None):
        if self.training and not self.resize_in_training:
            return image, target
        return super().resize(image, target)


def check_images(images) -> None:
    """A list of (3, H, W) float tensors or a (B, 3, H, W) float tensor, else one-line ValueError."""
    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise ValueError(f"expected a list of (3, H, W) images or a (B, 3, H, W) batch, got a tensor of "
                             f"shape {tuple(images.shape)}")
        images = list(images)
    if not isinstance(images, (list, tuple)) or not images:
        raise ValueError(f"expected a non-empty list of (3, H, W) image tensors, got {type(images).__name__}")
    for i, img in enumerate(images):
        if not isinstance(img, torch.Tensor) or img.dim() != 3 or img.shape[0] != 3:
            shape = tuple(img.shape) if isinstance(img, torch.Tensor) else type(img).__name__
            raise ValueError(f"image {i}: expected a (3, H, W) tensor, got {shape}")
        if not img.is_floating_point():
            raise ValueError(f"image {i}: expected float values in [0, 1], got dtype {img.dtype}")


class BoxStage(nn.Module):
    """One cascade stage's box head: RoI features (N, C, 7, 7) → logits (N, classes+1), deltas (N, 4).

    Two shared FC layers (torchvision's TwoMLPHead) then a classifier and a class-agnostic
    regressor, initialised as mmdet (normal, std 0.01 and 0.001, zero bias).
    """

    def __init__(self, in_channels: int, resolution: int, representation: int, num_classes: int) -> None:
        super().__init__()
        self.head = TwoMLPHead(in_channels * resolution * resolution, representation)
        self.cls_score = nn.Linear(representation, num_classes + 1)
        self.bbox_pred = nn.Linear(representation, 4)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.head(x)
        return self.cls_score(x), self.bbox_pred(x)


class MaskStage(nn.Sequential):
    """One stage's mask head: (N, C, 14, 14) → logits (N, classes, 28, 28) (4 convs, deconv, 1×1)."""

    def __init__(self, in_channels: int, layers: Sequence[int], num_classes: int) -> None:
        super().__init__(MaskRCNNHeads(in_channels, list(layers), dilation=1),
                         MaskRCNNPredictor(layers[-1], layers[-1], num_classes))


class CascadeRoIHeads(nn.Module):
    """The cascade's second stage (see the module docstring); torchvision's RoIHeads interface:
    ``forward(features, proposals, image_sizes, targets) → (detections, losses)``.

    Args:
        in_channels: FPN channels.
        num_classes: object classes without background (80 for COCO).
        representation: width of the two FC layers (1024).
        mask_layers: channels of the mask head's convolutions ((256,)*4); None: no masks.
        iou_thresholds, stage_loss_weights, target_stds: one entry per stage.
        batch_size_per_image, positive_fraction: RoI sampling per stage (512, 0.25).
        score_thresh, nms_thresh, detections_per_img: test-time post-processing (0.05, 0.5, 100).
        featmap_names: FPN levels the RoIs are pooled from (strides 4..32).
    """

    def __init__(self, in_channels: int = 256, num_classes: int = 80, *, representation: int = 1024,
                 mask_layers: Sequence[int] | None = (256, 256, 256, 256),
                 iou_thresholds: Sequence[float] = IOU_THRESHOLDS,
                 stage_loss_weights: Sequence[float] = STAGE_LOSS_WEIGHTS,
                 target_stds: Sequence[Sequence[float]] = TARGET_STDS,
                 batch_size_per_image: int = 512, positive_fraction: float = 0.25,
                 score_thresh: float = 0.05, nms_thresh: float = 0.5, detections_per_img: int = 100,
                 featmap_names: Sequence[str] = ("0", "1", "2", "3")) -> None:
        super().__init__()
        if not len(iou_thresholds) == len(stage_loss_weights) == len(target_stds) >= 1:
            raise ValueError(f"iou_thresholds, stage_loss_weights and target_stds need one entry per "
                             f"stage; got {len(iou_thresholds)}, {len(stage_loss_weights)}, "
                             f"{len(target_stds)}")
        self.num_classes = num_classes
        self.iou_thresholds = tuple(iou_thresholds)
        self.stage_loss_weights = tuple(stage_loss_weights)
        self.matchers = [Matcher(t, t, allow_low_quality_matches=False) for t in iou_thresholds]
        # BoxCoder weights are the reciprocal standard deviations: delta = weight · (encoded offset)
        self.box_coders = [BoxCoder(tuple(1.0 / s for s in stds)) for stds in target_stds]
        self.sampler = BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)
        self.box_roi_pool = MultiScaleRoIAlign(list(featmap_names), output_size=7, sampling_ratio=0)
        self.box_stages = nn.ModuleList(BoxStage(in_channels, 7, representation, num_classes)
                                        for _ in iou_thresholds)
        self.mask_roi_pool = None
        self.mask_stages = None
        if mask_layers is not None:
            self.mask_roi_pool = MultiScaleRoIAlign(list(featmap_names), output_size=14, sampling_ratio=0)
            self.mask_stages = nn.ModuleList(MaskStage(in_channels, mask_layers, num_classes)
                                             for _ in iou_thresholds)
        self.score_thresh, self.nms_thresh = score_thresh, nms_thresh
        self.detections_per_img = detections_per_img

    @property
    def num_stages(self) -> int:
        return len(self.box_stages)

    def has_mask(self) -> bool:
        return self.mask_stages is not None

    # ------------------------------------------------------------------------------ training
    def sample(self, stage: int, proposals: list[Tensor], targets: list[dict[str, Tensor]]):
        """Match ``proposals`` (+ ground truth) at the stage's IoU threshold and sample RoIs.

        Returns, per image: rois (n, 4), labels (n,) (0 = background), matched gt index (n,),
        regression targets (n, 4) in the stage's normalisation, and a mask of the RoIs that are
        ground-truth boxes (removed before the next stage).
        """
        matcher, coder = self.matchers[stage], self.box_coders[stage]
        rois, labels, matched, is_gt = [], [], [], []
        for props, target in zip(proposals, targets, strict=True):
            gt_boxes = target["boxes"].to(props.dtype)
            props = torch.cat([props, gt_boxes])
            gt_flag = torch.zeros(len(props), dtype=torch.bool, device=props.device)
            gt_flag[len(props) - len(gt_boxes):] = True
            if len(gt_boxes) == 0:  # an image without objects: every RoI is background
                idx = torch.zeros(len(props), dtype=torch.int64, device=props.device)
                lab = torch.zeros(len(props), dtype=torch.int64, device=props.device)
            else:
                m = matcher(box_iou(gt_boxes, props))  # (n,) gt index, -1 below, -2 between
                idx = m.clamp(min=0)
                lab = target["labels"][idx].to(torch.int64)
                lab[m == Matcher.BELOW_LOW_THRESHOLD] = 0
                lab[m == Matcher.BETWEEN_THRESHOLDS] = -1  # never happens with equal thresholds
            rois.append(props), labels.append(lab), matched.append(idx), is_gt.append(gt_flag)
        pos_masks, neg_masks = self.sampler(labels)
        reg_targets = []
        for i, (pos, neg) in enumerate(zip(pos_masks, neg_masks, strict=True)):
            keep = torch.where(pos | neg)[0]
            rois[i], labels[i] = rois[i][keep], labels[i][keep]
            matched[i], is_gt[i] = matched[i][keep], is_gt[i][keep]
            gt_boxes = targets[i]["boxes"].to(rois[i].dtype)
            if len(gt_boxes) == 0:
                gt_boxes = torch.zeros((1, 4), dtype=rois[i].dtype, device=rois[i].device)
            reg_targets.append(gt_boxes[matched[i]])
        reg_targets = list(coder.encode(reg_targets, rois)) if rois else []
        return rois, labels, matched, reg_targets, is_gt

    @staticmethod
    def box_loss(logits: Tensor, deltas: Tensor, labels: list[Tensor],
                 reg_targets: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Cross-entropy over sampled RoIs; smooth-L1 (β = 1) over positives, divided by all RoIs."""
        labels_all = torch.cat(labels)
        targets_all = torch.cat(reg_targets)
        loss_cls = F.cross_entropy(logits, labels_all)
        pos = labels_all > 0
        loss_box = F.smooth_l1_loss(deltas[pos], targets_all[pos], beta=1.0, reduction="sum")
        return loss_cls, loss_box / max(labels_all.numel(), 1)

    def decode(self, stage: int, deltas: Tensor, rois: list[Tensor], image_sizes) -> list[Tensor]:
        """Apply stage ``stage``'s class-agnostic deltas (N, 4) to ``rois``; boxes clipped to each image."""
        boxes = self.box_coders[stage].decode(deltas, rois).reshape(-1, 4)
        boxes = boxes.split([len(r) for r in rois])
        return [clip_boxes_to_image(b, size) for b, size in zip(boxes, image_sizes, strict=True)]

    def forward_train(self, features, proposals, image_sizes, targets):
        losses: dict[str, Tensor] = {}
        rois = [p.detach() for p in proposals]
        for s in range(self.num_stages):
            w = self.stage_loss_weights[s]
            rois, labels, matched, reg_targets, is_gt = self.sample(s, rois, targets)
            logits, deltas = self.box_stages[s](self.box_roi_pool(features, rois, image_sizes))
            loss_cls, loss_box = self.box_loss(logits, deltas, labels, reg_targets)
            losses[f"s{s}_loss_classifier"] = w * loss_cls
            losses[f"s{s}_loss_box_reg"] = w * loss_box
            if self.has_mask():
                pos = [torch.where(lab > 0)[0] for lab in labels]
                pos_rois = [r[p] for r, p in zip(rois, pos, strict=True)]
                mask_logits = self.mask_stages[s](self.mask_roi_pool(features, pos_rois, image_sizes))
                gt_masks = [t["masks"] for t in targets]
                gt_labels = [t["labels"] - 1 for t in targets]  # mask channels have no background
                pos_matched = [m[p] for m, p in zip(matched, pos, strict=True)]
                losses[f"s{s}_loss_mask"] = w * maskrcnn_loss(mask_logits, pos_rois, gt_masks, gt_labels,
                                                              pos_matched)
            if s + 1 < self.num_stages:  # next stage: this stage's boxes, ground-truth RoIs removed
                with torch.no_grad():
                    refined = self.decode(s, deltas.detach(), rois, image_sizes)
                rois = [r[~g] for r, g in zip(refined, is_gt, strict=True)]
        return losses

    # ----------------------------------------------------------------------------- inference
    @torch.no_grad()
    def refine(self, features, proposals, image_sizes) -> tuple[list[list[Tensor]], Tensor]:
        """Run the box stages at test time: the RoIs each stage saw plus the last stage's boxes, and
        the mean of the stages' logits. Returns (boxes per stage: [stage][image] (n_i, 4), where entry
        ``num_stages`` holds the final boxes; mean logits (N, classes+1))."""
        rois = list(proposals)
        history = [rois]
        logit_sum = 0
        for s in range(self.num_stages):
            logits, deltas = self.box_stages[s](self.box_roi_pool(features, rois, image_sizes))
            logit_sum = logit_sum + logits.float()
            rois = self.decode(s, deltas, rois, image_sizes)
            history.append(rois)
        return history, logit_sum / self.num_stages

    def forward_test(self, features, proposals, image_sizes) -> list[dict[str, Tensor]]:
        history, logits = self.refine(features, proposals, image_sizes)
        scores = F.softmax(logits, dim=-1).split([len(p) for p in proposals])
        results = []
        for boxes, sc in zip(history[-1], scores, strict=True):
            n, c = sc.shape[0], self.num_classes
            labels = torch.arange(1, c + 1, device=sc.device).expand(n, c).reshape(-1)
            boxes = boxes[:, None, :].expand(n, c, 4).reshape(-1, 4)
            sc = sc[:, 1:].reshape(-1)
            keep = torch.where(sc > self.score_thresh)[0]
            boxes, sc, labels = boxes[keep], sc[keep], labels[keep]
            keep = remove_small_boxes(boxes, min_size=1e-2)
            boxes, sc, labels = boxes[keep], sc[keep], labels[keep]
            keep = batched_nms(boxes, sc, labels, self.nms_thresh)[: self.detections_per_img]
            results.append({"boxes": boxes[keep], "scores": sc[keep], "labels": labels[keep]})
        if self.has_mask():
            det_boxes = [r["boxes"] for r in results]
            feats = self.mask_roi_pool(features, det_boxes, image_sizes)
            labels = torch.cat([r["labels"] for r in results]) - 1
            rows = torch.arange(len(labels), device=labels.device)
            probs = sum(stage(feats)[rows, labels].float().sigmoid() for stage in self.mask_stages)
            probs = (probs / self.num_stages)[:, None]  # (N, 1, 28, 28), pasted by the transform
            for r, m in zip(results, probs.split([len(b) for b in det_boxes]), strict=True):
                r["masks"] = m
        return results

    def forward(self, features, proposals, image_sizes, targets=None):
        if self.training:
            if targets is None:
                raise ValueError("training needs targets (boxes, labels, masks per image)")
            return [], self.forward_train(features, proposals, image_sizes, targets)
        return self.forward_test(features, proposals, image_sizes), {}


class CascadeMaskRCNN(GeneralizedRCNN):
    """Backbone + FPN → RPN → :class:`CascadeRoIHeads`; torchvision's detector interface.

    Train mode: ``model(images, targets)`` → loss dict (``loss_objectness``, ``loss_rpn_box_reg``,
    ``s{0,1,2}_loss_{classifier,box_reg,mask}``, stage weights applied; sum them).
    Eval mode: ``model(images)`` → one dict per image: ``boxes`` (n, 4) xyxy in input pixels,
    ``labels`` (n,) in 1..C, ``scores`` (n,), ``masks`` (n, 1, H, W) probabilities.
    """

    def forward(self, images, targets=None):
        check_images(images)
        return super().forward(images, targets)


class QtvitMaskRCNN(MaskRCNN):
    """torchvision's Mask R-CNN (class-specific regression, one stage) with input checks."""

    def forward(self, images, targets=None):
        check_images(images)
        return super().forward(images, targets)


def build_rpn(out_channels: int, *, pre_nms_top_n_train: int = 2000, pre_nms_top_n_test: int = 1000,
              post_nms_top_n_train: int = 2000, post_nms_top_n_test: int = 1000, nms_thresh: float = 0.7,
              batch_size_per_image: int = 256,
              anchor_sizes: Sequence[int] = ANCHOR_SIZES) -> RegionProposalNetwork:
    """mmdet's RPN: 3×3 conv, 3 anchors per location (ratios 0.5/1/2, one size per level), IoU 0.7 / 0.3,
    256 anchors sampled per image half positive, NMS 0.7 (2000/1000 proposals in training/test)."""
    anchors = AnchorGenerator(tuple((s,) for s in anchor_sizes), (ASPECT_RATIOS,) * len(anchor_sizes))
    head = RPNHead(out_channels, anchors.num_anchors_per_location()[0])
    return RegionProposalNetwork(
        anchors, head, fg_iou_thresh=0.7, bg_iou_thresh=0.3, batch_size_per_image=batch_size_per_image,
        positive_fraction=0.5, pre_nms_top_n=dict(training=pre_nms_top_n_train, testing=pre_nms_top_n_test),
        post_nms_top_n=dict(training=post_nms_top_n_train, testing=post_nms_top_n_test),
        nms_thresh=nms_thresh)


def build_transform(min_size: int | Sequence[int] = 800, max_size: int = 1333) -> DetectionTransform:
    return DetectionTransform(min_size, max_size, list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD))


def _split(kwargs: dict, keys: Sequence[str]) -> dict:
    return {k: kwargs.pop(k) for k in list(kwargs) if k in keys}


RPN_KEYS = ("pre_nms_top_n_train", "pre_nms_top_n_test", "post_nms_top_n_train", "post_nms_top_n_test",
            "anchor_sizes")


def build_cascade_mask_rcnn(backbone: nn.Module, num_classes: int = 80, *, min_size=800, max_size: int = 1333,
                            rpn_batch_size_per_image: int = 256, rpn_nms_thresh: float = 0.7,
                            box_nms_thresh: float = 0.5, **kwargs) -> CascadeMaskRCNN:
    """Cascade Mask R-CNN on ``backbone`` (a module with ``out_channels`` returning FPN levels "0".."3",
    "pool"). ``kwargs``: the RPN options of :func:`build_rpn` and :class:`CascadeRoIHeads`' options."""
    rpn = build_rpn(backbone.out_channels, batch_size_per_image=rpn_batch_size_per_image,
                    nms_thresh=rpn_nms_thresh, **_split(kwargs, RPN_KEYS))
    heads = CascadeRoIHeads(backbone.out_channels, num_classes, nms_thresh=box_nms_thresh, **kwargs)
    return CascadeMaskRCNN(backbone, rpn, heads, build_transform(min_size, max_size))


def build_mask_rcnn(backbone: nn.Module, num_classes: int = 80, *, min_size=800, max_size: int = 1333,
                    rpn_batch_size_per_image: int = 256, rpn_nms_thresh: float = 0.7,
                    box_nms_thresh: float = 0.5, representation: int = 1024,
                    mask_layers: Sequence[int] = (256, 256, 256, 256), batch_size_per_image: int = 512,
                    score_thresh: float = 0.05, detections_per_img: int = 100,
                    **rpn_kwargs) -> QtvitMaskRCNN:
    """torchvision's Mask R-CNN on ``backbone`` with the same RPN, pooling and transform as the cascade."""
    unknown = set(rpn_kwargs) - set(RPN_KEYS)
    if unknown:
        raise TypeError(f"build_mask_rcnn got unexpected options: {', '.join(sorted(unknown))}")
    c = backbone.out_channels
    rpn = build_rpn(c, batch_size_per_image=rpn_batch_size_per_image, nms_thresh=rpn_nms_thresh, **rpn_kwargs)
    model = QtvitMaskRCNN(
        backbone, num_classes=None, min_size=min_size, max_size=max_size,
        image_mean=list(IMAGENET_DEFAULT_MEAN), image_std=list(IMAGENET_DEFAULT_STD),
        rpn_anchor_generator=rpn.anchor_generator, rpn_head=rpn.head,
        box_roi_pool=MultiScaleRoIAlign(["0", "1", "2", "3"], 7, sampling_ratio=0),
        box_head=TwoMLPHead(c * 49, representation),
        box_predictor=_fastrcnn_predictor(representation, num_classes + 1),
        box_batch_size_per_image=batch_size_per_image, box_score_thresh=score_thresh,
        box_nms_thresh=box_nms_thresh, box_detections_per_img=detections_per_img,
        mask_roi_pool=MultiScaleRoIAlign(["0", "1", "2", "3"], 14, sampling_ratio=0),
        mask_head=MaskRCNNHeads(c, list(mask_layers), dilation=1),
        mask_predictor=MaskRCNNPredictor(mask_layers[-1], mask_layers[-1], num_classes + 1))
    model.rpn = rpn
    model.transform = build_transform(min_size, max_size)
    return model


def _fastrcnn_predictor(representation: int, num_classes: int) -> nn.Module:
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor

    return FastRCNNPredictor(representation, num_classes)


__all__ = ["ANCHOR_SIZES", "IOU_THRESHOLDS", "STAGE_LOSS_WEIGHTS", "TARGET_STDS", "BoxStage",
           "CascadeMaskRCNN", "CascadeRoIHeads", "DetectionTransform", "MaskStage", "QtvitMaskRCNN",
           "build_cascade_mask_rcnn",
           "build_mask_rcnn", "build_rpn", "build_transform", "check_images"]
