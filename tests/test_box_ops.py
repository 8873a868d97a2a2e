"""Box ops against hand values and a brute-force numpy reference."""

import inspect
import math

import numpy as np
import paddle
import pytest

from ppdet_retina.modeling.box_ops import (DEFAULT_MAX_RATIO, bbox2delta, box_area, clip_boxes, image_index,
                                           delta2bbox, pairwise_iou)


def numpy_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pair-by-pair IoU with explicit loops, no +1."""
    out = np.zeros((len(a), len(b)), dtype=np.float64)
    for i, p in enumerate(a):
        for j, q in enumerate(b):
            iw = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
            ih = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
            inter = iw * ih
            area_p = max(0.0, p[2] - p[0]) * max(0.0, p[3] - p[1])
            area_q = max(0.0, q[2] - q[0]) * max(0.0, q[3] - q[1])
            union = area_p + area_q - inter
            out[i, j] = inter / union if union > 0 else 0.0
    return out


def random_boxes(rng, n, size=100.0):
    xy = rng.uniform(0, size, (n, 2))
    wh = rng.uniform(1, size / 2, (n, 2))
    return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


def test_iou_hand_values():
    a = paddle.to_tensor([[0.0, 0.0, 10.0, 10.0]])
    b = paddle.to_tensor([[5.0, 5.0, 15.0, 15.0], [20.0, 20.0, 30.0, 30.0], [0.0, 0.0, 10.0, 10.0]])
    iou = pairwise_iou(a, b).numpy()
    np.testing.assert_allclose(iou, [[25.0 / 175.0, 0.0, 1.0]], rtol=1e-6)


def test_iou_zero_area_and_disjoint_give_zero_not_nan():
    a = paddle.to_tensor([[3.0, 3.0, 3.0, 3.0], [0.0, 0.0, 4.0, 0.0], [0.0, 0.0, 2.0, 2.0]])
    b = paddle.to_tensor([[3.0, 3.0, 3.0, 3.0], [0.0, 0.0, 4.0, 0.0], [10.0, 10.0, 12.0, 12.0]])
    iou = pairwise_iou(a, b).numpy()
    assert not np.isnan(iou).any()
    np.testing.assert_array_equal(iou, np.zeros((3, 3)))


def test_iou_random_batched_matches_numpy():
    rng = np.random.default_rng(0)
    a = np.stack([random_boxes(rng, 7), random_boxes(rng, 7)])
    b = np.stack([random_boxes(rng, 5), random_boxes(rng, 5)])
    b[0, 2] = [10, 10, 10, 30]  # zero width
    b[1, :2] = a[1, :2]  # identical pairs -> 1
    iou = pairwise_iou(paddle.to_tensor(a), paddle.to_tensor(b)).numpy()
    assert iou.shape == (2, 7, 5)
    for k in range(2):
        np.testing.assert_allclose(iou[k], numpy_iou(a[k], b[k]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose([iou[1, 0, 0], iou[1, 1, 1]], [1.0, 1.0], rtol=1e-6)


def test_iou_broadcasts_anchors_over_batch():
    rng = np.random.default_rng(1)
    anchors = random_boxes(rng, 6)
    gts = np.stack([random_boxes(rng, 3), random_boxes(rng, 3)])
    iou = pairwise_iou(paddle.to_tensor(anchors).unsqueeze(0), paddle.to_tensor(gts)).numpy()
    for k in range(2):
        np.testing.assert_allclose(iou[k], numpy_iou(anchors, gts[k]), rtol=1e-5, atol=1e-6)


def test_box_area():
    boxes = paddle.to_tensor([[0.0, 0.0, 4.0, 3.0], [5.0, 5.0, 4.0, 9.0]])
    np.testing.assert_allclose(box_area(boxes).numpy(), [12.0, 0.0])


def test_bbox2delta_hand_values():
    src = paddle.to_tensor([[0.0, 0.0, 10.0, 20.0]])
    tgt = paddle.to_tensor([[5.0, 0.0, 25.0, 10.0]])  # centre (15, 5) size (20, 10)
    d = bbox2delta(src, tgt).numpy()
    np.testing.assert_allclose(d, [[1.0, -0.25, math.log(2.0), math.log(0.5)]], rtol=1e-6)
    dw = bbox2delta(src, tgt, weights=(10.0, 10.0, 5.0, 5.0)).numpy()
    np.testing.assert_allclose(dw, d * np.array([10, 10, 5, 5]), rtol=1e-6)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_encode_decode_round_trip(weights):
    rng = np.random.default_rng(2)
    src = paddle.to_tensor(random_boxes(rng, 20).reshape(2, 10, 4))
    tgt = paddle.to_tensor(random_boxes(rng, 20).reshape(2, 10, 4))
    back = delta2bbox(bbox2delta(src, tgt, weights), src, weights).numpy()
    np.testing.assert_allclose(back, tgt.numpy(), rtol=1e-4, atol=1e-3)


def test_delta2bbox_hand_values_and_clamp():
    box = paddle.to_tensor([[0.0, 0.0, 16.0, 16.0]])
    out = delta2bbox(paddle.to_tensor([[0.5, 0.0, 0.0, math.log(2.0)]]), box).numpy()
    np.testing.assert_allclose(out, [[8.0, -8.0, 24.0, 24.0]], rtol=1e-6)
    # dw = 100 would overflow exp; clamped it gives a 16 * 1000/16 = 1000 px box.
    huge = delta2bbox(paddle.to_tensor([[0.0, 0.0, 100.0, 100.0]]), box).numpy()
    assert np.isfinite(huge).all()
    np.testing.assert_allclose(huge, [[8 - 500.0, 8 - 500.0, 8 + 500.0, 8 + 500.0]], rtol=1e-5)
    assert DEFAULT_MAX_RATIO == pytest.approx(math.log(1000 / 16))
    assert inspect.signature(delta2bbox).parameters["max_ratio"].default == DEFAULT_MAX_RATIO
    small = delta2bbox(paddle.to_tensor([[0.0, 0.0, 100.0, 0.0]]), box, max_ratio=math.log(2.0)).numpy()
    np.testing.assert_allclose(small, [[-8.0, 0.0, 24.0, 16.0]], rtol=1e-5)


def test_delta2bbox_weights_divide():
    box = paddle.to_tensor([[0.0, 0.0, 10.0, 10.0]])
    out = delta2bbox(paddle.to_tensor([[10.0, 0.0, 0.0, 0.0]]), box, weights=(10.0, 10.0, 5.0, 5.0)).numpy()
    np.testing.assert_allclose(out, [[10.0, 0.0, 20.0, 10.0]], rtol=1e-6)


def test_bad_weights_raise():
    box = paddle.to_tensor([[0.0, 0.0, 10.0, 10.0]])
    with pytest.raises(ValueError, match="4 values"):
        bbox2delta(box, box, weights=(1.0, 1.0))


def test_clip_boxes_single_and_batched():
    boxes = paddle.to_tensor([[-5.0, 3.0, 120.0, 70.0], [10.0, -2.0, 20.0, 90.0]])
    out = clip_boxes(boxes, paddle.to_tensor([64.0, 100.0])).numpy()
    np.testing.assert_allclose(out, [[0, 3, 100, 64], [10, 0, 20, 64]])
    batched = paddle.stack([boxes, boxes])
    im_shape = paddle.to_tensor([[64.0, 100.0], [50.0, 15.0]])
    out = clip_boxes(batched, im_shape).numpy()
    np.testing.assert_allclose(out[0], [[0, 3, 100, 64], [10, 0, 20, 64]])
    np.testing.assert_allclose(out[1], [[0, 3, 15, 50], [10, 0, 15, 50]])


def test_image_index_of_flat_rows():
    idx = image_index(paddle.to_tensor([2, 0, 3], dtype="int32"))
    assert idx.dtype == paddle.int64 and idx.numpy().tolist() == [0, 0, 2, 2, 2]
    assert image_index(paddle.to_tensor([0, 0], dtype="int32")).shape == [0]
