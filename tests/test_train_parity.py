"""Training parity with PaddleDetection 2.6: same weights, batch, config and schedule -> same updates.

``tools/dev/ppdet_train_reference.py`` ran PaddleDetection's own RetinaNet / Faster R-CNN config (narrow
FPN and heads, seeded weights, a two-image batch with boxes) for three Momentum steps at the end of the
config's warm-up and stored, per parameter, its optimizer settings and its update (after minus before).
Here our model from our config takes the same steps with the LR schedule and optimizer the trainer
builds (``build_optimizer``), and every parameter's update must agree within 1% relative norm:
``|ours - theirs| / |theirs| <= 0.01`` (on the stored sample positions for the large backbone tensors,
whose exact norm must agree as well). Parameters PaddleDetection keeps frozen must not move.
"""

from __future__ import annotations

import json
import os
from typing import Dict

import numpy as np
import paddle
import pytest

from ppdet_retina.core.workspace import load_config
from ppdet_retina.io.checkpoint import load_weights
from ppdet_retina.training.optimizer import build_optimizer
from ppdet_retina.io.ppdet_names import convert_ppdet_state_dict

from conftest import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REL_TOL = 0.01


tref = load_script("tools/dev/ppdet_train_reference.py", "ppdet_train_reference")
gen = tref.gen


def _fixture(arch: str) -> Dict[str, np.ndarray]:
    path = os.path.join(ROOT, "tests", "data", f"ppdet_train_{arch}.npz")
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def _per_param(ref: Dict[str, np.ndarray], key: str, model_keys, names: str = "param_names") -> Dict[str, float]:
    """A per-parameter array of the fixture (``ref[key]``, one value per PaddleDetection name in
    ``ref[names]``) as {our name: value}."""
    ppdet_names = [str(n) for n in ref[names]]
    return convert_ppdet_state_dict(dict(zip(ppdet_names, ref[key].tolist())), model_keys)


def _our_batch(arch: str, inputs: Dict[str, np.ndarray]) -> Dict[str, paddle.Tensor]:
    keys = ["image", "im_shape", "scale_factor", "im_id", "gt_bbox", "gt_class", "is_crowd", "pad_gt_mask"]
    return {k: paddle.to_tensor(inputs[k]) for k in keys}


def run_our_steps(arch: str, ref: Dict[str, np.ndarray], tmp_path) -> Dict[str, object]:
    """Our model from our config + the fixture's overrides and weights, trained as the trainer trains."""
    paddle.set_device("cpu")
    cfg = load_config(os.path.join(ROOT, tref.OUR_CONFIGS[arch]), json.loads(str(ref["overrides"])))
    from ppdet_retina.core.workspace import create

    model = create(cfg["architecture"], cfg)
    seed = int(ref["seed"])
    state = gen.make_state_dict([str(n) for n in ref["state_names"]], json.loads(str(ref["state_shapes"])), seed)
    np.testing.assert_allclose(gen.state_checksum(state), ref["state_checksum"], rtol=1e-9)
    path = str(tmp_path / f"{arch}_ppdet.pdparams")
    paddle.save({k: paddle.to_tensor(v) for k, v in state.items()}, path)
    assert load_weights(model, path)["style"] == "ppdet"
    before = {k: v.numpy().copy() for k, v in model.state_dict().items()}

    lr, optimizer = build_optimizer(cfg, model, int(ref["steps_per_epoch"]))
    for _ in range(int(ref["start_iter"])):
        lr.step()
    batch = _our_batch(arch, gen.make_inputs(seed))
    model.train()
    lrs, losses = [], []
    for _ in range(int(ref["steps"])):
        outputs = model(batch)
        outputs["loss"].backward()
        lrs.append(float(optimizer.get_lr()))
        optimizer.step()
        optimizer.clear_grad()
        lr.step()
        losses.append(float(outputs["loss"]))
    model.eval()
    after = {k: v.numpy() for k, v in model.state_dict().items()}
    return {"model": model, "before": before, "after": after, "lr": lrs, "loss": losses}


