"""DenseHead: the two top-k paths, the early stop on both, decode_candidates, and a minimal subclass."""

import math
import re

import numpy as np
import paddle
import pytest

import ppdet_retina.modeling.dense_head as dh
from ppdet_retina.modeling.anchors import RetinaAnchorGenerator
from ppdet_retina.modeling.dense_head import DenseHead, flatten_level
from ppdet_retina.modeling.heads.retina_head import RetinaFeat, RetinaHead
from ppdet_retina.modeling.losses import FocalLoss, SmoothL1Loss
from ppdet_retina.modeling.matching import MaxIoUAssigner
from ppdet_retina.modeling.nms import MultiClassNMS
from ppdet_retina.modeling.trace_utils import max_over_classes


def _t(x, dtype="float32"):
    return paddle.to_tensor(np.asarray(x, dtype=dtype))


def _nms(score_threshold=0.05):
    return MultiClassNMS(score_threshold=score_threshold, nms_top_k=1000, keep_top_k=100, nms_threshold=0.5)


def _retina(num_classes, nms_pre, strides=(8.0,)):
    """A RetinaHead with 9 anchors per location (the sizes only matter for the decoded boxes)."""
    return RetinaHead(num_classes=num_classes, conv_feat=RetinaFeat(8, 8, 1),
                      anchor_generator=RetinaAnchorGenerator(strides=list(strides)),
                      bbox_assigner=MaxIoUAssigner(0.5, 0.4, True), loss_class=FocalLoss(),
                      loss_bbox=SmoothL1Loss(beta=0.0), nms=_nms(), nms_pre=nms_pre)


def _sparse_level(seed, num_classes, h, w, batch=2):
    """Logits where a few dozen of the 9*h*w anchors pass the 0.05 score threshold, and deltas."""
    rng = np.random.default_rng(seed)
    return (_t(rng.normal(-6.0, 1.5, size=(batch, 9 * num_classes, h, w))),
            _t(rng.normal(0.0, 0.2, size=(batch, 9 * 4, h, w))))


def _paddle_route(monkeypatch):
    """Make dygraph take the paddle-op path (the one traced for export and used on GPU)."""
    monkeypatch.setattr(dh, "numpy_view_ok", lambda x: False)


# --------------------------------------------------------------------------- top-k paths

@pytest.mark.parametrize("num_classes", [3, 16, 80, 83])
def test_max_over_classes_equals_numpy_max(num_classes):
    # Class counts below, at and beyond the 16-row windows of the earlier max-pool form, and COCO's 80.
    x = np.random.default_rng(num_classes).normal(size=(2, 3, num_classes, 37)).astype("float32")
    got = max_over_classes(_t(x)).numpy()
    assert got.shape == (2, 3, 1, 37)
    np.testing.assert_array_equal(got[:, :, 0], x.max(axis=2))


@pytest.mark.parametrize("floor", [None, 2.2], ids=["no_stop", "stop_at_logit_2.2"])
def test_numpy_top_anchors_equal_the_paddle_route(monkeypatch, floor):
    # Dygraph on CPU selects through zero-copy numpy views; the paddle-op route (used when
    # tracing or on GPU) must pick the same anchors with the same values, and stop alike.
    head = _retina(num_classes=7, nms_pre=40)
    rng = np.random.default_rng(5)
    logits = _t(rng.normal(size=(2, 9 * 7, 5, 6)))
    deltas = _t(rng.normal(size=(2, 9 * 4, 5, 6)))
    anchors = head.anchors([logits])[0]
    best = logits.numpy().reshape(2, 9, 7, 30).max(axis=2).reshape(2, -1)
    want_k = 40 if floor is None else int((best >= floor).sum(axis=1).max())
    assert floor is None or 5 < want_k < 40
    fast = head._select_level(logits, deltas, anchors, floor)
    _paddle_route(monkeypatch)
    graph = head._select_level(logits, deltas, anchors, floor)
    for got, want in zip(fast, graph):
        assert got.shape == want.shape == [2, want_k, got.shape[-1]]
        np.testing.assert_array_equal(got.numpy(), want.numpy())


