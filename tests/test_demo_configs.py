"""The demo configs build from their files and run: one optimizer step and one eval forward each.

Shapes only, on a random 128x128 batch (the demo images' size), so a broken key, a channel
mismatch between sections or an optimizer / LR section that no longer builds fails here in
seconds instead of minutes into ``tools/train.py``. Training quality is the demos' own concern.
"""

from __future__ import annotations

import os

import numpy as np
import paddle
import pytest

from ppdet_retina.core.workspace import create, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIGS = ["configs/demo/retinanet_demo.yml", "configs/demo/faster_rcnn_demo.yml"]
SIZE = 128


def _batch(num_classes: int, num_images: int = 2) -> dict:
    """The batch dict the demo readers give: 2 images, up to 3 padded gts each (one padding row)."""
    rng = np.random.RandomState(0)
    gt_bbox = np.array([[[10, 12, 40, 50], [60, 60, 120, 110], [0, 0, 0, 0]],
                        [[30, 20, 50, 36], [0, 0, 0, 0], [0, 0, 0, 0]]], np.float32)[:num_images]
    pad = (gt_bbox[..., 2:3] > 0).astype(np.float32)
    gt_class = (rng.randint(0, num_classes, (num_images, 3, 1)) * pad).astype(np.int32)
    return {"image": paddle.to_tensor(rng.randn(num_images, 3, SIZE, SIZE).astype(np.float32)),
            "im_shape": paddle.to_tensor([[float(SIZE), float(SIZE)]] * num_images),
            "scale_factor": paddle.to_tensor([[1.0, 1.0]] * num_images),
            "gt_bbox": paddle.to_tensor(gt_bbox), "gt_class": paddle.to_tensor(gt_class),
            "pad_gt_mask": paddle.to_tensor(pad), "is_crowd": paddle.to_tensor(np.zeros_like(gt_class))}


@pytest.mark.parametrize("config", DEMO_CONFIGS)
def test_demo_config_trains_one_step_and_evaluates(config):
    cfg = load_config(os.path.join(ROOT, config))
    paddle.seed(0)
    model = create(cfg.architecture, cfg)
    # The config's own optimizer and schedule, as the trainer builds them (50 steps per epoch
    # stands in for the loader's length).
    lr = create("LearningRate", cfg)(50)
    optimizer = create("OptimizerBuilder", cfg)(lr, model)
    inputs = _batch(int(cfg.num_classes))
    # A stride list that disagrees with the neck still builds and runs (same number of levels),
    # with every anchor in the wrong place: only this check catches it.
    head = model.head if hasattr(model, "head") else model.rpn_head
    assert [float(s.stride) for s in model.neck.out_shape] == list(head.anchor_generator.strides)

    model.train()
    losses = model(inputs)
    assert "loss" in losses
    assert all(np.isfinite(float(v)) for v in losses.values()), {k: float(v) for k, v in losses.items()}
    trainable = [p for p in model.parameters() if not p.stop_gradient]
    before = [p.numpy().copy() for p in trainable]
    losses["loss"].backward()
    # Multi-process training needs every trainable parameter in every step's graph (else the gradient
    # all-reduce waits for a parameter one rank never produces).
    assert [p.name for p in trainable if p.grad is None] == []
    optimizer.step()
    optimizer.clear_grad()
    lr.step()
    assert any(not np.array_equal(b, p.numpy()) for b, p in zip(before, trainable)), "the step moved nothing"

    model.eval()
    with paddle.no_grad():
        out = model(inputs)
    bbox, bbox_num = out["bbox"].numpy(), out["bbox_num"].numpy()
    assert bbox_num.shape == (2,)
    assert bbox.ndim == 2 and bbox.shape[1] == 6 and bbox.shape[0] == int(bbox_num.sum())
    if bbox.shape[0]:
        assert np.all((bbox[:, 0] >= 0) & (bbox[:, 0] < int(cfg.num_classes)))
        assert np.all(bbox[:, 2:] >= 0) and np.all(bbox[:, 2:] <= SIZE)
