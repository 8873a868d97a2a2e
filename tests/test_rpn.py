"""RPN: anchor targets and sampling, proposal generation (numpy reference), head loss values."""

from __future__ import annotations

import math

import numpy as np
import paddle
import pytest

from ppdet_retina.core.workspace import ConfigError
from ppdet_retina.modeling.anchors import AnchorGenerator
from ppdet_retina.modeling.heads.rpn_head import RPNHead
from ppdet_retina.modeling.proposal_generator import ProposalGenerator, flatten_rois
from ppdet_retina.modeling.targets import RPNTargetAssign, gt_masks, matched_on_positives

from conftest import tiny_faster_rcnn_config

# ----------------------------------------------------------------------------- targets

# IoU with gt0 = [0,0,10,10]: 1.0, 0.8, 0.5, 0.2, 0; a5 has IoU 0.6 with gt1 = [40,40,50,50]
# (its best anchor), a6 has 64 / 116 = 0.55 with gt1.
_ANCHORS = np.array([[0, 0, 10, 10], [0, 0, 10, 8], [0, 0, 10, 5], [0, 0, 10, 2],
                     [20, 20, 30, 30], [40, 40, 50, 46], [42, 40, 52, 48]], np.float32)
_GTS = np.array([[0, 0, 10, 10], [40, 40, 50, 50]], np.float32)


def _assign(assigner, anchors, gts, valid, crowd=None):
    labels, matched = assigner(paddle.to_tensor(anchors), paddle.to_tensor(gts), paddle.to_tensor(valid),
                               None if crowd is None else paddle.to_tensor(crowd))
    return labels.numpy(), matched.numpy()


def test_rpn_targets_bands_and_best_anchor_per_gt():
    assigner = RPNTargetAssign(use_random=False)
    labels, matched = _assign(assigner, _ANCHORS, _GTS[None], np.array([[True, True]]))
    # >= 0.7 positive, < 0.3 negative, between ignored; a5 is gt1's best anchor, so positive at 0.6.
    np.testing.assert_array_equal(labels[0], [1, 1, -1, 0, 0, 1, -1])
    assert matched[0][[0, 1, 5]].tolist() == [0, 0, 1]


def test_gt_masks_from_padding_and_crowd_flags():
    inputs = {"gt_bbox": paddle.zeros([2, 3, 4]),
              "pad_gt_mask": paddle.to_tensor([[[1.0], [1.0], [0.0]], [[1.0], [0.0], [0.0]]]),
              "is_crowd": paddle.to_tensor([[[0], [1], [1]], [[0], [0], [1]]], dtype="int32")}
    valid, crowd = gt_masks(inputs)
    assert valid.numpy().tolist() == [[True, False, False], [True, False, False]]
    # A crowd flag on a padding row is not a crowd box.
    assert crowd.numpy().tolist() == [[False, True, False], [False, False, False]]
    valid, crowd = gt_masks({"gt_bbox": paddle.zeros([1, 2, 4])})
    assert valid.numpy().tolist() == [[True, True]] and crowd.numpy().tolist() == [[False, False]]


def test_matched_on_positives_boxes_and_classes():
    gt = paddle.to_tensor([[[0, 0, 2, 2], [1, 1, 5, 5]], [[3, 3, 4, 4], [0, 0, 0, 0]]], dtype="float32")
    matched = paddle.to_tensor([[1, 0, 1], [0, 1, 0]], dtype="int64")
    positive = paddle.to_tensor([[True, False, True], [True, False, False]])
    fallback = paddle.full([2, 3, 4], -1.0)
    out = matched_on_positives(gt, matched, positive, fallback).numpy()
    assert out[0].tolist() == [[1, 1, 5, 5], [-1] * 4, [1, 1, 5, 5]]
    assert out[1].tolist() == [[3, 3, 4, 4], [-1] * 4, [-1] * 4]
    classes = paddle.to_tensor([[7, 8], [9, 0]], dtype="int64")
    assert matched_on_positives(classes, matched, positive, 80).numpy().tolist() == [[8, 80, 8], [9, 80, 80]]


