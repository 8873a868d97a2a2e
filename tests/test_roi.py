"""RoI stage: FPN level rule, RoIAlign / RoIPool values, RoI sampling, box head layout and decoding."""

from __future__ import annotations

import numpy as np
import paddle
import pytest

from ppdet_retina.modeling.heads.bbox_head import BBoxHead, TwoFCHead
from ppdet_retina.modeling.heads.rcnn_postprocess import BBoxPostProcess, RCNNBox
from ppdet_retina.modeling.nms import MultiClassNMS
from ppdet_retina.modeling.roi_extractor import RoIAlign, RoIPool, assign_fpn_levels
from ppdet_retina.modeling.targets import BBoxAssigner


def _linear_map() -> paddle.Tensor:
    """A 4x4 map whose value at pixel (y, x) is x + 4y; bilinear sampling of it is exact."""
    y, x = np.mgrid[0:4, 0:4]
    return paddle.to_tensor((x + 4 * y).astype(np.float32)[None, None])


# ----------------------------------------------------------------------------- level assignment

def test_fpn_level_assignment_by_hand():
    sides = [111, 112, 224, 447, 448, 10, 2000]
    rois = paddle.to_tensor([[0, 0, s, s] for s in sides], dtype="float32")
    levels = assign_fpn_levels(rois, 2, 5, canonical_level=4, canonical_size=224).numpy()
    # floor(4 + log2(side / 224)), clamped to P2..P5.
    assert levels.tolist() == [2, 3, 4, 4, 5, 2, 5]


def test_fpn_level_assignment_matches_paddle_op():
    rng = np.random.RandomState(0)
    xy = rng.rand(50, 2) * 300
    wh = np.exp(rng.rand(50, 2) * 6) + 1
    rois = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    ours = assign_fpn_levels(paddle.to_tensor(rois), 2, 5).numpy()
    multi, _, _ = paddle.vision.ops.distribute_fpn_proposals(
        paddle.to_tensor(rois), 2, 5, 4, 224, rois_num=paddle.to_tensor([50], "int32"))
    for level, level_rois in zip(range(2, 6), multi):
        np.testing.assert_allclose(np.sort(rois[ours == level], 0), np.sort(level_rois.numpy(), 0))


# ----------------------------------------------------------------------------- pooling

def test_roi_align_hand_values():
    align = RoIAlign(resolution=2, spatial_scale=[1.0], sampling_ratio=2, aligned=True)
    out = align([_linear_map()], paddle.to_tensor([[1.0, 1.0, 3.0, 3.0]]), paddle.to_tensor([1]))
    # Bin centres (half-pixel aligned) sit on pixel coordinates (1, 1), (2, 1), (1, 2), (2, 2).
    np.testing.assert_allclose(out.numpy()[0, 0], [[5, 6], [9, 10]], rtol=1e-6)


def test_roi_pool_hand_values():
    pool = RoIPool(resolution=2, spatial_scale=[1.0])
    out = pool([_linear_map()], paddle.to_tensor([[0.0, 0.0, 3.0, 3.0]]), paddle.to_tensor([1]))
    # Each 2x2 bin's maximum is its bottom-right pixel.
    np.testing.assert_allclose(out.numpy()[0, 0], [[5, 7], [13, 15]])


def test_multi_level_roi_align_pools_each_roi_from_its_level():
    rng = np.random.RandomState(1)
    feats = [paddle.to_tensor(rng.rand(2, 3, 16, 16).astype(np.float32)),
             paddle.to_tensor(rng.rand(2, 3, 8, 8).astype(np.float32))]
    # canonical level 3 at 16 px: sides < 16 -> feature 0 (stride 4), >= 16 -> feature 1 (stride 8).
    align = RoIAlign(resolution=2, spatial_scale=[0.25, 0.125], sampling_ratio=2, aligned=True,
                     canonical_level=3, canonical_size=16, start_level=0, end_level=1)
    rois = np.array([[4, 4, 30, 30], [2, 2, 10, 12], [0, 0, 8, 8],   # image 0: levels 1, 0, 0
                     [10, 6, 20, 14], [1, 1, 50, 40]], np.float32)   # image 1: levels 0, 1
    rois_num = paddle.to_tensor([3, 2], "int32")
    out = align(feats, paddle.to_tensor(rois), rois_num).numpy()
    assert out.shape == (5, 3, 2, 2)
    image = [0, 0, 0, 1, 1]
    level = [1, 0, 0, 0, 1]
    for i in range(5):
        ref = paddle.vision.ops.roi_align(feats[level[i]][image[i]:image[i] + 1], paddle.to_tensor(rois[i:i + 1]),
                                          paddle.to_tensor([1], "int32"), 2, [0.25, 0.125][level[i]], 2, True)
        np.testing.assert_allclose(out[i], ref.numpy()[0], rtol=1e-6)


