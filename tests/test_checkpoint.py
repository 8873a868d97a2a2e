"""Checkpoints: PaddleDetection name conversion, strict / partial loading, atomic save, resume."""

import contextlib
import logging
import os

import numpy as np
import paddle
import pytest

from ppdet_retina.core.workspace import load_config, create
from ppdet_retina.io import checkpoint as ckpt
from ppdet_retina.io.checkpoint import load_pretrain_weights, load_weights, resume_checkpoint, save_checkpoint
from ppdet_retina.io.ppdet_names import convert_ppdet_state_dict, detect_key_style
from ppdet_retina.modeling.backbones.resnet import ResNet

from conftest import REPO, read_param_table

# Our R50-FPN configs build PaddleDetection's published models (test_retinanet, test_faster_rcnn).
RETINA_CFG = os.path.join(REPO, "configs", "retinanet", "retinanet_r50_fpn_1x.yml")
FRCNN_CFG = os.path.join(REPO, "configs", "faster_rcnn", "faster_rcnn_r50_fpn_1x.yml")


def _tsv_state(arch="retinanet", seed=0):
    """PaddleDetection names and shapes from its parameter table, filled with random numbers."""
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(dims, dtype=np.float32) for name, dims in read_param_table(arch).items()}


def _save_state(state, path):
    paddle.save({k: paddle.to_tensor(v) for k, v in state.items()}, path)
    return path


@pytest.fixture(scope="module")
def r50(tmp_path_factory):
    """The full RetinaNet R50-FPN built from our config, and a PaddleDetection-named file for it."""
    cfg = load_config(RETINA_CFG)
    model = create(cfg.architecture, cfg)
    state = _tsv_state()
    folder = tmp_path_factory.mktemp("r50")
    return model, state, _save_state(state, str(folder / "ppdet_retinanet.pdparams"))


def _tiny_retinanet(num_classes=3):
    overrides = {"num_classes": num_classes, "ResNet": {"depth": 18, "width_mult": 0.125},
                 "FPN": {"out_channel": 8}, "RetinaHead": {"conv_feat": {"feat_in": 8, "feat_out": 8,
                                                                          "num_convs": 1}}}
    cfg = load_config(RETINA_CFG, overrides)
    return create(cfg.architecture, cfg)


def _np(model, key):
    return model.state_dict()[key].numpy()


# --------------------------------------------------------------------------- conversion

def test_full_paddledetection_retinanet_loads_into_place(r50):
    model, state, file = r50
    report = load_weights(model, file)
    assert report["style"] == "ppdet" and report["loaded"] == len(state) == 301 and report["skipped"] == []
    pairs = {
        "backbone.stem.0.conv.weight": "backbone.conv1.conv1.conv.weight",
        "backbone.res2.0.shortcut.norm._mean": "backbone.res2.res2a.short.norm._mean",
        "backbone.res4.5.conv3.norm._variance": "backbone.res4.res4f.branch2c.norm._variance",
        "backbone.res5.2.conv2.conv.weight": "backbone.res5.res5c.branch2b.conv.weight",
        "neck.lateral_convs.0.weight": "neck.fpn_inner_res3_sum_lateral.weight",
        "neck.lateral_convs.2.bias": "neck.fpn_inner_res5_sum.bias",
        "neck.output_convs.1.weight": "neck.fpn_res4_sum.weight",
        "neck.extra_convs.0.weight": "neck.fpn_6.weight",
        "neck.extra_convs.1.bias": "neck.fpn_7.bias",
        "head.conv_feat.cls_tower.3.conv.weight": "head.conv_feat.fcos_head_cls_tower_conv_3.conv.weight",
        "head.conv_feat.box_tower.0.conv.bias": "head.conv_feat.fcos_head_reg_tower_conv_0.conv.bias",
        "head.cls_logits.weight": "head.retina_cls.weight",
        "head.bbox_deltas.bias": "head.retina_reg.bias",
    }
    for ours, theirs in pairs.items():
        np.testing.assert_array_equal(_np(model, ours), state[theirs], err_msg=ours)


