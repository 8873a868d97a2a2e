"""MultiClassNMS and batched_nms against a numpy greedy, class-aware reference."""

import numpy as np
import paddle
import pytest

from ppdet_retina.core.workspace import ConfigError, create
from ppdet_retina.modeling.nms import MultiClassNMS, batched_nms


def np_iou(box, boxes):
    iw = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    ih = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = iw * ih
    union = (box[2] - box[0]) * (box[3] - box[1]) + (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) - inter
    return inter / union


def greedy_nms(boxes, scores, thresh):
    order = list(np.argsort(-scores, kind="stable"))
    keep = []
    while order:
        i = order.pop(0)
        keep.append(i)
        if order:
            ious = np_iou(boxes[i], boxes[order])
            order = [j for j, v in zip(order, ious) if v <= thresh]
    return keep


def reference_multiclass_nms(boxes, scores, score_thr, nms_top_k, keep_top_k, thresh):
    """One image: boxes [M, 4], scores [C, M] -> rows (class, score, box) sorted by (class, -score)."""
    rows = []
    for c in range(scores.shape[0]):
        idx = np.nonzero(scores[c] > score_thr)[0]
        idx = idx[np.argsort(-scores[c, idx], kind="stable")][:nms_top_k]
        for k in greedy_nms(boxes[idx], scores[c, idx], thresh):
            rows.append([c, scores[c, idx[k]], *boxes[idx[k]]])
    rows.sort(key=lambda r: -r[1])
    rows = rows[:keep_top_k]
    rows.sort(key=lambda r: (r[0], -r[1]))
    return np.array(rows, dtype=np.float32).reshape(-1, 6)


def random_inputs(seed, batch=2, boxes=60, classes=3):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 60, (batch, boxes, 2))
    wh = rng.uniform(4, 40, (batch, boxes, 2))
    b = np.concatenate([xy, xy + wh], -1).astype(np.float32)
    s = rng.uniform(0, 1, (batch, classes, boxes)).astype(np.float32)
    return b, s


@pytest.mark.parametrize("nms_top_k,keep_top_k,thresh", [(1000, 100, 0.5), (10, 15, 0.3), (-1, -1, 0.6)])
def test_multiclass_nms_matches_reference(nms_top_k, keep_top_k, thresh):
    b, s = random_inputs(5)
    nms = MultiClassNMS(score_threshold=0.3, nms_top_k=nms_top_k, keep_top_k=keep_top_k, nms_threshold=thresh)
    out, num = nms(paddle.to_tensor(b), paddle.to_tensor(s))
    out, num = out.numpy(), num.numpy()
    assert num.dtype == np.int32 and out.shape == (num.sum(), 6)
    start = 0
    for i in range(2):
        ref = reference_multiclass_nms(b[i], s[i], 0.3, nms_top_k if nms_top_k > 0 else 10 ** 9,
                                       keep_top_k if keep_top_k > 0 else 10 ** 9, thresh)
        got = out[start:start + num[i]]
        start += num[i]
        assert len(got) == len(ref)
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-5)


def test_classes_never_suppress_each_other_and_iou_has_no_plus_one():
    # IoU of these two boxes is 81/119 = 0.681 without +1 and 100/142 = 0.704 with +1.
    boxes = paddle.to_tensor([[[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0]]])
    same_class = paddle.to_tensor([[[0.9, 0.8]]])
    out, num = MultiClassNMS(nms_threshold=0.69)(boxes, same_class)
    assert num.numpy().tolist() == [2]  # 0.681 <= 0.69: both kept
    out, num = MultiClassNMS(nms_threshold=0.67)(boxes, same_class)
    np.testing.assert_allclose(out.numpy(), [[0, 0.9, 0, 0, 10, 10]], rtol=1e-6)
    two_classes = paddle.to_tensor([[[0.9, 0.0], [0.0, 0.8]]])
    out, num = MultiClassNMS(nms_threshold=0.1)(boxes, two_classes)
    np.testing.assert_allclose(out.numpy(), [[0, 0.9, 0, 0, 10, 10], [1, 0.8, 1, 1, 11, 11]], rtol=1e-6)


def test_empty_result_is_honest():
    b, s = random_inputs(6)
    out, num = MultiClassNMS(score_threshold=0.05)(paddle.to_tensor(b), paddle.to_tensor(s * 0.01))
    assert out.shape == [0, 6] and out.dtype == paddle.float32
    assert num.numpy().tolist() == [0, 0] and num.dtype == paddle.int32


def test_one_image_empty_other_not():
    b, s = random_inputs(7)
    s[0] *= 0.01
    out, num = MultiClassNMS(score_threshold=0.05, nms_threshold=0.5)(paddle.to_tensor(b), paddle.to_tensor(s))
    ref = reference_multiclass_nms(b[1], s[1], 0.05, 1000, 100, 0.5)
    assert num.numpy().tolist() == [0, len(ref)]
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-6, atol=1e-5)


def test_background_label_skipped():
    boxes = paddle.to_tensor([[[0.0, 0.0, 10.0, 10.0]]])
    scores = paddle.to_tensor([[[0.9], [0.7]]])
    out, _ = MultiClassNMS(background_label=0)(boxes, scores)
    np.testing.assert_allclose(out.numpy(), [[1, 0.7, 0, 0, 10, 10]], rtol=1e-6)
    out, _ = MultiClassNMS()(boxes, scores, background_label=1)
    np.testing.assert_allclose(out.numpy(), [[0, 0.9, 0, 0, 10, 10]], rtol=1e-6)


