"""ONNX export of the demo RetinaNet, as a user runs it: tools/export_model.py --onnx, then onnxruntime
plus the NMS settings infer_cfg.yml records must give the Paddle export's detections.

The model is the demo config's (GroupNorm towers, whose epsilon paddle2onnx 2.1.0 misconverts) with
weights set to behave like a trained detector instead of a fresh one: a few anchors score above 0.9,
most are background, boxes move off their anchors. Training the demo long enough for that takes
minutes; these weights give the same kind of outputs in no time.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import paddle
import pytest
import yaml

from ppdet_retina import openvino_runtime as ovrt
from ppdet_retina import runtime as rt
from ppdet_retina.core.workspace import create, load_config
from ppdet_retina.data.shapes import ensure_demo_dataset
from ppdet_retina.export import paddle_inference as E
from ppdet_retina.export import onnx as O
from ppdet_retina.modeling.nms import MultiClassNMS

from conftest import load_script

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "configs", "demo", "retinanet_demo.yml")

needs_onnx = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("paddle2onnx", "onnxruntime", "onnx")),
    reason="paddle2onnx, onnx and onnxruntime are test extras (pip install -e .[test])")


def _export_tool():
    return load_script("tools/export_model.py", "export_model_tool")


def _confident(model) -> None:
    """Weights whose outputs look trained: logits spread over ~+-15 with a -6 bias, so a few anchors
    score > 0.9 and most < 0.01, and box deltas of ~0.5 (the GN towers normalise their inputs)."""
    rng = np.random.default_rng(0)
    head = model.head
    with paddle.no_grad():
        head.cls_logits.weight.set_value(rng.normal(scale=0.3, size=head.cls_logits.weight.shape).astype("float32"))
        head.cls_logits.bias.set_value(np.full(head.cls_logits.bias.shape, -6.0, "float32"))
        head.bbox_deltas.weight.set_value(rng.normal(scale=0.02, size=head.bbox_deltas.weight.shape).astype("float32"))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    data = ensure_demo_dataset(str(root / "shapes"), num_train=1, num_val=2)
    overrides = [f"{k}.dataset_dir={data}" for k in ("TrainDataset", "EvalDataset", "TestDataset")]
    cfg = load_config(DEMO, overrides)
    paddle.seed(0)
    model = create("RetinaNet", cfg)
    model.eval()
    _confident(model)
    weights = str(root / "confident.pdparams")
    paddle.save(model.state_dict(), weights)
    return {"root": root, "data": data, "overrides": overrides, "cfg": cfg, "model": model, "weights": weights}


def _image_feeds(cfg, data):
    """The first val image through the demo's TestReader (128 px, the ONNX input size)."""
    dataset = create("EvalDataset", cfg)
    batch = next(iter(create("TestReader", cfg)(dataset, 0)))
    return {k: batch[k].numpy()[:1] for k in ("image", "im_shape", "scale_factor")}


@needs_onnx
def test_export_tool_writes_a_checked_onnx_that_gives_paddles_detections(demo, capfd):
    out = demo["root"] / "inference"
    tool = _export_tool()
    tool.main(["-c", DEMO, "-o", f"weights={demo['weights']}", *demo["overrides"], "--onnx",
               "--output_dir", str(out)])
    model_dir = out / "retinanet_demo"
    with open(model_dir / "infer_cfg.yml") as f:
        info = yaml.safe_load(f)
    entry = info["onnx"]
    # What infer_cfg.yml says is what the file holds (read back with the onnx package).
    written = O.describe(str(model_dir / "model.onnx"))
    assert written == {"opset": 11, "inputs": ["image", "im_shape", "scale_factor"], "outputs": ["boxes", "scores"]}
    assert {k: entry[k] for k in ("opset", "inputs", "outputs")} == written
    assert entry["input_size"] == [128, 128] and entry["nms_inside"] is False
    assert entry["nms"] == {"score_threshold": 0.05, "nms_top_k": 1000, "keep_top_k": 100, "nms_threshold": 0.5,
                            "normalized": True, "nms_eta": 1.0, "background_label": -1}
    # The export checked a random image and the first val image, both passing.
    assert entry["check"].startswith("ok: random: ") and "; 000001.png: " in entry["check"]

    # A plain onnxruntime session on the file logs nothing (paddle2onnx's unused constants are removed).
    import onnxruntime

    capfd.readouterr()
    onnxruntime.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    assert "Removing initializer" not in capfd.readouterr().err

    # As a runtime uses it: onnxruntime, then the recorded NMS, on a real image.
    feeds = _image_feeds(demo["cfg"], demo["data"])
    session = O.ort_session(str(model_dir / "model.onnx"))
    boxes, scores = session.run(None, feeds)
    assert boxes.shape == (1, 1720, 4) and scores.shape == (1, 3, 1720)  # 1000 of P3's 2304 + 576 + 144
    assert np.isfinite(boxes).all()
    bbox, bbox_num = O.multiclass_nms(boxes, scores, **entry["nms"])
    predictor = rt.create_predictor(str(model_dir / "model.json"), str(model_dir / "model.pdiparams"))
    expected = rt.run(predictor, feeds)
    assert 20 <= int(expected[1][0]) <= 100 and expected[0][:, 1].max() > 0.9  # confident detections
    result = O.compare_detections(expected[:2], (bbox, bbox_num))
    assert result["count"] == int(expected[1][0]) and result["box"] < 1e-2 and result["score_rel"] < 1e-3


