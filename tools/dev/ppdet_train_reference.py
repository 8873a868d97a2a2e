"""Record PaddleDetection's first training steps for a small, seeded model as a test fixture (dev only).

Run it with the python of a venv that has PaddleDetection 2.6 (``import ppdet``), never ours:

    PPDET_CONFIGS=/path/to/PaddleDetection/configs \
        /tmp/ppdet_venv/bin/python tools/dev/ppdet_train_reference.py --arch retinanet
    /tmp/ppdet_venv/bin/python tools/dev/ppdet_train_reference.py --arch faster_rcnn \
        --config /path/to/PaddleDetection/configs/faster_rcnn/faster_rcnn_r50_fpn_1x_coco.yml

PaddleDetection builds the model from its own config with the narrow overrides of
``tools/dev/ppdet_reference.py`` (same seeded weights, same two-image batch with boxes), then its own
``LearningRate`` and ``OptimizerBuilder`` from the same config (Momentum 0.9, L2 1e-4, piecewise decay
with linear warm-up) take :data:`STEPS` steps in the order its trainer uses, from a fresh optimizer
with the schedule at iteration :data:`START_ITER`. ``tests/test_train_parity.py``
repeats that with our model, config and optimizer builder and compares each parameter's update.

What is stored (``tests/data/ppdet_train_<arch>.npz``), per parameter in PaddleDetection's names:
``trainable`` (what its optimizer receives), ``lr_mult`` (the ParamAttr learning rate), ``reg_coeff``
(the ParamAttr regularizer's L2 factor; -1 = none, so the optimizer's L2 applies), ``changed`` (any
value moved) and the update (after minus before): whole for tensors of at most :data:`FULL_LIMIT`
values; for bigger ones (ResNet-50's stages) :data:`SAMPLES` values at fixed positions plus the
update's exact norm and sum, which keeps the fixture well under a megabyte.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Dict, List

import numpy as np

STEPS = 3
# The steps are iterations 498-500 of the schedule: the end of both configs' linear warm-up (500 steps
# for RetinaNet, 1000 for Faster R-CNN, so there mid-ramp). At iteration 0 the LR is 1e-5 and many updates
# would be a few float32 ulps of their weights (some round away entirely), which says little.
START_ITER = 498
STEPS_PER_EPOCH = 100  # only places the decay milestones (epochs 8 and 11): far beyond these steps
FULL_LIMIT = 20000
SAMPLES = 2048
LOSS_KEYS = {
    "retinanet": ("loss", "loss_cls", "loss_reg"),
    "faster_rcnn": ("loss", "loss_rpn_cls", "loss_rpn_reg", "loss_bbox_cls", "loss_bbox_reg"),
}


# The seeded weights, batches and overrides come from the sibling script.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ppdet_reference as gen  # noqa: E402
OVERRIDES = {"retinanet": gen.RETINANET_OVERRIDES, "faster_rcnn": gen.FASTER_RCNN_OVERRIDES}
# Parameter attributes only (no steps) of a RetinaNet whose norms all train, with their own decay and
# per-stage LRs: the ParamAttr rules the published config leaves unused (its norms are frozen).
ATTRS_VARIANT = {
    "ResNet": {"freeze_norm": False, "freeze_at": -1, "norm_decay": 0.0005, "lr_mult_list": [0.1, 0.25, 0.5, 1.0]},
    "FPN": {"out_channel": 32, "norm_type": "gn"},
    "RetinaHead": {"conv_feat": {"name": "RetinaFeat", "feat_in": 32, "feat_out": 32, "num_convs": 2,
                                 "norm_type": "gn", "use_dcn": False}},
}
# PaddleDetection's configs, relative to its configs/ folder ($PPDET_CONFIGS), and ours.
PPDET_CONFIGS = {"retinanet": gen.PPDET_RETINANET_CONFIG, "faster_rcnn": gen.PPDET_FASTER_RCNN_CONFIG}
OUR_CONFIGS = {"retinanet": gen.OUR_RETINANET_CONFIG, "faster_rcnn": gen.OUR_FASTER_RCNN_CONFIG}


def update_record(name: str, delta: np.ndarray, seed: int) -> Dict[str, np.ndarray]:
    """The stored form of one parameter's update (float64 ``delta``): whole, or samples + norm + sum."""
    flat = delta.reshape(-1)
    out = {f"dnorm:{name}": np.array(np.linalg.norm(flat)), f"dsum:{name}": np.array(flat.sum())}
    if flat.size <= FULL_LIMIT:
        out[f"delta:{name}"] = flat.astype(np.float32)
    else:
        idx = gen.sample_indices("update:" + name, flat.size, seed, SAMPLES)
        out[f"idx:{name}"] = idx.astype(np.int64)
        out[f"dval:{name}"] = flat[idx].astype(np.float32)
    return out


def param_attrs(model, prefix: str = "") -> Dict[str, np.ndarray]:
    """Per parameter (PaddleDetection's names): trainable, ParamAttr LR and own L2 factor (-1: none)."""
    named = dict(model.named_parameters())
    return {
        f"{prefix}param_names": np.array(list(named)),
        f"{prefix}trainable": np.array([bool(p.trainable) for p in named.values()]),
        f"{prefix}lr_mult": np.array([float(p.optimize_attr["learning_rate"]) for p in named.values()], np.float64),
        f"{prefix}reg_coeff": np.array([_regularizer_coeff(p) for p in named.values()], np.float64),
    }


