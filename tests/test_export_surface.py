"""The export surface: one export mode from the config, what each architecture exports, the preprocessing
entries the transforms describe, and infer_cfg.yml's mode fields. No tracing here (tests/test_export.py
runs the exported graphs)."""

from __future__ import annotations

import textwrap

import numpy as np
import paddle
import pytest

from ppdet_retina.core.workspace import ConfigError, create, load_config
from ppdet_retina.export import paddle_inference as E
from ppdet_retina.modeling.architectures.export_surface import EXPORT_MODES, Exportable
from ppdet_retina.modeling.architectures.faster_rcnn import FasterRCNN

CFG = textwrap.dedent("""
    architecture: RetinaNet
    num_classes: 3
    metric: COCO
    worker_num: 0
    RetinaNet: {backbone: ResNet, neck: FPN, head: RetinaHead}
    ResNet: {depth: 18, variant: b, norm_type: bn, freeze_norm: false, freeze_at: -1,
             return_idx: [1, 2, 3], width_mult: 0.25}
    FPN: {out_channel: 16, extra_stage: 2, has_extra_convs: true, use_c5: false}
    RetinaHead:
      conv_feat: {name: RetinaFeat, feat_in: 16, feat_out: 16, num_convs: 1}
      anchor_generator: {name: RetinaAnchorGenerator, strides: [8.0, 16.0, 32.0, 64.0, 128.0]}
      nms: {name: MultiClassNMS, nms_top_k: 500, keep_top_k: 50, score_threshold: 0.1, nms_threshold: 0.6}
      nms_pre: 300
    TestReader:
      sample_transforms:
        - Decode: {}
        - Resize: {target_size: [96, 128], keep_ratio: true, interp: 2}
        - NormalizeImage: {is_scale: true, mean: [0.5, 0.4, 0.3], std: [0.2, 0.25, 0.3]}
        - Permute: {}
      batch_transforms: [{PadBatch: {pad_to_stride: 32}}]
      batch_size: 1
""")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("surface") / "tiny.yml"
    path.write_text(CFG)
    cfg = load_config(str(path))
    paddle.seed(0)
    model = create("RetinaNet", cfg)
    model.eval()
    return cfg, model


@pytest.mark.parametrize("section, flag, mode", [
    ({}, None, "detect"),
    ({"post_process": True, "nms": True}, None, "detect"),
    ({"nms": False}, None, "candidates"),
    ({"post_process": False}, None, "raw"),
    ({"benchmark": True}, None, "raw"),
    ({"benchmark": True, "nms": False}, None, "raw"),
    ({}, True, "raw"),  # --raw_outputs
    ({"post_process": False}, False, "detect"),  # the flag wins over post_process
    ({"post_process": False, "benchmark": True}, False, "raw"),  # ... but not over benchmark
])
def test_export_mode_maps_paddledetection_keys(section, flag, mode):
    assert E.export_mode({"export": section}, flag) == mode


def test_export_mode_refuses_unknown_keys():
    with pytest.raises(ConfigError, match=r"export: unknown key\(s\) \['nms_inside'\]"):
        E.export_mode({"export": {"nms_inside": False}})


def test_mode_fields_derive_from_export_mode():
    assert [E.mode_fields(m) for m in EXPORT_MODES] == [
        {"export_mode": "detect", "post_process": True, "nms_inside": True},
        {"export_mode": "candidates", "post_process": True, "nms_inside": False},
        {"export_mode": "raw", "post_process": False, "nms_inside": False},
    ]
    with pytest.raises(ValueError, match="no_nms"):
        E.mode_fields("no_nms")


def test_deploy_model_needs_an_exportable_model_and_a_supported_mode(tiny):
    with pytest.raises(ConfigError, match="Linear does not say what it exports"):
        E.DeployModel(paddle.nn.Linear(2, 2))
    with pytest.raises(ConfigError, match=r"export mode must be one of \['detect', 'candidates', 'raw'\]"):
        E.DeployModel(tiny[1], "no_nms")
    # Faster R-CNN's NMS runs per RoI inside the second stage: detect only, and the error says which keys.
    rcnn = FasterRCNN.__new__(FasterRCNN)
    assert isinstance(rcnn, Exportable) and rcnn.export_modes == ("detect",)
    with pytest.raises(ConfigError, match=r"FasterRCNN exports only \['detect'\], not 'candidates'.*export\.nms"):
        rcnn.check_export_mode("candidates")


def test_preprocess_entries_come_from_the_transforms(tiny):
    assert E.preprocess_entries(tiny[0]) == [
        {"type": "Resize", "target_size": [96, 128], "keep_ratio": True, "interp": 2},
        {"type": "NormalizeImage", "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "is_scale": True,
         "norm_type": "mean_std"},
        {"type": "Permute"},
        {"type": "PadStride", "stride": 32},
    ]
    cfg = dict(tiny[0])
    cfg["TestReader"] = {**cfg["TestReader"],
                         "sample_transforms": [{"Decode": {}}, {"RandomFlip": {"prob": 0.5}}, {"Permute": {}}]}
    with pytest.raises(ConfigError, match=r"TestReader\.sample_transforms: 'RandomFlip' cannot be exported"):
        E.preprocess_entries(cfg)


