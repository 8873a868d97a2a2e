"""Every PaddleDetection RetinaNet / Faster R-CNN config builds unchanged.

PaddleDetection's configs/ folder is found by tests/conftest.py (``PPDET_CONFIGS``); without it the
test skips and says how to enable it.

Model, LR schedule, optimizer and the three readers are built from each file as published; the
datasets are left out (COCO is not on this machine; test_data.py covers them with -o paths).
"""

import glob
import os

import paddle
import pytest

from ppdet_retina.core.workspace import create, load_config

from conftest import ppdet_configs_dir, ppdet_configs_missing_reason

ROOT = ppdet_configs_dir()
CONFIGS = sorted(os.path.relpath(p, ROOT) for arch in ("retinanet", "faster_rcnn")
                 for p in glob.glob(os.path.join(ROOT, arch, "*.yml"))) if ROOT else []


@pytest.mark.skipif(not CONFIGS, reason=ppdet_configs_missing_reason())
@pytest.mark.parametrize("relative", CONFIGS or ["none"], ids=[os.path.basename(p) for p in CONFIGS] or None)
def test_reference_config_builds(relative):
    cfg = load_config(os.path.join(ROOT, relative))
    model = create(cfg["architecture"], cfg)
    depth = cfg["ResNet"]["depth"]
    assert type(model).__name__ == cfg["architecture"]
    # The backbone is the one the file asks for (depth and variant decide the block count and stem).
    blocks = {34: 16, 50: 16, 101: 33}[depth]
    assert sum(1 for name, _ in model.backbone.named_sublayers() if name.count(".") == 1
               and name.startswith("res")) == blocks
    assert (len(model.backbone.stem) == 3) == (cfg["ResNet"].get("variant", "b") == "d")
    lr = create("LearningRate", cfg)(steps_per_epoch=100)
    optimizer = create("OptimizerBuilder", cfg)(lr, model)
    assert isinstance(optimizer, paddle.optimizer.Momentum)
    warmup = cfg["LearningRate"]["schedulers"][1]
    assert lr.get_lr() == pytest.approx(cfg["LearningRate"]["base_lr"] * warmup.start_factor)
    for reader in ("TrainReader", "EvalReader", "TestReader"):
        assert create(reader, cfg).batch_size == cfg[reader]["batch_size"]
