"""PaddleDetection's own tools, config and Trainer run our components through ppdet_retina.ppdet_plugin.

Everything runs as a user runs it: PaddleDetection's scripts (tools/infer.py, eval.py, export_model.py,
train.py under paddle.distributed.launch) in subprocesses, on PaddleDetection's unchanged
configs/retinanet/retinanet_r50_fpn_1x_coco.yml, with and without the plugin, on the real photo
tests/data/parity_photo.jpg and a tiny COCO set. The model is narrowed by ``-o`` overrides only
(tools/dev/ppdet_reference.py's RETINANET_OVERRIDES), and its weights are the seeded ones of
tools/dev/ppdet_file_reference.py written under PaddleDetection's parameter names.

These tests need PaddleDetection's dependencies (numpy < 2, imgaug, lap, ...), which this venv does
not carry: PaddleDetection-side steps run with ``$PPDET_PYTHON`` (default .venv-ppdet/bin/python,
built by ``make test-ppdet``) and the checkout at ``$PPDET_ROOT`` (default
../shared/reference/PaddleDetection beside this clone). Without either, the tests skip.
"""

from __future__ import annotations

import json
import os
import subprocess
from typing import Dict, List, Sequence

import numpy as np
import pytest

from conftest import REPO, make_coco, tool_env

PPDET_ROOT = os.environ.get("PPDET_ROOT") or os.path.join(os.path.dirname(REPO), "shared", "reference",
                                                          "PaddleDetection")
PPDET_PYTHON = os.environ.get("PPDET_PYTHON") or os.path.join(REPO, ".venv-ppdet", "bin", "python")
CONFIG = os.path.join(PPDET_ROOT, "configs", "retinanet", "retinanet_r50_fpn_1x_coco.yml")
PHOTO = os.path.join(REPO, "tests", "data", "parity_photo.jpg")
DRIVER = os.path.join(REPO, "tests", "ppdet_plugin_driver.py")
PLUGIN_LINE = ("ppdet_retina plugin: PaddleDetection's RetinaHead, RetinaFeat, RetinaAnchorGenerator, "
               "MaxIoUAssigner, FocalLoss, MultiClassNMS now build ppdet_retina's components")


def _missing() -> str:
    if not os.path.isfile(os.path.join(PPDET_ROOT, "ppdet", "__init__.py")):
        return (f"PaddleDetection checkout not found at {PPDET_ROOT}: set PPDET_ROOT to a PaddleDetection "
                f"develop checkout, then run `make test-ppdet`")
    if not os.access(PPDET_PYTHON, os.X_OK):
        return (f"PaddleDetection's python {PPDET_PYTHON} not found: run `make test-ppdet` (builds .venv-ppdet), "
                f"or set PPDET_PYTHON")
    return ""


pytestmark = pytest.mark.skipif(bool(_missing()), reason=_missing() or "ok")

# RETINANET_OVERRIDES of tools/dev/ppdet_reference.py as PaddleDetection's -o flags. Its -o parser
# rebuilds a dotted key's parents, so the head's conv_feat is given whole, as one YAML mapping.
NARROW = ["use_gpu=false", "FPN.out_channel=32",
          "RetinaHead.conv_feat={name: RetinaFeat, feat_in: 32, feat_out: 32, num_convs: 2, norm_type: null, "
          "use_dcn: false}"]
SMALL_READER = ("[{Decode: {}}, {Resize: {target_size: [128, 160], keep_ratio: true, interp: 1}}, "
                "{NormalizeImage: {is_scale: true, mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225]}}, "
                "{Permute: {}}]")
# Six images, two or three boxes each: one epoch of batch 2 is three steps. Category ids are COCO's, and
# the annotation file lists all 80: PaddleDetection's metric maps every predicted class to a category.
TRAIN_SPEC = [(i, 96 + 16 * (i % 3), 128 - 16 * (i % 2),
               [(3, [10 + i, 20, 30, 40], 0), (13, [50, 10 + i, 40, 30], 0)]
               + ([(7, [5, 50, 20, 20], 0)] if i % 2 else [])) for i in range(1, 7)]