@needs_onnx
def test_a_conversion_error_fails_the_export_with_the_numbers(demo, monkeypatch, capsys):
    # paddle2onnx 2.1.0's own GroupNorm epsilons (garbage) stand in for any conversion error.
    real = O.repair_norm_epsilons
    monkeypatch.setattr(O, "repair_norm_epsilons", lambda model, eps: real(model, [100.0] * len(eps)))
    out = demo["root"] / "failed"
    with pytest.raises(SystemExit) as exit_info:
        _export_tool().main(["-c", DEMO, "-o", f"weights={demo['weights']}", *demo["overrides"], "--onnx",
                             "--onnx_input_size", "64", "64", "--output_dir", str(out)])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "ONNX check on random (64x64)" in err and "relative (tolerance 0.001)" in err
    model_dir = out / "retinanet_demo"
    assert not (model_dir / "model.onnx").exists()  # no unchecked file is left behind
    assert (model_dir / "model.json").exists() and "onnx" not in yaml.safe_load((model_dir / "infer_cfg.yml").read_text())


def test_numpy_nms_equals_the_nms_op():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 100, size=(2, 300, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(1, 40, size=(2, 300, 2))], -1).astype(np.float32)
    scores = (rng.uniform(size=(2, 4, 300)) ** 3).astype(np.float32)
    scores[0, 0, :5] = 0.05  # exactly at the threshold: dropped by both (scores must exceed it)
    for settings in ({"keep_top_k": 100}, {"nms_top_k": 50, "keep_top_k": -1, "nms_threshold": 0.3},
                     {"keep_top_k": 10, "normalized": False}, {"keep_top_k": -1, "nms_eta": 0.9},
                     {"keep_top_k": 100, "background_label": 0}):
        kwargs = {"score_threshold": 0.05, **settings}
        op_bbox, op_num = MultiClassNMS(**kwargs)(paddle.to_tensor(boxes), paddle.to_tensor(scores))
        bbox, num = O.multiclass_nms(boxes, scores, **kwargs)
        np.testing.assert_array_equal(num, op_num.numpy())
        np.testing.assert_array_equal(bbox, op_bbox.numpy())  # same rows in the same order
        assert num.sum() > 0


def _dense_candidates(seed: int, images: int = 2, classes: int = 6, boxes_per_image: int = 400):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 200, size=(images, boxes_per_image, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(2, 60, size=(images, boxes_per_image, 2))], -1).astype(np.float32)
    return boxes, rng.uniform(size=(images, classes, boxes_per_image)).astype(np.float32)


def test_paddles_nms_op_from_numpy_equals_the_numpy_nms():
    boxes, scores = _dense_candidates(1)
    for settings in ({"keep_top_k": 100}, {"nms_top_k": 50, "keep_top_k": -1}, {"keep_top_k": 20, "nms_eta": 0.9},
                     {"keep_top_k": 100, "background_label": 2, "normalized": False}):
        expected = O.multiclass_nms(boxes, scores, **settings)
        bbox, num = ovrt.paddle_multiclass_nms(boxes, scores, **settings)
        assert bbox.dtype == np.float32 and num.dtype == np.int32 and num.sum() > 0
        np.testing.assert_array_equal(num, expected[1])
        np.testing.assert_array_equal(bbox, expected[0])
    empty, none = ovrt.paddle_multiclass_nms(boxes, np.zeros_like(scores))
    assert empty.shape == (0, 6) and none.tolist() == [0, 0]
    assert ovrt.nms_function()[0] == "paddle"