def test_imagenet_backbone_file_loads_backbone_only(r50, tmp_path):
    model, state, _ = r50
    backbone = {k[len("backbone."):]: v + 1.0 for k, v in state.items() if k.startswith("backbone.")}
    backbone["fc.weight"] = np.zeros([2048, 10], np.float32)  # the ImageNet classifier: not ours
    backbone["fc.bias"] = np.zeros([10], np.float32)
    file = _save_state(backbone, str(tmp_path / "ResNet50_pretrained.pdparams"))
    neck_before = _np(model, "neck.extra_convs.1.bias").copy()

    report = load_pretrain_weights(model, file[:-len(".pdparams")])  # path without extension works too
    assert report["style"] == "ppdet_backbone" and report["loaded"] == 265
    assert sorted(report["unused"]) == ["backbone.fc.bias", "backbone.fc.weight"]  # reported as converted
    assert len(report["not_in_file"]) == 301 - 265 and all(k.startswith(("neck.", "head.")) for k in
                                                             report["not_in_file"])
    np.testing.assert_array_equal(_np(model, "backbone.res3.1.conv1.conv.weight"),
                                  backbone["res3.res3b.branch2a.conv.weight"])
    np.testing.assert_array_equal(_np(model, "neck.extra_convs.1.bias"), neck_before)

    with pytest.raises(ValueError, match="missing in file"):
        load_weights(model, file)  # strict loading refuses a partial file

    bare = load_pretrain_weights(model.backbone, file)  # a bare backbone has no 'backbone.' prefix
    assert bare["loaded"] == 265 and bare["not_in_file"] == []


def _ppdet_resnet_names(depth_counts, bottleneck, variant):
    """PaddleDetection's ResNet names, written out independently of the converter's rules."""
    names = []
    stem = ["conv1"] if variant in "ab" else ["conv1_1", "conv1_2", "conv1_3"]
    for s in stem:
        names.append(f"conv1.{s}")
    for stage, count in zip(range(2, 6), depth_counts):
        for i in range(count):
            if count > 10 and stage == 4:
                block = "res4a" if i == 0 else f"res4b{i}"
            else:
                block = f"res{stage}{'abcdefghijklmnopqrstuvwxyz'[i]}"
            branches = ["branch2a", "branch2b"] + (["branch2c"] if bottleneck else [])
            if i == 0:
                branches.append("short.conv" if (variant == "d" and stage > 2) else "short")
            names += [f"res{stage}.{block}.{b}" for b in branches]
    return [f"{n}.{p}" for n in names
            for p in ("conv.weight", "norm.weight", "norm.bias", "norm._mean", "norm._variance")]


def test_resnet101_vd_names_convert_onto_the_model():
    model = ResNet(depth=101, variant="d", width_mult=0.0625)
    model_state = model.state_dict()
    theirs = _ppdet_resnet_names([3, 4, 23, 3], True, "d")
    assert "res4.res4b22.branch2c.norm._mean" in theirs and "res3.res3a.short.conv.conv.weight" in theirs
    state = {k: np.full([1], i, np.float32) for i, k in enumerate(theirs)}
    assert detect_key_style(state) == "ppdet_backbone"
    converted = convert_ppdet_state_dict(state, model_state.keys())
    assert set(converted) == set(model_state)
    assert converted["res4.22.conv3.norm._mean"] == state["res4.res4b22.branch2c.norm._mean"]
    assert converted["res4.1.conv1.conv.weight"] == state["res4.res4b1.branch2a.conv.weight"]
    assert converted["stem.2.norm.bias"] == state["conv1.conv1_3.norm.bias"]
    assert converted["res3.0.shortcut.conv.weight"] == state["res3.res3a.short.conv.conv.weight"]
    assert converted["res2.0.shortcut.norm.weight"] == state["res2.res2a.short.norm.weight"]


def test_resnet34_names_convert_with_basic_blocks():
    model = ResNet(depth=34, width_mult=0.0625)
    theirs = _ppdet_resnet_names([3, 4, 6, 3], False, "b")
    converted = convert_ppdet_state_dict({k: 0 for k in theirs}, model.state_dict().keys())
    assert set(converted) == set(model.state_dict())


def test_our_own_names_are_detected_and_kept():
    assert detect_key_style(["backbone.res2.0.conv1.conv.weight", "neck.extra_convs.0.weight"]) == "ours"
    state = {"backbone.res2.0.conv1.conv.weight": 1}
    assert convert_ppdet_state_dict(state, list(state)) == state


# --------------------------------------------------------------------------- strict loading errors

@pytest.fixture
def tiny_file(tmp_path):
    model = _tiny_retinanet()
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    return model, state, tmp_path