def _env(pythonpath: Sequence[str]) -> Dict[str, str]:
    env = tool_env({"PYTHONPATH": os.pathsep.join(pythonpath), "PYTHONWARNINGS": "ignore"})
    env.pop("PYTHONHOME", None)
    return env


# PaddleDetection's scripts write files into the working directory (eval.py's bbox.json): they run in a
# scratch folder, never in the repository.
_SCRATCH: Dict[str, str] = {}


@pytest.fixture(scope="module", autouse=True)
def _scratch_cwd(tmp_path_factory):
    _SCRATCH["cwd"] = str(tmp_path_factory.mktemp("ppdet_cwd"))
    yield
    _SCRATCH.clear()


def _start(args: Sequence[str], pythonpath: Sequence[str] = (REPO,), cwd: str = "") -> subprocess.Popen:
    return subprocess.Popen([PPDET_PYTHON, *args], cwd=cwd or _SCRATCH["cwd"], env=_env(pythonpath), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _finish(proc: subprocess.Popen, timeout: float = 240) -> subprocess.CompletedProcess:
    out, _ = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def _run(args: Sequence[str], pythonpath: Sequence[str] = (REPO,), cwd: str = "",
         timeout: float = 240) -> subprocess.CompletedProcess:
    return _finish(_start(args, pythonpath, cwd), timeout)


def _ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"{' '.join(map(str, proc.args))} failed:\n{proc.stdout[-4000:]}"
    return proc.stdout


def _tool(name: str) -> str:
    return os.path.join(PPDET_ROOT, "tools", name)


def _plugin(tool: str, *args: str) -> List[str]:
    return ["-m", "ppdet_retina.ppdet_plugin", _tool(tool), *args]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Seeded weights under PaddleDetection's names, its COCO label file, and a tiny COCO set."""
    root = tmp_path_factory.mktemp("ppdet_plugin")
    weights, coco80 = str(root / "seeded.pdparams"), str(root / "coco80.json")
    jobs = [_start([DRIVER, "weights", weights, CONFIG, "-o", *NARROW], pythonpath=(PPDET_ROOT, REPO)),
            _start([DRIVER, "coco80", coco80], pythonpath=(PPDET_ROOT, REPO))]
    for job in jobs:
        _ok(_finish(job))
    with open(coco80) as f:
        tiny = make_coco(str(root / "tiny"), spec=TRAIN_SPEC, categories=json.load(f)["categories"])
    data = [f"TestDataset.dataset_dir={root}", "TestDataset.anno_path=coco80.json",
            f"TrainDataset.dataset_dir={tiny.dataset_dir}", f"TrainDataset.image_dir={tiny.image_dir}",
            f"TrainDataset.anno_path={tiny.anno_path}",
            f"EvalDataset.dataset_dir={tiny.dataset_dir}", f"EvalDataset.image_dir={tiny.image_dir}",
            f"EvalDataset.anno_path={tiny.anno_path}"]
    train = [f"TrainReader.sample_transforms={SMALL_READER}", "TrainReader.shuffle=false", "worker_num=0",
             "epoch=1", "log_iter=1", f"pretrain_weights={weights}"]
    return dict(root=root, weights=weights, data=data, train=train)


def _rows(path: str) -> List[dict]:
    with open(path) as f:
        return sorted(json.load(f), key=lambda r: (r["image_id"], r["category_id"], -r["score"]))


def _compare_rows(ours: List[dict], theirs: List[dict]) -> Dict[str, float]:
    """Every row equal: category ids exactly, scores within 1e-4, boxes (x, y, w, h) within 0.01 px."""
    assert len(ours) == len(theirs) > 0
    assert [(r["image_id"], r["category_id"]) for r in ours] == [(r["image_id"], r["category_id"]) for r in theirs]
    score = max(abs(a["score"] - b["score"]) for a, b in zip(ours, theirs))
    box = max(float(np.abs(np.subtract(a["bbox"], b["bbox"])).max()) for a, b in zip(ours, theirs))
    assert score <= 1e-4 and box <= 0.01, (score, box)
    return {"rows": len(ours), "score": score, "box": box}


def _infer_both(work, config, overrides, weights, tag):
    """PaddleDetection's tools/infer.py on the photo without the plugin ("ppdet") and through it
    ("plugin"), run side by side: each one's bbox.json rows (every score) and its log."""
    jobs, outs = {}, {}
    for name, prefix in (("ppdet", [_tool("infer.py")]), ("plugin", _plugin("infer.py"))):
        out = work["root"] / f"{tag}_{name}"
        jobs[name] = _start([*prefix, "-c", config, "--infer_img", PHOTO, "--output_dir", str(out),
                             "--save_results", "True", "--save_threshold", "0", "--visualize", "False",
                             "-o", *overrides, *work["data"], f"weights={weights}"])
        outs[name] = str(out / "bbox.json")
    logs = {name: _ok(_finish(job)) for name, job in jobs.items()}
    return {name: _rows(path) for name, path in outs.items()}, logs


@pytest.fixture(scope="module")
def infer_rows(work):
    rows, logs = _infer_both(work, CONFIG, NARROW, work["weights"], "infer")
    assert PLUGIN_LINE in logs["plugin"] and PLUGIN_LINE not in logs["ppdet"]
    return rows


def test_infer_through_plugin_gives_paddledetections_detections(infer_rows):
    figures = _compare_rows(infer_rows["plugin"], infer_rows["ppdet"])
    assert figures["rows"] == 76  # the seeded classifier's detections on this photo (ppdet_file_reference)
    print(f"infer parity: {figures}")


def test_faster_rcnn_keeps_its_detections_with_our_nms_in_the_registry(work):
    """PaddleDetection's Faster R-CNN calls the taken-over MultiClassNMS in its own form (per-class boxes,
    RoI counts, background label): its infer.py gives the same rows with the plugin as without."""
    config = os.path.join(PPDET_ROOT, "configs", "faster_rcnn", "faster_rcnn_r50_fpn_1x_coco.yml")
    narrow = ["use_gpu=false", "FPN.out_channel=32", "TwoFCHead.out_channel=64"]  # FASTER_RCNN_OVERRIDES
    weights = str(work["root"] / "faster_rcnn.pdparams")
    _ok(_run([DRIVER, "weights", weights, config, "--arch", "faster_rcnn", "-o", *narrow],
             pythonpath=(PPDET_ROOT, REPO)))
    rows, logs = _infer_both(work, config, narrow, weights, "faster_rcnn")
    assert PLUGIN_LINE in logs["plugin"]
    figures = _compare_rows(rows["plugin"], rows["ppdet"])
    assert figures["rows"] == 75
    print(f"faster r-cnn beside the plugin: {figures}")


def _update_diffs(ours: np.lib.npyio.NpzFile, theirs: np.lib.npyio.NpzFile, before: Dict[str, np.ndarray]):
    """Per parameter that moved: |our update - theirs| relative to theirs, by norm and by largest element."""
    by_norm, by_max, moved = 0.0, 0.0, 0
    for key in theirs.files:
        if not key.startswith("param/"):
            continue
        start = before[key[len("param/"):]]
        mine, ref = ours[key] - start, theirs[key] - start
        if not np.any(ref):
            assert not np.any(mine), key
            continue
        moved += 1
        by_norm = max(by_norm, float(np.linalg.norm(mine - ref) / np.linalg.norm(ref)))
        by_max = max(by_max, float(np.abs(mine - ref).max() / np.abs(ref).max()))
    return moved, by_norm, by_max


def test_three_trainer_steps_match_paddledetections_components(work):
    outs = {name: str(work["root"] / f"train_{name}.npz") for name in ("ppdet", "plugin")}
    jobs = [_start([DRIVER, "train", outs[name], CONFIG, "--plugin", str(int(name == "plugin")), "-o", *NARROW,
                    *work["data"], *work["train"], f"save_dir={work['root'] / ('save_' + name)}"],
                   pythonpath=(PPDET_ROOT, REPO)) for name in ("ppdet", "plugin")]
    for job in jobs:
        _ok(_finish(job))
    theirs, ours = np.load(outs["ppdet"]), np.load(outs["plugin"])
    assert theirs["losses"].shape == ours["losses"].shape == (3, 3)  # 3 steps x (loss, loss_cls, loss_reg)
    loss_rel = float(np.abs(ours["losses"] - theirs["losses"]).max() / np.abs(theirs["losses"]).max())
    assert loss_rel <= 1e-4
    # The weights moved between steps: the losses of steps 2 and 3 differ from step 1's.
    assert np.abs(np.diff(theirs["losses"][:, 0])).min() > 1e-3
    # The initial weights, read by PaddleDetection's python (the file is a paddle pickle of its tensors).
    before_npz = str(work["root"] / "before.npz")
    _ok(_run(["-c", "import sys, numpy as np, paddle; s = paddle.load(sys.argv[1]); "
                    "np.savez(sys.argv[2], **{k: v.numpy() for k, v in s.items()})", work["weights"], before_npz],
             pythonpath=(PPDET_ROOT, REPO)))
    before = dict(np.load(before_npz))
    moved, by_norm, by_max = _update_diffs(ours, theirs, before)
    assert moved >= 60  # backbone, FPN and head parameters all train (frozen BN statistics do not)
    assert by_norm <= 1e-4
    print(f"train parity: loss rel {loss_rel:.2e}, {moved} parameters, update rel by norm {by_norm:.2e}, "
          f"by largest element {by_max:.2e}")


def test_taken_over_names_answer_paddledetections_calls_as_its_own(work):
    """Calls of PaddleDetection's convention that RetinaNet's forward does not make in the tests above."""
    out = str(work["root"] / "conventions.json")
    _ok(_run([DRIVER, "conventions", out, work["weights"], CONFIG, "-o", *NARROW], pythonpath=(PPDET_ROOT, REPO)))
    with open(out) as f:
        found = json.load(f)
    assert found["decode_cls_logits"] <= 1e-5
    assert max(found[f"focal_{r}"] for r in ("none", "sum", "mean", "default")) <= 1e-4
    assert found["assigner_positives"] > 0
    assert found["assigner_labels_equal"] and found["assigner_matches_equal"]


def test_eval_through_plugin_prints_coco_ap(work):
    out = _ok(_run(_plugin("eval.py", "-c", CONFIG, "-o", *NARROW, *work["data"],
                           f"EvalReader.sample_transforms={SMALL_READER}", "EvalReader.batch_size=2",
                           f"weights={work['weights']}")))
    assert PLUGIN_LINE in out
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]" in out
    assert "Total sample number: 6" in out


