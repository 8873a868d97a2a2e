"""RetinaFeat / RetinaHead: init, layout, loss on hand-made cases, decoding."""

import math
import os

import numpy as np
import paddle
import pytest
import yaml

from ppdet_retina.core.workspace import ConfigError, create
from ppdet_retina.modeling.anchors import RetinaAnchorGenerator
from ppdet_retina.modeling.heads.retina_head import RetinaFeat, RetinaHead
from ppdet_retina.modeling.losses import FocalLoss, SmoothL1Loss
from ppdet_retina.modeling.matching import MaxIoUAssigner
from ppdet_retina.modeling.nms import MultiClassNMS
from ppdet_retina.modeling.shape_spec import ShapeSpec

from conftest import REPO

R50_FPN_CFG = os.path.join(REPO, "configs", "retinanet", "_base_", "retinanet_r50_fpn.yml")

LN2 = math.log(2.0)


def _head(num_classes=2, feat=8, num_convs=1, strides=(8.0,), one_anchor=True, nms_pre=1000, norm_type=None):
    """A small head; ``one_anchor`` gives one 8*stride/8-sized square anchor per location."""
    if one_anchor:
        gen = RetinaAnchorGenerator(octave_base_scale=1, scales_per_octave=1, aspect_ratios=[1.0],
                                    strides=list(strides))
    else:
        gen = RetinaAnchorGenerator(strides=list(strides))
    return RetinaHead(num_classes=num_classes,
                      conv_feat=RetinaFeat(feat, feat, num_convs, norm_type=norm_type),
                      anchor_generator=gen,
                      bbox_assigner=MaxIoUAssigner(0.5, 0.4, True),
                      loss_class=FocalLoss(alpha=0.25, gamma=2.0),
                      loss_bbox=SmoothL1Loss(beta=0.0),
                      nms=MultiClassNMS(score_threshold=0.05, nms_top_k=1000, keep_top_k=100, nms_threshold=0.5),
                      nms_pre=nms_pre)


def _t(x, dtype="float32"):
    return paddle.to_tensor(np.asarray(x, dtype=dtype))


def _batch(boxes, classes, valid=None, crowd=None):
    boxes = np.asarray(boxes, "float32")
    b, g = boxes.shape[:2]
    valid = np.ones((b, g), "float32") if valid is None else np.asarray(valid, "float32")
    crowd = np.zeros((b, g), "int32") if crowd is None else np.asarray(crowd, "int32")
    return {"gt_bbox": _t(boxes), "gt_class": _t(np.asarray(classes).reshape(b, g, 1), "int32"),
            "pad_gt_mask": _t(valid.reshape(b, g, 1)), "is_crowd": _t(crowd.reshape(b, g, 1), "int32")}


# --------------------------------------------------------------------------- construction

def test_bias_init_and_parameter_names():
    head = _head(num_classes=3, feat=32, num_convs=2, strides=(8.0, 16.0), one_anchor=False, norm_type="gn")
    np.testing.assert_allclose(head.cls_logits.bias.numpy(), np.full(27, -math.log(99.0)), rtol=1e-6)
    np.testing.assert_array_equal(head.bbox_deltas.bias.numpy(), np.zeros(36))
    assert head.cls_logits.weight.shape == [27, 32, 3, 3]
    assert 0.007 < float(head.cls_logits.weight.std()) < 0.013
    assert 0.007 < float(head.conv_feat.cls_tower[0].conv.weight.std()) < 0.013
    names = set(head.state_dict().keys())
    for tower in ("cls_tower", "box_tower"):
        for i in range(2):
            for leaf in ("conv.weight", "conv.bias", "norm.weight", "norm.bias"):
                assert f"conv_feat.{tower}.{i}.{leaf}" in names
    assert {"cls_logits.weight", "cls_logits.bias", "bbox_deltas.weight", "bbox_deltas.bias"} <= names


def test_feat_rejects_dcn_and_bad_gn_width():
    with pytest.raises(ConfigError, match="deformable conv is not supported"):
        RetinaFeat(use_dcn=True)
    with pytest.raises(ConfigError, match="multiple of 32"):
        RetinaFeat(16, 16, 1, norm_type="gn")
    with pytest.raises(ConfigError, match="norm_type"):
        RetinaFeat(norm_type="ln")