def test_own_checkpoint_round_trip(tiny_file):
    model, state, folder = tiny_file
    prefix = save_checkpoint(model, None, str(folder), "model_final")
    assert prefix == str(folder / "model_final") and not os.path.exists(prefix + ".pdopt")
    other = _tiny_retinanet()
    report = load_weights(other, prefix)
    assert report["style"] == "ours" and report["loaded"] == len(state)
    for key in ("backbone.res5.1.conv2.conv.weight", "neck.lateral_convs.1.bias", "head.cls_logits.weight"):
        np.testing.assert_array_equal(_np(other, key), state[key])


@pytest.mark.parametrize("change, message", [
    ("drop", "missing in file .*neck.output_convs.0.weight"),
    ("add", "unexpected in file .*neck.bogus.weight"),
    ("reshape", r"wrong shape .*neck.lateral_convs.0.weight file \[8, 4, 1, 1\] vs model \[8, 16, 1, 1\]"),
])
def test_strict_loading_names_bad_keys(tiny_file, change, message):
    model, state, folder = tiny_file
    if change == "drop":
        del state["neck.output_convs.0.weight"]
    elif change == "add":
        state["neck.bogus.weight"] = np.zeros([2], np.float32)
    else:
        state["neck.lateral_convs.0.weight"] = np.zeros([8, 4, 1, 1], np.float32)
    file = _save_state(state, str(folder / "bad.pdparams"))
    with pytest.raises(ValueError, match=message):
        load_weights(model, file)
    # Partial loading tolerates names, and a few tensors of another shape (skipped and reported).
    report = load_pretrain_weights(model, file)
    wrong = [k for k, _, _ in report["wrong_shape"]]
    assert wrong == (["neck.lateral_convs.0.weight"] if change == "reshape" else [])
    assert report["loaded"] == len(state) - (1 if change in ("reshape", "add") else 0)


def test_head_class_mismatch_is_reported_and_skippable(tmp_path):
    five = _tiny_retinanet(num_classes=5)
    file = save_checkpoint(five, None, str(tmp_path), "five") + ".pdparams"
    three = _tiny_retinanet(num_classes=3)
    cls_before = _np(three, "head.cls_logits.weight").copy()
    with pytest.raises(ValueError, match=r"different number of classes.*head.cls_logits.weight file \[45"):
        load_weights(three, file)
    report = load_weights(three, file, skip_mismatch_head=True)
    assert sorted(report["skipped"]) == ["head.cls_logits.bias", "head.cls_logits.weight"]
    np.testing.assert_array_equal(_np(three, "head.cls_logits.weight"), cls_before)
    np.testing.assert_array_equal(_np(three, "head.bbox_deltas.weight"), _np(five, "head.bbox_deltas.weight"))
    assert load_pretrain_weights(three, file)["skipped"] == report["skipped"]


def test_missing_file_and_url_give_clear_errors(tmp_path, monkeypatch):
    model = ResNet(depth=18, width_mult=0.125)
    with pytest.raises(FileNotFoundError, match=r"nowhere\.pdparams' not found.*-o weights="):
        load_weights(model, str(tmp_path / "nowhere"))
    monkeypatch.setenv("PPDET_WEIGHTS_HOME", str(tmp_path / "cache"))
    url = "https://127.0.0.1:9/models/ResNet50_cos_pretrained.pdparams"  # the discard port: refused
    monkeypatch.setattr(ckpt.download_cache.time, "sleep", lambda s: None)
    with pytest.raises(FileNotFoundError, match=r"cannot download.*ResNet50_cos_pretrained.*pretrain_weights="):
        load_pretrain_weights(model, url)
    with pytest.raises(FileNotFoundError, match=r"resuming needs a local checkpoint"):
        resume_checkpoint(model, None, url)
    garbage = tmp_path / "broken.pdparams"
    garbage.write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="broken.pdparams"):
        load_weights(model, str(garbage))


# --------------------------------------------------------------------------- save / resume

def _linear_and_opt(seed):
    paddle.seed(seed)
    model = paddle.nn.Linear(3, 2)
    opt = paddle.optimizer.Momentum(learning_rate=0.1, momentum=0.9, parameters=model.parameters())
    return model, opt


def _step(model, opt):
    loss = model(paddle.ones([4, 3])).sum()
    loss.backward()
    opt.step()
    opt.clear_grad()