def test_export_through_plugin_runs_in_paddle_inference(work, infer_rows):
    model_dir = work["root"] / "export"
    out = _ok(_run(_plugin("export_model.py", "-c", CONFIG, "--output_dir", str(model_dir), "-o", *NARROW,
                           *work["data"], f"weights={work['weights']}")))
    assert PLUGIN_LINE in out
    exported = model_dir / "retinanet_r50_fpn_1x_coco"
    assert (exported / "model.pdiparams").is_file() and (exported / "infer_cfg.yml").is_file()
    rows = str(work["root"] / "exported.json")
    _ok(_run([DRIVER, "exported", rows, str(exported), PHOTO], pythonpath=(PPDET_ROOT, REPO)))
    _compare_rows(_rows(rows), infer_rows["ppdet"])


def test_two_process_launch_trains_through_plugin(work):
    """The multi-card command of docs/ppdet_plugin.md, on two CPU processes."""
    plugin_file = _ok(_run(["-m", "ppdet_retina.ppdet_plugin", "--path"])).strip().splitlines()[-1]
    assert plugin_file == os.path.join(REPO, "ppdet_retina", "ppdet_plugin.py")
    log_dir, save_dir = work["root"] / "launch", work["root"] / "save_launch"
    proc = _run(["-m", "paddle.distributed.launch", "--log_dir", str(log_dir), "--nproc_per_node", "2",
                 plugin_file, _tool("train.py"), "-c", CONFIG, "-o", *NARROW, *work["data"], *work["train"],
                 f"save_dir={save_dir}"], timeout=300)
    logs = [(log_dir / f"workerlog.{rank}").read_text() for rank in (0, 1)]
    assert proc.returncode == 0, proc.stdout[-3000:] + "".join(log[-3000:] for log in logs)
    assert all(PLUGIN_LINE in log for log in logs)
    # Six images over two ranks at batch 2: one step each (one process alone takes three).
    assert "Epoch: [0] [0/1]" in logs[0]
    assert (save_dir / "model_final.pdparams").is_file()


