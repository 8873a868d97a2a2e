"""The default engine of eval / infer / training's evaluation: Paddle Inference through a cached export.

A tiny RetinaNet (and a tiny Faster R-CNN) with seeded weights is evaluated by the Trainer on
both engines. The evaluation set's ground truth is made from the dygraph model's own confident
detections, moved by a few pixels: the mAP is then far from 0 and 1 and moves with any change of
boxes or scores, so "same mAP to 0.001" means something.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import numpy as np
import paddle
import pytest

from conftest import derive_ground_truth, make_coco, tiny_faster_rcnn_config, write_tiny_config
from ppdet_retina.core.workspace import ConfigError, create, load_config
from ppdet_retina.inference import engines as fast_engine
from ppdet_retina.inference.engines import EngineChooser, PredictorModel, choose_engine
from ppdet_retina.inference.evaluate import Evaluator
from ppdet_retina.inference.predict import Predictor
from ppdet_retina.training.trainer import Trainer


# One export cache for the module (conftest's export_cache): the RetinaNet tests share the seeded weights' export.
pytestmark = pytest.mark.usefixtures("export_cache")


def _sharpen(model) -> None:
    """Scale the RetinaNet classifier so that scores spread over locations (confident, no near-ties)."""
    rng = np.random.default_rng(1)
    conv = model.head.cls_logits
    with paddle.no_grad():
        conv.weight.set_value(rng.normal(scale=0.3, size=conv.weight.shape).astype("float32"))
        conv.bias.set_value(np.full(conv.bias.shape, -2.5, "float32"))


@pytest.fixture(scope="module")
def retina(tmp_path_factory):
    root = tmp_path_factory.mktemp("default_engine")
    coco = make_coco(str(root / "coco"))
    cfg_path = write_tiny_config(root, coco, epoch=1)
    paddle.seed(3)
    cfg = load_config(cfg_path)
    model = create("RetinaNet", cfg)
    _sharpen(model)
    anno = derive_ground_truth(model, cfg, coco)
    weights = str(root / "seeded.pdparams")
    paddle.save(model.state_dict(), weights)
    derived = SimpleNamespace(dataset_dir=coco.dataset_dir, image_dir=coco.image_dir, anno_path=anno)
    cfg_path = write_tiny_config(root, derived, epoch=1, name="tiny_retina_derived.yml")
    return SimpleNamespace(root=root, coco=coco, cfg_path=cfg_path, weights=weights)


def _evaluate(cfg_path: str, weights: str, engine: str, out: str):
    cfg = load_config(cfg_path, [f"weights={weights}", f"output_eval={out}"])
    evaluator = Evaluator(cfg, engine)
    evaluator.load_weights(weights)
    return evaluator, evaluator.evaluate()


def test_retinanet_eval_default_engine_equals_dygraph_and_traces_once(retina, tmp_path, export_cache):
    _, dygraph = _evaluate(retina.cfg_path, retina.weights, "dygraph", str(tmp_path / "dy"))
    trainer, fast = _evaluate(retina.cfg_path, retina.weights, "auto", str(tmp_path / "pi"))
    assert 0.2 < dygraph["bbox"][0] < 0.95, dygraph["bbox"]  # a mAP that moves with any box or score
    np.testing.assert_allclose(fast["bbox"], dygraph["bbox"], atol=1e-3)
    assert trainer.engine._current == "paddle_inference"
    entries = os.listdir(export_cache)
    assert len(entries) == 1
    with open(export_cache / entries[0] / "engine_meta.json") as f:
        meta = json.load(f)
    assert meta["architecture"] == "RetinaNet" and meta["trace_s"] > 0
    # The same weights again, in a new Trainer: loaded from the cache, not traced.
    again, stats = _evaluate(retina.cfg_path, retina.weights, "auto", str(tmp_path / "pi2"))
    assert again.engine._trace_s == 0.0 and os.listdir(export_cache) == entries
    assert stats["bbox"] == fast["bbox"]
    retina.seeded_map = fast["bbox"][0]


def test_infer_default_engine_equals_dygraph(retina, tmp_path):
    results = {}
    for engine in ("dygraph", "auto"):
        cfg = load_config(retina.cfg_path, [f"weights={retina.weights}"])
        predictor = Predictor(cfg, engine)
        predictor.load_weights(retina.weights)
        out = tmp_path / engine
        results[engine] = predictor.predict(retina.coco.image_root, draw_threshold=0.3, output_dir=str(out),
                                            save_results=True)
        assert sorted(os.listdir(out)) == ["bbox.json", "img_1.png", "img_2.png", "img_3.png", "img_5.png"]
    assert [r["im_file"] for r in results["auto"]] == [r["im_file"] for r in results["dygraph"]]
    for mine, ref in zip(results["auto"], results["dygraph"]):
        a, b = (r[np.lexsort((-r[:, 1], r[:, 0]))] for r in (mine["bbox"], ref["bbox"]))
        assert len(b) > 0 and len(a) == len(b)
        np.testing.assert_array_equal(a[:, 0], b[:, 0])
        np.testing.assert_allclose(a[:, 1], b[:, 1], atol=1e-4)  # the export tests' tolerances
        np.testing.assert_allclose(a[:, 2:], b[:, 2:], atol=1e-2)


def test_faster_rcnn_eval_default_engine_equals_dygraph(tmp_path):
    coco = make_coco(str(tmp_path / "coco"))
    readers = """
