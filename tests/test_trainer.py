"""Trainer: train, snapshot, resume, non-finite loss, evaluate and predict on a tiny RetinaNet."""

import json
import os

import numpy as np
import paddle
import pytest

from ppdet_retina.core.workspace import load_config
from ppdet_retina.core import env
from ppdet_retina.inference.evaluate import Evaluator
from ppdet_retina.inference.predict import Predictor
from ppdet_retina.training.trainer import Trainer
from instrumented_tool import weights_digest

from conftest import write_tiny_config


def read_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture
def tiny_cfg(tmp_path, tiny_coco):
    return load_config(write_tiny_config(tmp_path, tiny_coco))


def test_train_saves_snapshots_and_log(tiny_cfg):
    paddle.seed(0)
    trainer = Trainer(tiny_cfg, mode="train")
    assert len(trainer.loader) == 1  # 3 images with boxes, batch 2, drop_last
    before = weights_digest(trainer.model)
    trainer.train()
    out = trainer.output_dir
    assert out.endswith(os.path.join("output", "tiny_retina"))
    for name in ("0.pdparams", "0.pdopt", "model_final.pdparams", "model_final.pdopt"):
        assert os.path.isfile(os.path.join(out, name)), name
    assert weights_digest(trainer.model) != before
    records = read_log(os.path.join(out, "train_log.jsonl"))
    assert [(r["epoch"], r["iter"]) for r in records] == [(0, 0), (1, 0)]
    for r in records:
        for key in ("loss", "loss_cls", "loss_reg", "lr", "batch_cost", "data_cost", "ips"):
            assert np.isfinite(r[key]), key
    # lr logged is the one used by the step: warm-up factor 0.5 at iteration 0, decayed at epoch 1.
    assert records[0]["lr"] == pytest.approx(0.005)
    assert records[1]["lr"] == pytest.approx(0.01 * 0.1 * 0.75)
    assert trainer.lr.last_epoch == 2
    # A second fresh run in the same folder keeps the first run's records and appends its own.
    Trainer(tiny_cfg, mode="train").train()
    assert [(r["epoch"], r["iter"]) for r in read_log(os.path.join(out, "train_log.jsonl"))] == [(0, 0), (1, 0)] * 2


def test_resume_restores_epoch_lr_and_optimizer(tmp_path, tiny_coco):
    cfg_path = write_tiny_config(tmp_path, tiny_coco, epoch=3)
    paddle.seed(0)
    first = Trainer(load_config(cfg_path), mode="train")
    first.train()
    uninterrupted = weights_digest(first.model)
    prefix = os.path.join(first.output_dir, "1")

    paddle.seed(123)  # a different init: everything must come from the checkpoint
    resumed = Trainer(load_config(cfg_path), mode="train")
    resumed.resume_weights(prefix)
    assert resumed.start_epoch == 2
    assert resumed.lr.last_epoch == 2
    assert resumed.lr.get_lr() == pytest.approx(0.001)
    saved = paddle.load(prefix + ".pdparams")
    for key, value in resumed.model.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), np.asarray(saved[key]))
    resumed.train()
    records = read_log(os.path.join(resumed.output_dir, "train_log.jsonl"))
    # 3 epochs from the first run, then only epoch 2 again from the resumed one.
    assert [r["epoch"] for r in records] == [0, 1, 2, 2]
    assert records[-1]["lr"] == pytest.approx(records[2]["lr"])
    assert records[-1]["loss"] == pytest.approx(records[2]["loss"], rel=1e-5)
    assert resumed.lr.last_epoch == 3
    # Same final weights as the run that never stopped: the Momentum velocity was restored too.
    assert weights_digest(resumed.model) == uninterrupted


def test_resume_without_optimizer_state_differs(tmp_path, tiny_coco):
    """Guards the test above: losing the momentum on resume must change the result."""
    cfg_path = write_tiny_config(tmp_path, tiny_coco, epoch=3)
    first = Trainer(load_config(cfg_path), mode="train")
    first.train()
    uninterrupted = weights_digest(first.model)
    restarted = Trainer(load_config(cfg_path), mode="train")
    restarted.load_weights(os.path.join(first.output_dir, "1"))
    restarted.start_epoch = 2
    restarted.lr.set_state_dict({"last_epoch": 2, "last_lr": 0.0})
    restarted.train()
    assert weights_digest(restarted.model) != uninterrupted