def test_forward_shapes_and_tower_math():
    head = _head(num_classes=3, feat=8, num_convs=1, strides=(8.0, 16.0), one_anchor=False)
    feats = [paddle.randn([2, 8, 8, 8]), paddle.randn([2, 8, 4, 4])]
    cls_logits, deltas = head(feats)
    assert [x.shape for x in cls_logits] == [[2, 27, 8, 8], [2, 27, 4, 4]]
    assert [x.shape for x in deltas] == [[2, 36, 8, 8], [2, 36, 4, 4]]
    # the tower is conv + ReLU, shared by the levels
    cls_feats, _ = head.conv_feat(feats)
    expect = paddle.nn.functional.relu(head.conv_feat.cls_tower[0].conv(feats[1]))
    np.testing.assert_allclose(cls_feats[1].numpy(), expect.numpy(), rtol=1e-5)


def test_r50_fpn_config_section_builds_and_from_config_checks_channels():
    with open(R50_FPN_CFG) as f:
        cfg = yaml.safe_load(f)
    head = create("RetinaHead", cfg=cfg, input_shape=[ShapeSpec(256, s) for s in (8, 16, 32, 64, 128)])
    assert head.cls_logits.weight.shape == [720, 256, 3, 3]
    assert head.bbox_deltas.weight.shape == [36, 256, 3, 3]
    assert head.loss_bbox.beta == 0.0 and head.bbox_assigner.negative_overlap == 0.4
    small = {"RetinaHead": {"conv_feat": {"name": "RetinaFeat", "feat_in": 16, "feat_out": 16, "num_convs": 1},
                            "anchor_generator": {"name": "RetinaAnchorGenerator", "strides": [8.0, 16.0]}},
             "num_classes": 2}
    with pytest.raises(ConfigError, match="feat_in: 32"):
        create("RetinaHead", cfg=small, input_shape=[ShapeSpec(32, 8), ShapeSpec(32, 16)])
    with pytest.raises(ConfigError, match="levels"):
        create("RetinaHead", cfg=small, input_shape=[ShapeSpec(16, s) for s in (8, 16, 32)])
    ok = create("RetinaHead", cfg=small, input_shape=[ShapeSpec(16, 8), ShapeSpec(16, 16)])
    assert ok.num_classes == 2 and ok.num_anchors == 9


# --------------------------------------------------------------------------- loss

def _one_level_outputs(num_classes, logits_value=0.0, h=4, w=4, batch=1):
    logits = paddle.full([batch, num_classes, h, w], logits_value, dtype="float32")
    deltas = paddle.zeros([batch, 4, h, w], dtype="float32")
    return logits, deltas


def test_loss_one_gt_equal_to_one_anchor():
    # One 8x8 anchor per cell of a 4x4 stride-8 map, centred at (8x, 8y): the
    # anchor at (y=1, x=2) is [12, 4, 20, 12]; its neighbours do not overlap it.
    head = _head(num_classes=2)
    logits, deltas_np = _one_level_outputs(2)[0], np.zeros((1, 4, 4, 4), "float32")
    deltas_np[0, :, 1, 2] = [0.3, -0.2, 0.1, 0.0]  # only the positive anchor's error counts
    deltas_np[0, :, 3, 3] = [5.0, 5.0, 5.0, 5.0]   # a negative: no box loss
    batch = _batch([[[12, 4, 20, 12]]], [[1]])
    losses = head.get_loss(([logits], [_t(deltas_np)]), batch)
    # p = 0.5 everywhere: the positive element costs 0.25 * 0.5^2 * ln2, each of
    # the other 16*2 - 1 elements 0.75 * 0.5^2 * ln2; one positive normalises.
    expect_cls = (0.25 + 31 * 0.75) * 0.25 * LN2
    np.testing.assert_allclose(float(losses["loss_cls"]), expect_cls, rtol=1e-5)
    np.testing.assert_allclose(float(losses["loss_reg"]), 0.6, rtol=1e-5)


