"""label_box bands, low-quality matches, masks and sampling against hand values and a loop reference."""

import numpy as np
import paddle
import pytest

from ppdet_retina.core.workspace import ConfigError, create
from ppdet_retina.modeling.matching import MaxIoUAssigner, label_box, subsample_labels


def loop_label_box(iou, pos, neg, low_quality, valid):
    """Reference for one image: iou [N, G], valid [G] bool, explicit loops."""
    n, g = iou.shape
    matched = np.zeros(n, dtype=np.int64)
    labels = np.zeros(n, dtype=np.int32)
    if not valid.any():
        return matched, labels
    for i in range(n):
        best, best_j = -1.0, 0
        for j in range(g):
            if valid[j] and iou[i, j] > best:
                best, best_j = iou[i, j], j
        matched[i] = best_j
        labels[i] = 1 if best >= pos else (0 if best < neg else -1)
    if low_quality:
        for j in range(g):
            if not valid[j]:
                continue
            top = iou[:, j].max()
            if top > 0:
                labels[iou[:, j] == top] = 1
    return matched, labels


def run(iou, valid, pos=0.5, neg=0.4, low_quality=True):
    m, l = label_box(paddle.to_tensor(np.asarray(iou, np.float32)), pos, neg, low_quality,
                     paddle.to_tensor(np.asarray(valid)))
    assert m.dtype == paddle.int64 and l.dtype == paddle.int32
    return m.numpy(), l.numpy()


def test_bands_without_low_quality():
    # anchors: 0.7 -> pos, exactly 0.5 -> pos, 0.45 -> ignore, exactly 0.4 -> ignore, 0.1 -> neg
    iou = [[[0.7, 0.1], [0.2, 0.5], [0.45, 0.3], [0.4, 0.0], [0.1, 0.05]]]
    m, l = run(iou, [[True, True]], low_quality=False)
    np.testing.assert_array_equal(l, [[1, 1, -1, -1, 0]])
    np.testing.assert_array_equal(m, [[0, 1, 0, 0, 0]])


def test_low_quality_with_ties_keeps_best_match():
    # gt1's best IoU is 0.3, shared by anchors 1 and 2 (tie): both positive.
    # Anchor 2 has IoU 0.35 with gt0, so it stays matched to gt0.
    iou = [[[0.8, 0.0], [0.1, 0.3], [0.35, 0.3], [0.2, 0.1]]]
    m, l = run(iou, [[1, 1]])
    np.testing.assert_array_equal(l, [[1, 1, 1, 0]])
    np.testing.assert_array_equal(m, [[0, 1, 0, 0]])


def test_low_quality_ignores_gt_with_zero_iou():
    # gt1 overlaps nothing: its best IoU is 0, which must not make every anchor positive.
    iou = [[[0.6, 0.0], [0.1, 0.0], [0.0, 0.0]]]
    _, l = run(iou, [[1, 1]])
    np.testing.assert_array_equal(l, [[1, 0, 0]])


def test_invalid_gts_never_match():
    # gt1 (crowd or padding) has the highest IoUs but is invalid.
    iou = [[[0.3, 0.9], [0.1, 0.95], [0.0, 0.2]]]
    m, l = run(iou, [[True, False]])
    np.testing.assert_array_equal(m, [[0, 0, 0]])
    np.testing.assert_array_equal(l, [[1, 0, 0]])  # anchor 0 is gt0's low-quality best


def test_image_without_valid_gt_all_negative_in_batch():
    iou = np.array([[[0.9, 0.6], [0.2, 0.1]], [[0.9, 0.6], [0.45, 0.1]]], np.float32)
    m, l = run(iou, [[False, False], [True, False]])
    np.testing.assert_array_equal(l, [[0, 0], [1, -1]])
    np.testing.assert_array_equal(m, [[0, 0], [0, 0]])


def test_zero_gts():
    m, l = run(np.zeros((2, 3, 0)), np.zeros((2, 0), bool))
    assert m.shape == (2, 3)
    np.testing.assert_array_equal(l, np.zeros((2, 3)))


