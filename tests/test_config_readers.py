"""Every shipped config resizes alike in its three readers.

Eval and inference must see images at one scale (else eval.py and infer.py / deploy.py score
the same model differently), and training must teach the scales eval then uses: the same long
side with keep_ratio, the eval short side inside the training range.
"""

from __future__ import annotations

import glob
import os
from typing import List, Optional, Tuple

import pytest

from ppdet_retina.core.workspace import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Full configs only: _base_/ pieces, datasets/ and runtime.yml are parts the configs include.
CONFIGS = sorted(p for p in glob.glob(os.path.join(REPO, "configs", "**", "*.yml"), recursive=True)
                 if "_base_" not in p and os.sep + "datasets" + os.sep not in p
                 and os.path.basename(p) != "runtime.yml")

Sizes = Optional[Tuple[List[List[int]], bool, int]]


def _resize(cfg: dict, reader: str) -> Sizes:
    """(target sizes, keep_ratio, interp) of the reader's Resize / RandomResize, None without one."""
    found = []
    for op in cfg[reader]["sample_transforms"]:
        (name, args), = op.items()
        args = args or {}
        if name == "Resize":
            target = args["target_size"]
            found.append(([[target, target] if isinstance(target, int) else list(target)],
                          bool(args.get("keep_ratio", True)), int(args.get("interp", 1))))
        elif name == "RandomResize":
            targets = [[t, t] if isinstance(t, int) else list(t) for t in args["target_size"]]
            found.append((targets, bool(args.get("keep_ratio", True)), int(args.get("interp", 1))))
    assert len(found) <= 1, f"{reader} resizes {len(found)} times"
    return found[0] if found else None


def test_the_shipped_configs_are_all_found():
    names = sorted(os.path.relpath(p, REPO) for p in CONFIGS)
    assert names == ["configs/demo/faster_rcnn_demo.yml", "configs/demo/retinanet_demo.yml",
                     "configs/faster_rcnn/faster_rcnn_r50_fpn_1x.yml", "configs/faster_rcnn/faster_rcnn_vgg16_1x.yml",
                     "configs/retinanet/retinanet_r50_fpn_1x.yml",
                     "configs/retinanet/retinanet_r50_fpn_finetune_mydata.yml"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, REPO))
def test_eval_and_test_readers_resize_alike_and_training_matches(path):
    cfg = load_config(path)
    train, evaluate, test = (_resize(cfg, r) for r in ("TrainReader", "EvalReader", "TestReader"))
    assert evaluate == test, f"EvalReader resizes {evaluate}, TestReader {test}"
    if evaluate is None:
        assert train is None, f"eval and test use full-size images but TrainReader resizes {train}"
        return
    assert train is not None, f"eval and test resize to {evaluate[0][0]} but TrainReader keeps full size"
    (eval_size,), keep_ratio, _ = evaluate
    assert train[1] == keep_ratio, "TrainReader and EvalReader disagree on keep_ratio"
    if not keep_ratio:
        assert eval_size in train[0], f"eval size {eval_size} is not one of the training sizes {train[0]}"
        return
    shorts = [min(t) for t in train[0]]
    assert {max(t) for t in train[0]} == {max(eval_size)}, \
        f"training long sides {sorted({max(t) for t in train[0]})} differ from eval's {max(eval_size)}"
    assert min(shorts) <= min(eval_size) <= max(shorts), \
        f"eval short side {min(eval_size)} is outside the training range {min(shorts)}-{max(shorts)}"


def test_the_check_catches_the_old_demo_readers():
    # The demo as it was: full-size train and eval, TestReader at 128.
    cfg = {"TrainReader": {"sample_transforms": [{"Decode": {}}, {"RandomFlip": {"prob": 0.5}}]},
           "EvalReader": {"sample_transforms": [{"Decode": {}}, {"Permute": {}}]},
           "TestReader": {"sample_transforms": [{"Decode": {}},
                                                {"Resize": {"target_size": [128, 128], "keep_ratio": True}}]}}
    assert _resize(cfg, "EvalReader") != _resize(cfg, "TestReader")
    assert _resize(cfg, "TestReader") == ([[128, 128]], True, 1)