def test_loss_ignores_padding_and_crowd_gts():
    head = _head(num_classes=2)
    logits, deltas = _one_level_outputs(2)
    plain = head.get_loss(([logits], [deltas]), _batch([[[12, 4, 20, 12]]], [[1]]))
    # A padding gt and a crowd gt, each exactly on another anchor: neither may
    # create a positive, so the loss is the same.
    extra = _batch([[[12, 4, 20, 12], [-4, -4, 4, 4], [4, 4, 12, 12]]], [[1, 0, 0]],
                   valid=[[1, 0, 1]], crowd=[[0, 0, 1]])
    with_extra = head.get_loss(([logits], [deltas]), extra)
    np.testing.assert_allclose(float(with_extra["loss_cls"]), float(plain["loss_cls"]), rtol=1e-6)
    np.testing.assert_allclose(float(with_extra["loss_reg"]), 0.0, atol=1e-7)


def test_loss_ignored_anchors_and_batch_normaliser():
    # gt [12, 4, 20, 8] (8x4) overlaps the anchor [12, 4, 20, 12] with IoU 0.5
    # (positive) and [12, -4, 20, 4] with IoU 0 -> negative. A 2nd image's gt
    # [0, 0, 8, 8] meets the anchor [-4, -4, 4, 4] with inter 16, union 112
    # -> IoU 1/7 < 0.4, but that is the gt's best IoU (4 anchors tie) -> all 4
    # positive by the low-quality rule. Total positives: 1 + 4.
    head = _head(num_classes=1)
    logits, deltas = _one_level_outputs(1, batch=2)
    batch = _batch([[[12, 4, 20, 8]], [[0, 0, 8, 8]]], [[0], [0]])
    losses = head.get_loss(([logits], [deltas]), batch)
    num_pos = 5
    expect_cls = (num_pos * 0.25 + (32 - num_pos) * 0.75) * 0.25 * LN2 / num_pos
    np.testing.assert_allclose(float(losses["loss_cls"]), expect_cls, rtol=1e-5)
    # targets: image 0 dy = (6 - 8) / 8, dh = log(4/8); image 1, each 8x8 anchor
    # is +-4 px off the gt in x and y: |dx| = |dy| = 0.5
    expect_reg = (0.25 + abs(math.log(0.5)) + 4 * (0.5 + 0.5)) / num_pos
    np.testing.assert_allclose(float(losses["loss_reg"]), expect_reg, rtol=1e-5)


def test_loss_matches_numpy_reference_multi_level():
    paddle.seed(3)
    head = _head(num_classes=3, feat=8, num_convs=1, strides=(8.0, 16.0), one_anchor=False)
    feats = [paddle.randn([2, 8, 8, 8]), paddle.randn([2, 8, 4, 4])]
    outs = head(feats)
    gts = np.array([[[4, 6, 40, 30], [30, 20, 60, 62]], [[10, 10, 50, 50], [0, 0, 0, 0]]], "float32")
    classes = np.array([[2, 0], [1, 0]])
    valid = np.array([[1, 1], [1, 0]], "float32")
    losses = head.get_loss(outs, _batch(gts, classes, valid=valid))
    anchors = np.concatenate([a.numpy() for a in head.anchor_generator([o for o in outs[0]])])
    cls_np = np.concatenate([o.numpy().reshape(2, 9, 3, o.shape[2], o.shape[3]).transpose(0, 3, 4, 1, 2)
                             .reshape(2, -1, 3) for o in outs[0]], axis=1)
    reg_np = np.concatenate([o.numpy().reshape(2, 9, 4, o.shape[2], o.shape[3]).transpose(0, 3, 4, 1, 2)
                             .reshape(2, -1, 4) for o in outs[1]], axis=1)
    exp_cls, exp_reg = _np_retina_loss(anchors, cls_np, reg_np, gts, classes, valid)
    np.testing.assert_allclose(float(losses["loss_cls"]), exp_cls, rtol=1e-4)
    np.testing.assert_allclose(float(losses["loss_reg"]), exp_reg, rtol=1e-4)


def _np_iou(a, b):
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
    area = lambda x: np.prod(x[:, 2:] - x[:, :2], axis=-1)
    return inter / (area(a)[:, None] + area(b)[None] - inter)


