"""PaddleDetection's other tool flags: --amp, --use_vdl, --profiler_options, --enable_ce, --to_static,
--slim_config (train), --save_prediction_only (eval), --infer_list / --save_threshold / --visualize (infer)."""

import json
import os
import runpy

import numpy as np
import paddle
import pytest

from ppdet_retina.core.workspace import ConfigError, load_config
from ppdet_retina.io import checkpoint
from ppdet_retina.inference.evaluate import Evaluator
from ppdet_retina.training.amp import MixedPrecision
from ppdet_retina.training.profiling import ProfilerDone, parse_profiler_options
from ppdet_retina.training.trainer import Trainer
from ppdet_retina.training.vdl import VisualDLWriter

from conftest import REPO, write_tiny_config


def tool_main(name):
    return runpy.run_path(os.path.join(REPO, "tools", name), run_name="flags_test")["main"]


def _extra(prefix):
    return paddle.load(prefix + ".pdopt")[checkpoint.EXTRA_KEY]


# --------------------------------------------------------------------------- --amp

def test_amp_on_cpu_trains_in_float32_and_checkpoints_the_scaler_state(tmp_path, tiny_coco, messages):
    cfg = load_config(write_tiny_config(tmp_path, tiny_coco, epoch=1), ["amp=true", "amp_level=O2"])
    trainer = Trainer(cfg, mode="train")
    assert trainer.amp.requested and not trainer.amp.active and trainer.amp.scaler is None
    assert "--amp asked on cpu: training runs in float32" in messages.text
    trainer.train()
    prefix = os.path.join(trainer.output_dir, "model_final")
    assert _extra(prefix)["amp_scaler"] == {}  # no scaler runs on a CPU
    assert {p.dtype for p in trainer.model.parameters()} == {paddle.float32}  # O2 did not cast
    resumed = Trainer(cfg, mode="train")
    resumed.resume_weights(prefix)
    assert resumed.amp.state_dict() == {}
    with pytest.raises(ConfigError, match="amp_level 'O3'"):
        MixedPrecision(True, "cpu", level="O3")


@pytest.mark.skipif(not paddle.device.is_compiled_with_cuda() or paddle.device.cuda.device_count() == 0,
                    reason="float16 loss scaling needs a CUDA GPU")
def test_amp_scaler_state_round_trips_through_a_checkpoint_on_gpu(tmp_path, tiny_coco):
    cfg = load_config(write_tiny_config(tmp_path, tiny_coco, epoch=1), ["amp=true", "use_gpu=true",
                                                                      "init_loss_scaling=512"])
    trainer = Trainer(cfg, mode="train")
    assert trainer.amp.active
    trainer.train()
    saved = _extra(os.path.join(trainer.output_dir, "model_final"))["amp_scaler"]
    assert float(np.asarray(saved["scale"]).reshape(-1)[0]) in (512.0, 256.0)  # halved on an overflow
    resumed = Trainer(load_config(write_tiny_config(tmp_path, tiny_coco, epoch=1), ["amp=true", "use_gpu=true"]),
                      mode="train")
    resumed.resume_weights(os.path.join(trainer.output_dir, "model_final"))
    state = resumed.amp.state_dict()
    assert float(state["scale"].reshape(-1)[0]) == float(np.asarray(saved["scale"]).reshape(-1)[0])
    assert state["incr_count"] == saved["incr_count"] and state["decr_count"] == saved["decr_count"]


# --------------------------------------------------------------------------- --use_vdl