def update_agreement(ref: Dict[str, np.ndarray], run: Dict[str, object]) -> Dict[str, float]:
    """{our parameter name: relative difference of the update} over PaddleDetection's trainable ones."""
    model_keys = list(run["after"])
    ppdet_names = [str(n) for n in ref["param_names"]]
    ours_of = convert_ppdet_state_dict({n: n for n in ppdet_names}, model_keys)
    rel = {}
    for ours, theirs in ours_of.items():
        if f"dnorm:{theirs}" not in ref:
            continue
        delta = (run["after"][ours].astype(np.float64) - run["before"][ours].astype(np.float64)).reshape(-1)
        if f"delta:{theirs}" in ref:
            expected = ref[f"delta:{theirs}"].astype(np.float64)
            got = delta
        else:
            expected = ref[f"dval:{theirs}"].astype(np.float64)
            got = delta[ref[f"idx:{theirs}"]]
            # The samples stand for the whole tensor only if the whole update has the same size.
            norm_ratio = np.linalg.norm(delta) / float(ref[f"dnorm:{theirs}"])
            assert abs(norm_ratio - 1) <= REL_TOL, f"{ours}: update norm ratio {norm_ratio:.5f}"
        rel[ours] = float(np.linalg.norm(got - expected) / max(np.linalg.norm(expected), 1e-30))
    return rel


@pytest.fixture(scope="module")
def parity_run(tmp_path_factory):
    """``parity_run(arch)`` -> (PaddleDetection's fixture, our three steps on it); each arch runs once."""
    runs: Dict[str, tuple] = {}

    def get(arch: str) -> tuple:
        if arch not in runs:
            ref = _fixture(arch)
            runs[arch] = ref, run_our_steps(arch, ref, tmp_path_factory.mktemp("train_parity"))
        return runs[arch]

    return get


def test_retinanet_parameter_groups_match(parity_run):
    """Same trainable set, per-parameter LR multipliers and own regularizers as PaddleDetection."""
    ref, run = parity_run("retinanet")
    model = run["model"]
    named = dict(model.named_parameters())
    keys = list(model.state_dict())
    trainable = _per_param(ref, "trainable", keys)
    lr_mult = _per_param(ref, "lr_mult", keys)
    reg = _per_param(ref, "reg_coeff", keys)
    assert set(trainable) == set(named)
    for name, param in named.items():
        assert (not param.stop_gradient) == trainable[name], name
        if not trainable[name]:
            continue
        assert float(param.optimize_attr["learning_rate"]) == lr_mult[name], name
        own = getattr(param, "regularizer", None)
        assert (-1.0 if own is None else float(own._coeff)) == reg[name], name
    # The published quirk the fixture must show: tower conv biases at twice the LR.
    doubled = sorted(n for n, m in lr_mult.items() if m == 2.0)
    assert doubled == sorted(f"head.conv_feat.{t}_tower.{i}.conv.bias" for t in ("cls", "box") for i in range(2))


def test_retinanet_updates_match(parity_run):
    ref, run = parity_run("retinanet")
    np.testing.assert_allclose(run["lr"], ref["lr"], rtol=1e-9)
    # Schedule at the end of the warm-up: 0.01 * (0.001 + 0.999 * i / 500), i = 498, 499, 500.
    np.testing.assert_allclose(run["lr"], [0.01 * (0.001 + 0.999 * i / 500) for i in (498, 499, 500)], rtol=1e-9)
    np.testing.assert_allclose(run["loss"], ref["loss:loss"], rtol=1e-4)
    rel = update_agreement(ref, run)
    assert len(rel) == int(ref["trainable"].sum()) == 70
    worst = max(rel, key=rel.get)
    assert rel[worst] <= REL_TOL, f"{worst}: update differs by {rel[worst]:.4f} of its norm"


def test_retinanet_frozen_parts_stay_frozen(parity_run):
    ref, run = parity_run("retinanet")
    keys = list(run["after"])
    changed = _per_param(ref, "changed", keys, names="state_names")
    assert set(changed) == set(keys)
    moved = {k for k in keys if not np.array_equal(run["after"][k], run["before"][k])}
    assert moved == {k for k, v in changed.items() if v}
    # Stem, res2 and every BN (weights and running stats) are frozen in the published config.
    assert not any(k.startswith(("backbone.stem.", "backbone.res2.")) or ".norm." in k for k in moved)