def test_early_stop_counts_anchors_above_the_floor_on_both_paths():
    best = np.array([[3.0, -2.0, 0.5, -5.0], [-4.0, -4.0, -4.0, 1.0]], "float32")
    assert DenseHead._stop_early_numpy(best, 3, 0.0) == 2  # image 0 has 2 above 0, image 1 has 1
    assert DenseHead._stop_early(_t(best), 3, 0.0) == 2
    assert DenseHead._stop_early_numpy(best, 3, 5.0) == DenseHead._stop_early(_t(best), 3, 5.0) == 1  # >= 1
    assert DenseHead._stop_early_numpy(best, 1, -10.0) == DenseHead._stop_early(_t(best), 1, -10.0) == 1
    assert DenseHead._stop_early_numpy(best, 3, None) == DenseHead._stop_early(_t(best), 3, None) == 3


def test_candidate_logit_floor_is_the_threshold_logit():
    head = _retina(num_classes=2, nms_pre=10)
    assert head.candidate_logit_floor() == pytest.approx(math.log(0.05 / 0.95) - 1e-3, abs=1e-12)
    head.nms = _nms(score_threshold=0.0)  # nothing to stop at
    assert head.candidate_logit_floor() is None


@pytest.mark.parametrize("route", ["numpy", "paddle"])
def test_stopping_the_top_k_at_the_score_threshold_keeps_the_detections(monkeypatch, route):
    # Anchors whose best score is under the NMS threshold cannot become detections, so the
    # selection stops there on either path: same bbox rows as the full nms_pre top-k.
    if route == "paddle":
        _paddle_route(monkeypatch)
    head = _retina(num_classes=5, nms_pre=200)
    logits, deltas = _sparse_level(11, 5, 8, 8)
    best = logits.numpy().reshape(2, 9, 5, 64).max(axis=2).reshape(2, -1)
    needed = int((1 / (1 + np.exp(-best)) >= 0.05).sum(axis=1).max())
    assert 0 < needed < 200
    anchors = head.anchors([logits])[0]
    assert head._select_level(logits, deltas, anchors, head.candidate_logit_floor())[0].shape[1] == needed
    size, scale = _t([[64, 64]] * 2), _t([[1, 1]] * 2)
    short = head.post_process(([logits], [deltas]), size, scale)
    monkeypatch.setattr(type(head), "candidate_logit_floor", lambda self: None)
    full = head.post_process(([logits], [deltas]), size, scale)
    assert int(full[1].sum()) > 10
    np.testing.assert_array_equal(short[1].numpy(), full[1].numpy())
    np.testing.assert_allclose(short[0].numpy(), full[0].numpy(), rtol=0, atol=1e-4)


def test_decode_candidates_are_the_nms_input_without_the_stop():
    # Two levels, one above nms_pre (top-k) and one below (every anchor): M = 40 + 9*2*2.
    head = _retina(num_classes=3, nms_pre=40, strides=(8.0, 16.0))
    (l0, d0), (l1, d1) = _sparse_level(2, 3, 4, 4), _sparse_level(3, 3, 2, 2)
    size, scale = _t([[32, 32]] * 2), _t([[2.0, 0.5]] * 2)
    boxes, scores = head.decode_candidates(([l0, l1], [d0, d1]), size, scale)
    assert boxes.shape == [2, 40 + 36, 4] and scores.shape == [2, 3, 40 + 36]
    # Level 1 (all anchors, generator order): row j is anchor j's decoded box divided by (sx, sy).
    anchors1 = head.anchors([l0, l1])[1].numpy()
    expect = head.decode_boxes(flatten_level(d1, 4), _t(np.broadcast_to(anchors1, (2, 36, 4)))).numpy()
    np.testing.assert_allclose(boxes.numpy()[:, 40:], expect / np.array([0.5, 2.0, 0.5, 2.0]), rtol=1e-6)
    np.testing.assert_allclose(scores.numpy()[:, :, 40:],
                               1 / (1 + np.exp(-flatten_level(l1, 3).numpy().transpose(0, 2, 1))), rtol=1e-6)
    bbox, bbox_num = head.nms(boxes, scores)
    want_bbox, want_num = head.post_process(([l0, l1], [d0, d1]), size, scale)
    assert int(want_num.sum()) > 0
    np.testing.assert_array_equal(bbox_num.numpy(), want_num.numpy())
    np.testing.assert_allclose(bbox.numpy(), want_bbox.numpy(), atol=1e-4)


class _Detect(paddle.nn.Layer):
    """post_process on given logits and deltas, as a traceable layer with one parameter."""

    def __init__(self, head):
        super().__init__()
        self.head = head
        self.one = self.create_parameter([1], default_initializer=paddle.nn.initializer.Constant(1.0))

    def forward(self, logits, deltas, scale_factor):
        return self.head.post_process(([logits * self.one], [deltas]), scale_factor, scale_factor)


