"""RetinaNet end to end on tiny inputs: build from config, train a few steps, eval output format."""

import os
import textwrap

import numpy as np
import paddle
import pytest

from ppdet_retina.core.workspace import ConfigError, create, load_config
from ppdet_retina.modeling.architectures.retinanet import RetinaNet

from conftest import REPO, ppdet_config, read_param_table

TINY_CFG = textwrap.dedent("""
    architecture: RetinaNet
    num_classes: 3
    RetinaNet:
      backbone: ResNet
      neck: FPN
      head: RetinaHead
    ResNet:
      depth: 18
      variant: b
      norm_type: bn
      freeze_norm: false
      freeze_at: -1
      return_idx: [1, 2, 3]
      width_mult: 0.25
    FPN:
      out_channel: 32
      extra_stage: 2
      has_extra_convs: true
      use_c5: false
    RetinaHead:
      conv_feat: {name: RetinaFeat, feat_in: 32, feat_out: 32, num_convs: 1}
      anchor_generator: {name: RetinaAnchorGenerator, strides: [8.0, 16.0, 32.0, 64.0, 128.0]}
      bbox_assigner: {name: MaxIoUAssigner, positive_overlap: 0.5, negative_overlap: 0.4, allow_low_quality: true}
      loss_class: {name: FocalLoss, gamma: 2.0, alpha: 0.25}
      loss_bbox: {name: SmoothL1Loss, beta: 0.0}
      nms: {name: MultiClassNMS, nms_top_k: 1000, keep_top_k: 100, score_threshold: 0.05, nms_threshold: 0.5}
""")


@pytest.fixture()
def tiny_model(tmp_path):
    path = tmp_path / "tiny_retinanet.yml"
    path.write_text(TINY_CFG)
    cfg = load_config(str(path))
    paddle.seed(0)
    return create("RetinaNet", cfg)


def _batch():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(2, 3, 64, 64)).astype("float32")
    gt_bbox = np.array([[[8, 8, 40, 48], [30, 4, 60, 30]], [[16, 20, 48, 44], [0, 0, 0, 0]]], "float32")
    return {
        "image": paddle.to_tensor(image),
        "im_shape": paddle.to_tensor([[64.0, 64.0], [64.0, 64.0]]),
        "scale_factor": paddle.to_tensor([[1.0, 1.0], [0.5, 0.5]]),
        "im_id": paddle.to_tensor([[1], [2]], dtype="int64"),
        "gt_bbox": paddle.to_tensor(gt_bbox),
        "gt_class": paddle.to_tensor([[[1], [2]], [[0], [0]]], dtype="int32"),
        "is_crowd": paddle.zeros([2, 2, 1], dtype="int32"),
        "pad_gt_mask": paddle.to_tensor([[[1.0], [1.0]], [[1.0], [0.0]]]),
    }


def test_builds_in_order_with_shapes(tiny_model):
    assert isinstance(tiny_model, RetinaNet)
    assert [s.stride for s in tiny_model.neck.out_shape] == [8, 16, 32, 64, 128]
    assert tiny_model.head.conv_feat.feat_in == 32
    assert tiny_model.head.cls_logits.weight.shape == [27, 32, 3, 3]
    names = set(tiny_model.state_dict())
    assert "head.conv_feat.cls_tower.0.conv.weight" in names and "head.bbox_deltas.bias" in names


def test_training_loss_goes_down_on_one_batch(tiny_model):
    batch = _batch()
    tiny_model.train()
    opt = paddle.optimizer.Adam(learning_rate=1e-3, parameters=tiny_model.parameters())
    history = []
    for _ in range(8):
        losses = tiny_model(batch)
        assert set(losses) == {"loss", "loss_cls", "loss_reg"}
        np.testing.assert_allclose(float(losses["loss"]), float(losses["loss_cls"]) + float(losses["loss_reg"]),
                                   rtol=1e-6)
        history.append(float(losses["loss"]))
        losses["loss"].backward()
        opt.step()
        opt.clear_grad()
    assert np.isfinite(history).all()
    # monotone on this batch at this rate; 0.5x leaves margin for platform noise
    assert history[-1] < 0.5 * history[0], history
    assert all(b < a for a, b in zip(history, history[1:])), history