def test_infer_cfg_per_mode(tiny):
    cfg, model = tiny
    nms = {"score_threshold": 0.1, "nms_top_k": 500, "keep_top_k": 50, "nms_threshold": 0.6, "normalized": True,
           "nms_eta": 1.0, "background_label": -1}
    detect = E.build_infer_cfg(cfg, E.DeployModel(model, "detect"))
    assert (detect["export_mode"], detect["post_process"], detect["nms_inside"]) == ("detect", True, True)
    assert detect["outputs"] == ["bbox", "bbox_num"] and "NMS" not in detect and "anchors" not in detect
    cand = E.build_infer_cfg(cfg, E.DeployModel(model, "candidates"))
    assert (cand["export_mode"], cand["post_process"], cand["nms_inside"]) == ("candidates", True, False)
    assert cand["outputs"] == ["boxes", "scores"] and cand["NMS"] == nms and "anchors" not in cand
    raw = E.build_infer_cfg(cfg, E.DeployModel(model, "raw"))
    assert (raw["export_mode"], raw["post_process"], raw["nms_inside"]) == ("raw", False, False)
    assert raw["outputs"] == [f"cls_logits_{i}" for i in range(5)] + [f"bbox_deltas_{i}" for i in range(5)]
    assert raw["NMS"] == nms
    anchors = raw["anchors"]
    assert (anchors["num_classes"], anchors["num_anchors"], anchors["nms_pre"]) == (3, 9, 300)
    assert anchors["strides"] == [8.0, 16.0, 32.0, 64.0, 128.0] and anchors["box_weights"] == [1.0] * 4
    # Anchor 4 of P3 (size 32 * 2^(1/3), ratio 1) is a square centred on 0.
    half = 0.5 * 32 * 2 ** (1 / 3)
    np.testing.assert_allclose(anchors["cell_anchors"][0][4], [-half, -half, half, half], atol=1e-5)


def _candidates_by_hand(raw, anchors_cfg, scale_factor):
    """NumPy from the raw outputs and infer_cfg.yml's ``anchors`` entry, as a runtime of a raw export would:
    per level the nms_pre anchors with the best class logit, decoded, divided by (sx, sy, sx, sy).
    Returns boxes [B, M, 4] and scores [B, C, M]."""
    num_classes, num_anchors = anchors_cfg["num_classes"], anchors_cfg["num_anchors"]
    weights = np.asarray(anchors_cfg["box_weights"])
    levels = len(anchors_cfg["strides"])
    boxes, logits = [[] for _ in scale_factor], [[] for _ in scale_factor]
    for level, stride in enumerate(anchors_cfg["strides"]):
        cls, reg = raw[level], raw[levels + level]
        b, _, h, w = cls.shape
        # Channel a*C + c of cell (y, x) is row (y*w + x)*A + a, column c.
        cls = cls.reshape(b, num_anchors, num_classes, h, w).transpose(0, 3, 4, 1, 2).reshape(b, -1, num_classes)
        reg = reg.reshape(b, num_anchors, 4, h, w).transpose(0, 3, 4, 1, 2).reshape(b, -1, 4) / weights
        offset = anchors_cfg["anchor_offset"] * stride
        ys, xs = np.meshgrid(np.arange(h) * stride + offset, np.arange(w) * stride + offset, indexing="ij")
        shifts = np.stack([xs, ys, xs, ys], axis=-1).reshape(-1, 1, 4)
        anchors = (shifts + np.asarray(anchors_cfg["cell_anchors"][level])[None]).reshape(-1, 4)
        for i, (sy, sx) in enumerate(scale_factor):
            keep = np.arange(len(anchors))
            if len(anchors) > anchors_cfg["nms_pre"]:
                keep = np.argsort(-cls[i].max(axis=1), kind="stable")[:anchors_cfg["nms_pre"]]
            a, d = anchors[keep], reg[i, keep]
            size = a[:, 2:] - a[:, :2]
            centre = a[:, :2] + 0.5 * size + d[:, :2] * size
            pred = np.exp(np.minimum(d[:, 2:], np.log(1000.0 / 16))) * size
            boxes[i].append(np.concatenate([centre - 0.5 * pred, centre + 0.5 * pred], axis=1) / [sx, sy, sx, sy])
            logits[i].append(cls[i, keep])
    scores = 1 / (1 + np.exp(-np.stack([np.concatenate(x) for x in logits])))
    return np.stack([np.concatenate(x) for x in boxes]), scores.transpose(0, 2, 1)


def test_deploy_model_outputs_match_a_runtime_written_from_infer_cfg(tiny):
    cfg, model = tiny
    rng = np.random.default_rng(0)
    inputs = {"image": paddle.to_tensor(rng.normal(size=(2, 3, 64, 96)).astype("float32")),
              "im_shape": paddle.to_tensor([[64.0, 96.0], [60.0, 90.0]]),
              "scale_factor": paddle.to_tensor([[0.5, 0.5], [2.0, 1.5]])}
    with paddle.no_grad():
        boxes, scores = E.DeployModel(model, "candidates")(*inputs.values())
        raw = [t.numpy() for t in E.DeployModel(model, "raw")(*inputs.values())]
    # Raw: 9 anchors x 3 classes and 9 x 4 deltas per cell of P3-P7 on 64 x 96 (FPN's extra levels round up).
    sizes = [(8, 12), (4, 6), (2, 3), (1, 2), (1, 1)]
    assert [r.shape for r in raw] == [(2, 27, h, w) for h, w in sizes] + [(2, 36, h, w) for h, w in sizes]
    assert np.std(raw[0]) > 0.01 and np.std(raw[5]) > 0.01  # not a constant map
    # Candidates: P3 keeps its nms_pre = 300 best of 864 anchors, every other level all of its own.
    assert boxes.shape == [2, 300 + 216 + 54 + 18 + 9, 4] and scores.shape == [2, 3, 597]
    anchors_cfg = E.build_infer_cfg(cfg, E.DeployModel(model, "raw"))["anchors"]
    want_boxes, want_scores = _candidates_by_hand(raw, anchors_cfg, inputs["scale_factor"].numpy())
    np.testing.assert_allclose(boxes.numpy(), want_boxes, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(scores.numpy(), want_scores, rtol=1e-5, atol=1e-6)
