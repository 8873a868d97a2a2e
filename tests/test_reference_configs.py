"""Every PaddleDetection RetinaNet / Faster R-CNN config in shared/reference builds unchanged.

Model, LR schedule, optimizer and the three readers are built from each file as published; the
datasets are left out (COCO is not on this machine; test_data.py covers them with -o paths).
"""

import glob
import os

import paddle
import pytest

from ppdet_retina.core.workspace import create, load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(REPO, "..", "shared", "reference", "ppdet_configs")
CONFIGS = sorted(glob.glob(os.path.join(SHARED, "retinanet", "*.yml"))
                 + glob.glob(os.path.join(SHARED, "faster_rcnn", "*.yml")))


@pytest.mark.skipif(not CONFIGS, reason="shared/reference/ppdet_configs not present")
@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.basename(p) for p in CONFIGS])
def test_reference_config_builds(path):
    cfg = load_config(path)
    model = create(cfg["architecture"])
    depth = cfg["ResNet"]["depth"]
    assert type(model).__name__ == cfg["architecture"]
    # The backbone is the one the file asks for (depth and variant decide the block count and stem).
    blocks = {34: 16, 50: 16, 101: 33}[depth]
    assert sum(1 for name, _ in model.backbone.named_sublayers() if name.count(".") == 1
               and name.startswith("res")) == blocks
    assert (len(model.backbone.stem) == 3) == (cfg["ResNet"].get("variant", "b") == "d")
    lr = create("LearningRate")(steps_per_epoch=100)
    optimizer = create("OptimizerBuilder")(lr, model)
    assert isinstance(optimizer, paddle.optimizer.Momentum)
    warmup = cfg["LearningRate"]["schedulers"][1]
    assert lr.get_lr() == pytest.approx(cfg["LearningRate"]["base_lr"] * warmup.start_factor)
    for reader in ("TrainReader", "EvalReader", "TestReader"):
        assert create(reader).batch_size == cfg[reader]["batch_size"]