def test_roi_align_from_config_takes_scales_from_input_shape():
    from ppdet_retina.modeling.shape_spec import ShapeSpec
    kw = RoIAlign.from_config({}, input_shape=[ShapeSpec(8, 4), ShapeSpec(8, 8)])
    assert kw == {"spatial_scale": [0.25, 0.125]}
    assert RoIAlign(canconical_level=3).canonical_level == 3  # PaddleDetection's spelling


# ----------------------------------------------------------------------------- RoI sampling

def _boxes_around(box, n, rng, jitter):
    return (np.asarray(box, np.float32) + rng.uniform(-jitter, jitter, (n, 4))).astype(np.float32)


def test_bbox_assigner_sampling_counts_and_labels():
    rng = np.random.RandomState(0)
    gt = np.array([[[10, 10, 50, 50], [0, 0, 0, 0]], [[60, 60, 90, 90], [5, 5, 25, 25]]], np.float32)
    gt_class = np.array([[[2], [0]], [[1], [0]]], np.int32)
    gt_valid = np.array([[True, False], [True, False]])  # image 1's second gt is crowd
    fg0 = _boxes_around([10, 10, 50, 50], 10, rng, 1.0)          # IoU > 0.85 with gt 0
    fg1 = _boxes_around([60, 60, 90, 90], 2, rng, 1.0)
    bg = np.tile(np.array([[100, 100, 120, 120]], np.float32), (30, 1))
    rois = np.zeros((2, 40, 4), np.float32)
    rois[0] = np.concatenate([fg0, bg])
    rois[1, :32] = np.concatenate([fg1, bg])
    rois_valid = np.zeros((2, 40), bool)
    rois_valid[0] = True
    rois_valid[1, :32] = True
    assigner = BBoxAssigner(batch_size_per_im=16, fg_fraction=0.25, num_classes=3)
    t = assigner(paddle.to_tensor(rois), paddle.to_tensor(rois_valid), paddle.to_tensor(gt),
                 paddle.to_tensor(gt_class), paddle.to_tensor(gt_valid), paddle.to_tensor(~gt_valid))
    assert t.rois_num.numpy().tolist() == [16, 16]
    labels = t.labels.numpy()
    # Image 0: 11 fg candidates (10 + the gt) capped at 4; image 1: 2 + the gt = 3, the rest background.
    assert (labels[:16] == 2).sum() == 4 and (labels[:16] == 3).sum() == 12
    assert (labels[16:] == 1).sum() == 3 and (labels[16:] == 3).sum() == 13
    sampled = t.rois.numpy()
    fg = labels < 3
    np.testing.assert_allclose(t.gt_boxes.numpy()[fg][:4], np.tile(gt[0, 0], (4, 1)))
    # The crowd box and the padding rows are never sampled; the real gt is (it is foreground).
    assert not np.any(np.all(sampled[16:] == gt[1, 1], axis=1))
    assert np.any(np.all(sampled[16:] == gt[1, 0], axis=1))
    assert not np.any(np.all(sampled[16:] == 0, axis=1))


# ----------------------------------------------------------------------------- box head

def _tiny_bbox_head(num_classes=3):
    head = TwoFCHead(in_channel=2, out_channel=8, resolution=2)
    return BBoxHead(head=head, in_channel=8, roi_extractor={"resolution": 2, "spatial_scale": [0.25],
                                                             "sampling_ratio": 1, "aligned": True},
                    bbox_assigner=BBoxAssigner(batch_size_per_im=8, num_classes=num_classes),
                    num_classes=num_classes)


