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


def test_deploy_model_outputs_are_the_models_answers(tiny):
    _, model = tiny
    rng = np.random.default_rng(0)
    inputs = {"image": paddle.to_tensor(rng.normal(size=(2, 3, 64, 96)).astype("float32")),
              "im_shape": paddle.to_tensor([[64.0, 96.0], [60.0, 90.0]]),
              "scale_factor": paddle.to_tensor([[0.5, 0.5], [2.0, 1.5]])}
    with paddle.no_grad():
        boxes, scores = E.DeployModel(model, "candidates")(*inputs.values())
        want_boxes, want_scores = model.candidates(inputs)
        raw = E.DeployModel(model, "raw")(*inputs.values())
        logits, deltas = model.head(model.neck(model.backbone(inputs)))
    assert boxes.shape[0] == 2 and boxes.shape[2] == 4 and scores.shape[:2] == [2, 3]
    np.testing.assert_array_equal(boxes.numpy(), want_boxes.numpy())
    np.testing.assert_array_equal(scores.numpy(), want_scores.numpy())
    assert len(raw) == 10
    for got, want in zip(raw, list(logits) + list(deltas)):
        np.testing.assert_array_equal(got.numpy(), want.numpy())