def _regularizer_coeff(param) -> float:
    reg = getattr(param, "regularizer", None)
    if reg is None:
        return -1.0
    if type(reg).__name__ != "L2Decay":
        raise SystemExit(f"{param.name}: regularizer {type(reg).__name__} is not recorded by this script")
    return float(reg._coeff)


def _batch(arch: str, inputs_np: Dict[str, np.ndarray]):
    import paddle

    keys = ["image", "im_shape", "scale_factor", "im_id"]
    batch = {k: paddle.to_tensor(inputs_np[k]) for k in keys}
    if arch == "retinanet":
        for key in ("gt_bbox", "gt_class", "is_crowd", "pad_gt_mask"):
            batch[key] = paddle.to_tensor(inputs_np[key])
    else:
        # Its Faster R-CNN reader does not collate gts: per-image lists.
        for key in ("gt_bbox", "gt_class", "is_crowd"):
            batch[key] = [paddle.to_tensor(x) for x in inputs_np[key]]
    return batch


def run(arch: str, config: str, seed: int) -> Dict[str, np.ndarray]:
    import paddle
    from ppdet.core.workspace import create

    paddle.set_device("cpu")
    if arch == "faster_rcnn":
        gen._patch_ppdet_rpn_concat()
        gen._patch_tensor_index()
    model = gen.build_ppdet_model(config, OVERRIDES[arch])
    state_names = list(model.state_dict().keys())
    shapes = [list(model.state_dict()[n].shape) for n in state_names]
    before = gen.make_state_dict(state_names, shapes, seed)
    gen.load_seeded(model, before)

    # What its trainer does: LR from the config, optimizer over the trainable parameters.
    lr = create("LearningRate")(STEPS_PER_EPOCH)
    for _ in range(START_ITER):
        lr.step()
    optimizer = create("OptimizerBuilder")(lr, model)
    inputs_np = gen.make_inputs(seed)
    model.train()
    losses: Dict[str, List[float]] = {k: [] for k in LOSS_KEYS[arch]}
    lrs: List[float] = []
    for _ in range(STEPS):
        outputs = model(_batch(arch, inputs_np))
        outputs["loss"].backward()
        lrs.append(float(optimizer.get_lr()))
        optimizer.step()
        lr.step()
        optimizer.clear_grad()
        for key in losses:
            losses[key].append(float(outputs[key]))

    named = dict(model.named_parameters())
    after = {k: v.numpy() for k, v in model.state_dict().items()}
    out: Dict[str, np.ndarray] = {
        "arch": np.array(arch),
        "overrides": np.array(json.dumps(OVERRIDES[arch])),
        "seed": np.array(seed),
        "steps": np.array(STEPS),
        "start_iter": np.array(START_ITER),
        "steps_per_epoch": np.array(STEPS_PER_EPOCH),
        "lr": np.array(lrs, np.float64),
        "state_names": np.array(state_names),
        "state_shapes": np.array(json.dumps(shapes)),
        "state_checksum": gen.state_checksum(before),
        "changed": np.array([not np.array_equal(after[n], before[n]) for n in state_names]),
        **param_attrs(model),
    }
    for key, values in losses.items():
        out[f"loss:{key}"] = np.array(values, np.float64)
    for name, param in named.items():
        if param.trainable:
            delta = after[name].astype(np.float64) - before[name].astype(np.float64)
            out.update(update_record(name, delta, seed))
    if arch == "retinanet":
        variant = gen.build_ppdet_model(config, ATTRS_VARIANT)
        out["variant:overrides"] = np.array(json.dumps(ATTRS_VARIANT))
        out.update(param_attrs(variant, "variant:"))
    return out


def main(argv: List[str] | None = None) -> None:
    args = gen.fixture_args(__doc__, "ppdet_train_reference.py", OVERRIDES, "tests/data/ppdet_train_{arch}.npz", argv)
    if args.config is None:
        from ppdet_configs import ppdet_config

        args.config = ppdet_config(PPDET_CONFIGS[args.arch])
    out_path = args.out
    out = run(args.arch, args.config, args.seed)
    gen.save_fixture(out, out_path)
    trainable = int(out["trainable"].sum())
    special = {str(n): (float(m), float(r)) for n, m, r in zip(out["param_names"], out["lr_mult"], out["reg_coeff"])
               if m != 1.0 or r != -1.0}
    print(f"wrote {out_path} ({os.path.getsize(out_path) / 1024:.0f} KB): {trainable} trainable of "
          f"{len(out['param_names'])} parameters; lr {out['lr'].tolist()}; "
          f"losses {[(k, out[k].round(5).tolist()) for k in out if k.startswith('loss:')]}")
    print("parameters with their own lr / regularizer (lr_mult, L2 coeff; -1 = optimizer's):")
    for name, attrs in special.items():
        print(f"  {name}: {attrs}")


if __name__ == "__main__":
    main()
