"""tools/benchmark.py prints one JSON object with the documented keys (values are not judged here)."""

import json
import os

from conftest import REPO, run_tool

KEYS = ["threads", "train_step_ms", "train_backbone_neck_ms", "train_head_ms", "train_loss_ms",
        "train_backward_ms", "infer_ms", "postprocess_ms", "postprocess_dense_ms", "peak_rss_mb",
        "infer_default_engine_ms", "default_engine_trace_s"]
DENSE_ONLY_KEYS = ["postprocess_sparse_ms"]


def run_benchmark(*args):
    proc = run_tool("benchmark.py", *args, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, proc.stdout
    return json.loads(lines[0])


def _assert_numbers(out, keys):
    """Every documented key is there, as a number (what the values should be is not judged here)."""
    missing = [k for k in keys if k not in out]
    assert missing == [], missing
    for key in keys:
        assert isinstance(out[key], (int, float)) and not isinstance(out[key], bool), (key, out[key])


def _assert_engines(out, threads=1):
    """The default engine on CPU is Paddle Inference, and the eval throughput is given for both engines."""
    assert out["default_engine"] == f"Paddle Inference (oneDNN fp32, {threads} thread(s))"
    rates = out["eval_images_per_s"]
    assert sorted(rates) == ["dygraph", "paddle_inference"]
    _assert_numbers(rates, ["dygraph", "paddle_inference"])
    assert min(rates.values()) > 0 and out["default_engine_trace_s"] > 0


def test_retinanet_benchmark_json():
    out = run_benchmark("--config", "configs/demo/retinanet_demo.yml", "--train-size", "64",
                        "--infer-size", "64", "96", "--iters", "1", "--warmup", "0", "--threads", "1")
    _assert_numbers(out, KEYS + DENSE_ONLY_KEYS)
    _assert_engines(out)
    assert out["threads"] == 1 and out["num_classes"] == 3
    assert out["train_input"] == [2, 3, 64, 64] and out["infer_input"] == [1, 3, 64, 96]


def test_faster_rcnn_benchmark_json(tmp_path):
    cfg = tmp_path / "frcnn_small.yml"
    cfg.write_text("_BASE_: ['%s']\npretrain_weights: ''\nResNet: {depth: 18, width_mult: 0.125}\n"
                   "FPN: {out_channel: 16}\nTwoFCHead: {out_channel: 32}\n"
                   % os.path.join(REPO, "configs", "faster_rcnn", "faster_rcnn_r50_fpn_1x.yml"))
    out = run_benchmark("--config", str(cfg), "--num-classes", "4", "--train-size", "64", "--infer-size", "64",
                        "--iters", "1", "--warmup", "0", "--threads", "1")
    _assert_numbers(out, KEYS)
    _assert_engines(out)
    assert out["threads"] == 1 and out["num_classes"] == 4
    assert out["train_input"] == [2, 3, 64, 64] and out["infer_input"] == [1, 3, 64, 64]


def test_early_stop_ab_same_detections_with_and_without_the_stop():
    """The traced graph with the early stop keeps exactly what the graph without it keeps: none at the
    prior 0.01 (every score is the prior once the classifier is zeroed), every top box at 0.5."""
    common = ["--early-stop-ab", "--config", "configs/demo/retinanet_demo.yml", "--infer-size", "64", "96",
              "--iters", "1", "--warmup", "0", "--threads", "1"]
    sparse = run_benchmark(*common)
    assert sparse["detections"] == 0 and sparse["same_detections"] is True
    assert sorted(sparse["engine_ms"]) == ["early_stop", "no_early_stop"]
    dense = run_benchmark(*common, "-o", "RetinaHead.prior_prob=0.5")
    assert dense["detections"] > 0 and dense["same_detections"] is True