@pytest.mark.parametrize("winner", [0, 1, 2, 3])
def test_bbox_head_scores_background_last_and_class_bias_wins(winner):
    head = _tiny_bbox_head()
    head.eval()
    bias = np.zeros(4, np.float32)
    bias[winner] = 20.0  # index 3 = num_classes is background
    head.cls_score.bias.set_value(paddle.to_tensor(bias))
    rois = paddle.to_tensor([[[4, 4, 20, 20], [0, 0, 8, 8]]], dtype="float32")
    (probs, deltas), (flat, rois_num) = head([paddle.rand([1, 2, 8, 8])], rois, paddle.to_tensor([[True, False]]))
    assert probs.shape == [1, 4] and deltas.shape == [1, 12] and rois_num.numpy().tolist() == [1]
    assert probs.argmax(axis=1).numpy().tolist() == [winner]
    np.testing.assert_allclose(probs.numpy().sum(1), 1.0, rtol=1e-5)
    post = BBoxPostProcess(num_classes=3, decode=RCNNBox(num_classes=3), nms=MultiClassNMS())
    bbox, bbox_num = post((probs, deltas), flat, rois_num, paddle.to_tensor([[32.0, 32.0]]),
                          paddle.to_tensor([[1.0, 1.0]]))
    # A background win leaves no detection; otherwise the winner is the only class above 0.05.
    assert bbox.numpy()[:, 0].tolist() == ([] if winner == 3 else [winner])


def test_bbox_head_loss_values():
    head = _tiny_bbox_head()
    head.train()
    for layer in (head.cls_score, head.bbox_pred):
        layer.weight.set_value(paddle.zeros_like(layer.weight))
    pred_bias = np.zeros(12, np.float32)
    pred_bias[4:8] = [1.0, -2.0, 0.5, 0.0]  # class 1's deltas
    head.bbox_pred.bias.set_value(paddle.to_tensor(pred_bias))
    inputs = {"gt_bbox": paddle.to_tensor([[[4, 4, 24, 24]]], dtype="float32"),
              "gt_class": paddle.to_tensor([[[1]]], dtype="int32")}
    rois = paddle.to_tensor([[[4, 4, 24, 24], [40, 40, 60, 60]]], dtype="float32")  # one fg, one bg
    losses = head([paddle.rand([1, 2, 16, 16])], rois, paddle.to_tensor([[True, True]]), inputs)
    # Sampled: the proposal and the appended gt (both foreground, delta target 0) and one background RoI.
    # Uniform logits over 4 classes: CE = log 4; L1 = 2 fg * 3.5 / 3 RoIs.
    np.testing.assert_allclose(float(losses["loss_bbox_cls"]), np.log(4.0), rtol=1e-5)
    np.testing.assert_allclose(float(losses["loss_bbox_reg"]), 2 * 3.5 / 3, rtol=1e-5)


def test_rcnn_box_decode_clip_and_rescale():
    decode = RCNNBox(num_classes=2)
    deltas = np.zeros((2, 8), np.float32)
    deltas[0, 4:8] = [1.0, 0.0, 0.0, 0.0]  # class 1: dx = 1 / 10 of the width
    deltas[1, 0:4] = [0.0, 0.0, 5 * np.log(2.0), 0.0]  # class 0: width x 2
    probs = paddle.to_tensor([[0.1, 0.7, 0.2], [0.6, 0.1, 0.3]])
    rois = paddle.to_tensor([[10, 10, 30, 30], [20, 0, 40, 10]], dtype="float32")
    boxes, scores = decode((probs, paddle.to_tensor(deltas)), rois, paddle.to_tensor([2], "int32"),
                           paddle.to_tensor([[40.0, 45.0]]), paddle.to_tensor([[2.0, 2.5]]))
    assert boxes.shape == [2, 2, 4]
    np.testing.assert_allclose(scores.numpy(), [[0.1, 0.7], [0.6, 0.1]])
    # Boxes stay in the resized frame (the NMS runs there; BBoxPostProcess rescales after it).
    # roi 0 class 1 shifted by 2 px -> [12, 10, 32, 30].
    np.testing.assert_allclose(boxes.numpy()[0, 1], [12, 10, 32, 30], rtol=1e-5)
    # roi 1 class 0 grows to [10, 0, 50, 10], clipped at width 45.
    np.testing.assert_allclose(boxes.numpy()[1, 0], [10, 0, 45, 10], rtol=1e-5)