def _np_retina_loss(anchors, logits, deltas, gts, classes, valid):
    """Brute force: loop over images and anchors, as the paper describes it."""
    total_cls, total_reg, num_pos = 0.0, 0.0, 0
    for b in range(len(gts)):
        g = gts[b][valid[b] > 0]
        c = classes[b][valid[b] > 0]
        iou = _np_iou(anchors, g)
        best = iou.max(1)
        match = iou.argmax(1)
        labels = np.where(best >= 0.5, 1, np.where(best < 0.4, 0, -1))
        for j in range(len(g)):
            labels[(iou[:, j] == iou[:, j].max()) & (iou[:, j] > 0)] = 1
        for n in range(len(anchors)):
            if labels[n] < 0:
                continue
            target = np.zeros(logits.shape[-1])
            if labels[n] == 1:
                target[c[match[n]]] = 1
                num_pos += 1
                a, t = anchors[n], g[match[n]]
                aw, ah, tw, th = a[2] - a[0], a[3] - a[1], t[2] - t[0], t[3] - t[1]
                d = [((t[0] + t[2]) - (a[0] + a[2])) / 2 / aw, ((t[1] + t[3]) - (a[1] + a[3])) / 2 / ah,
                     np.log(tw / aw), np.log(th / ah)]
                total_reg += np.abs(deltas[b, n] - d).sum()
            p = 1 / (1 + np.exp(-logits[b, n].astype(np.float64)))
            pt = np.where(target == 1, p, 1 - p)
            at = np.where(target == 1, 0.25, 0.75)
            total_cls += (-at * (1 - pt) ** 2 * np.log(pt)).sum()
    norm = max(1, num_pos)
    return total_cls / norm, total_reg / norm


def test_no_gt_batch_keeps_every_parameter_in_the_graph():
    head = _head(num_classes=2, feat=8, num_convs=1, strides=(8.0, 16.0), one_anchor=False)
    feats = [paddle.randn([1, 8, 8, 8]), paddle.randn([1, 8, 4, 4])]
    batch = _batch([[[0, 0, 0, 0]]], [[0]], valid=[[0]])
    losses = head.get_loss(head(feats), batch)
    assert np.isfinite(float(losses["loss_cls"])) and float(losses["loss_cls"]) > 0
    assert float(losses["loss_reg"]) == 0.0
    (losses["loss_cls"] + losses["loss_reg"]).backward()
    for name, param in head.named_parameters():
        assert param.grad is not None, f"{name} got no gradient"
        assert np.isfinite(param.grad.numpy()).all(), name
    assert float(paddle.abs(head.bbox_deltas.weight.grad).sum()) == 0.0
    assert float(paddle.abs(head.cls_logits.weight.grad).sum()) > 0.0


def test_batch_without_gt_columns_is_all_negative():
    head = _head(num_classes=2)
    logits, deltas = _one_level_outputs(2)
    batch = {"gt_bbox": paddle.zeros([1, 0, 4]), "gt_class": paddle.zeros([1, 0, 1], dtype="int32")}
    losses = head.get_loss(([logits], [deltas]), batch)
    np.testing.assert_allclose(float(losses["loss_cls"]), 32 * 0.75 * 0.25 * LN2, rtol=1e-5)
    assert float(losses["loss_reg"]) == 0.0
    with pytest.raises(ValueError, match="gt_bbox"):
        head.get_loss(([logits], [deltas]), {"gt_class": batch["gt_class"]})


# --------------------------------------------------------------------------- inference

def _anchor_box(stride, a, y, x):
    """Anchor ``a`` (size-major, ratios [0.5, 1, 2], 3 octave scales) at cell (y, x), by the README's facts."""
    size = stride * 4 * 2 ** ((a // 3) / 3)
    ratio = [0.5, 1.0, 2.0][a % 3]
    w = math.sqrt(size * size / ratio)
    h = w * ratio
    cx, cy = x * stride, y * stride
    return np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])