def test_failed_write_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    model, opt = _linear_and_opt(0)
    prefix = save_checkpoint(model, opt, str(tmp_path), "latest", {"epoch": 1})
    good = model.weight.numpy().copy()
    _step(model, opt)

    real_save = paddle.save

    def dying_save(obj, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"half a pickle")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ckpt.paddle, "save", dying_save)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(model, opt, str(tmp_path), "latest", {"epoch": 2})
    monkeypatch.setattr(ckpt.paddle, "save", real_save)

    # no temp file left over; the commit record still describes the first save
    assert sorted(os.listdir(tmp_path)) == ["latest.commit.json", "latest.pdopt", "latest.pdparams"]
    fresh, fresh_opt = _linear_and_opt(5)
    assert resume_checkpoint(fresh, fresh_opt, prefix) == {"epoch": 1}
    np.testing.assert_array_equal(fresh.weight.numpy(), good)


def test_resume_restores_model_optimizer_and_extra(tmp_path):
    model, opt = _linear_and_opt(0)
    _step(model, opt)
    prefix = save_checkpoint(model, opt, str(tmp_path), "7", {"epoch": 7, "lr_step": 70, "best_ap": 0.25})
    _step(model, opt)  # the continued run, to compare with
    want_weight = model.weight.numpy().copy()

    fresh, fresh_opt = _linear_and_opt(1)
    extra = resume_checkpoint(fresh, fresh_opt, prefix + ".pdparams")
    assert extra == {"epoch": 7, "lr_step": 70, "best_ap": 0.25}
    _step(fresh, fresh_opt)  # momentum restored: the same next step as the original run
    np.testing.assert_allclose(fresh.weight.numpy(), want_weight, rtol=1e-6)


def test_resume_paddledetection_pdopt_epoch(tmp_path):
    model, opt = _linear_and_opt(0)
    _step(model, opt)
    prefix = str(tmp_path / "ppdet")
    paddle.save(model.state_dict(), prefix + ".pdparams")
    paddle.save(dict(opt.state_dict(), last_epoch=11), prefix + ".pdopt")
    fresh, fresh_opt = _linear_and_opt(1)
    assert resume_checkpoint(fresh, fresh_opt, prefix) == {"epoch": 11}
    os.remove(prefix + ".pdopt")
    with pytest.raises(FileNotFoundError, match=r"ppdet\.pdopt"):
        resume_checkpoint(fresh, fresh_opt, prefix)


# PaddleDetection's RPN / RoI head parameters -> ours, written out by hand (fc6 / fc7 keep their names).
FRCNN_HEAD_NAMES = {
    "rpn_head.rpn_feat.rpn_conv": "rpn_head.rpn_conv",
    "rpn_head.rpn_rois_score": "rpn_head.objectness",
    "rpn_head.rpn_rois_delta": "rpn_head.deltas",
    "bbox_head.head.fc6": "bbox_head.head.fc6",
    "bbox_head.head.fc7": "bbox_head.head.fc7",
    "bbox_head.bbox_score": "bbox_head.cls_score",
    "bbox_head.bbox_delta": "bbox_head.bbox_pred",
}


def test_full_paddledetection_faster_rcnn_names_convert():
    """C2..C5 FPN inputs, max-pool P6, RPN and RoI heads: every name lands on a same-shaped tensor
    (the names load_weights converts with: PaddleDetection's table onto our config's model)."""
    cfg = load_config(FRCNN_CFG)
    model_state = create(cfg.architecture, cfg).state_dict()
    shapes = {name: np.empty(dims, np.float32) for name, dims in read_param_table("faster_rcnn").items()}
    assert len(shapes) == len(model_state) == 295
    assert detect_key_style(shapes) == "ppdet"
    converted = convert_ppdet_state_dict(shapes, model_state.keys())
    assert set(converted) == set(model_state)
    assert all(tuple(v.shape) == tuple(model_state[k].shape) for k, v in converted.items())
    pairs = {"neck.lateral_convs.0.weight": "neck.fpn_inner_res2_sum_lateral.weight",
             "neck.lateral_convs.3.bias": "neck.fpn_inner_res5_sum.bias",
             "neck.output_convs.0.weight": "neck.fpn_res2_sum.weight",
             "rpn_head.rpn_conv.weight": "rpn_head.rpn_feat.rpn_conv.weight",
             "rpn_head.objectness.bias": "rpn_head.rpn_rois_score.bias",
             "rpn_head.deltas.weight": "rpn_head.rpn_rois_delta.weight",
             "bbox_head.cls_score.weight": "bbox_head.bbox_score.weight",
             "bbox_head.bbox_pred.bias": "bbox_head.bbox_delta.bias"}
    for ours, theirs in pairs.items():
        assert converted[ours] is shapes[theirs], ours
    # Every RPN / RoI head parameter, and only those, is one of the hand-written renames.
    heads = [k for k in shapes if k.startswith(("rpn_head.", "bbox_head."))]
    assert len(heads) == 14
    expected = {f"{theirs_}.{leaf}": f"{ours_}.{leaf}" for theirs_, ours_ in FRCNN_HEAD_NAMES.items()
                for leaf in ("weight", "bias")}
    assert sorted(heads) == sorted(expected)
    for theirs_name, ours_name in expected.items():
        # A rename keeps the value object: the table's array itself arrives under our name.
        assert converted[ours_name] is shapes[theirs_name], theirs_name


