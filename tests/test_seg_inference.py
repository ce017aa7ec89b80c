"""Inference helpers: padding to 32, sliding window vs whole image, flip / multi-scale, non-square inputs."""

import pytest
import torch
import torch.nn as nn

import qtvit
from qtvit.tasks.segmentation.inference import (
    forward_logits,
    pad_to_multiple,
    predict,
    slide_logits,
    window_starts,
)


class PixelModel(nn.Module):
    """Per-pixel (1×1) classifier: translation-equivariant, so windows must agree with the whole image."""

    output_stride = 1

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, classes, 1)
        self.calls: list[tuple[int, int]] = []

    def forward(self, x):
        assert x.shape[-2] % 32 == 0 and x.shape[-1] % 32 == 0  # the helpers pad
        self.calls.append(tuple(x.shape[-2:]))
        return self.conv(x)


def test_pad_to_multiple_pads_right_and_bottom():
    x = torch.ones(1, 3, 33, 70)
    padded, size = pad_to_multiple(x)
    assert padded.shape == (1, 3, 64, 96) and size == (33, 70)
    assert padded[..., :33, :70].eq(1).all() and padded[..., 33:, :].eq(0).all()


def test_window_starts_cover_the_side_and_end_flush():
    assert window_starts(1024, 512, 341) == [0, 341, 512]
    assert window_starts(2048, 512, 341) == [0, 341, 682, 1023, 1364, 1536]
    assert window_starts(300, 512, 341) == [0]


def test_sliding_window_equals_whole_image_when_one_window_covers_it():
    model = qtvit.create_model("qtvit_seg_demo", num_classes=3, img_size=(64, 96)).eval()
    x = torch.randn(1, 3, 50, 90)  # non-square, not a multiple of 32
    with torch.no_grad():
        whole = forward_logits(model, x)
        slide = slide_logits(model, x, crop=96, stride=64)
    assert whole.shape == (1, 3, 50, 90)
    torch.testing.assert_close(slide, whole)


def test_overlapping_windows_equal_whole_image_for_a_per_pixel_model():
    model = PixelModel()
    x = torch.randn(2, 3, 100, 230)
    with torch.no_grad():
        whole = forward_logits(model, x)
        slide = slide_logits(model, x, crop=(64, 96), stride=(40, 50), batch_windows=3)
    assert len(model.calls) > 2
    torch.testing.assert_close(slide, whole)


def test_predict_resizes_to_label_size_flip_and_scales():
    model = qtvit.create_model("qtvit_seg_demo", num_classes=4, img_size=(64, 64)).eval()
    x = torch.randn(1, 3, 64, 96)
    logits = predict(model, x, out_size=(50, 70))
    assert logits.shape == (1, 4, 50, 70)
    probs = predict(model, x, flip=True, scales=(0.75, 1.0))
    assert probs.shape == (1, 4, 64, 96)
    torch.testing.assert_close(probs.sum(1), torch.ones(1, 64, 96))  # mean of softmaxes
    # flip on a mirror-symmetric input and model output: the flipped run equals the plain one
    sym = torch.cat([x[..., :48], x[..., :48].flip(-1)], -1)
    pixel = PixelModel()
    torch.testing.assert_close(predict(pixel, sym, flip=True), predict(pixel, sym).softmax(1))


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="stride"):
        slide_logits(PixelModel(), torch.randn(1, 3, 64, 64), crop=32, stride=48)
    with pytest.raises(ValueError, match="unknown inference mode"):
        predict(PixelModel(), torch.randn(1, 3, 32, 32), mode="tile")