@pytest.mark.parametrize("low_quality", [True, False])
def test_random_batch_matches_loop_reference(low_quality):
    rng = np.random.default_rng(3)
    # Quantised IoUs make ties common.
    iou = rng.integers(0, 10, (3, 40, 4)).astype(np.float32) / 10.0
    iou[:, :, 3] = 0.0
    valid = np.array([[1, 1, 0, 1], [1, 0, 0, 0], [0, 0, 0, 0]], bool)
    m, l = run(iou, valid, low_quality=low_quality)
    for b in range(3):
        rm, rl = loop_label_box(iou[b], 0.5, 0.4, low_quality, valid[b])
        np.testing.assert_array_equal(l[b], rl)
        np.testing.assert_array_equal(m[b], rm)


def test_assigner_two_images_different_gt_counts():
    anchors = paddle.to_tensor([[0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 20, 20], [50, 50, 60, 60]], "float32")
    # image 0: two gts; image 1: one real gt plus padding (padded box equals anchor 3).
    gt = paddle.to_tensor([[[0, 0, 10, 10], [21, 21, 31, 31]],
                           [[0, 0, 14, 14], [50, 50, 60, 60]]], "float32")
    valid = paddle.to_tensor([[1.0, 1.0], [1.0, 0.0]])
    m, l = MaxIoUAssigner(0.5, 0.4, True)(anchors, gt, valid)
    # image 0: anchor0 IoU 1 with gt0; anchor1 IoU 81/119=0.68 with gt1; anchor2 IoU .25 with gt0.
    np.testing.assert_array_equal(l.numpy()[0], [1, 1, 0, 0])
    np.testing.assert_array_equal(m.numpy()[0, :2], [0, 1])
    # image 1: IoU(anchor0, gt) = 100/196 = 0.51 -> pos; anchor2: 196/400 = 0.49 -> ignore;
    # anchor 3 overlaps only the padded gt -> negative.
    np.testing.assert_array_equal(l.numpy()[1], [1, 0, -1, 0])
    np.testing.assert_array_equal(m.numpy()[1], [0, 0, 0, 0])


def test_assigner_empty_gt_and_config():
    anchors = paddle.to_tensor([[0, 0, 10, 10], [20, 20, 30, 30]], "float32")
    m, l = MaxIoUAssigner()(anchors, paddle.zeros([2, 0, 4]), paddle.zeros([2, 0]))
    assert l.shape == [2, 2] and not l.numpy().any() and not m.numpy().any()
    a = create({"name": "MaxIoUAssigner", "positive_overlap": 0.5, "negative_overlap": 0.4,
                "allow_low_quality": True})
    assert (a.positive_overlap, a.negative_overlap, a.allow_low_quality) == (0.5, 0.4, True)
    with pytest.raises(ConfigError, match="negative_overlap"):
        MaxIoUAssigner(positive_overlap=0.3, negative_overlap=0.5)


def test_subsample_deterministic_takes_first():
    labels = paddle.to_tensor([[1, 0, 1, 1, -1, 0, 0, 1, 0, 0],
                               [0, 0, 0, 0, 0, 0, -1, -1, 1, 0]], "int32")
    pos, neg = subsample_labels(labels, num_samples=4, positive_fraction=0.5, use_random=False)
    # image 0: 2 of 4 positives (first two), 2 negatives; image 1: 1 positive, 3 negatives.
    np.testing.assert_array_equal(pos.numpy()[0], [1, 0, 1, 0, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(neg.numpy()[0], [0, 1, 0, 0, 0, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(pos.numpy()[1], [0, 0, 0, 0, 0, 0, 0, 0, 1, 0])
    np.testing.assert_array_equal(neg.numpy()[1], [1, 1, 1, 0, 0, 0, 0, 0, 0, 0])


def test_subsample_random_counts_and_membership():
    paddle.seed(0)
    rng = np.random.default_rng(4)
    lab = rng.choice([-1, 0, 1], size=(3, 200), p=[0.2, 0.7, 0.1]).astype(np.int32)
    lab[2] = 0  # no positives: all samples negative
    pos, neg = subsample_labels(paddle.to_tensor(lab), 64, 0.25, use_random=True)
    pos, neg = pos.numpy(), neg.numpy()
    for b in range(3):
        n_pos = min((lab[b] == 1).sum(), 16)
        assert pos[b].sum() == n_pos
        assert neg[b].sum() == min((lab[b] == 0).sum(), 64 - n_pos)
        assert (lab[b][pos[b]] == 1).all() and (lab[b][neg[b]] == 0).all()
