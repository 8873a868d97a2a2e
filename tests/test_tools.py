"""tools/train.py, eval.py, infer.py as a user runs them (subprocesses from the repo root)."""

import json
import os

import numpy as np
import pytest

from ppdet_retina.runtime import class_color, draw_detections

from conftest import detections_from_bbox_json, run_tool, write_derived_ground_truth, write_tiny_config


def test_train_eval_infer_round_trip(tmp_path, tiny_coco):
    cfg = write_tiny_config(tmp_path, tiny_coco, epoch=1)
    proc = run_tool("train.py", "-c", cfg, "--seed", "3", "-o", "log_iter=1", timeout=80)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Epoch: [0/1]" in proc.stdout and "ips:" in proc.stdout and "eta:" in proc.stdout
    weights = os.path.join(str(tmp_path), "output", "tiny_retina", "model_final")
    assert os.path.isfile(weights + ".pdparams")

    eval_dir = str(tmp_path / "eval_out")
    # A score threshold of 0 so that the barely trained model keeps its keep_top_k = 100 detections per image.
    low = "RetinaHead.nms.score_threshold=0.0"
    proc = run_tool("eval.py", "-c", cfg, "-o", f"weights={weights}", low, "--classwise", "--output_eval", eval_dir,
                    timeout=80)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Average Precision" in proc.stdout and "category" in proc.stdout
    detections = detections_from_bbox_json(os.path.join(eval_dir, "bbox.json"))
    assert {k: len(v) for k, v in detections.items()} == {1: 100, 2: 100, 3: 100, 5: 100}

    # Ground truth from those detections, moved a few pixels: a mAP that moves with any box or score.
    anno = write_derived_ground_truth(tiny_coco, detections)
    derived = f"EvalDataset.anno_path={anno}"
    proc = run_tool("eval.py", "-c", cfg, "-o", f"weights={weights}", low, derived, "--engine", "dygraph",
                    timeout=80)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    dygraph_ap = _ap_values(proc.stdout)
    assert 0.2 < dygraph_ap[0] < 0.95, proc.stdout

    # The same weights exported and evaluated through the Paddle Inference predictor give the same mAP.
    export_dir = str(tmp_path / "exported")
    proc = run_tool("export_model.py", "-c", cfg, "-o", f"weights={weights}", low, "--output_dir", export_dir,
                    timeout=80)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    model_dir = os.path.join(export_dir, "tiny_retina")
    assert {"model.json", "model.pdiparams", "infer_cfg.yml"} <= set(os.listdir(model_dir))
    proc_exported = run_tool("eval.py", "-c", cfg, "-o", derived, "--exported", model_dir, timeout=80)
    assert proc_exported.returncode == 0, proc_exported.stdout + proc_exported.stderr
    np.testing.assert_allclose(_ap_values(proc_exported.stdout), dygraph_ap, atol=1.5e-3)

    out_dir = str(tmp_path / "infer_out")
    image = os.path.join(tiny_coco.image_root, "img_1.png")
    proc = run_tool("infer.py", "-c", cfg, "-o", f"weights={weights}", low, "--infer_img", image,
                    "--output_dir", out_dir, "--draw_threshold", "0.0", "--save_results", "true", timeout=80)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(os.listdir(out_dir)) == ["bbox.json", "img_1.png"]
    with open(os.path.join(out_dir, "bbox.json")) as f:
        dets = json.load(f)
    assert len(dets) == 100
    assert {d["category_id"] for d in dets} == {3, 7, 12} and {d["file_name"] for d in dets} == {"img_1.png"}
    assert {d["image_id"] for d in dets} == {1}  # the image id of TestDataset.anno_path's json


def _ap_values(stdout: str) -> list:
    """The six 'Average Precision' numbers pycocotools printed (3 decimals)."""
    values = [float(ln.rsplit("=", 1)[1]) for ln in stdout.splitlines() if "Average Precision" in ln]
    assert len(values) == 6, stdout
    return values


def _closed_port_url(name):
    """An http URL on 127.0.0.1 where nothing listens: the connection is refused at once."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/{name}"


def test_unreachable_pretrain_weights_url_gives_one_line_error(tiny_coco, tmp_path, monkeypatch):
    # The shipped config (found by its bare name) with its URL pointed at a server that is not there.
    monkeypatch.setenv("PPDET_WEIGHTS_HOME", str(tmp_path / "cache"))
    url = _closed_port_url("ResNet50_cos_pretrained.pdparams")
    proc = run_tool("train.py", "-c", "retinanet_r50_fpn_1x", "-o", "use_gpu=false", "epoch=1", "num_classes=3",
                    f"pretrain_weights={url}",
                    f"TrainDataset.dataset_dir={tiny_coco.dataset_dir}",
                    f"TrainDataset.image_dir={tiny_coco.image_dir}",
                    f"TrainDataset.anno_path={tiny_coco.anno_path}", timeout=80)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(line) == 1 and f"cannot download pretrain_weights from '{url}'" in line[0]
    cached = os.path.join(str(tmp_path / "cache"), "ResNet50_cos_pretrained.pdparams")
    assert f"place it at '{cached}'" in line[0] and "-o pretrain_weights=." in line[0]


@pytest.mark.parametrize("tool,extra,message", [
    ("eval.py", ["-o", "weights=/nonexistent/model_final"], "not found"),
    ("eval.py", [], "weights"),
    ("eval.py", ["-o", f"weights={_closed_port_url('model_final.pdparams')}"], "cannot download weights"),
    ("infer.py", ["-o", "weights=x", "--infer_img", "/nonexistent.png"], "--infer_img"),
    ("train.py", ["-o", "TrainReader.batchsize=2"], "batch_size"),
    ("train.py", ["-o", "epochs=3"], "'epochs' from -o (did you mean 'epoch'?)"),
])
def test_user_errors_exit_2(tmp_path, tiny_coco, tool, extra, message, monkeypatch):
    monkeypatch.setenv("PPDET_WEIGHTS_HOME", str(tmp_path / "weights_cache"))  # never the user's cache
    cfg = write_tiny_config(tmp_path, tiny_coco, epoch=1)
    proc = run_tool(tool, "-c", cfg, *extra, timeout=80)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert message in proc.stderr


def test_draw_detections_draws_only_above_threshold():
    image = np.zeros((60, 80, 3), np.uint8)
    dets = np.array([[1, 0.9, 10, 20, 50, 50], [2, 0.1, 5, 5, 70, 55]], np.float32)
    drawn = draw_detections(image, dets, ["a", "b", "c"], threshold=0.5, thickness=1)
    assert image.sum() == 0  # the input is not modified
    assert tuple(drawn[50, 30]) == class_color(1)  # bottom edge of the kept box
    assert tuple(drawn[55, 40]) == (0, 0, 0)  # bottom edge of the low-score box: not drawn
    assert drawn[10:20, 10:40].any()  # the label sits above the box
    assert class_color(1) != class_color(2)