def test_eval_output_format(tiny_model):
    tiny_model.eval()
    head = tiny_model.head
    # Make every anchor confident so that detections surely exist.
    head.cls_logits.bias.set_value(paddle.full_like(head.cls_logits.bias, 2.0))
    with paddle.no_grad():
        out = tiny_model(_batch())
    assert set(out) == {"bbox", "bbox_num"}
    bbox, bbox_num = out["bbox"].numpy(), out["bbox_num"].numpy()
    assert out["bbox_num"].dtype == paddle.int32
    assert bbox.ndim == 2 and bbox.shape[1] == 6
    assert bbox_num.shape == (2,) and bbox_num.sum() == bbox.shape[0]
    assert (bbox_num == 100).all()  # keep_top_k, with 3 classes x thousands of confident anchors
    assert set(np.unique(bbox[:, 0])) <= {0.0, 1.0, 2.0}
    assert (bbox[:, 1] >= 0.05).all() and (bbox[:, 1] <= 1.0).all()
    # Image 1 was resized by 0.5: the same detections as with scale 1, at twice
    # the coordinates (a power of two, so exact).
    same = _batch()
    same["scale_factor"] = paddle.ones([2, 2])
    with paddle.no_grad():
        unscaled = tiny_model(same)["bbox"].numpy()
    np.testing.assert_array_equal(bbox[:100], unscaled[:100])
    np.testing.assert_array_equal(bbox[100:, :2], unscaled[100:, :2])
    np.testing.assert_allclose(bbox[100:, 2:], 2 * unscaled[100:, 2:], rtol=1e-6)


def test_eval_requires_scale_factor(tiny_model):
    tiny_model.eval()
    batch = _batch()
    del batch["scale_factor"]
    with pytest.raises(ValueError, match="scale_factor"):
        with paddle.no_grad():
            tiny_model(batch)


def test_missing_stage_is_a_config_error(tmp_path):
    path = tmp_path / "bad.yml"
    path.write_text(TINY_CFG.replace("  neck: FPN\n", ""))
    cfg = load_config(str(path))
    with pytest.raises(ConfigError, match="neck"):
        create("RetinaNet", cfg)


def test_our_r50_config_matches_paddledetection_parameter_table():
    cfg = load_config(os.path.join(REPO, "configs/retinanet/_base_/retinanet_r50_fpn.yml"))
    model = create("RetinaNet", cfg)
    ours = sum(int(np.prod(v.shape)) for v in model.state_dict().values())
    table = read_param_table("retinanet")
    assert len(table) == len(model.state_dict()) == 301
    # The whole table (so a truncated copy fails): 33.9M numbers, BN running statistics included.
    assert ours == sum(int(np.prod(dims)) for dims in table.values()) == 33_893_044
    assert table["head.retina_cls.weight"] == model.head.cls_logits.weight.shape == [720, 256, 3, 3]
    assert table["head.retina_reg.weight"] == model.head.bbox_deltas.weight.shape == [36, 256, 3, 3]


def test_our_r50_config_equals_paddledetection_config():
    """Everything but names and paths equals PaddleDetection's retinanet_r50_fpn_1x_coco.yml."""
    theirs = load_config(ppdet_config("retinanet/retinanet_r50_fpn_1x_coco.yml"))
    ours = load_config(os.path.join(REPO, "configs/retinanet/retinanet_r50_fpn_1x.yml"))
    assert set(ours) == set(theirs)
    for key in set(ours) - {"LearningRate", "config_path", "filename", "weights"}:
        assert ours[key] == theirs[key], key
    assert ours.LearningRate.base_lr == theirs.LearningRate.base_lr
    assert [vars(s) for s in ours.LearningRate.schedulers] == [vars(s) for s in theirs.LearningRate.schedulers]
