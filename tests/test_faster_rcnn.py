"""Faster R-CNN end to end: PaddleDetection config and parameter names, a tiny model that learns, VGG16."""

from __future__ import annotations

import os

import numpy as np
import paddle
import pytest

from ppdet_retina.core.workspace import create, load_config
from ppdet_retina.io.ppdet_names import convert_ppdet_state_dict
from ppdet_retina.modeling.architectures.faster_rcnn import FasterRCNN

from conftest import REPO, ppdet_config, read_param_table, tiny_faster_rcnn_config

OUR_CONFIG = os.path.join(REPO, "configs/faster_rcnn/faster_rcnn_r50_fpn_1x.yml")
PPDET_CONFIG = "faster_rcnn/faster_rcnn_r50_fpn_1x_coco.yml"
MODEL_SECTIONS = ("architecture", "FasterRCNN", "ResNet", "FPN", "RPNHead", "BBoxHead", "BBoxAssigner",
                  "TwoFCHead", "BBoxPostProcess")


def _shapes(model):
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def test_ppdet_config_builds_with_the_published_parameters_and_settings():
    cfg = load_config(ppdet_config(PPDET_CONFIG))
    model = create(cfg.architecture, cfg)
    assert isinstance(model, FasterRCNN)
    assert convert_ppdet_state_dict(read_param_table("faster_rcnn"), _shapes(model).keys()) == _shapes(model)
    rpn = model.rpn_head
    assert (rpn.train_proposal.pre_nms_top_n, rpn.train_proposal.post_nms_top_n) == (2000, 1000)
    assert rpn.train_proposal.topk_after_collect and not rpn.test_proposal.topk_after_collect
    assert model.bbox_head.roi_extractor.spatial_scale[:4] == [0.25, 0.125, 0.0625, 0.03125]
    assert model.bbox_head.bbox_assigner.batch_size_per_im == 512


def test_our_r50_fpn_config_matches_ppdet_model_sections():
    theirs = load_config(ppdet_config(PPDET_CONFIG))
    ours = load_config(OUR_CONFIG)
    for key in MODEL_SECTIONS:
        assert ours[key] == theirs[key], key
    assert ours.LearningRate.base_lr == theirs.LearningRate.base_lr
    assert [vars(s) for s in ours.LearningRate.schedulers] == [vars(s) for s in theirs.LearningRate.schedulers]
    assert ours.epoch == theirs.epoch and ours.OptimizerBuilder == theirs.OptimizerBuilder


# ----------------------------------------------------------------------------- a tiny model

def _batch(num_images=1, empty_second=False):
    rng = np.random.RandomState(0)
    image = rng.rand(num_images, 3, 64, 64).astype(np.float32)
    image[:, :, 10:40, 12:50] += 1.0
    gt_bbox = np.zeros((num_images, 2, 4), np.float32)
    gt_bbox[:, 0] = [12, 10, 50, 40]
    gt_class = np.ones((num_images, 2, 1), np.int32)
    pad = np.zeros((num_images, 2, 1), np.float32)
    pad[:, 0] = 1
    crowd = np.zeros((num_images, 2, 1), np.int32)
    if num_images > 1:  # the second image also has a crowd box
        gt_bbox[1, 1], pad[1, 1], crowd[1, 1] = [0, 40, 20, 60], 1, 1
    if empty_second:  # or no real gt at all: only padding rows
        gt_bbox[1], pad[1], crowd[1] = 0, 0, 0
    return {"image": paddle.to_tensor(image), "im_shape": paddle.to_tensor([[64.0, 64.0]] * num_images),
            "scale_factor": paddle.to_tensor([[0.5, 0.5]] * num_images), "gt_bbox": paddle.to_tensor(gt_bbox),
            "gt_class": paddle.to_tensor(gt_class), "pad_gt_mask": paddle.to_tensor(pad),
            "is_crowd": paddle.to_tensor(crowd)}


LOSS_KEYS = ("loss_rpn_cls", "loss_rpn_reg", "loss_bbox_cls", "loss_bbox_reg")


def test_tiny_faster_rcnn_every_loss_goes_down(tmp_path):
    paddle.seed(0)
    cfg = tiny_faster_rcnn_config(tmp_path)
    model = create(cfg.architecture, cfg)
    inputs = _batch()
    opt = paddle.optimizer.SGD(learning_rate=0.02, parameters=model.parameters())
    model.train()
    history = []
    for _ in range(40):
        losses = model(inputs)
        history.append({k: float(v) for k, v in losses.items()})
        losses["loss"].backward()
        opt.step()
        opt.clear_grad()
    first, last = history[0], history[-1]
    np.testing.assert_allclose(first["loss"], sum(first[k] for k in LOSS_KEYS), rtol=1e-5)
    for key in LOSS_KEYS + ("loss",):
        assert last[key] < first[key], (key, first[key], last[key])
    assert last["loss_rpn_cls"] < 0.5 * first["loss_rpn_cls"]

    model.eval()
    out = model(inputs)
    bbox, bbox_num = out["bbox"].numpy(), out["bbox_num"].numpy()
    assert bbox.shape == (int(bbox_num.sum()), 6) and bbox_num.shape == (1,)
    # The learned object is class 1 at [12, 10, 50, 40] in the 64 px input, i.e. x2 in original pixels.
    best = bbox[bbox[:, 1].argmax()]
    assert best[0] == 1
    assert np.abs(best[2:] - [24, 20, 100, 80]).max() < 16


@pytest.mark.parametrize("empty_second", [False, True])
def test_batch_of_two_gives_every_parameter_a_gradient(tmp_path, empty_second):
    paddle.seed(1)
    cfg = tiny_faster_rcnn_config(tmp_path)
    model = create(cfg.architecture, cfg)
    model.train()
    losses = model(_batch(2, empty_second))
    assert all(np.isfinite(float(losses[k])) for k in LOSS_KEYS)
    losses["loss"].backward()
    missing = [p.name for p in model.parameters() if not p.stop_gradient and p.grad is None]
    assert missing == []


def test_vgg16_config_trains_and_evaluates_narrowed(tmp_path):
    cfg = load_config(os.path.join(REPO, "configs/faster_rcnn/faster_rcnn_vgg16_1x.yml"), [
        "VGG.channels=[4,4,8,8,8]", "TwoFCHead.out_channel=16", "num_classes=3",
        "RPNHead.anchor_generator.anchor_sizes=[16,32]", "RPNHead.train_proposal.pre_nms_top_n=200",
        "RPNHead.train_proposal.post_nms_top_n=50", "RPNHead.test_proposal.post_nms_top_n=20"])
    model = create(cfg.architecture, cfg)
    assert model.neck is None and model.backbone.out_shape[0].stride == 16
    assert type(model.bbox_head.roi_extractor).__name__ == "RoIPool"
    assert model.bbox_head.head.fc6.weight.shape == [8 * 7 * 7, 16]
    assert model.rpn_head.objectness.weight.shape == [6, 8, 1, 1]  # 2 sizes x 3 ratios
    # freeze_at 1: conv1 and conv2 get no gradient.
    assert all(p.stop_gradient for stage in model.backbone.stages[:2] for p in stage.parameters())
    model.train()
    losses = model(_batch(2))
    assert all(np.isfinite(float(losses[k])) for k in LOSS_KEYS)
    model.eval()
    out = model(_batch(1))
    assert out["bbox"].shape[1] == 6 and out["bbox_num"].shape == [1]