def test_config_and_bad_shapes():
    nms = create({"name": "MultiClassNMS", "nms_top_k": 1000, "keep_top_k": 100,
                  "score_threshold": 0.05, "nms_threshold": 0.5})
    assert (nms.nms_top_k, nms.keep_top_k, nms.normalized) == (1000, 100, True)
    # PaddleDetection's defaults, relied on by the Faster R-CNN config.
    default = MultiClassNMS()
    assert (default.nms_top_k, default.keep_top_k, default.normalized, default.score_threshold) == (-1, 100, True, 0.05)
    with pytest.raises(ConfigError, match="nms_threshold"):
        MultiClassNMS(nms_threshold=1.5)
    with pytest.raises(ValueError, match="scores"):
        nms(paddle.zeros([1, 5, 4]), paddle.zeros([1, 5]))


def test_batched_nms_matches_per_class_reference():
    rng = np.random.default_rng(8)
    xy = rng.uniform(0, 60, (80, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(4, 40, (80, 2))], -1).astype(np.float32)
    scores = rng.uniform(0, 1, 80).astype(np.float32)
    idxs = rng.integers(0, 4, 80)
    keep = batched_nms(paddle.to_tensor(boxes), paddle.to_tensor(scores), paddle.to_tensor(idxs), 0.5).numpy()
    ref = []
    for c in range(4):
        members = np.nonzero(idxs == c)[0]
        ref += [members[k] for k in greedy_nms(boxes[members], scores[members], 0.5)]
    ref = sorted(ref, key=lambda i: -scores[i])
    np.testing.assert_array_equal(keep, ref)
    assert batched_nms(paddle.zeros([0, 4]), paddle.zeros([0]), paddle.zeros([0], "int64"), 0.5).shape == [0]


def test_per_roi_class_boxes_with_rois_num_and_index():
    # Faster R-CNN form: a box per class per RoI, images delimited by rois_num.
    rng = np.random.default_rng(9)
    xy = rng.uniform(0, 60, (30, 2, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(4, 40, (30, 2, 2))], -1).astype(np.float32)
    scores = rng.uniform(0, 1, (30, 2)).astype(np.float32)
    nms = MultiClassNMS(score_threshold=0.2, nms_threshold=0.4, return_index=True)
    rois_num = paddle.to_tensor([12, 18], "int32")
    out, num, index = nms((paddle.to_tensor(boxes), rois_num), paddle.to_tensor(scores))
    out, num = out.numpy(), num.numpy()
    assert index.shape[0] == out.shape[0]
    start = 0
    for i, (lo, hi) in enumerate([(0, 12), (12, 30)]):
        rows = []
        for c in range(2):
            b, s = boxes[lo:hi, c], scores[lo:hi, c]
            idx = np.nonzero(s > 0.2)[0]
            for k in greedy_nms(b[idx], s[idx], 0.4):
                rows.append([c, s[idx[k]], *b[idx[k]]])
        rows.sort(key=lambda r: (r[0], -r[1]))
        got = out[start:start + num[i]]
        # This form orders rows by class then RoI, not by score: compare sorted.
        got = got[np.lexsort((-got[:, 1], got[:, 0]))]
        np.testing.assert_allclose(got, np.array(rows, np.float32), rtol=1e-6, atol=1e-5)
        start += num[i]


class _AnchorsDecodeNMS(paddle.nn.Layer):
    """Tiny graph using the shared ops the way a dense head's inference does."""

    def __init__(self):
        super().__init__()
        from ppdet_retina.modeling.anchors import RetinaAnchorGenerator
        self.anchor_generator = RetinaAnchorGenerator(strides=[8.0, 16.0])
        self.nms = MultiClassNMS(keep_top_k=5)

    def forward(self, image):
        from ppdet_retina.modeling.box_ops import clip_boxes, delta2bbox
        feats = [paddle.nn.functional.avg_pool2d(image, 8), paddle.nn.functional.avg_pool2d(image, 16)]
        anchors = paddle.concat(self.anchor_generator(feats), axis=0)
        boxes = delta2bbox(paddle.zeros_like(anchors) + 0.1, anchors)
        boxes = clip_boxes(boxes, paddle.to_tensor([32.0, 48.0])).unsqueeze(0)
        scores = paddle.ones([1, 2, 1]) * 0.5 + (anchors[:, 0] * 0.001).unsqueeze(0).unsqueeze(0)
        return self.nms(boxes, scores)


def test_export_with_dynamic_size_matches_dygraph(tmp_path):
    from paddle import inference
    model = _AnchorsDecodeNMS()
    spec = [paddle.static.InputSpec([1, 3, None, None], "float32")]
    paddle.jit.save(paddle.jit.to_static(model, input_spec=spec, full_graph=True), str(tmp_path / "m"))
    config = inference.Config(str(tmp_path / "m.json"), str(tmp_path / "m.pdiparams"))
    config.disable_glog_info()
    predictor = inference.create_predictor(config)
    handle = predictor.get_input_handle(predictor.get_input_names()[0])
    for shape in ([1, 3, 32, 48], [1, 3, 64, 32]):
        image = paddle.rand(shape)
        handle.copy_from_cpu(image.numpy())
        predictor.run()
        names = predictor.get_output_names()
        exported = predictor.get_output_handle(names[0]).copy_to_cpu()
        expected, expected_num = model(image)
        assert exported.shape == (5, 6)
        np.testing.assert_allclose(exported, expected.numpy(), rtol=1e-5, atol=1e-4)