def test_bbox_post_process_rescales_after_nms_and_marks_emptied_boxes():
    post = BBoxPostProcess(num_classes=2, decode=RCNNBox(num_classes=2),
                           nms=MultiClassNMS(score_threshold=0.3, keep_top_k=10, nms_threshold=0.5))
    probs = paddle.to_tensor([[0.1, 0.8, 0.1], [0.7, 0.1, 0.2]])
    # im_shape 40 x 45.9 at scale 2.5: the original is floor(45.9 / 2.5 + 0.5) = 18 px wide, so the RoI
    # at x 45.5..45.9 (inside the resized image) lands at 18.2..18.36 and is clipped to nothing.
    rois = paddle.to_tensor([[5, 5, 25, 30], [45.5, 0, 45.9, 10]], dtype="float32")
    bbox, bbox_num = post((probs, paddle.zeros([2, 8])), rois, paddle.to_tensor([2], "int32"),
                          paddle.to_tensor([[40.0, 45.9]]), paddle.to_tensor([[2.5, 2.5]]))
    # Rows come class by class. The emptied one keeps its place (bbox_num counts it) with class -1, as in
    # PaddleDetection's output.
    assert bbox_num.numpy().tolist() == [2]
    np.testing.assert_allclose(bbox.numpy(), [[-1, 0.7, 18, 0, 18, 4], [1, 0.8, 2, 2, 10, 12]], rtol=1e-6)


def test_bbox_post_process_rows_and_counts():
    post = BBoxPostProcess(num_classes=2, decode=RCNNBox(num_classes=2),
                           nms=MultiClassNMS(score_threshold=0.3, keep_top_k=10, nms_threshold=0.5))
    probs = paddle.to_tensor([[0.1, 0.8, 0.1], [0.05, 0.75, 0.2], [0.9, 0.05, 0.05]])
    rois = paddle.to_tensor([[0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30]], dtype="float32")
    bbox, bbox_num = post((probs, paddle.zeros([3, 8])), rois, paddle.to_tensor([2, 1], "int32"),
                          paddle.to_tensor([[32.0, 32.0], [32.0, 32.0]]), paddle.to_tensor([[1.0, 1.0], [2.0, 2.0]]))
    # Image 0: the two class-1 boxes overlap (IoU 0.82): one survives. Image 1: one class-0 box, halved.
    assert bbox_num.numpy().tolist() == [1, 1]
    np.testing.assert_allclose(bbox.numpy(), [[1, 0.8, 0, 0, 10, 10], [0, 0.9, 10, 10, 15, 15]], rtol=1e-6)


@pytest.mark.parametrize("rois_num", [[0, 2], [2, 0]])
def test_bbox_post_process_image_without_rois(rois_num):
    post = BBoxPostProcess(num_classes=2, decode=RCNNBox(num_classes=2), nms=MultiClassNMS(score_threshold=0.3))
    probs = paddle.to_tensor([[0.1, 0.8, 0.1], [0.05, 0.75, 0.2]])
    rois = paddle.to_tensor([[0, 0, 10, 10], [20, 0, 31, 10]], dtype="float32")
    bbox, bbox_num = post((probs, paddle.zeros([2, 8])), rois, paddle.to_tensor(rois_num, "int32"),
                          paddle.to_tensor([[32.0, 32.0]] * 2), paddle.to_tensor([[1.0, 1.0]] * 2))
    assert bbox_num.numpy().tolist() == rois_num
    np.testing.assert_allclose(bbox.numpy(), [[1, 0.8, 0, 0, 10, 10], [1, 0.75, 20, 0, 31, 10]], rtol=1e-6)


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_two_fc_head_shapes(dropout):
    head = TwoFCHead(in_channel=3, out_channel=16, resolution=7, dropout=dropout)
    assert head.fc6.weight.shape == [147, 16] and head.fc7.weight.shape == [16, 16]
    head.eval()
    out = head(paddle.rand([5, 3, 7, 7]))
    assert out.shape == [5, 16] and float(out.min()) >= 0
