"""The openvino engine: RetinaNet's ONNX candidates graph on OpenVINO + Paddle's NMS op, in eval, infer,
training's evaluation and tools/deploy.py.

The model is test_default_engine's tiny RetinaNet with seeded, sharpened weights and a ground truth
made from its own detections (moved by a few pixels), so the mAP moves with any change of boxes or
scores. fp32 must give Paddle Inference's detections (scores within 1e-4, boxes within 0.01 px) and
its mAP; bf16's mAP must stay within 0.002 of fp32's.
"""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import paddle
import pytest
import yaml

from conftest import load_script
from ppdet_retina.core.workspace import ConfigError, create, load_config
from ppdet_retina.inference import engines as fast_engine
from ppdet_retina.inference.engines import choose_engine
from ppdet_retina.runtime import cpu_supports_bf16
from ppdet_retina.inference.evaluate import Evaluator
from ppdet_retina.training.trainer import Trainer
from test_default_engine import retina  # noqa: F401 - the shared seeded model fixture
from test_onnx import _confident

pytestmark = [pytest.mark.usefixtures("export_cache"), pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("openvino", "paddle2onnx", "onnx")),
    reason="openvino, paddle2onnx and onnx are test extras (pip install -e .[test,openvino])")]




def _evaluate(cfg_path: str, weights: str, engine: str, out: str, bf16: bool = False):
    cfg = load_config(cfg_path, [f"weights={weights}", f"output_eval={out}"])
    evaluator = Evaluator(cfg, engine, bf16)
    evaluator.load_weights(weights)
    return evaluator, evaluator.evaluate()


def _rows(path) -> np.ndarray:
    """bbox.json as [image id, category id, score, x, y, w, h] rows in a fixed order."""
    with open(path) as f:
        rows = np.array([[r["image_id"], r["category_id"], r["score"], *r["bbox"]] for r in json.load(f)])
    return rows[np.lexsort((-rows[:, 2], rows[:, 1], rows[:, 0]))]


def test_eval_on_openvino_equals_paddle_inference_and_is_cached(retina, tmp_path, export_cache):  # noqa: F811
    _, reference = _evaluate(retina.cfg_path, retina.weights, "paddle_inference", str(tmp_path / "pi"))
    trainer, fp32 = _evaluate(retina.cfg_path, retina.weights, "openvino", str(tmp_path / "ov"))
    assert trainer.engine._current == "openvino"
    assert 0.2 < reference["bbox"][0] < 0.95, reference["bbox"]
    np.testing.assert_allclose(fp32["bbox"], reference["bbox"], atol=1e-4)
    a, b = _rows(tmp_path / "ov" / "bbox.json"), _rows(tmp_path / "pi" / "bbox.json")
    assert len(a) == len(b) > 50
    np.testing.assert_array_equal(a[:, :2], b[:, :2])
    np.testing.assert_allclose(a[:, 2], b[:, 2], atol=1e-4)
    np.testing.assert_allclose(a[:, 3:], b[:, 3:], atol=1e-2)
    onnx_folders = [n for n in os.listdir(export_cache) if n.endswith("-onnx")]
    assert len(onnx_folders) == 1
    assert sorted(os.listdir(export_cache / onnx_folders[0])) == ["engine_meta.json", "model.onnx", "nms.json"]
    again, stats = _evaluate(retina.cfg_path, retina.weights, "openvino", str(tmp_path / "ov2"))
    assert again.engine._trace_s < 30 and [n for n in os.listdir(export_cache) if n.endswith("-onnx")] == onnx_folders
    assert stats["bbox"] == fp32["bbox"]
    retina.openvino_fp32_map = fp32["bbox"][0]


@pytest.mark.skipif(not cpu_supports_bf16(), reason="bf16 needs a CPU with avx512_bf16")
def test_eval_on_openvino_bf16_keeps_the_map(retina, tmp_path):  # noqa: F811
    _, fp32 = _evaluate(retina.cfg_path, retina.weights, "openvino", str(tmp_path / "fp32"))
    _, bf16 = _evaluate(retina.cfg_path, retina.weights, "openvino", str(tmp_path / "bf16"), bf16=True)
    print(f"openvino mAP fp32 {fp32['bbox'][0]:.4f} bf16 {bf16['bbox'][0]:.4f}")
    assert abs(bf16["bbox"][0] - fp32["bbox"][0]) <= 0.002
    assert abs(bf16["bbox"][1] - fp32["bbox"][1]) <= 0.002