def test_best_first_nms_gives_the_full_nms_rows_and_falls_back_when_short():
    boxes, scores = _dense_candidates(2)  # 2400 pairs over 0.05 per image: the cut applies
    calls = []

    def counted(b, s, **kw):  # how many (box, class) pairs the NMS is given, the background excepted
        background = kw.get("background_label", -1)
        given = s if background < 0 else np.delete(s, background, axis=1)
        calls.append(int((given > kw.get("score_threshold", 0.05)).sum()))
        return O.multiclass_nms(b, s, **kw)

    for settings in ({"keep_top_k": 100}, {"keep_top_k": 30, "nms_top_k": 200}, {"keep_top_k": 50, "nms_eta": 0.8},
                     {"keep_top_k": 40, "background_label": 0}):
        calls.clear()
        bbox, num = ovrt.best_first_nms(counted, boxes, scores, settings)
        expected = O.multiclass_nms(boxes, scores, **settings)
        np.testing.assert_array_equal(num, expected[1])
        np.testing.assert_array_equal(bbox, expected[0])
        # One run, on at most factor * keep_top_k pairs per image (plus ties at the cut): not all 4800.
        assert len(calls) == 1 and calls[0] <= 2 * 4 * settings["keep_top_k"] + 2, calls
    # A strict IoU threshold drops most of the best pairs: fewer than keep_top_k survive the cut, so
    # the image runs again on all its pairs, and the rows are still the full NMS's.
    calls.clear()
    tight = {"keep_top_k": 300, "nms_threshold": 0.0}
    bbox, num = ovrt.best_first_nms(counted, boxes, scores, tight)
    expected = O.multiclass_nms(boxes, scores, **tight)
    np.testing.assert_array_equal(bbox, expected[0])
    assert len(calls) == 2 and calls[1] == int((scores > 0.05).sum())
    # keep_top_k -1 (keep all) leaves nothing to cut: a single full run.
    calls.clear()
    ovrt.best_first_nms(counted, boxes, scores, {"keep_top_k": -1})
    assert calls == [int((scores > 0.05).sum())]


def test_numpy_nms_keeps_nothing_below_the_threshold():
    bbox, num = O.multiclass_nms(np.zeros((1, 3, 4), np.float32), np.full((1, 2, 3), 0.01, np.float32))
    assert bbox.shape == (0, 6) and num.tolist() == [0]


def test_candidates_match_by_box_not_by_position():
    boxes = np.array([[[0, 0, 10, 10], [20, 20, 30, 30], [5, 5, 9, 9]]], np.float32)
    scores = np.array([[[0.9, 0.8, 0.01]]], np.float32)
    swapped = (boxes[:, [1, 0, 2]], scores[:, :, [1, 0, 2]])
    assert O.compare_candidates((boxes, scores), swapped, 0.05)["compared"] == 2
    moved = (boxes + np.float32(0.5), scores)
    with pytest.raises(O.OnnxCheckError, match=r"2 of the 2 Paddle candidates.*0\.5 px"):
        O.compare_candidates((boxes, scores), moved, 0.05)
    nan = boxes.copy()
    nan[0, 1] = np.nan
    with pytest.raises(O.OnnxCheckError, match="1 of 3 ONNX candidates have non-finite"):
        O.compare_candidates((boxes, scores), (nan, scores), 0.05)


@needs_onnx
def test_saturated_scores_are_reported_as_not_comparable(demo, tmp_path):
    # Untrained-looking weights: every logit far above 0, every score exactly 1.0 in float32, so
    # the top-k and the NMS may keep any of the tied anchors, in Paddle as in onnxruntime.
    model = create("RetinaNet", demo["cfg"])
    model.eval()
    with paddle.no_grad():
        model.head.cls_logits.bias.set_value(np.full(model.head.cls_logits.bias.shape, 40.0, "float32"))
    entry = O.export_onnx(E.DeployModel(model, "detect"), str(tmp_path), [64, 64])
    assert entry["check"] == ("not comparable: random: 756 of 756 candidates score exactly 1.0 (saturated "
                              "logits, as untrained weights give), so their order is arbitrary")
    assert os.path.isfile(tmp_path / "model.onnx")


def test_detections_may_differ_only_at_the_score_or_keep_top_k_cut():
    def rows(*r):
        return np.array(r, np.float32).reshape(-1, 6), np.array([len(r)], np.int32)

    paddle_dets = rows([0, 0.9, 0, 0, 10, 10], [1, 0.3, 20, 20, 30, 30], [1, 0.2, 40, 40, 50, 50])
    reordered = rows([1, 0.3, 20, 20, 30, 30], [1, 0.2, 40, 40, 50, 50], [0, 0.9, 0, 0, 10, 10])
    assert O.compare_detections(paddle_dets, reordered)["at_cut"] == 0
    # One more row whose score sits on the threshold in the last bits: accepted, and counted.
    on_threshold = rows(*paddle_dets[0].tolist(), [2, 0.0500001, 60, 60, 70, 70])
    assert O.compare_detections(paddle_dets, on_threshold, score_threshold=0.05)["at_cut"] == 1
    # keep_top_k = 3 reached on both sides: the last kept row may be another near-tied one.
    other_last = rows([0, 0.9, 0, 0, 10, 10], [1, 0.3, 20, 20, 30, 30], [2, 0.2000001, 80, 80, 90, 90])
    assert O.compare_detections(paddle_dets, other_last, keep_top_k=3)["at_cut"] == 2
    with pytest.raises(O.OnnxCheckError, match=r"Paddle's detection class 1 score 0\.20000 .* has no equal"):
        O.compare_detections(paddle_dets, other_last, keep_top_k=100)
    # A confident detection that moved is an error whatever the cuts.
    moved = rows([0, 0.9, 0.5, 0, 10.5, 10], [1, 0.3, 20, 20, 30, 30], [1, 0.2, 40, 40, 50, 50])
    with pytest.raises(O.OnnxCheckError, match=r"class 0 score 0\.90000 .*nearest \[0\.5, 0\.0, 10\.5, 10\.0\]"):
        O.compare_detections(paddle_dets, moved, score_threshold=0.05, keep_top_k=3)