def test_rpn_targets_padded_and_crowd_gts_make_no_positive():
    assigner = RPNTargetAssign(use_random=False)
    gts = np.stack([_GTS, _GTS])
    valid = np.array([[True, True], [False, False]])  # image 1: gt0 padding, gt1 crowd
    labels, _ = _assign(assigner, _ANCHORS, gts, valid, crowd=np.array([[False, False], [False, True]]))
    np.testing.assert_array_equal(labels[0], [1, 1, -1, 0, 0, 1, -1])
    np.testing.assert_array_equal(labels[1], [0] * 7)


def test_rpn_targets_ignore_thresh_ignores_anchors_on_crowd():
    assigner = RPNTargetAssign(use_random=False, ignore_thresh=0.58)
    gts = _GTS[None]
    labels, _ = _assign(assigner, _ANCHORS, gts, np.array([[True, False]]), crowd=np.array([[False, True]]))
    # a5 (IoU 0.6 with the crowd box) is ignored; a6 (0.55) is not, and with no valid gt
    # near it, it is negative; gt0's anchors as before.
    np.testing.assert_array_equal(labels[0], [1, 1, -1, 0, 0, -1, 0])


def _grid_boxes(n: int, offset: float) -> np.ndarray:
    xs = np.arange(n, dtype=np.float32) * 3 + offset
    return np.stack([xs, np.zeros(n), xs + 10, np.full(n, 10.0)], 1).astype(np.float32)


@pytest.mark.parametrize("use_random", [True, False])
def test_rpn_sampling_caps(use_random):
    # 300 anchors on the gt (IoU 1) and 400 far away: 128 positives and 128 negatives are drawn.
    anchors = np.concatenate([np.tile([[0, 0, 10, 10]], (300, 1)), _grid_boxes(400, 100)]).astype(np.float32)
    assigner = RPNTargetAssign(batch_size_per_im=256, fg_fraction=0.5, use_random=use_random)
    labels, _ = _assign(assigner, anchors, np.array([[[0, 0, 10, 10]]], np.float32), np.array([[True]]))
    assert (labels[0] == 1).sum() == 128 and (labels[0] == 0).sum() == 128
    if not use_random:  # then the lowest indices are taken
        assert np.nonzero(labels[0] == 1)[0].tolist() == list(range(128))
        assert np.nonzero(labels[0] == 0)[0].tolist() == list(range(300, 428))
    assert set(np.nonzero(labels[0] == 1)[0]) <= set(range(300))
    assert set(np.nonzero(labels[0] == 0)[0]) <= set(range(300, 700))


def test_rpn_sampling_fills_with_negatives_when_positives_are_few():
    anchors = np.concatenate([np.tile([[0, 0, 10, 10]], (10, 1)), _grid_boxes(400, 100)]).astype(np.float32)
    assigner = RPNTargetAssign(batch_size_per_im=256, fg_fraction=0.5)
    labels, _ = _assign(assigner, anchors, np.array([[[0, 0, 10, 10]]], np.float32), np.array([[True]]))
    assert (labels[0] == 1).sum() == 10 and (labels[0] == 0).sum() == 246


def test_rpn_target_assign_rejects_bad_overlaps():
    with pytest.raises(ConfigError):
        RPNTargetAssign(positive_overlap=0.3, negative_overlap=0.7)


# ----------------------------------------------------------------------------- proposals (numpy reference)

def _np_decode(deltas, anchors):
    wh = anchors[:, 2:] - anchors[:, :2]
    ctr = anchors[:, :2] + 0.5 * wh
    pred_ctr = deltas[:, :2] * wh + ctr
    pred_wh = np.exp(np.minimum(deltas[:, 2:], math.log(1000 / 16))) * wh
    return np.concatenate([pred_ctr - 0.5 * pred_wh, pred_ctr + 0.5 * pred_wh], 1)


def _np_iou(box, boxes):
    lt = np.maximum(box[:2], boxes[:, :2])
    rb = np.minimum(box[2:], boxes[:, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), 1)
    area = lambda b: np.prod(b[..., 2:] - b[..., :2], -1)
    return inter / (area(box) + area(boxes) - inter)


