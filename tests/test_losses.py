"""Losses against hand-computed values and a numpy focal-loss reference."""

import math

import numpy as np
import paddle
import pytest

from ppdet_retina.core.workspace import ConfigError
from ppdet_retina.modeling.losses import FocalLoss, GIoULoss, SmoothL1Loss, giou


def _np_focal(logits, targets, alpha, gamma):
    p = 1.0 / (1.0 + np.exp(-logits))
    p_t = np.where(targets == 1, p, 1 - p)
    alpha_t = np.where(targets == 1, alpha, 1 - alpha)
    return -alpha_t * (1 - p_t) ** gamma * np.log(p_t)


def _t(x, dtype="float32"):
    return paddle.to_tensor(np.asarray(x, dtype=dtype))


def test_focal_loss_matches_numpy_with_ignored_rows_and_normalizer():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 3)).astype("float32") * 3
    targets = np.zeros((6, 3), "float32")
    targets[0, 2] = 1
    targets[3, 0] = 1
    valid = np.array([1, 1, 0, 1, 0, 1], "float32")  # rows 2 and 4 ignored
    expected = (_np_focal(logits, targets, 0.25, 2.0) * valid[:, None]).sum() / 2.0 * 0.5
    loss = FocalLoss(alpha=0.25, gamma=2.0, loss_weight=0.5)(
        _t(logits), _t(targets), weight=_t(valid), normalizer=paddle.to_tensor([2.0]))
    assert loss.shape == []
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_focal_loss_ignored_row_changes_nothing():
    logits = _t([[5.0, -1.0], [2.0, 2.0]])
    targets = _t([[0.0, 1.0], [0.0, 0.0]])
    fl = FocalLoss()
    only_first = fl(logits[:1], targets[:1])
    masked = fl(logits, targets, weight=_t([1.0, 0.0]))
    np.testing.assert_allclose(float(masked), float(only_first), rtol=1e-6)
    assert float(fl(logits, targets)) > float(masked) + 1e-3


def test_focal_loss_single_value_by_hand():
    # logit 0 -> p = 0.5; positive: 0.25 * 0.25 * ln 2; negative: 0.75 * 0.25 * ln 2.
    loss = FocalLoss()(_t([[0.0, 0.0]]), _t([[1.0, 0.0]]))
    np.testing.assert_allclose(float(loss), (0.25 + 0.75) * 0.25 * math.log(2), rtol=1e-6)


def test_focal_loss_rejects_softmax_form():
    with pytest.raises(ConfigError, match="use_sigmoid"):
        FocalLoss(use_sigmoid=False)


