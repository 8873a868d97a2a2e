"""PaddleDetection-side steps of tests/test_ppdet_plugin.py, run with PaddleDetection's python.

    PYTHON tests/ppdet_plugin_driver.py weights OUT.pdparams CONFIG [--arch faster_rcnn] [-o KEY=VALUE ...]
    PYTHON tests/ppdet_plugin_driver.py train OUT.npz CONFIG --plugin {0,1} [-o KEY=VALUE ...]
    PYTHON tests/ppdet_plugin_driver.py exported OUT.json MODEL_DIR IMAGE
    PYTHON tests/ppdet_plugin_driver.py coco80 OUT.json
    PYTHON tests/ppdet_plugin_driver.py conventions OUT.json WEIGHTS CONFIG [-o KEY=VALUE ...]

``weights``: the seeded weights (tools/dev/ppdet_file_reference.py's ``state_dict``) under the names of
PaddleDetection's own model built from CONFIG, written as a .pdparams file.
``train``: PaddleDetection's Trainer (its own components, or ours after ``ppdet_plugin.register()``)
loads ``pretrain_weights`` and trains one epoch from the config's reader; writes each step's losses
and the final parameters. The warm-up starts at the full learning rate, so three steps move the
weights visibly.
``exported``: runs a model written by PaddleDetection's export_model.py with Paddle Inference on an
image preprocessed by PaddleDetection's own TestReader operators; writes COCO result rows like
infer.py's bbox.json.
``coco80``: a COCO annotation file without images and with PaddleDetection's default COCO label set
(80 classes, category ids 1..90): its infer.py reads the label set from TestDataset's annotation file.
``conventions``: PaddleDetection's own RetinaHead, FocalLoss and MaxIoUAssigner and ours through the
plugin, called the way PaddleDetection calls them on the same inputs; writes the largest differences.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SEED = 0  # the seed of tests/data/ppdet_file_reference_retinanet.json


def _overrides(items):
    from ppdet.utils.cli import ArgsParser
    return ArgsParser()._parse_opt(items)


def _load(config: str, overrides):
    from ppdet.core.workspace import load_config, merge_config
    cfg = load_config(config)
    merge_config(_overrides(overrides))
    return cfg


def write_weights(args) -> None:
    import paddle
    from ppdet.core.workspace import create
    sys.path.insert(0, os.path.join(REPO, "tools", "dev"))
    import ppdet_file_reference as gen
    cfg = _load(args.config, args.opt)
    model = create(cfg.architecture)
    names = list(model.state_dict())
    shapes = [list(t.shape) for t in model.state_dict().values()]
    state = gen.state_dict(names, shapes, SEED, args.arch)
    paddle.save({k: paddle.to_tensor(v) for k, v in state.items()}, args.out)


def train(args) -> None:
    import paddle
    if args.plugin:
        from ppdet_retina import ppdet_plugin
        ppdet_plugin.register()
    from ppdet.engine import Trainer
    cfg = _load(args.config, args.opt)
    for sched in cfg.LearningRate["schedulers"]:
        if type(sched).__name__ == "LinearWarmup":
            sched.start_factor = 1.0
    paddle.set_device("cpu")
    trainer = Trainer(cfg, mode="train")
    trainer.load_weights(cfg.pretrain_weights)
    losses = []

    def record(layer, inputs, outputs):
        losses.append([float(outputs[k]) for k in ("loss", "loss_cls", "loss_reg")])

    trainer.model.register_forward_post_hook(record)
    trainer.train()
    out = {f"param/{k}": v.numpy() for k, v in trainer.model.state_dict().items()}
    out["losses"] = np.asarray(losses, np.float64)
    np.savez(args.out, **out)


def run_exported(args) -> None:
    import paddle.inference as pi
    from ppdet.data.source.category import get_categories
    from ppdet.data.transform.batch_operators import PadBatch
    from ppdet.data.transform.operators import Decode, NormalizeImage, Permute, Resize
    with open(args.image, "rb") as f:
        sample = {"im_file": args.image, "image": f.read(), "im_id": np.array([0])}
    for op in (Decode(), Resize(target_size=[800, 1333], keep_ratio=True, interp=1),
               NormalizeImage(is_scale=True, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
               Permute()):
        sample = op(sample)
    sample = PadBatch(pad_to_stride=32)([sample])[0]
    config = pi.Config(os.path.join(args.model_dir, "model.json") if os.path.exists(
        os.path.join(args.model_dir, "model.json")) else os.path.join(args.model_dir, "model.pdmodel"),
        os.path.join(args.model_dir, "model.pdiparams"))
    config.disable_gpu()
    # PaddleDetection's own RetinaNet export fails under oneDNN on Paddle 3.3 ("ConvertPirAttribute2-
    # RuntimeAttribute not support ArrayAttribute<DoubleAttribute>"), with or without the plugin.
    config.disable_mkldnn()
    predictor = pi.create_predictor(config)
    feeds = {"image": sample["image"][None], "im_shape": np.asarray(sample["im_shape"], np.float32)[None],
             "scale_factor": np.asarray(sample["scale_factor"], np.float32)[None]}
    for name in predictor.get_input_names():
        predictor.get_input_handle(name).copy_from_cpu(np.ascontiguousarray(feeds[name]))
    predictor.run()
    bbox = predictor.get_output_handle(predictor.get_output_names()[0]).copy_to_cpu()
    clsid2catid, _ = get_categories("COCO", None)
    rows = [{"image_id": 0, "category_id": int(clsid2catid[int(c)]), "score": float(s),
             "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)]}
            for c, s, x1, y1, x2, y2 in bbox.tolist() if c >= 0]
    with open(args.out, "w") as f:
        json.dump(rows, f)


def write_coco80(args) -> None:
    from ppdet.data.source.category import get_categories
    _, catid2name = get_categories("COCO", None)
    categories = [{"id": int(i), "name": name} for i, name in sorted(catid2name.items())]
    with open(args.out, "w") as f:
        json.dump({"images": [], "annotations": [], "categories": categories}, f)


def conventions(args) -> None:
    import paddle
    from ppdet.core.workspace import create
    from ppdet.modeling.assigners.max_iou_assigner import MaxIoUAssigner as TheirAssigner
    from ppdet.modeling.losses.focal_loss import FocalLoss as TheirFocalLoss
    _load(args.config, args.opt)
    theirs = create("RetinaNet")
    from ppdet_retina import ppdet_plugin
    ppdet_plugin.register()
    ours = create("RetinaNet")
    state = paddle.load(args.weights)
    for model in (theirs, ours):
        model.set_dict(state)
        model.eval()
    paddle.seed(0)
    feats = theirs.neck(theirs.backbone({"image": paddle.randn([1, 3, 160, 224])}))
    logits = [theirs.head.decode_cls_logits(theirs.head(feats)[0]).numpy(),
              ours.head.decode_cls_logits(ours.head(feats)[0]).numpy()]
    # The same top-k per level; ties may order alike-valued anchors differently, so compare sorted.
    out = {"decode_cls_logits": float(np.abs(np.sort(logits[0], 2) - np.sort(logits[1], 2)).max())}
    pred, target = paddle.randn([50, 80]), paddle.randint(0, 81, [50])
    for reduction in ("none", "sum", "mean"):
        diff = ours.head.loss_class(pred, target, reduction=reduction) - TheirFocalLoss()(pred, target, reduction)
        out[f"focal_{reduction}"] = float(paddle.abs(diff).max())
    out["focal_default"] = float(paddle.abs(ours.head.loss_class(pred, target) - TheirFocalLoss()(pred, target)).max())
    corner = paddle.rand([300, 2]) * 100
    anchors = paddle.concat([corner, corner + paddle.rand([300, 2]) * 50 + 5], axis=1)
    gts = paddle.to_tensor([[10.0, 10.0, 60.0, 60.0], [30.0, 40.0, 90.0, 120.0]])
    match_o, label_o = ours.head.bbox_assigner(anchors, gts)
    match_t, label_t = TheirAssigner(0.5, 0.4)(anchors, gts)
    positive = label_t.numpy() == 1
    out["assigner_labels_equal"] = bool((label_o.numpy() == label_t.numpy()).all())
    out["assigner_positives"] = int(positive.sum())
    out["assigner_matches_equal"] = bool((match_o.numpy()[positive] == match_t.numpy()[positive]).all())
    with open(args.out, "w") as f:
        json.dump(out, f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("weights")
    p.add_argument("out")
    p.add_argument("config")
    p.add_argument("--arch", default="retinanet", choices=["retinanet", "faster_rcnn"])
    p.add_argument("-o", "--opt", nargs="*", default=[])
    p = sub.add_parser("train")
    p.add_argument("out")
    p.add_argument("config")
    p.add_argument("--plugin", type=int, required=True)
    p.add_argument("-o", "--opt", nargs="*", default=[])
    p = sub.add_parser("exported")
    p.add_argument("out")
    p.add_argument("model_dir")
    p.add_argument("image")
    p = sub.add_parser("coco80")
    p.add_argument("out")
    p = sub.add_parser("conventions")
    p.add_argument("out")
    p.add_argument("weights")
    p.add_argument("config")
    p.add_argument("-o", "--opt", nargs="*", default=[])
    args = parser.parse_args()
    {"weights": write_weights, "train": train, "exported": run_exported, "coco80": write_coco80,
     "conventions": conventions}[args.command](args)


if __name__ == "__main__":
    main()