def test_non_finite_loss_stops_with_clear_message(tiny_cfg, monkeypatch):
    trainer = Trainer(tiny_cfg, mode="train")
    real_forward = trainer.model.forward
    calls = {"n": 0}

    def forward_nan_on_second_epoch(inputs):
        out = real_forward(inputs)
        calls["n"] += 1
        if calls["n"] >= 2 and trainer.model.training:
            out["loss_cls"] = out["loss_cls"] * float("nan")
            out["loss"] = out["loss_cls"] + out["loss_reg"]
        return out

    monkeypatch.setattr(trainer.model, "forward", forward_nan_on_second_epoch)
    with pytest.raises(FloatingPointError) as err:
        trainer.train()
    msg = str(err.value)
    assert "epoch 1, iteration 0" in msg and "loss_cls=nan" in msg and "loss_reg=" in msg
    good = paddle.load(os.path.join(trainer.output_dir, "0.pdparams"))
    assert all(np.isfinite(np.asarray(v)).all() for v in good.values())
    assert not os.path.exists(os.path.join(trainer.output_dir, "model_final.pdparams"))


def test_train_with_validation_keeps_best_and_evaluates(tiny_cfg):
    paddle.seed(1)
    trainer = Trainer(tiny_cfg, mode="train")
    trainer.train(validate=True)
    out = trainer.output_dir
    assert os.path.isfile(os.path.join(out, "best_model.pdparams"))
    assert os.path.isfile(os.path.join(out, "bbox.json"))
    evals = [r for r in read_log(os.path.join(out, "train_log.jsonl")) if r["type"] == "eval"]
    assert [(r["epoch"], r["step"]) for r in evals] == [(0, 0), (1, 1)]
    assert all(len(r["bbox"]) == 12 and r["bbox_map"] == r["bbox"][0] for r in evals)
    assert trainer.best_ap == pytest.approx(max(r["bbox_map"] for r in evals))

    evaluator = Evaluator(tiny_cfg)
    evaluator.load_weights(os.path.join(out, "model_final"))
    stats = evaluator.evaluate()
    assert len(stats["bbox"]) == 12
    np.testing.assert_allclose(stats["bbox"], evals[-1]["bbox"], atol=1e-9)


def test_predict_writes_images_and_coco_json(tiny_cfg, tiny_coco, tmp_path):
    trainer = Trainer(tiny_cfg, mode="train")
    trainer.train()
    # Score threshold 0: the barely trained model keeps its keep_top_k = 100 detections in every image.
    cfg = load_config(write_tiny_config(tmp_path, tiny_coco), ["RetinaHead.nms.score_threshold=0.0"])
    predictor = Predictor(cfg)
    predictor.load_weights(os.path.join(trainer.output_dir, "model_final"))
    out_dir = str(tmp_path / "infer")
    results = predictor.predict(tiny_coco.image_root, draw_threshold=0.0, output_dir=out_dir, save_results=True)
    assert [len(r["bbox"]) for r in results] == [100] * 4
    assert sorted(os.listdir(out_dir)) == ["bbox.json", "img_1.png", "img_2.png", "img_3.png", "img_5.png"]
    with open(os.path.join(out_dir, "bbox.json")) as f:
        dets = json.load(f)
    assert len(dets) == 400
    assert {d["category_id"] for d in dets} == {3, 7, 12}
    # Each image's rows under the json's own image id and the file's name.
    names = {1: "img_1.png", 2: "img_2.png", 3: "img_3.png", 5: "img_5.png"}
    assert sorted((d["image_id"], d["file_name"]) for d in dets) == sorted((i, n) for i, n in names.items()
                                                                           for _ in range(100))
    for d in dets:
        assert set(d) == {"image_id", "category_id", "bbox", "score", "file_name"} and len(d["bbox"]) == 4
        x, y, w, h = d["bbox"]
        assert w > 0 and h > 0 and 0 <= d["score"] <= 1


def test_device_fallback_and_threads(monkeypatch, caplog):
    monkeypatch.setattr(env, "_WARNED_NO_GPU", False)
    if not paddle.device.is_compiled_with_cuda():
        with caplog.at_level("WARNING", logger="ppdet_retina.core.env"):
            assert env.select_device(True) == "cpu"
            assert env.select_device(True) == "cpu"
        assert sum("no GPU" in r.message for r in caplog.records) == 1
    assert env.cpu_threads_per_process(num_cpus=8, local_size=2) == 4
    assert env.cpu_threads_per_process(num_cpus=2, local_size=4) == 1
    monkeypatch.setenv("PADDLE_LOCAL_SIZE", "2")
    assert env.cpu_threads_per_process(num_cpus=6) == 3
