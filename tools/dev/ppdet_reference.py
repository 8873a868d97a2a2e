"""Write PaddleDetection's outputs for a small, seeded RetinaNet as a test fixture (dev only).

Run it with the python of a venv that has PaddleDetection 2.6 (``import ppdet``), never ours:

    PPDET_CONFIGS=/path/to/PaddleDetection/configs /tmp/ppdet_venv/bin/python tools/dev/ppdet_reference.py \
        --out tests/data/ppdet_reference_retinanet.npz

(``PPDET_CONFIGS``: a PaddleDetection checkout's ``configs/`` folder; or pass ``--config PATH``.)

No weight file is involved: every parameter is drawn from a seed and its PaddleDetection name
(:func:`param_value`), so ``tests/test_ppdet_parity.py`` rebuilds the very same weights, loads them
into our model through ``load_weights`` (which converts PaddleDetection names) and compares with the
values stored here. The test imports this file for the generators, so the module's top level needs
only numpy; PaddleDetection is imported inside :func:`main`.

``--arch faster_rcnn`` does the same for ``faster_rcnn_r50_fpn_1x_coco.yml`` (narrow FPN/box head,
use_random: false) and writes tests/data/ppdet_reference_faster_rcnn.npz.

The RetinaNet model is PaddleDetection's own ``retinanet_r50_fpn_1x_coco.yml`` (ResNet-50 b, FPN P3-P7,
80 classes, anchor-major head) with narrower FPN/head (:data:`RETINANET_OVERRIDES`), so the structure
is the published one while a CPU forward takes well under a second.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import zlib
from typing import Dict, List, Sequence, Tuple

import numpy as np

# Narrow widths keep the test fast; everything structural (depth, variant, levels, anchors, classes,
# losses, NMS settings) stays as the published config has it.
RETINANET_OVERRIDES = {
    "FPN": {"out_channel": 32},
    "RetinaHead": {"conv_feat": {"name": "RetinaFeat", "feat_in": 32, "feat_out": 32, "num_convs": 2,
                                 "norm_type": None, "use_dcn": False}},
}
# Relative to PaddleDetection's configs/ folder ($PPDET_CONFIGS, see tools/dev/ppdet_configs.py).
PPDET_RETINANET_CONFIG = "retinanet/retinanet_r50_fpn_1x_coco.yml"
OUR_RETINANET_CONFIG = "configs/retinanet/retinanet_r50_fpn_1x.yml"
# Faster R-CNN: narrow FPN and box head; samplers take the first k candidates (use_random: false) so the
# training losses are deterministic on both sides.
FASTER_RCNN_OVERRIDES = {
    "FPN": {"out_channel": 32},
    "TwoFCHead": {"out_channel": 64},
    "RPNHead": {"rpn_target_assign": {"use_random": False}},
    "BBoxAssigner": {"use_random": False},
}
PPDET_FASTER_RCNN_CONFIG = "faster_rcnn/faster_rcnn_r50_fpn_1x_coco.yml"
OUR_FASTER_RCNN_CONFIG = "configs/faster_rcnn/faster_rcnn_r50_fpn_1x.yml"

IMAGE_SHAPE = (2, 3, 160, 224)  # divisible by 32, so FPN's 2x upsampling lines up without padding
# (sy, sx) != 1 and different per image, so the division back to original pixels is exercised.
SCALE_FACTOR = np.array([[0.8, 0.7], [1.25, 1.5]], np.float32)
# Classification bias: with head logits of std ~1.5 around it, a few hundred (anchor, class) pairs per
# image clear the 0.05 score threshold, and many overlap, so NMS has work to do.
CLS_BIAS = -7.5
BG_BIAS = 1.5
SAMPLES_PER_TENSOR = 256


# --------------------------------------------------------------------------- deterministic inputs

def _rng(name: str, seed: int) -> np.random.Generator:
    # crc32 (not hash()) is stable across processes and Python versions.
    return np.random.default_rng(zlib.crc32(name.encode("utf-8")) ^ int(seed))


def param_value(name: str, shape: Sequence[int], seed: int) -> np.ndarray:
    """The value of parameter/buffer ``name`` (PaddleDetection naming) of ``shape``.

    Scales are chosen so that activations stay O(1) through a frozen-BN ResNet-50 + FPN (He-style
    weights with a gain below 1, BN gamma < 1): outputs that neither vanish nor explode make the
    1e-4 comparisons meaningful.
    """
    shape = tuple(int(s) for s in shape)
    rng = _rng(name, seed)
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "_mean":
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)
    if leaf == "_variance":
        return rng.uniform(0.5, 1.5, shape).astype(np.float32)
    if ".norm." in name or ".bn" in name:
        if leaf == "weight":
            return rng.uniform(0.3, 0.7, shape).astype(np.float32)
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)
    if name.endswith("retina_cls.bias"):
        return (CLS_BIAS + rng.standard_normal(shape) * 0.3).astype(np.float32)
    if name.endswith("rpn_rois_score.bias"):
        return (rng.standard_normal(shape) * 0.5).astype(np.float32)
    if name.endswith("bbox_score.bias"):
        # Background (last of 81) a little ahead, so that only some (RoI, class) pairs pass 0.05.
        value = rng.standard_normal(shape) * 0.02  # tiny: biases would decide the class everywhere
        value[-1] += BG_BIAS
        return value.astype(np.float32)
    if leaf == "bias" or len(shape) == 1:
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)
    fan_in = int(np.prod(shape[1:])) if len(shape) == 4 else int(shape[0])  # Linear weights are [in, out]
    gain = 0.9
    if "retina_reg" in name or "rpn_rois_delta" in name or "bbox_delta" in name:
        gain = 0.32  # deltas ~0.1-0.3: boxes move and resize, but stay near their anchors
    elif "retina_cls" in name:
        gain = 8.0  # logits spread ~0.7-0.9 around CLS_BIAS
    elif "bbox_score" in name:
        gain = 10.0  # softmax over 81 needs logit spread to put a class above 0.05
    elif "tower_conv" in name:
        gain = 1.6  # the head's towers (conv + ReLU, no norm) would otherwise shrink the signal
    value = rng.standard_normal(shape) * gain / np.sqrt(fan_in)
    if "retina_cls" in name:
        # Zero-sum 3x3 kernels: the tower's features are post-ReLU (positive, channel-dependent mean),
        # so a random kernel's sum would shift its whole class channel and a few classes would win
        # everywhere. Centred kernels respond to spatial change only, so all 80 classes compete.
        value -= value.mean(axis=(2, 3), keepdims=True)
    if "bbox_score" in name:
        # Same reason for the box head's classifier: its input is post-ReLU, so centre each class's
        # weights over the inputs ([in, out] layout).
        value -= value.mean(axis=0, keepdims=True)
    return value.astype(np.float32)


def make_state_dict(names: Sequence[str], shapes: Sequence[Sequence[int]], seed: int) -> Dict[str, np.ndarray]:
    return {n: param_value(n, s, seed) for n, s in zip(names, shapes)}


def make_image(seed: int) -> np.ndarray:
    """A smooth-ish synthetic image batch: noise plus blobs, so features vary across space."""
    rng = _rng("image", seed)
    b, c, h, w = IMAGE_SHAPE
    img = rng.standard_normal((b, c, h, w)).astype(np.float32) * 0.5
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(b):
        for _ in range(6):
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            r = rng.uniform(10, 50)
            amp = rng.uniform(-2, 2, size=(c, 1, 1))
            img[i] += amp * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))[None]
    return img.astype(np.float32)


def make_gts() -> Tuple[np.ndarray, np.ndarray]:
    """gt_bbox [2, 4, 4] (resized pixels) and gt_class [2, 4, 1] int32; no padding rows.

    PaddleDetection's RetinaHead ignores pad_gt_mask and is_crowd, so both images have 4 real,
    non-crowd gts. The sizes span small (only low-quality matches reach it) to large.
    """
    boxes = np.array([
        [[10.0, 12.0, 60.0, 70.0], [100.0, 40.0, 210.0, 150.0], [30.0, 90.0, 41.0, 101.0],
         [120.0, 5.0, 160.0, 30.0]],
        [[0.0, 0.0, 223.0, 159.0], [50.0, 50.0, 90.0, 130.0], [150.0, 20.0, 200.0, 45.0],
         [5.0, 120.0, 25.0, 155.0]],
    ], np.float32)
    classes = np.array([[[3], [17], [3], [79]], [[0], [45], [17], [62]]], np.int32)
    return boxes, classes


def make_inputs(seed: int) -> Dict[str, np.ndarray]:
    """The batch as numpy arrays, keys as in docs/DESIGN.md."""
    b, _, h, w = IMAGE_SHAPE
    gt_bbox, gt_class = make_gts()
    return {
        "image": make_image(seed),
        "im_shape": np.tile(np.array([[h, w]], np.float32), (b, 1)),
        "scale_factor": SCALE_FACTOR.copy(),
        "im_id": np.arange(b, dtype=np.int64).reshape(b, 1),
        "gt_bbox": gt_bbox,
        "gt_class": gt_class,
        "is_crowd": np.zeros(gt_class.shape, np.int32),
        "pad_gt_mask": np.ones(gt_class.shape, np.float32),
    }


def sample_indices(name: str, size: int, seed: int, count: int = SAMPLES_PER_TENSOR) -> np.ndarray:
    """Fixed flat positions at which an intermediate tensor is recorded (whole tensors are too big)."""
    return np.sort(_rng("sample:" + name, seed).choice(size, size=min(count, size), replace=False))


def state_checksum(state: Dict[str, np.ndarray]) -> np.ndarray:
    """Per-tensor sum of |x| (float64), to prove both venvs drew identical weights."""
    return np.array([np.abs(state[k].astype(np.float64)).sum() for k in sorted(state)], np.float64)


# --------------------------------------------------------------------------- reference run (ppdet)

def _record(store: Dict[str, np.ndarray], name: str, tensor, seed: int) -> None:
    flat = np.asarray(tensor.numpy(), np.float32).reshape(-1)
    idx = sample_indices(name, flat.size, seed)
    store[f"shape:{name}"] = np.array(tensor.shape, np.int64)
    store[f"idx:{name}"] = idx.astype(np.int64)
    store[f"val:{name}"] = flat[idx]
    store[f"absmean:{name}"] = np.array(np.abs(flat.astype(np.float64)).mean())


def build_ppdet_model(config: str, overrides: dict):
    from ppdet.core.workspace import create, load_config, merge_config

    cfg = load_config(config)
    merge_config(overrides)
    return create(cfg.architecture)


def load_seeded(model, state: Dict[str, np.ndarray]) -> None:
    """Load the seeded ``state`` (numpy, by PaddleDetection name) into ``model`` and check that
    set_state_dict took every tensor (a silent partial load would make the fixture lie)."""
    import paddle

    model.set_state_dict({k: paddle.to_tensor(v) for k, v in state.items()})
    for name, value in model.state_dict().items():
        assert np.array_equal(value.numpy(), state[name]), name


def _seeded_model(args: argparse.Namespace, overrides: dict):
    """PaddleDetection's model with the seeded weights, the seeded inputs, and the record's header entries."""
    model = build_ppdet_model(args.config, overrides)
    names = list(model.state_dict().keys())
    shapes = [list(model.state_dict()[n].shape) for n in names]
    state = make_state_dict(names, shapes, args.seed)
    load_seeded(model, state)

    inputs_np = make_inputs(args.seed)
    out: Dict[str, np.ndarray] = {
        "overrides": np.array(json.dumps(overrides)),
        "seed": np.array(args.seed),
        "param_names": np.array(names),
        "param_shapes": np.array(json.dumps(shapes)),
        "param_checksum": state_checksum(state),
        "image_checksum": np.array(np.abs(inputs_np["image"].astype(np.float64)).sum()),
    }
    return model, inputs_np, out


def run_retinanet(args: argparse.Namespace) -> Dict[str, np.ndarray]:
    import paddle

    paddle.set_device("cpu")
    model, inputs_np, out = _seeded_model(args, RETINANET_OVERRIDES)
    for key in ("im_shape", "scale_factor", "gt_bbox", "gt_class"):
        out[f"input:{key}"] = inputs_np[key]

    def tensors(keys):
        return {k: paddle.to_tensor(inputs_np[k]) for k in keys}

    model.eval()
    with paddle.no_grad():
        eval_inputs = tensors(["image", "im_shape", "scale_factor", "im_id"])
        body = model.backbone(eval_inputs)
        neck = model.neck(body)
        cls_logits, deltas = model.head(neck)
        anchors = model.head.anchor_generator(cls_logits)
        for i, t in enumerate(body):
            _record(out, f"backbone{i}", t, args.seed)
        for i, t in enumerate(neck):
            _record(out, f"neck{i}", t, args.seed)
        for i, (c, d, a) in enumerate(zip(cls_logits, deltas, anchors)):
            _record(out, f"cls_logits{i}", c, args.seed)
            _record(out, f"deltas{i}", d, args.seed)
            out[f"anchors{i}"] = a.numpy().astype(np.float32)
        # The diagnostics below say how hard the NMS case is (not compared, printed for the record).
        scores = [paddle.nn.functional.sigmoid(c).numpy() for c in cls_logits]
        out["num_scores_over_thresh"] = np.array(
            [sum(int((s[i] > 0.05).sum()) for s in scores) for i in range(IMAGE_SHAPE[0])])
        pred = model(tensors(["image", "im_shape", "scale_factor", "im_id"]))
        out["bbox"] = pred["bbox"].numpy().astype(np.float32)
        out["bbox_num"] = pred["bbox_num"].numpy().astype(np.int64)

    model.train()
    losses = model(tensors(["image", "im_shape", "scale_factor", "im_id", "gt_bbox", "gt_class", "is_crowd",
                            "pad_gt_mask"]))
    for key in ("loss", "loss_cls", "loss_reg"):
        out[key] = np.array(float(losses[key]), np.float64)
    return out


def _patch_ppdet_rpn_concat() -> None:
    """PaddleDetection 2.6's RPNHead, proposal targets and BBoxPostProcess concatenate ``paddle.shape(x)[0]`` values,
    which are 0-D tensors under paddle 3 (1-D under the paddle 2.x it was written for), and concat
    refuses 0-D inputs. Give those modules a ``paddle`` whose concat lifts 0-D tensors to shape [1]:
    the values are unchanged."""
    import types

    import paddle
    from ppdet.modeling import post_process
    from ppdet.modeling.proposal_generator import rpn_head, target

    if getattr(rpn_head.paddle, "_ppdet_reference_shim", False):
        return

    def concat(xs, axis=0, name=None):
        xs = [x.reshape([1]) if isinstance(x, paddle.Tensor) and x.ndim == 0 else x for x in xs]
        return paddle.concat(xs, axis=axis, name=name)

    shim = types.ModuleType("paddle_shim")
    shim.__dict__.update({k: getattr(paddle, k) for k in dir(paddle) if not k.startswith("__")})
    shim.concat = concat
    shim._ppdet_reference_shim = True
    rpn_head.paddle = shim
    post_process.paddle = shim
    target.paddle = shim


def _patch_tensor_index() -> None:
    """Its RPNHead loops ``range(paddle.slice(paddle.shape(im_shape), ...))``, a 1-element 1-D tensor,
    which numpy 2's int() refuses; let a one-element tensor act as its value (this process only)."""
    import paddle

    def index(tensor) -> int:
        values = tensor.numpy().reshape(-1)
        if values.size != 1:
            raise TypeError(f"only one-element tensors can be indices, got shape {tensor.shape}")
        return int(values[0])

    paddle.Tensor.__index__ = index