EvalDataset: {{name: COCODataSet, dataset_dir: {root}, image_dir: images, anno_path: {anno}, allow_empty: true}}
EvalReader:
  sample_transforms:
  - Decode: {{}}
  - Resize: {{target_size: [64, 64], keep_ratio: false}}
  - NormalizeImage: {{is_scale: true, mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}}
  - Permute: {{}}
  batch_transforms: [PadBatch: {{pad_to_stride: 32}}]
  batch_size: 2
worker_num: 0
use_gpu: false
"""
    cfg = tiny_faster_rcnn_config(tmp_path, readers.format(root=coco.dataset_dir, anno=coco.anno_path))
    paddle.seed(5)
    model = create(cfg["architecture"], cfg)
    anno = derive_ground_truth(model, cfg, coco)
    weights = str(tmp_path / "frcnn.pdparams")
    paddle.save(model.state_dict(), weights)
    cfg_path = tmp_path / "tiny_faster_rcnn.yml"
    cfg_path.write_text(cfg_path.read_text().replace(coco.anno_path, anno))
    _, dygraph = _evaluate(str(cfg_path), weights, "dygraph", str(tmp_path / "dy"))
    trainer, fast = _evaluate(str(cfg_path), weights, "paddle_inference", str(tmp_path / "pi"))
    assert 0.05 < dygraph["bbox"][0] < 0.95, dygraph["bbox"]
    np.testing.assert_allclose(fast["bbox"], dygraph["bbox"], atol=1e-3)
    assert trainer.engine._current == "paddle_inference"


def test_training_evaluation_traces_the_current_weights_and_keeps_training(retina, export_cache):
    cfg = load_config(retina.cfg_path)
    trainer = Trainer(cfg, mode="train")
    trainer.set_engine("paddle_inference")
    trainer.load_weights(retina.weights)
    cached = sorted(os.listdir(export_cache))
    with paddle.no_grad():  # weights moved on by training: the seeded weights' cached export must not serve
        trainer.model.head.cls_logits.bias.set_value(np.full([9 * 3], -6.0, "float32"))
    stats = trainer.evaluate()
    assert trainer.engine._trace_s > 0 and trainer.model.training  # traced, and back to training after
    assert sorted(os.listdir(export_cache)) == cached  # training's exports are temporary
    seeded = getattr(retina, "seeded_map", None)
    if seeded is None:  # run alone
        _, seeded_stats = _evaluate(retina.cfg_path, retina.weights, "dygraph", str(retina.root / "dy"))
        seeded = seeded_stats["bbox"][0]
    assert stats["bbox"][0] < seeded - 0.05


def _fake_runner(trace_s: float):
    def make(model, cfg, engine, bf16, device, cache=True):
        runner = PredictorModel(None, "fake")
        runner.trace_s = trace_s
        return runner
    return make


def test_training_keeps_the_cheaper_engine(monkeypatch):
    chooser = EngineChooser("auto", training=True)
    model = paddle.nn.Linear(1, 1)
    on_gpu = EngineChooser("auto", device="gpu:0", training=True)
    assert on_gpu.runner(model, {"architecture": "RetinaNet"}) is model  # auto's GPU rule holds in training
    monkeypatch.setattr(fast_engine, "inference_runner", _fake_runner(trace_s=5.0))
    assert isinstance(chooser.runner(model, {}), PredictorModel)
    chooser.finished(2.0)  # trace 5 s > evaluation 2 s: compare with dygraph next time
    assert chooser.runner(model, {}) is model
    chooser.finished(4.0)  # dygraph 4 s < 2 + 5 s
    assert chooser.runner(model, {}) is model
    cheap = EngineChooser("auto", training=True)
    monkeypatch.setattr(fast_engine, "inference_runner", _fake_runner(trace_s=1.0))
    cheap.runner(model, {})
    cheap.finished(3.0)  # the trace costs less than the evaluation: stays on Paddle Inference
    assert isinstance(cheap.runner(model, {}), PredictorModel)


def test_engine_choice_and_refusals(monkeypatch):
    assert choose_engine("auto", "cpu", "RetinaNet")[0] == "paddle_inference"
    assert choose_engine("auto", "cpu", "FasterRCNN")[0] == "paddle_inference"
    assert choose_engine("auto", "gpu:0", "RetinaNet")[0] == "dygraph"
    engine, why = choose_engine("auto", "cpu", "MyDetector")
    assert engine == "dygraph" and "MyDetector" in why
    assert choose_engine("paddle_inference", "cpu", "MyDetector")[0] == "paddle_inference"
    assert choose_engine("dygraph", "cpu", "RetinaNet")[0] == "dygraph"
    with pytest.raises(ConfigError, match="--engine 'onnx'"):
        choose_engine("onnx", "cpu", "RetinaNet")
    with pytest.raises(ConfigError, match="--bf16 .*paddle_inference"):
        choose_engine("dygraph", "cpu", "RetinaNet", bf16=True)
    monkeypatch.setattr(fast_engine.rt, "cpu_supports_bf16", lambda: False)
    with pytest.raises(ConfigError, match="avx512_bf16"):
        choose_engine("auto", "cpu", "RetinaNet", bf16=True)


def test_failed_export_falls_back_to_dygraph_under_auto_only(monkeypatch):
    def broken(model, folder):
        raise RuntimeError("In transformed code:\n  many lines\nNameError: name 'x' is not defined")

    monkeypatch.setattr(fast_engine, "_trace", broken)
    model = paddle.nn.Linear(1, 1)
    assert fast_engine.inference_runner(model, {"architecture": "RetinaNet"}, "auto") is model
    with pytest.raises(RuntimeError, match="NameError"):
        fast_engine.inference_runner(model, {"architecture": "RetinaNet"}, "paddle_inference")


def test_weights_key_follows_weights_and_model_config_only():
    cfg = {"architecture": "RetinaNet", "RetinaHead": {"nms": {"score_threshold": 0.05}},
           "weights": "a/model_final", "save_dir": "out", "EvalDataset": {"anno_path": "x.json"}}
    paddle.seed(0)
    model = paddle.nn.Linear(3, 2)
    key = fast_engine.weights_key(model, cfg)
    moved = dict(cfg, weights="b/best_model", save_dir="elsewhere", EvalDataset={"anno_path": "y.json"})
    assert fast_engine.weights_key(model, moved) == key
    assert fast_engine.weights_key(model, dict(cfg, RetinaHead={"nms": {"score_threshold": 0.3}})) != key
    with paddle.no_grad():
        model.bias.set_value(model.bias.numpy() + np.float32(1e-6))
    assert fast_engine.weights_key(model, cfg) != key


def test_a_change_to_the_package_source_retraces_and_measures_again(monkeypatch, tmp_path):
    # A release whose graph or engine changed must not load an export (or an engine choice) made by
    # the old code: both keys follow a digest of the package's sources.
    from ppdet_retina.inference import export_cache, openvino_engine

    (tmp_path / "sub").mkdir()
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "sub" / "b.py").write_text("y = 2\n")
    (tmp_path / "notes.txt").write_text("not source\n")
    monkeypatch.setattr(export_cache, "_PACKAGE_DIR", str(tmp_path))
    export_cache.code_key.cache_clear()
    before = export_cache.code_key()
    export_cache.code_key.cache_clear()
    (tmp_path / "notes.txt").write_text("still not source\n")
    assert export_cache.code_key() == before
    export_cache.code_key.cache_clear()
    (tmp_path / "sub" / "b.py").write_text("y = 3\n")
    edited = export_cache.code_key()
    assert edited != before and len(edited) == 16
    export_cache.code_key.cache_clear()

    model, cfg = paddle.nn.Linear(3, 2), {"architecture": "RetinaNet"}
    keys = {}
    for code in ("release-1", "release-2"):
        monkeypatch.setattr(export_cache, "code_key", lambda code=code: code)
        monkeypatch.setattr(openvino_engine, "code_key", lambda code=code: code)
        keys[code] = (export_cache.weights_key(model, cfg), openvino_engine.machine_key(2, False))
    assert keys["release-1"][0] != keys["release-2"][0]
    assert keys["release-1"][1].endswith("code=release-1") and keys["release-2"][1].endswith("code=release-2")
