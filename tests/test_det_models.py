"""Detectors: parameter counts of the paper's table, output format, backbone options, input errors."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("torchvision")

import qtvit  # noqa: E402
from qtvit.models import get_model_card, list_models, save_state_dict  # noqa: E402
from qtvit.models.detection import PARAMS, build_detector  # noqa: E402

EVIT = dict(kernel="relu", ape=False, shortcut=False)
# The paper's Table 4 (M parameters, 80 classes): (QT-ViT, EfficientViT twin), restated here.
PAPER_CASCADE = {"1": (57.85, 57.60), "2": (68.52, 67.99), "3": (93.14, 92.08)}
# Tiny heads for fast CPU checks.
TINY = dict(fpn_channels=16, representation=32, mask_layers=(16,), min_size=64, max_size=96,
            batch_size_per_image=32, pre_nms_top_n_train=64, post_nms_top_n_train=64,
            pre_nms_top_n_test=32, post_nms_top_n_test=32)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def meta(name: str, **kwargs) -> torch.nn.Module:
    with torch.device("meta"):
        return qtvit.create_model(name, **kwargs)


@pytest.mark.parametrize("size", sorted(PAPER_CASCADE))
def test_cascade_parameter_counts_match_the_paper(size):
    qt, evit = PAPER_CASCADE[size]
    name = f"qtvit_{size}_cascade_mask_rcnn_coco"
    n_qt, n_evit = n_params(meta(name)), n_params(meta(name, **EVIT))
    assert abs(n_qt / 1e6 - qt) <= 0.01, n_qt
    assert abs(n_evit / 1e6 - evit) <= 0.01, n_evit
    assert get_model_card(name).params == n_qt


def test_every_detector_card_states_its_parameter_count():
    names = list_models("qtvit_*_mask_rcnn_coco")
    assert len(names) == len(PARAMS) == 6
    for name in names:  # the cascade's cards are checked with the paper's counts above
        if "cascade" not in name:
            assert get_model_card(name).params == n_params(meta(name)), name


def test_cascade_has_three_stages_of_mmdet_shape():
    model = meta("qtvit_1_cascade_mask_rcnn_coco")
    assert model.num_classes == 80  # create_model passes 1000 when no count is named: the COCO default
    heads = model.roi_heads
    assert heads.num_stages == 3 and heads.iou_thresholds == (0.5, 0.6, 0.7)
    assert heads.stage_loss_weights == (1.0, 0.5, 0.25)
    stds = [tuple(round(1 / w, 3) for w in c.weights) for c in heads.box_coders]
    assert stds == [(0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067)]
    for stage in heads.box_stages:
        assert stage.head.fc6.out_features == stage.head.fc7.out_features == 1024
        assert stage.cls_score.out_features == 81 and stage.bbox_pred.out_features == 4  # class-agnostic
    assert len(heads.mask_stages) == 3
    assert model.rpn.head.cls_logits.out_channels == 3 and model.backbone.out_channels == 256
    # torchvision's Mask R-CNN: class-specific regression over 81 labels
    light = meta("qtvit_1_mask_rcnn_coco")
    assert light.roi_heads.box_predictor.bbox_pred.out_features == 81 * 4


def test_num_classes_default_and_explicit():
    model = meta("qtvit_1_cascade_mask_rcnn_coco", num_classes=5)
    assert model.num_classes == 5 and model.roi_heads.box_stages[0].cls_score.out_features == 6
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        build_detector("cascade_mask_rcnn", "qtvit_b0", 0)
    with pytest.raises(ValueError, match="unknown detector architecture 'yolo'"):
        build_detector("yolo")
    with pytest.raises(ValueError, match="unknown norm 'gn'"):
        build_detector("cascade_mask_rcnn", "qtvit_b0", 3, norm="gn")


def tiny(arch: str = "cascade_mask_rcnn", **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_detector(arch, "qtvit_b0", 3, **{**TINY, **kwargs})


def targets_for(sizes):
    out = []
    for h, w in sizes:
        masks = torch.zeros(2, h, w, dtype=torch.uint8)
        masks[0, 4:30, 6:40] = 1
        masks[1, 30:60, 40:70] = 1
        out.append(dict(boxes=torch.tensor([[6.0, 4, 40, 30], [40, 30, 70, 60]]), labels=torch.tensor([1, 3]),
                        masks=masks))
    return out


@pytest.mark.parametrize("arch", ["cascade_mask_rcnn", "mask_rcnn"])
def test_train_mode_returns_finite_losses_and_trains_the_backbone(arch):
    model = tiny(arch).train()
    images = [torch.rand(3, 64, 80), torch.rand(3, 72, 64)]
    losses = model(images, targets_for([(64, 80), (72, 64)]))
    expected = ({f"s{s}_loss_{k}" for s in range(3) for k in ("classifier", "box_reg", "mask")}
                if arch == "cascade_mask_rcnn" else {"loss_classifier", "loss_box_reg", "loss_mask"})
    assert set(losses) == expected | {"loss_objectness", "loss_rpn_box_reg"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    grad = model.backbone.body.stem.in_conv.conv.weight.grad
    assert grad is not None and grad.abs().sum() > 0


@pytest.mark.parametrize("arch", ["cascade_mask_rcnn", "mask_rcnn"])
def test_eval_mode_returns_torchvision_format_for_lists_and_batches(arch):
    model = tiny(arch, score_thresh=0.0).eval()
    with torch.no_grad():
        # random heads score every class near 1/4: random boxes come out, at least one per image
        batch = torch.rand(2, 3, 70, 90)
        from_batch = model(batch)
        from_list = model([batch[0], batch[1]])
        odd = model([torch.rand(3, 50, 61)])
    assert len(from_batch) == 2 and len(odd) == 1
    for a, b in zip(from_batch, from_list, strict=True):
        assert set(a) == {"boxes", "labels", "scores", "masks"}
        torch.testing.assert_close(a["boxes"], b["boxes"])
    for out, (h, w) in ((from_batch[0], (70, 90)), (odd[0], (50, 61))):
        n = len(out["boxes"])
        assert n > 0 and out["boxes"].shape == (n, 4) and out["masks"].shape == (n, 1, h, w)
        assert out["labels"].min() >= 1 and out["labels"].max() <= 3
        assert (out["boxes"][:, 2] <= w).all() and (out["boxes"][:, 3] <= h).all()
        assert out["masks"].min() >= 0 and out["masks"].max() <= 1
        assert (out["scores"][:-1] >= out["scores"][1:]).all() or arch == "mask_rcnn"


def test_bad_inputs_raise_one_line_errors():
    model = tiny().eval()
    with pytest.raises(ValueError, match=r"expected a \(3, H, W\) tensor, got \(64, 64\)"):
        model([torch.rand(64, 64)])
    with pytest.raises(ValueError, match="expected float values in \\[0, 1\\], got dtype torch.uint8"):
        model([torch.zeros(3, 64, 64, dtype=torch.uint8)])
    with pytest.raises(ValueError, match="got a tensor of shape \\(3, 64, 64\\)"):
        model(torch.rand(3, 64, 64))
    model.train()
    with pytest.raises(ValueError, match="training needs targets"):
        model.roi_heads({}, [], [], None)


def test_backbone_options_ape_kernel_norm():
    no_ape = build_detector("cascade_mask_rcnn", "qtvit_b0", 3, ape=False, **TINY)
    assert not any(n.endswith(".ape") for n, _ in no_ape.named_parameters())
    assert any(n.endswith(".ape") for n, _ in tiny().named_parameters())
    relu = build_detector("cascade_mask_rcnn", "qtvit_b0", 3, kernel="softmax", **TINY)
    kernels = {m.kernel for m in relu.backbone.body.modules() if hasattr(m, "kernel") and hasattr(m, "impl")}
    assert kernels == {"softmax"}
    from torchvision.ops.misc import FrozenBatchNorm2d

    frozen = tiny(norm="frozen_bn")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in frozen.backbone.body.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in frozen.backbone.body.modules())
    synced = tiny(norm="sync_bn")
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.backbone.body.modules())


def test_backbone_starts_from_a_classification_checkpoint(tmp_path):
    torch.manual_seed(1)
    classifier = qtvit.create_model("qtvit_b0", num_classes=10)
    with torch.no_grad():
        for p in classifier.parameters():
            p.add_(torch.randn_like(p))
    path = tmp_path / "b0.safetensors"
    save_state_dict(classifier, path)
    model = build_detector("cascade_mask_rcnn", "qtvit_b0", 3, backbone_checkpoint=path, **TINY)
    body = model.backbone.body.state_dict()
    reference = {k: v for k, v in classifier.state_dict().items() if not k.startswith("head.")}
    assert set(body) == set(reference)
    for key, value in reference.items():
        torch.testing.assert_close(body[key], value, msg=key)
    # an EfficientViT (no QT keys) checkpoint into a QT backbone: QT extras stay at their initial values
    evit = qtvit.create_model("qtvit_b0", num_classes=10, **EVIT)
    evit_path = tmp_path / "evit.pt"
    torch.save(evit.state_dict(), evit_path)
    model = build_detector("cascade_mask_rcnn", "qtvit_b0", 3, backbone_checkpoint=evit_path,
                           allow_missing_qt=True, **TINY)
    body = model.backbone.body.state_dict()
    apes = [k for k in body if k.endswith(".ape")]
    assert apes and all(body[k].abs().max() == 0 for k in apes)
    stem = "stem.in_conv.conv.weight"
    torch.testing.assert_close(body[stem], evit.state_dict()[stem])