# --------------------------------------------------------------------------- load reports in the log

@contextlib.contextmanager
def _log_lines(name="ppdet_retina.io.checkpoint"):
    """Messages of one logger (the package's root logger does not propagate to pytest's caplog)."""
    records = []
    handler = logging.Handler(level=logging.INFO)
    handler.emit = records.append
    log = logging.getLogger(name)
    old_level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield records
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)


def test_resnet_vd_file_into_resnet_b_loads_partially_and_logs_its_report(tmp_path):
    vd = ResNet(depth=50, variant="d", width_mult=0.0625)
    b = ResNet(depth=50, variant="b", width_mult=0.0625)
    file = save_checkpoint(vd, None, str(tmp_path), "r50_vd") + ".pdparams"
    total = len(b.state_dict())
    with _log_lines() as records:
        report = load_pretrain_weights(b, file)
    # vd's stem is three 3x3 conv+norm (15 tensors), b's one 7x7 conv+norm (5): stem.0 is mis-shaped,
    # stem.1 / stem.2 are unused; every block after the stem fits.
    assert report["loaded"] == total - 5 and [k for k, _, _ in report["wrong_shape"]] == [
        "stem.0.conv.weight", "stem.0.norm.weight", "stem.0.norm.bias", "stem.0.norm._mean",
        "stem.0.norm._variance"]
    assert len(report["unused"]) == 10 and all(k.startswith(("stem.1.", "stem.2.")) for k in report["unused"])
    np.testing.assert_array_equal(_np(b, "res5.2.conv3.conv.weight"), _np(vd, "res5.2.conv3.conv.weight"))
    info, warning = [r.getMessage() for r in records]
    assert info.startswith(f"pretrain_weights: loaded {total - 5} of the model's {total} tensors from {file}")
    assert "; 10 in the file unused by the model: stem.1.conv.weight, stem.1.norm.weight" in info
    assert "... (5 more)" in info and records[1].levelno == logging.WARNING
    assert warning.startswith("pretrain_weights: 5 tensor(s) of another shape skipped, left as initialised")
    assert "stem.0.conv.weight file [2, 3, 3, 3] vs model [4, 3, 7, 7]" in warning


def test_head_of_another_class_count_is_reinitialised_and_logged(tmp_path):
    five = _tiny_retinanet(num_classes=5)
    file = save_checkpoint(five, None, str(tmp_path), "five") + ".pdparams"
    three = _tiny_retinanet(num_classes=3)
    total = len(three.state_dict())
    with _log_lines() as records:
        load_pretrain_weights(three, file)
    info, warning = [r.getMessage() for r in records]
    assert info == f"pretrain_weights: loaded {total - 2} of the model's {total} tensors from {file} (our names)"
    # 9 anchors per cell: 9 * 5 = 45 channels in the file, 9 * 3 = 27 in the model
    assert warning.startswith("pretrain_weights: 2 class-dependent head tensor(s) re-initialised")
    assert "head.cls_logits.weight file [45, 8, 3, 3] vs model [27, 8, 3, 3]" in warning


def test_backbone_file_and_resume_log_their_counts(r50, tmp_path):
    model, state, _ = r50
    backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    file = _save_state(backbone, str(tmp_path / "ResNet50_pretrained.pdparams"))
    with _log_lines() as records:
        load_pretrain_weights(model, file)
    (line,) = [r.getMessage() for r in records]
    assert line.startswith(f"pretrain_weights: loaded 265 of the model's 301 tensors from {file} "
                           f"(PaddleDetection backbone names); 36 not in the file, left as initialised: neck.")
    small = paddle.nn.Linear(3, 2)
    prefix = save_checkpoint(small, None, str(tmp_path), "small")
    with _log_lines() as records:
        resume_checkpoint(small, None, prefix)
    assert [r.getMessage() for r in records] == [f"resume: loaded 2 of the model's 2 tensors from {prefix}.pdparams "
                                                 f"(our names)"]