def run_faster_rcnn(args: argparse.Namespace) -> Dict[str, np.ndarray]:
    import paddle

    paddle.set_device("cpu")
    _patch_ppdet_rpn_concat()
    _patch_tensor_index()
    model, inputs_np, out = _seeded_model(args, FASTER_RCNN_OVERRIDES)

    def tensors(keys):
        return {k: paddle.to_tensor(inputs_np[k]) for k in keys}

    model.eval()
    with paddle.no_grad():
        eval_inputs = tensors(["image", "im_shape", "scale_factor", "im_id"])
        neck = model.neck(model.backbone(eval_inputs))
        for i, t in enumerate(neck):
            _record(out, f"neck{i}", t, args.seed)
        rois, rois_num, _ = model.rpn_head(neck, eval_inputs)
        out["rois"] = paddle.concat(rois).numpy().astype(np.float32)
        out["rois_num"] = rois_num.numpy().astype(np.int64)
        pred = model(tensors(["image", "im_shape", "scale_factor", "im_id"]))
        out["bbox"] = pred["bbox"].numpy().astype(np.float32)
        out["bbox_num"] = pred["bbox_num"].numpy().astype(np.int64)

    model.train()
    # Its TrainReader does not collate gts (collate_batch: False): per-image lists, as it tests `if is_crowd`.
    train_inputs = tensors(["image", "im_shape", "scale_factor", "im_id"])
    for key in ("gt_bbox", "gt_class", "is_crowd"):
        train_inputs[key] = [paddle.to_tensor(x) for x in inputs_np[key]]
    losses = model(train_inputs)
    for key in ("loss", "loss_rpn_cls", "loss_rpn_reg", "loss_bbox_cls", "loss_bbox_reg"):
        out[key] = np.array(float(losses[key]), np.float64)
    return out