# --------------------------------------------------------------------------- the runner and the errors

def test_runner_runs_the_script_as_python_would(tmp_path):
    script = tmp_path / "tools" / "probe.py"
    script.parent.mkdir()
    script.write_text("import sys\nprint('argv', sys.argv)\nprint('path0', sys.path[0])\n"
                      "from ppdet.core.workspace import global_config\n"
                      "print('head', global_config['RetinaHead'].pymodule.__name__)\nsys.exit(3)\n")
    proc = _run(["-m", "ppdet_retina.ppdet_plugin", str(script), "-c", "x.yml", "--flag"],
                pythonpath=(PPDET_ROOT, REPO), cwd=str(tmp_path))
    assert proc.returncode == 3, proc.stdout
    assert f"argv {[str(script), '-c', 'x.yml', '--flag']}" in proc.stdout
    assert f"path0 {script.parent}" in proc.stdout
    assert "head ppdet_retina.ppdet_adapters" in proc.stdout
    assert proc.stdout.count("ppdet_retina plugin:") == 1


def test_register_is_idempotent_and_keeps_paddledetections_modules():
    code = ("from ppdet_retina import ppdet_plugin\n"
            "first = ppdet_plugin.register(); second = ppdet_plugin.register()\n"
            "import ppdet.modeling.heads.retina_head as theirs\n"
            "from ppdet.core.workspace import create, global_config\n"
            "print(first == second == ppdet_plugin.registered(), len(first))\n"
            "print(theirs.RetinaHead.__module__, global_config['RetinaHead'].pymodule.__name__)\n"
            "nms = create('MultiClassNMS')\n"
            "import paddle\n"
            "boxes = paddle.to_tensor([[[0., 0., 10., 10.], [1., 1., 11., 11.], [50., 50., 60., 60.]]])\n"
            "scores = paddle.to_tensor([[[0.9, 0.8, 0.7]]])\n"
            "bbox, num, index = nms(boxes, scores)\n"
            "print(type(nms).__module__, list(bbox.shape), num.numpy().tolist(), index)\n")
    out = _ok(_run(["-c", code], pythonpath=(PPDET_ROOT, REPO)))
    assert out.count("ppdet_retina plugin:") == 1
    assert "True 6" in out
    assert "ppdet.modeling.heads.retina_head ppdet_retina.ppdet_adapters" in out
    # PaddleDetection's three-value convention; the overlapping second box is suppressed.
    assert "ppdet_retina.ppdet_adapters [2, 6] [2] None" in out