def test_visualdl_scalars_read_back_from_the_log_dir(tmp_path, tiny_coco):
    visualdl = pytest.importorskip("visualdl")
    log_dir = str(tmp_path / "vdl")
    cfg = load_config(write_tiny_config(tmp_path, tiny_coco, epoch=2), ["use_vdl=true", f"vdl_log_dir={log_dir}"])
    trainer = Trainer(cfg, mode="train")
    trainer.train(validate=True)
    files = os.listdir(log_dir)
    assert len(files) == 1 and files[0].startswith("vdlrecords")
    reader = visualdl.LogReader(file_path=os.path.join(log_dir, files[0]))
    assert {"loss", "loss_cls", "loss_reg", "lr", "bbox-mAP"} <= set(reader.get_tags()["scalar"])
    with open(os.path.join(trainer.output_dir, "train_log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    train = [r for r in records if r["type"] == "train"]
    evals = [r for r in records if r["type"] == "eval"]

    def scalars(tag):
        return [(s.id, s.value) for s in reader.get_data("scalar", tag)]

    assert [s for s, _ in scalars("loss")] == [r["step"] for r in train] == [0, 1]
    np.testing.assert_allclose([v for _, v in scalars("loss_reg")], [r["loss_reg"] for r in train], rtol=1e-6)
    np.testing.assert_allclose([v for _, v in scalars("lr")], [0.005, 0.01 * 0.1 * 0.75], rtol=1e-6)
    assert [s for s, _ in scalars("bbox-mAP")] == [r["step"] for r in evals]
    np.testing.assert_allclose([v for _, v in scalars("bbox-mAP")], [r["bbox_map"] for r in evals], atol=1e-7)


def test_use_vdl_without_visualdl_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setitem(__import__("sys").modules, "visualdl", None)  # import visualdl now fails
    with pytest.raises(ConfigError, match=r"--use_vdl needs VisualDL.*pip install visualdl"):
        VisualDLWriter(str(tmp_path / "vdl"))


# --------------------------------------------------------------------------- --profiler_options

def test_profiler_options_parse_like_paddledetection():
    opts = parse_profiler_options("batch_range=[3, 7]; profile_path=out/p.json;sorted_key=ave;"
                                  "exit_on_finished=false")
    assert opts["batch_range"] == [3, 7] and opts["profile_path"] == "out/p.json"
    assert opts["sorted_key"] == "ave" and opts["exit_on_finished"] is False and opts["state"] == "All"
    for bad, word in [("batch_range=[5,5]", "batch_range"), ("batchrange=[1,2]", "batchrange"),
                      ("sorted_key=speed", "sorted_key"), ("profile_path", "profile_path")]:
        with pytest.raises(ValueError, match=word):
            parse_profiler_options(bad)


def test_profiler_records_the_batch_range_and_stops_the_run(tmp_path, tiny_coco):
    trace = str(tmp_path / "prof" / "trace.json")
    cfg = load_config(write_tiny_config(tmp_path, tiny_coco, epoch=4),
                      [f"profiler_options=batch_range=[1,3];profile_path={trace}"])
    trainer = Trainer(cfg, mode="train")  # one iteration per epoch
    with pytest.raises(ProfilerDone, match=r"iterations 1\.\.2"):
        trainer.train()
    assert trainer.lr.last_epoch == 3  # iterations 0, 1, 2 ran; the run stopped before iteration 3
    with open(trace) as f:
        events = json.load(f)["traceEvents"]
    assert any("conv2d" in str(e.get("name", "")) for e in events)
    assert not os.path.exists(os.path.join(trainer.output_dir, "model_final.pdparams"))


def test_profiler_range_past_the_run_still_writes_its_trace(tmp_path, tiny_coco):
    trace = str(tmp_path / "late.json")
    cfg = load_config(write_tiny_config(tmp_path, tiny_coco, epoch=2),
                      [f"profiler_options=batch_range=[1,5];profile_path={trace};exit_on_finished=false"])
    trainer = Trainer(cfg, mode="train")
    trainer.train()  # iterations 0 and 1 only: the range is cut short by the end of training
    assert os.path.exists(os.path.join(trainer.output_dir, "model_final.pdparams"))
    with open(trace) as f:
        assert json.load(f)["traceEvents"]


# --------------------------------------------------------------------------- tools/train.py flags

def test_enable_ce_runs_repeat_exactly(tmp_path, tiny_coco):
    main = tool_main("train.py")
    digests = []
    for run in range(2):
        (tmp_path / f"run{run}").mkdir()
        cfg = write_tiny_config(tmp_path / f"run{run}", tiny_coco, epoch=1)
        main(["-c", cfg, "--enable_ce", "-o", "TrainReader.shuffle=true", "TrainReader.batch_size=1"])
        state = paddle.load(os.path.join(str(tmp_path / f"run{run}"), "output", "tiny_retina",
                                         "model_final.pdparams"), return_numpy=True)
        digests.append({k: np.asarray(v) for k, v in state.items()})
    assert digests[0].keys() == digests[1].keys()
    for key in digests[0]:
        np.testing.assert_array_equal(digests[0][key], digests[1][key], err_msg=key)


def test_given_flags_set_their_config_keys():
    from ppdet_retina.training.train_options import flags_to_config

    parser = runpy.run_path(os.path.join(REPO, "tools", "train.py"), run_name="flags_test")["build_parser"]()
    args = parser.parse_args(["-c", "x.yml", "--amp", "--use_vdl", "false", "--enable_ce",
                              "--profiler_options", "batch_range=[1,2]"])
    cfg = flags_to_config({"use_vdl": True, "fleet": True}, args)
    assert cfg == {"use_vdl": False, "fleet": True, "amp": True, "enable_ce": True,
                   "profiler_options": "batch_range=[1,2]"}


@pytest.mark.parametrize("flag, message", [
    (["--to_static"], "--to_static is not supported for RetinaNet"),
    (["--slim_config", "prune.yml"], "PaddleSlim compression"),
])
def test_unsupported_train_flags_say_so(tmp_path, tiny_coco, flag, message):
    with pytest.raises(ConfigError, match=message):
        tool_main("train.py")(["-c", write_tiny_config(tmp_path, tiny_coco, epoch=1), *flag])


# --------------------------------------------------------------------------- eval and infer flags

@pytest.fixture
def untrained_weights(tmp_path, tiny_coco):
    cfg_path = write_tiny_config(tmp_path, tiny_coco, epoch=1)
    paddle.seed(3)
    trainer = Trainer(load_config(cfg_path), mode="train")
    return cfg_path, checkpoint.save_checkpoint(trainer.model, None, str(tmp_path / "w"), "init")


def test_eval_save_prediction_only_writes_bbox_json_without_map(tmp_path, untrained_weights):
    cfg_path, weights = untrained_weights
    cfg = load_config(cfg_path, [f"weights={weights}", "save_prediction_only=true",
                                 "RetinaHead.nms.score_threshold=0.0", f"output_eval={tmp_path / 'ev'}"])
    evaluator = Evaluator(cfg)
    evaluator.load_weights(weights)
    assert evaluator.evaluate() == {}
    with open(tmp_path / "ev" / "bbox.json") as f:
        dets = json.load(f)
    assert {d["image_id"] for d in dets} == {1, 2, 3, 5}  # the four val images


def test_infer_list_save_threshold_and_visualize(tmp_path, tiny_coco, untrained_weights):
    cfg_path, weights = untrained_weights
    listing = tmp_path / "list.txt"
    listing.write_text("# two of the images\nimg_1.png\n\nimg_3.png\n")
    common = ["-c", cfg_path, "--infer_list", str(listing), "--infer_dir", tiny_coco.image_root,
              "--save_results", "-o", f"weights={weights}", "RetinaHead.nms.score_threshold=0.0"]
    infer = tool_main("infer.py")
    infer(common + ["--output_dir", str(tmp_path / "all")])
    assert sorted(os.listdir(tmp_path / "all")) == ["bbox.json", "img_1.png", "img_3.png"]
    with open(tmp_path / "all" / "bbox.json") as f:
        scores = sorted(d["score"] for d in json.load(f))
    threshold = scores[len(scores) // 2]
    infer(common + ["--output_dir", str(tmp_path / "kept"), "--save_threshold", str(threshold),
                    "--visualize", "false"])
    assert os.listdir(tmp_path / "kept") == ["bbox.json"]  # no pictures
    with open(tmp_path / "kept" / "bbox.json") as f:
        kept = sorted(d["score"] for d in json.load(f))
    assert kept == [s for s in scores if s >= threshold] and 0 < len(kept) < len(scores)

    listing.write_text("img_1.png\nmissing.png\n")
    with pytest.raises(FileNotFoundError, match="line 2: image .*missing.png"):
        infer(common + ["--output_dir", str(tmp_path / "bad")])
