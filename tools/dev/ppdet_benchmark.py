"""PaddleDetection 2.6's RetinaNet measured like ``tools/benchmark.py`` measures ours (dev only).

Run it with the python of a venv that has PaddleDetection (``import ppdet``), on the same machine
and in the same session as ``tools/benchmark.py``, so the two JSON lines can be compared key by key:

    PPDET_CONFIGS=/path/to/PaddleDetection/configs /tmp/ppdet_venv/bin/python tools/dev/ppdet_benchmark.py --iters 2
    .venv/bin/python tools/benchmark.py --iters 2

Same case and method as ours: RetinaNet R50-FPN, 80 classes, random init (nothing loaded); a train
step on 2 x 3 x 512 x 512 with 3-8 random gts per image, split into backbone+neck, head, loss and
backward+update (Momentum, lr 1e-4); inference at 1 x 3 x 800 x 1216 with post-processing timed on
its own, then the sparse case (no score passes 0.05) and the dense worst case (logits centred on 0). The random batch is drawn with the same
generator calls as ours, so with the same --seed both tools see the same images and boxes.
Times are medians in ms after warm-up; ``peak_rss_mb`` is the process's peak resident memory.

The only deliberate differences are PaddleDetection's own input conventions: its TrainReader does
not collate gts (``collate_batch: False``), so gt_bbox / gt_class reach the model as per-image
lists without padding rows; and its head's forward computes the loss in train mode, so the head is
timed by switching that (norm-free) head to eval for the forward alone.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List

os.environ.setdefault("GLOG_minloglevel", "2")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_common import (build_parser, gt_boxes, measure, median_of, post_process_variants,  # noqa: E402
                          timed, train_step_sample)

# Relative to PaddleDetection's configs/ folder ($PPDET_CONFIGS, see tools/dev/ppdet_configs.py).
DEFAULT_CONFIG = "retinanet/retinanet_r50_fpn_1x_coco.yml"


def parse_args(argv: List[str] | None = None) -> argparse.Namespace:
    args = build_parser(__doc__, None).parse_args(argv)
    if args.config is None:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from ppdet_configs import ppdet_config

        args.config = ppdet_config(DEFAULT_CONFIG)
    return args


def random_batch(batch: int, h: int, w: int, rng: np.random.Generator, num_classes: int) -> Dict:
    """Our benchmark's random batch (same draws), gts as PaddleDetection's per-image lists."""
    import paddle

    gts = gt_boxes(rng, batch, h, w, num_classes)
    return {
        "image": paddle.to_tensor(rng.standard_normal((batch, 3, h, w)).astype(np.float32)),
        "im_shape": paddle.to_tensor(np.tile([[h, w]], (batch, 1)).astype(np.float32)),
        "scale_factor": paddle.ones([batch, 2], dtype="float32"),
        "im_id": paddle.arange(batch, dtype="int64").reshape([batch, 1]),
        "gt_bbox": [paddle.to_tensor(b) for b, _ in gts],
        "gt_class": [paddle.to_tensor(c.reshape(-1, 1)) for _, c in gts],
        "is_crowd": [paddle.zeros([len(b), 1], dtype="int32") for b, _ in gts],
    }


def _head_outputs(head, feats):
    # PaddleDetection's RetinaHead.forward returns the loss in train mode; the head has no norm or
    # dropout, so running its forward in eval mode gives the same tensors (with gradients).
    head.eval()
    try:
        return head(feats)
    finally:
        head.train()


def bench_train(model, optimizer, inputs: Dict, warmup: int, iters: int) -> Dict[str, float]:
    model.train()
    samples = []
    for i in range(warmup + iters):
        feats, t_bb = timed(lambda: model.neck(model.backbone(inputs)))
        head_outs, t_head = timed(lambda: _head_outputs(model.head, feats))
        losses, t_loss = timed(lambda: model.head.get_loss(head_outs, inputs))
        sample = train_step_sample(lambda: losses["loss"], optimizer, t_bb, t_head, t_loss)
        if i >= warmup:
            samples.append(sample)
    return median_of(samples)


def bench_infer(model, inputs: Dict, warmup: int, iters: int) -> Dict[str, float]:
    import paddle

    model.eval()
    head = model.head
    samples = []
    with paddle.no_grad():
        for i in range(warmup + iters):
            head_outs, t_fwd = timed(lambda: head(model.neck(model.backbone(inputs))))
            _, t_post = timed(lambda: head.post_process(head_outs, inputs["im_shape"], inputs["scale_factor"]))
            if i >= warmup:
                samples.append({"infer_ms": t_fwd + t_post, "infer_forward_ms": t_fwd, "postprocess_ms": t_post})
        extra = post_process_variants(
            lambda logits: head.post_process([logits, head_outs[1]], inputs["im_shape"], inputs["scale_factor"]),
            head_outs[0], warmup, iters)
    result = median_of(samples)
    result.update(extra)
    return result


def main(argv: List[str] | None = None) -> Dict:
    args = parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore")
    import paddle
    import ppdet
    from ppdet.core.workspace import create, load_config, merge_config

    paddle.set_device("cpu")
    threads = args.threads or max(1, len(os.sched_getaffinity(0)))
    paddle.base.core.set_num_threads(threads)
    paddle.seed(args.seed)
    rng = np.random.default_rng(args.seed)
    cfg = load_config(args.config)
    if args.num_classes is not None:
        merge_config({"num_classes": args.num_classes})
    model = create(cfg.architecture)
    num_classes = int(cfg.get("num_classes", 80))
    result: Dict[str, object] = {"config": args.config, "threads": threads, "num_classes": num_classes,
                                 "paddle": paddle.__version__,
                                 "ppdet": getattr(ppdet, "__version__", "unknown")}
    return measure(model, args, rng, num_classes, random_batch, bench_infer, bench_train, result)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