def test_training_evaluation_runs_on_openvino_and_keeps_training(retina, export_cache):  # noqa: F811
    cfg = load_config(retina.cfg_path)
    trainer = Trainer(cfg, mode="train")
    trainer.set_engine("openvino")
    trainer.load_weights(retina.weights)
    cached = sorted(os.listdir(export_cache))
    stats = trainer.evaluate()
    assert trainer.engine._current == "openvino" and trainer.model.training
    assert sorted(os.listdir(export_cache)) == cached  # training's exports are temporary
    assert stats["bbox"][0] > 0.2


def test_openvino_refuses_what_it_cannot_run():
    with pytest.raises(ConfigError, match="--engine openvino runs on the CPU"):
        choose_engine("openvino", "gpu:0", "RetinaNet")
    engine, why = choose_engine("openvino", "cpu", "RetinaNet")
    assert (engine, why) == ("openvino", "--engine openvino")
    from ppdet_retina.inference.openvino_engine import check_available

    class TwoStage:
        export_modes = ("detect",)

    with pytest.raises(ConfigError, match="FasterRCNN applies its NMS between stages"):
        check_available("FasterRCNN", TwoStage())


def test_deploy_on_openvino_gives_paddle_inferences_detections(tmp_path):
    from ppdet_retina.data.shapes import ensure_demo_dataset

    demo = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo",
                        "retinanet_demo.yml")
    data = ensure_demo_dataset(str(tmp_path / "shapes"), num_train=1, num_val=2)
    overrides = [f"{k}.dataset_dir={data}" for k in ("TrainDataset", "EvalDataset", "TestDataset")]
    paddle.seed(0)
    model = create("RetinaNet", load_config(demo, overrides))
    _confident(model)
    weights = str(tmp_path / "confident.pdparams")
    paddle.save(model.state_dict(), weights)
    export = load_script("tools/export_model.py", "export_model_tool_ov")
    export.main(["-c", demo, "-o", f"weights={weights}", *overrides, "--onnx", "--output_dir",
                 str(tmp_path / "inference")])
    model_dir = tmp_path / "inference" / "retinanet_demo"
    images = os.path.join(data, "images", "train")
    deploy = load_script("tools/deploy.py", "deploy_tool_ov")
    outputs = {}
    for engine in ("paddle", "openvino"):
        out = tmp_path / f"deploy_{engine}"
        deploy.main(["--model_dir", str(model_dir), "--image_dir", images, "--output_dir", str(out),
                     "--save_results", "--engine", engine])
        outputs[engine] = _rows(out / "bbox.json")
    a, b = outputs["openvino"], outputs["paddle"]
    assert len(a) == len(b) > 0
    np.testing.assert_array_equal(a[:, :2], b[:, :2])
    np.testing.assert_allclose(a[:, 2], b[:, 2], atol=1e-4)
    np.testing.assert_allclose(a[:, 3:], b[:, 3:], atol=1e-2)
    with open(model_dir / "infer_cfg.yml") as f:
        assert yaml.safe_load(f)["onnx"]["input_size"] == [128, 128]  # the demo's fixed Resize: no extra padding