def test_smooth_l1_by_hand():
    pred = _t([[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    target = _t([[0.5, -2.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    # beta 1: |d| = 0.5 -> 0.125; 2 -> 1.5; 0 -> 0; 1 -> 0.5 (the branch edge)
    loss = SmoothL1Loss(beta=1.0)(pred, target, normalizer=2.0)
    np.testing.assert_allclose(float(loss), (0.125 + 1.5 + 0.0 + 0.5) / 2.0, rtol=1e-6)
    # beta 0 is L1; weight zeroes the first row; loss_weight scales
    l1 = SmoothL1Loss(beta=0.0, loss_weight=2.0)
    np.testing.assert_allclose(float(l1(pred, target)), 2.0 * 3.5, rtol=1e-6)
    np.testing.assert_allclose(float(l1(pred, target, weight=_t([0.0, 1.0]))), 0.0, atol=1e-7)
    # beta 0.5: |d| 0.25 -> 0.5 * 0.0625 / 0.5 = 0.0625
    np.testing.assert_allclose(float(SmoothL1Loss(beta=0.5)(_t([0.25]), _t([0.0]))), 0.0625, rtol=1e-6)


def test_smooth_l1_rejects_negative_beta():
    with pytest.raises(ConfigError, match="beta"):
        SmoothL1Loss(beta=-1)


def test_giou_by_hand():
    pred = _t([[0, 0, 2, 2], [0, 0, 1, 1], [0, 0, 2, 2]])
    target = _t([[0, 0, 2, 2], [2, 0, 3, 1], [1, 1, 3, 3]])
    # identical -> 1; disjoint unit boxes with hull 3x1, union 2 -> 0 - 1/3;
    # overlap 1, union 7, hull 9 -> 1/7 - 2/9
    expected = np.array([1.0, -1.0 / 3.0, 1.0 / 7.0 - 2.0 / 9.0])
    np.testing.assert_allclose(giou(pred, target).numpy(), expected, rtol=1e-6)
    per_box = GIoULoss(reduction="none")(pred, target).numpy()
    np.testing.assert_allclose(per_box, 1 - expected, rtol=1e-6)
    total = GIoULoss(loss_weight=2.0)(pred, target, weight=_t([1, 1, 0]), normalizer=4.0)
    np.testing.assert_allclose(float(total), 2.0 * (0 + 4.0 / 3.0) / 4.0, rtol=1e-6)
    np.testing.assert_allclose(float(GIoULoss(reduction="mean")(pred, target)), (1 - expected).mean(), rtol=1e-6)


def test_giou_rejects_bad_reduction():
    with pytest.raises(ConfigError, match="reduction"):
        GIoULoss(reduction="avg")


def test_focal_loss_gradient_matches_finite_difference():
    logits = _t([[0.3, -1.2]])
    logits.stop_gradient = False
    targets = _t([[1.0, 0.0]])
    loss = FocalLoss()(logits, targets)
    loss.backward()
    eps = 1e-3
    base = np.array([[0.3, -1.2]])
    num = []
    for j in range(2):
        up, down = base.copy(), base.copy()
        up[0, j] += eps
        down[0, j] -= eps
        t = targets.numpy()
        num.append((_np_focal(up, t, 0.25, 2).sum() - _np_focal(down, t, 0.25, 2).sum()) / (2 * eps))
    np.testing.assert_allclose(logits.grad.numpy()[0], num, rtol=1e-3)


@pytest.mark.parametrize("gamma", [2.0, 1.5, 0.0])
def test_focal_loss_class_id_targets_match_numpy(gamma):
    rng = np.random.default_rng(1)
    logits = (rng.normal(size=(7, 4)) * 4).astype("float32")
    logits[0, 1] = 40.0  # far in the tail: must stay finite
    ids = np.array([1, 4, -1, 0, 3, 4, 2])  # 4 (= C) and -1 are background
    onehot = np.zeros((7, 4), "float32")
    for i, c in enumerate(ids):
        if 0 <= c < 4:
            onehot[i, c] = 1
    valid = np.array([1, 1, 1, 0, 1, 1, 1], "float32")
    expected = (_np_focal(logits.astype(np.float64), onehot, 0.25, gamma) * valid[:, None]).sum() / 3.0
    fl = FocalLoss(alpha=0.25, gamma=gamma)
    sparse = fl(_t(logits), _t(ids, "int64"), weight=_t(valid), normalizer=3.0)
    dense = fl(_t(logits), _t(onehot), weight=_t(valid), normalizer=3.0)
    np.testing.assert_allclose(float(sparse), expected, rtol=1e-5)
    np.testing.assert_allclose(float(dense), expected, rtol=1e-5)


def test_focal_loss_class_id_gradient_matches_dense():
    rng = np.random.default_rng(2)
    logits_np = rng.normal(size=(5, 3)).astype("float32")
    ids = np.array([0, 3, 2, 3, 1])
    grads = []
    for target in (_t(ids, "int64"), _t(np.eye(4, dtype="float32")[ids][:, :3])):
        logits = _t(logits_np)
        logits.stop_gradient = False
        FocalLoss()(logits, target, weight=_t([1, 1, 0, 1, 1])).backward()
        grads.append(logits.grad.numpy())
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-4, atol=1e-7)
    assert np.abs(grads[0][2]).max() == 0.0  # the ignored row


def test_focal_loss_class_id_rejects_elementwise_weight():
    with pytest.raises(ValueError, match="per row"):
        FocalLoss()(_t([[0.0, 1.0]]), _t([0], "int64"), weight=_t([[1.0, 1.0]]))
