"""ppdet_retina/runtime.py on its own: the export folder checks, preprocessing replay, output names.
(Running a predictor is tested against dygraph in test_export.py and test_default_engine.py.)"""

import os

import numpy as np
import pytest

from ppdet_retina import runtime as rt


def test_missing_export_files_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"infer_cfg\.yml' not found.*tools/export_model\.py"):
        rt.read_infer_cfg(str(tmp_path))
    (tmp_path / "model.json").write_text("{}")
    with pytest.raises(rt.PredictorError, match=r"model\.pdiparams' not found"):
        rt.model_files(str(tmp_path))


def test_preprocess_replay_and_batch_padding():
    ops = rt.build_preprocess([
        {"type": "Resize", "target_size": [64, 96], "keep_ratio": True, "interp": 1},
        {"type": "NormalizeImage", "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "is_scale": True},
        {"type": "Permute"}, {"type": "PadStride", "stride": 32}])
    image = np.full((50, 100, 3), 255, np.uint8)
    # keep_ratio: min(64 / 50, 96 / 100) = 0.96 -> 48 x 96
    chw, info = rt.preprocess(image, ops)
    assert chw.shape == (3, 48, 96)
    np.testing.assert_allclose(chw, 2.0)  # (1 - 0.5) / 0.25
    np.testing.assert_allclose(info["scale_factor"], [0.96, 0.96])
    np.testing.assert_allclose(info["im_shape"], [48.0, 96.0])
    feeds = rt.stack_batch([chw, chw[:, :20, :30]], [info, info], stride=ops[-1].stride)
    assert feeds["image"].shape == (2, 3, 64, 96)  # 48 rounded up to 64
    assert feeds["image"][1, :, 20:, :].sum() == 0 and feeds["image"][1, :, :20, :30].min() == 2.0
    with pytest.raises(rt.PredictorError, match="fixed 32x32 input"):
        rt.stack_batch([chw], [info], 32, fixed_size=[32, 32])
    with pytest.raises(rt.PredictorError, match=r"Preprocess\[0\] type 'RandomFlip'"):
        rt.build_preprocess([{"type": "RandomFlip"}])


def test_split_detections_and_output_names(tmp_path):
    bbox = np.array([[0, 0.9, 1, 1, 5, 5], [-1, 0, 0, 0, 0, 0], [2, 0.5, 2, 2, 4, 4]], np.float32)
    first, second = rt.split_detections(bbox, np.array([2, 1]))
    assert first.tolist() == [[0, np.float32(0.9), 1, 1, 5, 5]] and second[:, 0].tolist() == [2]
    used = set()
    names = [rt.unique_output_path(str(tmp_path), f, used) for f in ("a/x.jpg", "b/x.jpg", "c/x.tif")]
    assert [os.path.basename(n) for n in names] == ["x.jpg", "x_1.jpg", "x_2.jpg"]