def test_auto_measures_once_and_runs_the_faster_exact_engine(retina, tmp_path, export_cache,  # noqa: F811
                                                             monkeypatch, messages):
    from ppdet_retina.inference import openvino_engine

    monkeypatch.setenv(openvino_engine.AUTO_ENGINES_ENV, "paddle_inference,openvino")
    trainer, stats = _evaluate(retina.cfg_path, retina.weights, "auto", str(tmp_path / "auto"))
    with open(export_cache / openvino_engine.CHOICE_FILE) as f:
        choices = json.load(f)
    assert len(choices) == 1
    (key, entry), = choices.items()
    assert key.startswith("RetinaNet ") and "threads=" in key and " fp32 " in key
    assert entry["exact"] is True and entry["input"] == [1, 3, 64, 64] and min(entry["ms"].values()) > 0
    faster = min(entry["ms"], key=entry["ms"].get)
    assert entry["engine"] == faster == trainer.engine._current
    err = messages.text
    messages.clear()
    assert "auto measures Paddle Inference and OpenVINO once" in err and "engine: auto runs" in err
    # Measured once: the next evaluation reads the choice.
    again, again_stats = _evaluate(retina.cfg_path, retina.weights, "auto", str(tmp_path / "auto2"))
    assert again.engine._current == faster and "auto measures" not in messages.text
    assert "engine: auto runs" in messages.text
    np.testing.assert_allclose(again_stats["bbox"], stats["bbox"], atol=1e-4)


def test_auto_keeps_paddle_inference_when_openvino_differs():
    import paddle as pd

    from ppdet_retina.inference.openvino_engine import measure_engines

    def runner(rows):
        def run(feeds):
            return {"bbox": pd.to_tensor(np.array(rows, np.float32).reshape(-1, 6)),
                    "bbox_num": pd.to_tensor(np.array([len(rows)], np.int32))}
        return run

    feeds = {"image": np.zeros((1, 3, 8, 8), np.float32)}
    same = measure_engines(runner([[0, 0.9, 1, 1, 5, 5]]), runner([[0, 0.9, 1, 1, 5, 5]]), feeds, bf16=False, runs=1)
    assert same["exact"] is True and set(same["ms"]) == {"paddle_inference", "openvino"}
    moved = measure_engines(runner([[0, 0.9, 1, 1, 5, 5]]), runner([[0, 0.9, 1, 1, 6, 5]]), feeds, bf16=False, runs=1)
    assert moved["engine"] == "paddle_inference" and moved["exact"] is False
    assert "class 0 score 0.90000 box [1.0, 1.0, 5.0, 5.0]" in moved["note"]
    # Two boxes tied at the score of the keep_top_k cut (2 rows kept): which one fills the last slot is
    # arbitrary in both runtimes, so that is a tie, not a difference; a difference above the cut is one.
    kept_a, kept_b = [[0, 1.0, 1, 1, 5, 5], [0, 0.7, 9, 9, 20, 20]], [[0, 1.0, 1, 1, 5, 5], [0, 0.7, 30, 30, 40, 40]]
    nms = {"keep_top_k": 2, "score_threshold": 0.05}
    tie = measure_engines(runner(kept_a), runner(kept_b), feeds, bf16=False, runs=1, nms=nms)
    assert tie["exact"] is True
    assert measure_engines(runner(kept_a), runner(kept_b), feeds, bf16=False, runs=1)["exact"] is False
    above = [[0, 1.0, 2, 1, 5, 5], [0, 0.7, 9, 9, 20, 20]]
    assert measure_engines(runner(kept_a), runner(above), feeds, bf16=False, runs=1, nms=nms)["exact"] is False


def test_a_difference_in_detections_is_recorded_for_those_weights_only(retina, tmp_path, monkeypatch):  # noqa: F811
    from ppdet_retina.inference import openvino_engine

    cache = tmp_path / "cache"
    monkeypatch.setenv(fast_engine.CACHE_ENV, str(cache))
    monkeypatch.setenv(openvino_engine.AUTO_ENGINES_ENV, "paddle_inference,openvino")
    verdict = {"engine": "paddle_inference", "ms": {"paddle_inference": 2.0, "openvino": 1.0}, "exact": False,
               "note": "Paddle's detection class 0 ... has no equal", "input": [1, 3, 64, 64]}
    monkeypatch.setattr(openvino_engine, "measure_engines", lambda *args, **kwargs: dict(verdict))
    trainer, _ = _evaluate(retina.cfg_path, retina.weights, "auto", str(tmp_path / "auto"))
    assert trainer.engine._current == "paddle_inference"
    with open(cache / openvino_engine.CHOICE_FILE) as f:
        (key, entry), = json.load(f).items()
    assert " | weights " in key and entry == verdict  # other weights of this config are measured afresh