@pytest.mark.parametrize("nms_pre", [1000, 10])
def test_post_process_places_raised_anchor_class(nms_pre):
    num_classes, A = 3, 9
    head = _head(num_classes=num_classes, strides=(8.0, 16.0), one_anchor=False, nms_pre=nms_pre)
    logits = [np.full((2, A * num_classes, 6, 6), -10.0, "float32"),
              np.full((2, A * num_classes, 3, 3), -10.0, "float32")]
    deltas = [np.zeros((2, A * 4, 6, 6), "float32"), np.zeros((2, A * 4, 3, 3), "float32")]
    # image 0: anchor 5, class 2 at (y=2, x=4) of level 0; image 1: anchor 1, class 0 at (1, 1) of
    # level 1, with a dx shift of 0.5 anchor widths.
    logits[0][0, 5 * num_classes + 2, 2, 4] = 3.0
    logits[1][1, 1 * num_classes + 0, 1, 1] = 2.0
    deltas[1][1, 4 * 1 + 0, 1, 1] = 0.5
    scale_factor = _t([[2.0, 0.5], [1.0, 1.0]])
    bbox, bbox_num = head.post_process(([_t(x) for x in logits], [_t(x) for x in deltas]),
                                       _t([[96, 96], [96, 96]]), scale_factor)
    np.testing.assert_array_equal(bbox_num.numpy(), [1, 1])
    box0 = _anchor_box(8, 5, 2, 4) / np.array([0.5, 2.0, 0.5, 2.0])
    box1 = _anchor_box(16, 1, 1, 1)
    box1 += 0.5 * (box1[2] - box1[0]) * np.array([1, 0, 1, 0])
    expect = np.array([[2, 1 / (1 + math.exp(-3.0)), *box0], [0, 1 / (1 + math.exp(-2.0)), *box1]])
    np.testing.assert_allclose(bbox.numpy(), expect, rtol=1e-5, atol=1e-3)


def test_post_process_topk_keeps_best_per_image():
    # nms_pre 2 on a 16-anchor level: the best two anchors of each image survive
    # the pre-selection; a third, weaker one does not, even above the threshold.
    head = _head(num_classes=1, nms_pre=2)
    logits = np.full((2, 1, 4, 4), -10.0, "float32")
    logits[0, 0, 0, 0], logits[0, 0, 3, 3], logits[0, 0, 2, 0] = 4.0, 3.0, 1.0
    logits[1, 0, 1, 1] = 2.0
    deltas = np.zeros((2, 4, 4, 4), "float32")
    bbox, bbox_num = head.post_process(([_t(logits)], [_t(deltas)]), _t([[32, 32]] * 2), _t([[1, 1]] * 2))
    np.testing.assert_array_equal(bbox_num.numpy(), [2, 1])
    np.testing.assert_allclose(bbox.numpy()[:, 2:], [[-4, -4, 4, 4], [20, 20, 28, 28], [4, 4, 12, 12]],
                               atol=1e-4)


def test_post_process_outside_no_grad():
    # An eval-mode forward without paddle.no_grad(): the head outputs track gradients, which
    # DLPack refuses; the selection must read detached views.
    # Zero output weights make the logits the biases: class 1 at logit 2 on every one of the
    # 6 x 6 stride-8 cells, zero deltas, so the detections are the anchors themselves, the
    # 8 x 8 squares centred on (8x, 8y). Neighbours only touch (IoU 0), so the NMS removes none;
    # with equal scores which cells pass nms_pre and the row order are not fixed: compare as sets.
    head = _head(num_classes=2, nms_pre=20)
    head.eval()
    for layer, bias in ((head.cls_logits, [-10.0, 2.0]), (head.bbox_deltas, [0.0] * 4)):
        layer.weight.set_value(paddle.zeros_like(layer.weight))
        layer.bias.set_value(_t(bias))
    feats = [_t(np.random.default_rng(3).normal(size=(1, 8, 6, 6)))]
    outs = head(feats)
    assert not outs[0][0].stop_gradient
    bbox, bbox_num = head.post_process(outs, _t([[48, 48]]), _t([[1, 1]]))
    # nms_pre 20 of 36 equal candidates: 20 survive the pre-selection.
    np.testing.assert_array_equal(bbox_num.numpy(), [20])
    bbox = bbox.numpy()
    np.testing.assert_array_equal(bbox[:, 0], np.ones(20))
    np.testing.assert_allclose(bbox[:, 1], np.full(20, 1 / (1 + math.exp(-2.0))), rtol=1e-6)
    cells = {(int(round((x1 + x2) / 16)), int(round((y1 + y2) / 16))) for x1, y1, x2, y2 in bbox[:, 2:]}
    assert len(cells) == 20 and cells <= {(x, y) for x in range(6) for y in range(6)}
    np.testing.assert_allclose(bbox[:, 4] - bbox[:, 2], np.full(20, 8.0), atol=1e-4)
    np.testing.assert_allclose(bbox[:, 5] - bbox[:, 3], np.full(20, 8.0), atol=1e-4)