def fixture_args(doc: str, script: str, archs: Sequence[str], out_pattern: str,
                 argv: List[str] | None) -> argparse.Namespace:
    """The fixture scripts' common flags (--arch, --config, --seed, --out), parsed; exits unless
    PaddleDetection is importable. ``out_pattern`` (with ``{arch}``) fills in --out."""
    os.environ.setdefault("GLOG_minloglevel", "2")
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=sorted(archs), default="retinanet")
    p.add_argument("--config", default=None,
                   help="PaddleDetection's config (default: the published one under $PPDET_CONFIGS)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="default: " + out_pattern.format(arch="<arch>"))
    args = p.parse_args(argv)
    try:
        import ppdet  # noqa: F401
    except ImportError:
        sys.exit(f"{script} needs PaddleDetection: run it with the python of the ppdet venv")
    args.out = args.out or out_pattern.format(arch=args.arch)
    return args


def save_fixture(out: Dict[str, np.ndarray], path: str) -> None:
    """``out`` and PaddleDetection's version as a compressed .npz at ``path``."""
    out["ppdet_version"] = np.array(getattr(sys.modules["ppdet"], "__version__", "unknown"))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez_compressed(path, **out)


def main(argv: List[str] | None = None) -> None:
    args = fixture_args(__doc__, "ppdet_reference.py", ("retinanet", "faster_rcnn"),
                        "tests/data/ppdet_reference_{arch}.npz", argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from ppdet_configs import ppdet_config

    if args.arch == "retinanet":
        args.config = args.config or ppdet_config(PPDET_RETINANET_CONFIG)
        out = run_retinanet(args)
    else:
        args.config = args.config or ppdet_config(PPDET_FASTER_RCNN_CONFIG)
        out = run_faster_rcnn(args)
    save_fixture(out, args.out)
    summary = {k: (round(float(v), 6) if v.ndim == 0 else v.tolist()) for k, v in out.items()
               if k.startswith("loss") or k in ("bbox_num", "rois_num", "num_scores_over_thresh")}
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1024:.0f} KB): {summary}")


if __name__ == "__main__":
    main()