@pytest.mark.parametrize("fixed", [True, False], ids=["fixed_size", "dynamic_size"])
def test_traced_early_stop_equals_dygraph_in_the_predictor(tmp_path, fixed):
    # The traced graph cuts k at run time (a topk with a graph k, no If): its detections equal
    # dygraph's with and without the stop, at a fixed and at a dynamic input size.
    from ppdet_retina.runtime import create_predictor, run

    head = _retina(num_classes=5, nms_pre=200)
    head.eval()
    logits, deltas = _sparse_level(11, 5, 8, 8, batch=1)
    layer = _Detect(head)
    with paddle.no_grad():
        bbox, bbox_num = layer(logits, deltas, _t([[1, 1]]))
    hw = [8, 8] if fixed else [None, None]
    spec = [paddle.static.InputSpec([1, 45] + hw, "float32", "logits"),
            paddle.static.InputSpec([1, 36] + hw, "float32", "deltas"),
            paddle.static.InputSpec([1, 2], "float32", "scale_factor")]
    prefix = str(tmp_path / "detect")
    paddle.jit.save(paddle.jit.to_static(layer, input_spec=spec, full_graph=True), prefix)
    with open(prefix + ".json", encoding="utf-8") as f:
        ops = set(re.findall(r'"#":"1\.([a-z_0-9]+)"', f.read()))
    assert {"topk", "greater_equal", "multiclass_nms3"} <= ops and "if" not in ops
    feeds = {"logits": logits.numpy(), "deltas": deltas.numpy(), "scale_factor": np.ones((1, 2), "float32")}
    got_bbox, got_num = run(create_predictor(prefix + ".json", prefix + ".pdiparams"), feeds)[:2]
    assert int(bbox_num.numpy()[0]) > 10
    np.testing.assert_array_equal(got_num, bbox_num.numpy())
    np.testing.assert_allclose(got_bbox, bbox.numpy(), rtol=1e-5, atol=1e-3)


# --------------------------------------------------------------------------- the subclass contract

class _CentreHead(DenseHead):
    """The smallest dense head: one 1x1 conv per output, targets from the assigner, two losses."""

    def __init__(self, num_classes=2, channels=4):
        gen = RetinaAnchorGenerator(octave_base_scale=1, scales_per_octave=1, aspect_ratios=[1.0], strides=[8.0])
        super().__init__(num_classes, gen, MaxIoUAssigner(0.5, 0.4, True), _nms(), nms_pre=10,
                         weights=(1.0, 1.0, 1.0, 1.0))
        self.cls = paddle.nn.Conv2D(channels, self.num_anchors * num_classes, 1)
        self.box = paddle.nn.Conv2D(channels, self.num_anchors * 4, 1)

    def forward(self, feats):
        return [self.cls(f) for f in feats], [self.box(f) for f in feats]

    def losses(self, head_outs, assignment):
        logits = paddle.concat([flatten_level(x, self.num_classes) for x in head_outs[0]], axis=1)
        target = paddle.take_along_axis(assignment.gt_class, assignment.matched.astype("int64"), axis=1)
        onehot = paddle.nn.functional.one_hot(target, self.num_classes)
        pos = (assignment.labels == 1).astype("float32").unsqueeze(-1)
        return {"loss_cls": paddle.nn.functional.binary_cross_entropy_with_logits(logits, onehot * pos)}


def test_a_dense_head_writes_only_forward_and_losses():
    paddle.seed(1)
    head = _CentreHead()
    feats = [_t(np.random.default_rng(0).normal(size=(1, 4, 4, 4)))]
    # One gt exactly on the anchor at cell (1, 2) (an 8 x 8 square centred on (16, 8)): one positive.
    inputs = {"gt_bbox": _t([[[12, 4, 20, 12]]]), "gt_class": _t([[[1]]], "int32")}
    outs = head(feats)
    loss = head.get_loss(outs, inputs)["loss_cls"]
    logits = flatten_level(outs[0][0], 2).numpy()[0]  # [16, 2]
    target = np.zeros((16, 2), "float32")
    target[1 * 4 + 2, 1] = 1.0
    expect = np.mean(np.maximum(logits, 0) - logits * target + np.log1p(np.exp(-np.abs(logits))))
    np.testing.assert_allclose(float(loss), expect, rtol=1e-5)
    bbox, bbox_num = head.post_process(outs, _t([[32, 32]]), _t([[1, 1]]))
    assert bbox.shape[1] == 6 and int(bbox_num.sum()) == bbox.shape[0] <= 10 * 2