def test_gn_tower_norms_get_no_decay():
    """With GroupNorm towers (the demo's head) PaddleDetection's FCOSFeat gives the norm's scale and
    shift L2Decay(0.) at LR 1, and the conv bias LR 2 with the optimizer's decay."""
    from ppdet_retina.modeling.heads.retina_head import RetinaFeat

    feat = RetinaFeat(feat_in=32, feat_out=32, num_convs=1, norm_type="gn")
    attrs = {n: (float(p.optimize_attr["learning_rate"]), None if p.regularizer is None else p.regularizer._coeff)
             for n, p in feat.named_parameters()}
    for tower in ("cls_tower", "box_tower"):
        assert attrs[f"{tower}.0.conv.weight"] == (1.0, None)
        assert attrs[f"{tower}.0.conv.bias"] == (2.0, None)
        assert attrs[f"{tower}.0.norm.weight"] == (1.0, 0.0)
        assert attrs[f"{tower}.0.norm.bias"] == (1.0, 0.0)


def test_faster_rcnn_updates_match(parity_run):
    ref, run = parity_run("faster_rcnn")
    # Faster R-CNN's warm-up: 1000 steps from 0.1: 0.01 * (0.1 + 0.9 * i / 1000).
    np.testing.assert_allclose(run["lr"], [0.01 * (0.1 + 0.9 * i / 1000) for i in (498, 499, 500)], rtol=1e-9)
    np.testing.assert_allclose(run["lr"], ref["lr"], rtol=1e-9)
    np.testing.assert_allclose(run["loss"], ref["loss:loss"], rtol=1e-4)
    model = run["model"]
    keys = list(run["after"])
    trainable = _per_param(ref, "trainable", keys)
    for name, param in model.named_parameters():
        assert (not param.stop_gradient) == trainable[name], name
    # No Faster R-CNN parameter has its own LR or regularizer in PaddleDetection.
    assert set(ref["lr_mult"][ref["trainable"]].tolist()) == {1.0}
    assert set(ref["reg_coeff"][ref["trainable"]].tolist()) == {-1.0}
    rel = update_agreement(ref, run)
    assert len(rel) == int(ref["trainable"].sum())
    worst = max(rel, key=rel.get)
    assert rel[worst] <= REL_TOL, f"{worst}: update differs by {rel[worst]:.4f} of its norm"
    changed = _per_param(ref, "changed", keys, names="state_names")
    moved = {k for k in keys if not np.array_equal(run["after"][k], run["before"][k])}
    assert moved == {k for k, v in changed.items() if v}


def test_trainable_norm_variant_parameter_attrs_match():
    """PaddleDetection's ParamAttr rules the published config leaves unused: a ResNet whose BN trains
    (per-stage LR on conv and norm, norm_decay as the norm's own L2, the stem at LR 1), GN in the FPN
    (own L2 0) and in the head towers. Ours from the same overrides must carry the same attributes."""
    ref = _fixture("retinanet")
    overrides = json.loads(str(ref["variant:overrides"]))
    from ppdet_retina.core.workspace import create

    cfg = load_config(os.path.join(ROOT, tref.OUR_CONFIGS["retinanet"]), overrides)
    model = create(cfg["architecture"], cfg)
    named = dict(model.named_parameters())
    expected = {key: _per_param(ref, f"variant:{key}", list(named), names="variant:param_names")
                for key in ("trainable", "lr_mult", "reg_coeff")}
    assert set(expected["trainable"]) == set(named)
    got = {}
    for name, param in named.items():
        own = getattr(param, "regularizer", None)
        trainable = not param.stop_gradient
        got[name] = (trainable, float(param.optimize_attr["learning_rate"]) if trainable else None,
                     (-1.0 if own is None else float(own._coeff)) if trainable else None)
    want = {n: (expected["trainable"][n], expected["lr_mult"][n] if expected["trainable"][n] else None,
                expected["reg_coeff"][n] if expected["trainable"][n] else None) for n in named}
    assert {n: g for n, g in got.items() if g != want[n]} == {}
    # The variant exercises what it claims: 5 LRs and 3 kinds of decay among trainable parameters.
    trained = [v for v in want.values() if v[0]]
    assert {v[1] for v in trained} == {0.1, 0.25, 0.5, 1.0, 2.0}
    assert {v[2] for v in trained} == {-1.0, 0.0, 0.0005}