def _np_nms(boxes, scores, thresh):
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        order = order[1:][_np_iou(boxes[i], boxes[order[1:]]) <= thresh]
    return np.array(keep, np.int64)


def _np_proposals(scores, deltas, anchors, im_hw, pre, post, per_level_top, thresh, min_size):
    """One image: lists per level of scores [N], deltas [N, 4], anchors [N, 4]."""
    all_boxes, all_scores = [], []
    for s, d, a in zip(scores, deltas, anchors):
        order = np.argsort(-s, kind="stable")[:pre]
        boxes = _np_decode(d[order], a[order])
        boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, im_hw[1])
        boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, im_hw[0])
        wh = boxes[:, 2:] - boxes[:, :2]
        ok = (wh >= max(min_size, 1.0)).all(1)
        boxes, level_scores = boxes[ok], s[order][ok]
        keep = _np_nms(boxes, level_scores, thresh)[:per_level_top]
        all_boxes.append(boxes[keep])
        all_scores.append(level_scores[keep])
    boxes, scores = np.concatenate(all_boxes), np.concatenate(all_scores)
    order = np.argsort(-scores, kind="stable")[:post]
    return boxes[order], scores[order]


def _random_rpn_outputs(rng, batch, sizes, strides, anchor_sizes):
    gen = AnchorGenerator(anchor_sizes=anchor_sizes, aspect_ratios=[0.5, 1.0, 2.0], strides=strides)
    anchors = [a.numpy() for a in gen(sizes)]
    scores = [rng.randn(batch, a.shape[0]).astype(np.float32) for a in anchors]
    deltas = [(rng.randn(batch, a.shape[0], 4) * 0.3).astype(np.float32) for a in anchors]
    return scores, deltas, anchors