def test_error_when_paddledetection_is_not_importable(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("print('ran')\n")
    proc = _run(["-m", "ppdet_retina.ppdet_plugin", str(script)], pythonpath=(REPO,), cwd=str(tmp_path))
    assert proc.returncode == 1
    assert "ran" not in proc.stdout
    assert "cannot import PaddleDetection (No module named 'ppdet')" in proc.stdout
    assert "PYTHONPATH=/path/to/PaddleDetection (the folder that holds ppdet/ and tools/)" in proc.stdout


def _fake_registry(fake, names=()):
    """A fake PaddleDetection registry holding ``names``; register() then runs against it."""
    (fake / "ppdet" / "core" / "workspace.py").write_text(
        f"global_config = {{name: {{}} for name in {list(names)}}}\n"
        "def create(name):\n    pass\ndef register(cls):\n    return cls\n")
    return _run(["-c", "from ppdet_retina import ppdet_plugin; ppdet_plugin.register()"],
                pythonpath=(str(fake), REPO))


def test_error_when_paddledetection_differs_from_the_supported_one(tmp_path):
    """A PaddleDetection whose registry lacks the names the adapters take over (an older or other fork)."""
    fake = tmp_path / "old_ppdet"
    for package in ("ppdet", "ppdet/core", "ppdet/core/config", "ppdet/modeling"):
        (fake / package).mkdir(parents=True)
        (fake / package / "__init__.py").write_text("")
    (fake / "ppdet" / "__init__.py").write_text("__version__ = '0.9.0'\n")
    (fake / "ppdet" / "core" / "config" / "schema.py").write_text("def extract_schema(cls):\n    pass\n")
    proc = _fake_registry(fake)
    assert proc.returncode == 1
    assert (f"PluginError: ppdet_retina.ppdet_plugin: PaddleDetection 0.9.0 at {fake} differs from what the "
            f"adapters support: its registry has no RetinaHead, RetinaFeat, RetinaAnchorGenerator, MaxIoUAssigner, "
            f"FocalLoss, MultiClassNMS. Supported: PaddleDetection develop") in proc.stdout

    # The names are there, but its RetinaNet hands the head no batch in training.
    names = ["RetinaHead", "RetinaFeat", "RetinaAnchorGenerator", "MaxIoUAssigner", "FocalLoss", "MultiClassNMS"]
    (fake / "ppdet" / "modeling" / "architectures").mkdir()
    (fake / "ppdet" / "modeling" / "architectures" / "__init__.py").write_text("")
    (fake / "ppdet" / "modeling" / "architectures" / "retinanet.py").write_text(
        "class RetinaNet:\n    def _forward(self):\n        feats = self.neck(self.backbone(self.inputs))\n"
        "        if self.training:\n            return self.head(feats)\n"
        "        return self.head.post_process(self.head(feats), self.inputs['im_shape'])\n")
    proc = _fake_registry(fake, names)
    assert proc.returncode == 1
    assert (f"PluginError: ppdet_retina.ppdet_plugin: PaddleDetection 0.9.0 at {fake} differs from what the "
            f"adapters support: its RetinaNet does not call self.head(neck_feats, self.inputs) in training. "
            f"Supported: PaddleDetection develop") in proc.stdout


def test_error_for_a_config_key_our_component_does_not_take(work):
    proc = _run(_plugin("infer.py", "-c", CONFIG, "--infer_img", PHOTO, "--output_dir",
                        str(work["root"] / "bad_key"), "-o", *NARROW, *work["data"], "RetinaHead.nms_top=500",
                        f"weights={work['weights']}"))
    assert proc.returncode == 1
    assert ("ConfigError: RetinaHead: unknown config key 'nms_top' (did you mean 'nms_pre'?) for RetinaHead; "
            "valid keys: num_classes, conv_feat, anchor_generator, bbox_assigner, loss_class, loss_bbox, nms, "
            "prior_prob, nms_pre, weights") in proc.stdout