def _sorted_block_candidates():
    """Two pyramid levels' top-k as a graph returns them: each block sorted by best score, the
    first block's last two anchors tied at 0.3 (the cut), the second block unsorted (nothing cut)."""
    best = [0.9, 0.7, 0.5, 0.3, 0.3, 0.8, 0.2, 0.6]
    boxes = np.array([[10 * i, 0, 10 * i + 8, 8] for i in range(len(best))], np.float32)[None]
    scores = np.zeros((1, 2, len(best)), np.float32)
    scores[0, 0] = best
    scores[0, 1] = np.array(best, np.float32) * np.float32(0.5)
    return boxes, scores


def test_anchors_swapped_at_a_top_k_cut_are_ties_and_detections_from_them_are_accepted():
    boxes, scores = _sorted_block_candidates()
    # The other runtime kept another anchor scoring the same 0.3 as the block's last one.
    other = boxes.copy()
    other[0, 4] = [500, 500, 520, 530]
    result = O.compare_candidates((boxes, scores), (other, scores), 0.05)
    assert result["at_cut"] == 1
    np.testing.assert_array_equal(result["tied"], [[40, 0, 48, 8], [500, 500, 520, 530]])
    nms = {"score_threshold": 0.05, "keep_top_k": 100, "nms_threshold": 0.5}
    paddle_dets, onnx_dets = O.multiclass_nms(boxes, scores, **nms), O.multiclass_nms(other, scores, **nms)
    assert int(paddle_dets[1][0]) == 16  # every anchor survives, in both classes
    with pytest.raises(O.OnnxCheckError, match=r"class 0 score 0\.30000 box \[40\.0, 0\.0, 48\.0, 8\.0\]"):
        O.compare_detections(paddle_dets, onnx_dets)
    assert O.compare_detections(paddle_dets, onnx_dets, tied=result["tied"])["at_cut"] == 4  # 2 rows each side


def test_a_perturbed_candidate_graph_still_fails():
    boxes, scores = _sorted_block_candidates()
    # A row in the middle of its block that moved: not a tie at a cut, whatever its score.
    moved = boxes.copy()
    moved[0, 1] += np.float32(0.5)
    with pytest.raises(O.OnnxCheckError, match=r"1 of the 8 Paddle candidates .* row 1 box \[10\.0, 0\.0, 18\.0, 8\.0\] "
                                               r"best score 0\.70000: nearest box differs by 0\.5 px"):
        O.compare_candidates((boxes, scores), (moved, scores), 0.05)
    # The block's last anchor replaced by one scoring differently: not a tie.
    other_boxes, other_scores = boxes.copy(), scores.copy()
    other_boxes[0, 4] = [500, 500, 520, 530]
    other_scores[0, :, 4] *= np.float32(0.9)
    with pytest.raises(O.OnnxCheckError, match=r"row 4 box \[40\.0, 0\.0, 48\.0, 8\.0\] best score 0\.30000"):
        O.compare_candidates((boxes, scores), (other_boxes, other_scores), 0.05)
    # Every score 1% off.
    with pytest.raises(O.OnnxCheckError, match=r"8 of the 8 Paddle candidates.*differs by 0 px \(tolerance 0\.0116\), "
                                               r"its scores by 0\.01 relative \(tolerance 0\.001\)"):
        O.compare_candidates((boxes, scores), (boxes, scores * np.float32(0.99)), 0.05)


def test_box_tolerance_grows_with_the_box():
    np.testing.assert_allclose(O.box_tolerance(np.array([[0, 0, 8, 8], [0, 0, 1000, 200]])), [0.0116, 0.21])
    boxes, scores = _sorted_block_candidates()
    big = np.array([[[0, 0, 1000, 600]]], np.float32)
    assert O.compare_candidates((big, scores[:, :, :1]), (big + np.float32(0.1), scores[:, :, :1]), 0.05)["box"] \
        == pytest.approx(0.1, abs=1e-4)