# The top-k paths, the early stop and decode_candidates are DenseHead's: tests/test_dense_head.py.


class _PostProcessOnly(paddle.nn.Layer):
    """The head's post-processing on given head outputs, as a traceable layer."""

    def __init__(self, head):
        super().__init__()
        self.head = head
        # The predictor needs a parameter file; an exact 1.0 keeps the inputs unchanged.
        self.one = self.create_parameter([1], default_initializer=paddle.nn.initializer.Constant(1.0))

    def forward(self, logits0, logits1, deltas0, deltas1, scale_factor):
        bbox, bbox_num = self.head.post_process(([logits0 * self.one, logits1], [deltas0, deltas1]),
                                                scale_factor, scale_factor)
        return bbox, bbox_num


@pytest.mark.parametrize("fixed", [True, False], ids=["fixed_size", "dynamic_size"])
def test_traced_post_process_equals_dygraph_in_the_predictor(tmp_path, fixed):
    # 20 classes (two pooling passes) and nms_pre 50: level 0 (6x8x9 = 432 anchors) takes the
    # top-k path, level 1 (3x4x9 = 108) too, at fixed size from Python, at dynamic size with a
    # run-time k. The oneDNN predictor once dropped a scale fused into the integer index
    # arithmetic at fixed size (wrong logits gathered for classes > 0).
    from ppdet_retina.runtime import create_predictor, run

    num_classes, sizes = 20, [(6, 8), (3, 4)]
    head = _head(num_classes=num_classes, strides=(8.0, 16.0), one_anchor=False, nms_pre=50)
    head.eval()
    rng = np.random.default_rng(3)
    logits = [rng.normal(-1.0, 1.5, size=(1, 9 * num_classes, h, w)).astype("float32") for h, w in sizes]
    deltas = [rng.normal(0.0, 0.2, size=(1, 36, h, w)).astype("float32") for h, w in sizes]
    feeds = dict(zip(["logits0", "logits1", "deltas0", "deltas1"], logits + deltas))
    feeds["scale_factor"] = np.array([[2.0, 0.5]], "float32")
    layer = _PostProcessOnly(head)
    with paddle.no_grad():
        bbox, bbox_num = layer(*[_t(v) for v in feeds.values()])
    spec = [paddle.static.InputSpec([1, c, h if fixed else None, w if fixed else None], "float32", name)
            for name, c, (h, w) in zip(feeds, [9 * num_classes] * 2 + [36] * 2, sizes * 2)]
    spec.append(paddle.static.InputSpec([1, 2], "float32", "scale_factor"))
    prefix = str(tmp_path / "post")
    paddle.jit.save(paddle.jit.to_static(layer, input_spec=spec, full_graph=True), prefix)
    got_bbox, got_num = run(create_predictor(prefix + ".json", prefix + ".pdiparams"), feeds)[:2]
    assert int(bbox_num.numpy()[0]) > 20 and len(set(bbox.numpy()[:, 0])) > 5
    np.testing.assert_array_equal(got_num, bbox_num.numpy())
    order = lambda r: r[np.lexsort((-r[:, 1], r[:, 0]))]  # noqa: E731
    np.testing.assert_array_equal(order(got_bbox)[:, 0], order(bbox.numpy())[:, 0])
    np.testing.assert_allclose(order(got_bbox)[:, 1:], order(bbox.numpy())[:, 1:], rtol=1e-5, atol=1e-3)