@pytest.mark.parametrize("topk_after_collect,min_size", [(True, 0.0), (False, 6.0)])
def test_proposals_match_numpy_reference(topk_after_collect, min_size):
    rng = np.random.RandomState(3)
    scores, deltas, anchors = _random_rpn_outputs(rng, 2, [(8, 8), (4, 4)], [8, 16], [[16], [32]])
    im_shape = np.array([[60, 64], [48, 40]], np.float32)
    gen = ProposalGenerator(pre_nms_top_n=60, post_nms_top_n=50, nms_thresh=0.5, min_size=min_size,
                            topk_after_collect=topk_after_collect)
    rois, roi_scores, valid = gen([paddle.to_tensor(s) for s in scores], [paddle.to_tensor(d) for d in deltas],
                                  [paddle.to_tensor(a) for a in anchors], paddle.to_tensor(im_shape))
    per_level = 60 if topk_after_collect else 50
    for b in range(2):
        ref_boxes, ref_scores = _np_proposals([s[b] for s in scores], [d[b] for d in deltas], anchors,
                                              im_shape[b], 60, 50, per_level, 0.5, min_size)
        n = int(valid[b].numpy().sum())
        assert n == len(ref_boxes) and n > 10
        assert valid[b].numpy()[:n].all()  # the valid ones come first
        np.testing.assert_allclose(rois[b].numpy()[:n], ref_boxes, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(roi_scores[b].numpy()[:n], ref_scores, rtol=1e-6)
        assert rois[b].numpy()[:n, 2].max() <= im_shape[b][1] and rois[b].numpy()[:n, 3].max() <= im_shape[b][0]
    flat, rois_num = flatten_rois(rois, valid)
    assert flat.shape[0] == int(rois_num.sum()) and rois_num.numpy().tolist() == valid.numpy().sum(1).tolist()


def test_single_level_proposals_match_paddle_generate_proposals():
    rng = np.random.RandomState(5)
    scores, deltas, anchors = _random_rpn_outputs(rng, 1, [(6, 6)], [16], [[24, 48]])
    num_anchors = 6
    im_shape = np.array([[90, 96]], np.float32)
    gen = ProposalGenerator(pre_nms_top_n=100, post_nms_top_n=40, nms_thresh=0.6, min_size=0.0)
    rois, _, valid = gen([paddle.to_tensor(scores[0])], [paddle.to_tensor(deltas[0])],
                         [paddle.to_tensor(anchors[0])], paddle.to_tensor(im_shape))
    # Paddle's op wants the maps [1, A, h, w] / [1, 4A, h, w] and anchors [h, w, A, 4].
    score_map = scores[0].reshape(1, 6, 6, num_anchors).transpose(0, 3, 1, 2)
    delta_map = deltas[0].reshape(1, 6, 6, num_anchors * 4).transpose(0, 3, 1, 2)
    anchor_map = anchors[0].reshape(6, 6, num_anchors, 4)
    ref, _, ref_num = paddle.vision.ops.generate_proposals(
        paddle.to_tensor(score_map), paddle.to_tensor(delta_map), paddle.to_tensor(im_shape),
        paddle.to_tensor(anchor_map), paddle.ones([6, 6, num_anchors, 4]), pre_nms_top_n=100,
        post_nms_top_n=40, nms_thresh=0.6, min_size=0.0, return_rois_num=True)
    n = int(valid.numpy().sum())
    assert n == int(ref_num.numpy()[0])
    np.testing.assert_allclose(rois[0].numpy()[:n], ref.numpy(), rtol=1e-5, atol=1e-3)


def test_proposal_generator_rejects_adaptive_nms():
    with pytest.raises(ConfigError, match="eta"):
        ProposalGenerator(eta=0.9)


# ----------------------------------------------------------------------------- head

def _tiny_rpn(in_channel=4, **target_kw):
    head = RPNHead(anchor_generator={"anchor_sizes": [[16]], "aspect_ratios": [1.0], "strides": [8]},
                   rpn_target_assign=RPNTargetAssign(use_random=False, **target_kw),
                   train_proposal={"pre_nms_top_n": 50, "post_nms_top_n": 20, "nms_thresh": 0.7},
                   test_proposal={"pre_nms_top_n": 50, "post_nms_top_n": 10, "nms_thresh": 0.7},
                   in_channel=in_channel)
    return head


def test_rpn_head_output_layout():
    head = _tiny_rpn()
    feats = [paddle.rand([2, 4, 8, 8]), paddle.rand([2, 4, 4, 4])]
    scores, deltas = head.predict(feats)
    assert [s.shape for s in scores] == [[2, 64], [2, 16]]
    assert [d.shape for d in deltas] == [[2, 64, 4], [2, 16, 4]]
    head.eval()
    rois, valid, losses = head(feats[:1], {"im_shape": paddle.to_tensor([[64.0, 64.0]] * 2)})
    assert losses is None and rois.shape == [2, 10, 4] and valid.shape == [2, 10]


def test_rpn_head_loss_values():
    """Zero weights, objectness bias c, delta bias 0: the losses follow from the targets alone."""
    head = _tiny_rpn(batch_size_per_im=8, fg_fraction=0.5)
    bias = 0.3
    for layer, value in ((head.objectness, bias), (head.deltas, 0.0)):
        layer.weight.set_value(paddle.zeros_like(layer.weight))
        layer.bias.set_value(paddle.full_like(layer.bias, value))
    gt = np.array([[[4, 4, 22, 20], [0, 0, 0, 0]]], np.float32)
    inputs = {"image": paddle.zeros([1, 3, 32, 32]), "im_shape": paddle.to_tensor([[32.0, 32.0]]),
              "gt_bbox": paddle.to_tensor(gt), "pad_gt_mask": paddle.to_tensor([[[1.0], [0.0]]])}
    head.train()
    _, _, losses = head([paddle.rand([1, 4, 4, 4])], inputs)

    # 16 x 16 anchors centred on (8x, 8y) of the 4 x 4 map, index 4y + x. IoU with the 18 x 16 gt
    # (area 288): anchors 6 [8, 0, 24, 16] and 10 [8, 8, 24, 24] overlap it by 14 x 12 = 168 of 376
    # (0.447), 5 [0, 0, 16, 16] and 9 [0, 8, 16, 24] by 12 x 12 = 144 of 400 (0.36), every other
    # anchor by at most 72 of 472 (0.15). None reaches 0.7, so the gt's best anchors, 6 and 10 (a
    # tie), are the positives; 5 and 9 lie between 0.3 and 0.7 and are ignored; of the 8 sampled,
    # the other 6 are the lowest-index negatives 0, 1, 2, 3, 4, 7.
    num_pos, num_neg = 2, 6
    norm = 8 * 1  # batch_size_per_im x images
    expected_cls = (num_pos * math.log1p(math.exp(-bias)) + num_neg * math.log1p(math.exp(bias))) / norm
    np.testing.assert_allclose(float(losses["loss_rpn_cls"]), expected_cls, rtol=1e-5)
    # gt centre (13, 12), 18 x 16; anchors 6 and 10 centred at (16, 8) and (16, 16), 16 x 16:
    # targets (-3/16, +-4/16, log(18/16), 0), and the predicted deltas are 0.
    expected_reg = 2 * (3 / 16 + 4 / 16 + math.log(18 / 16)) / norm
    np.testing.assert_allclose(float(losses["loss_rpn_reg"]), expected_reg, rtol=1e-5)

    labels, matched = head.rpn_target_assign(paddle.to_tensor(head.anchor_generator([(4, 4)])[0].numpy()),
                                             paddle.to_tensor(gt), paddle.to_tensor([[True, False]]))
    want = np.full(16, -1)
    want[[6, 10]] = 1
    want[[0, 1, 2, 3, 4, 7]] = 0
    np.testing.assert_array_equal(labels.numpy()[0], want)
    assert matched.numpy()[0][[6, 10]].tolist() == [0, 0]


# ----------------------------------------------------------------------------- export

def _match_rows(expected: np.ndarray, got: np.ndarray) -> None:
    """Each expected detection row has its own got row of the same class within tolerance
    (order-free: near-equal scores may come out in either order from different runtimes)."""
    assert expected.shape == got.shape
    free = np.ones(len(got), bool)
    for row in expected:
        cand = np.flatnonzero(free & (got[:, 0] == row[0]))
        assert len(cand), f"no class {row[0]} row left for {row}"
        err = np.abs(got[cand, 1:] - row[1:]).max(axis=1)
        best = cand[int(np.argmin(err))]
        assert abs(got[best, 1] - row[1]) < 1e-4 and np.abs(got[best, 2:] - row[2:]).max() < 1e-2, (row, got[best])
        free[best] = False


def test_faster_rcnn_dynamic_size_export_equals_dygraph(tmp_path):
    # Traced with unknown H and W, the proposal top-k sizes min(pre_nms_top_n, anchors) are
    # run-time values: P2 at 64x96 has 1152 anchors (> 100, capped), P6 only 18 (all kept).
    from ppdet_retina.core.workspace import create
    from ppdet_retina import runtime as rt
    from ppdet_retina.export import trace as E

    cfg = tiny_faster_rcnn_config(tmp_path)
    paddle.seed(0)
    model = create(cfg["architecture"], cfg)
    model.eval()
    static = paddle.jit.to_static(E.DeployModel(model), input_spec=E.input_spec(), full_graph=True)
    prefix = str(tmp_path / "model")
    paddle.jit.save(static, prefix)
    predictor = rt.create_predictor(prefix + ".json", prefix + ".pdiparams", cpu_threads=1)
    rng = np.random.default_rng(0)
    for h, w in ((64, 96), (96, 64)):
        image = rng.random((1, 3, h, w)).astype("float32")
        image[:, :, 10:40, 12:50] += 1.0
        feeds = {"image": image, "im_shape": np.array([[h, w]], "float32"),
                 "scale_factor": np.array([[1.0, 0.5]], "float32")}
        with paddle.no_grad():
            out = model({k: paddle.to_tensor(v) for k, v in feeds.items()})
        bbox, bbox_num = rt.run(predictor, feeds)[:2]
        np.testing.assert_array_equal(bbox_num, out["bbox_num"].numpy())
        assert bbox_num[0] > 10 and np.ptp(bbox[:, 1]) > 1e-3  # real, distinct detections
        _match_rows(out["bbox"].numpy(), bbox)
