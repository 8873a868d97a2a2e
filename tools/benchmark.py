"""Measure a detector's speed and memory on random data; prints one JSON object.

Default case: RetinaNet R50-FPN, 80 classes, random init; a train step on a batch of
2 x 3 x 512 x 512 with 3-8 random gts per image, split into backbone+neck forward, head forward, loss
(anchors + assignment + focal + box loss) and backward+update; inference at 1 x 3 x 800 x 1216 with
post-processing timed on its own on the freshly initialised model's outputs (measured before the
train step changes the weights), then with the logits shifted so no score passes 0.05 (sparse: the
selection and decoding alone) and centred on 0 so most scores pass (dense worst case).

Then the engines tools/eval.py and tools/infer.py choose from, on the same input and weights:
`infer_default_engine_ms` is what tools/infer.py runs by default (on CPU: the model traced and run on
Paddle Inference with oneDNN, in bf16 with --bf16), `default_engine` names it and
`default_engine_trace_s` is its one-off trace + load time; `eval_images_per_s` gives the evaluation
loop's images per second (forward, NMS, detections to COCO results) per engine, `paddle_inference`
and `dygraph`.

All times are medians in milliseconds after warm-up; `peak_rss_mb` is the process's peak resident
memory. Usage:

    python tools/benchmark.py                       # the default case above
    python tools/benchmark.py --threads 2 --iters 3 --train-size 512 --infer-size 800 1216
    python tools/benchmark.py --config configs/demo/retinanet_demo.yml --num-classes 3
    python tools/benchmark.py --bf16 --skip-train   # CPUs with avx512_bf16
    python tools/benchmark.py --early-stop-ab -o RetinaHead.prior_prob=0.5

`--early-stop-ab` measures what the dense head's early stop (docs/DESIGN.md, "Dense heads") buys in
the traced default engine: the model is traced twice, with the stop and without it, and the two
predictors run alternately on one input. The classifier's weights are zeroed first, so every score
is the head's prior_prob: at the default 0.01 no score passes the NMS threshold 0.05 (the stop's best
case: one candidate per level); with `-o RetinaHead.prior_prob=0.5` every score does (its worst case:
the count is paid for and nothing is cut). A random-init R50 alone gives neither: its activations
are so large that logits spread far from the prior either way.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from typing import Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("GLOG_minloglevel", "2")

import numpy as np  # noqa: E402
import paddle  # noqa: E402

from bench_common import (build_parser, gt_boxes, hw, measure, median_ms, median_of,  # noqa: E402
                          post_process_variants, timed, train_step_sample)
from ppdet_retina.core.workspace import create, load_config  # noqa: E402
from ppdet_retina.core.env import set_cpu_threads  # noqa: E402

DEFAULT_CONFIG = "configs/retinanet/retinanet_r50_fpn_1x.yml"


def parse_args(argv: List[str] | None = None) -> argparse.Namespace:
    parser = build_parser(__doc__, DEFAULT_CONFIG)
    parser.add_argument("-o", "--opt", nargs="*", default=[], help="config overrides key=value")
    parser.add_argument("--data", action="store_true", help="instead: COCODataSet and COCOMetric at COCO "
                        "scale (tools/benchmark_data.py, whose flags then apply)")
    parser.add_argument("--bf16", action="store_true", help="the default engine in oneDNN bfloat16")
    parser.add_argument("--skip-engines", action="store_true",
                        help="leave out the default engine and the eval throughput per engine")
    parser.add_argument("--engines", nargs="*", default=[], metavar="ENGINE",
                        help="also time these engines (paddle_inference, openvino): forward, trace + compile, "
                             "eval images/s each, under 'engines'")
    parser.add_argument("--only-engine", default=None, metavar="ENGINE",
                        help="instead: time this one engine alone (nothing else runs in the process); "
                             "tools/bench_isolated.py runs every figure so")
    parser.add_argument("--early-stop-ab", action="store_true",
                        help="instead: the default engine traced with and without the dense head's early "
                             "stop, alternated on one input (see above)")
    return parser.parse_args(argv)


def random_batch(batch: int, h: int, w: int, rng: np.random.Generator, num_classes: int) -> Dict:
    """A batch dict as the reader makes it, with 3-8 random gts per image (padded with a mask)."""
    gts = gt_boxes(rng, batch, h, w, num_classes)
    g = max(len(b) for b, _ in gts)
    boxes = np.zeros((batch, g, 4), np.float32)
    classes = np.zeros((batch, g, 1), np.int32)
    mask = np.zeros((batch, g, 1), np.float32)
    for i, (b, c) in enumerate(gts):
        boxes[i, :len(b)] = b
        classes[i, :len(b), 0] = c
        mask[i, :len(b)] = 1.0
    return {
        "image": paddle.to_tensor(rng.standard_normal((batch, 3, h, w)).astype(np.float32)),
        "im_shape": paddle.to_tensor(np.tile([[h, w]], (batch, 1)).astype(np.float32)),
        "scale_factor": paddle.ones([batch, 2], dtype="float32"),
        "im_id": paddle.arange(batch, dtype="int64").reshape([batch, 1]),
        "gt_bbox": paddle.to_tensor(boxes),
        "gt_class": paddle.to_tensor(classes),
        "is_crowd": paddle.zeros([batch, g, 1], dtype="int32"),
        "pad_gt_mask": paddle.to_tensor(mask),
    }


def features(model, inputs: Dict):
    feats = model.backbone(inputs)
    return model.neck(feats) if getattr(model, "neck", None) is not None else feats


def head_and_loss(model, feats, inputs: Dict) -> tuple:
    """(head outputs, loss dict, head ms, loss ms) for a dense (RetinaNet) or two-stage model."""
    if hasattr(model, "head"):
        head_outs, t_head = timed(lambda: model.head(feats))
        losses, t_loss = timed(lambda: model.head.get_loss(head_outs, inputs))
        return losses, t_head, t_loss

    # Two-stage: target assignment and losses happen inside each head's forward, so the RPN's and
    # the box head's forward+loss are timed as `head`, and `loss` stays 0.
    def heads():
        rois, rois_valid, losses = model.rpn_head(feats, inputs)
        losses = dict(losses)
        losses.update(model.bbox_head(feats, rois, rois_valid, inputs))
        return losses

    losses, t_head = timed(heads)
    return losses, t_head, 0.0


def bench_train(model, optimizer, inputs: Dict, warmup: int, iters: int) -> Dict[str, float]:
    model.train()
    samples = []
    for i in range(warmup + iters):
        feats, t_bb = timed(lambda: features(model, inputs))
        losses, t_head, t_loss = head_and_loss(model, feats, inputs)
        sample = train_step_sample(
            lambda: losses["loss"] if "loss" in losses else paddle.add_n(list(losses.values())),
            optimizer, t_bb, t_head, t_loss)
        if i >= warmup:
            samples.append(sample)
    return median_of(samples)


def bench_infer(model, inputs: Dict, warmup: int, iters: int) -> Dict[str, float]:
    model.eval()
    if not hasattr(model, "head"):
        return bench_infer_two_stage(model, inputs, warmup, iters)
    head = model.head
    samples = []
    with paddle.no_grad():
        for i in range(warmup + iters):
            head_outs, t_fwd = timed(lambda: head(features(model, inputs)))
            _, t_post = timed(lambda: head.post_process(head_outs, inputs["im_shape"], inputs["scale_factor"]))
            if i >= warmup:
                samples.append({"infer_ms": t_fwd + t_post, "infer_forward_ms": t_fwd, "postprocess_ms": t_post})
        extra = post_process_variants(
            lambda logits: head.post_process((logits,) + tuple(head_outs[1:]), inputs["im_shape"],
                                             inputs["scale_factor"]),
            head_outs[0], warmup, iters)
    result = median_of(samples)
    result.update(extra)
    return result


def bench_infer_two_stage(model, inputs: Dict, warmup: int, iters: int) -> Dict[str, float]:
    """Faster R-CNN: forward = backbone, neck, RPN + proposals, box head; post-process = decode + NMS."""
    samples, dense_times = [], []
    post = model.bbox_post_process
    with paddle.no_grad():
        for i in range(warmup + iters):
            def forward():
                feats = features(model, inputs)
                rois, rois_valid, _ = model.rpn_head(feats, inputs)
                return model.bbox_head(feats, rois, rois_valid)

            (head_out, (rois, rois_num)), t_fwd = timed(forward)
            args = (rois, rois_num, inputs["im_shape"], inputs["scale_factor"])
            _, t_post = timed(lambda: post(head_out, *args))
            # Dense worst case: every class gets the same high probability.
            probs, deltas = head_out
            dense = (paddle.full_like(probs, 0.5), deltas)
            _, t_dense = timed(lambda: post(dense, *args))
            if i >= warmup:
                samples.append({"infer_ms": t_fwd + t_post, "infer_forward_ms": t_fwd, "postprocess_ms": t_post})
                dense_times.append(t_dense)
    result = median_of(samples)
    result["postprocess_dense_ms"] = round(statistics.median(dense_times), 2)
    return result


def engine_benchmark(cfg: Dict, args: argparse.Namespace, threads: int):
    """``bench_engines`` for :func:`bench_common.measure`: the default engine's forward, its trace cost,
    and the evaluation loop's images/s on it and on dygraph (same input, same weights)."""
    from ppdet_retina.inference import engines as fast_engine
    from ppdet_retina.metrics.coco import detections_to_coco

    def eval_images_per_s(runner, inputs: Dict) -> float:
        catids = {c: c + 1 for c in range(int(cfg.get("num_classes", 80)))}

        def one():
            out = runner(inputs)
            return detections_to_coco(out["bbox"].numpy(), out["bbox_num"].numpy(), inputs["im_id"].numpy(), catids)

        for _ in range(args.warmup):
            one()
        total = sum(timed(one)[1] for _ in range(args.iters))
        return round(1000.0 * args.iters / total, 3)

    def run(model, inputs: Dict) -> Dict[str, object]:
        with paddle.no_grad():
            # Dygraph first, before a trace or a predictor exists in the process, as
            # `tools/eval.py --engine dygraph` runs it.
            rates = {"dygraph": eval_images_per_s(model, inputs)}
            # Traced into a temporary folder: random weights have no place in the user's export cache.
            runner, trace_ms = timed(lambda: fast_engine.inference_runner(
                model, cfg, "auto", args.bf16, "cpu", cache=False, threads=threads))
            infer_ms = median_ms(lambda: runner(inputs), args.warmup, args.iters)
            if runner is not model:  # auto's engine: Paddle Inference, or OpenVINO where measured faster
                name = "openvino" if type(runner).__name__ == "OpenVinoModel" else "paddle_inference"
                rates[name] = eval_images_per_s(runner, inputs)
            extra = {}
            if args.engines:
                from bench_engines import time_engine

                extra = {"engines": {name: time_engine(model, cfg, name, args, threads, inputs)
                                     for name in args.engines}}
        return {"default_engine": getattr(runner, "description", "dygraph"),
                "default_engine_trace_s": round(trace_ms / 1000.0, 2),
                "infer_default_engine_ms": infer_ms, "eval_images_per_s": rates, **extra}

    return run


def early_stop_ab(model, cfg: Dict, args: argparse.Namespace, threads: int, inputs: Dict) -> Dict[str, object]:
    """Median and range (ms) of the default engine traced with and without the head's early stop,
    alternated run by run, and whether both give the same detections."""
    from ppdet_retina.inference import engines as fast_engine

    head = getattr(model, "head", None)
    if head is None or head.candidate_logit_floor() is None:
        raise SystemExit("--early-stop-ab needs a dense head with an NMS score threshold (e.g. RetinaNet)")

    def trace():
        return fast_engine.inference_runner(model, cfg, "paddle_inference", args.bf16, "cpu", cache=False,
                                            threads=threads)

    with paddle.no_grad():
        head.cls_logits.weight.set_value(paddle.zeros_like(head.cls_logits.weight))
    runners = {"early_stop": trace()}
    head.candidate_logit_floor = lambda: None  # this instance only: the head as if it had no stop
    runners["no_early_stop"] = trace()
    outputs, times = {}, {name: [] for name in runners}
    with paddle.no_grad():
        for i in range(args.warmup + args.iters):
            for name, runner in runners.items():
                outputs[name], ms = timed(lambda: runner(inputs))
                if i >= args.warmup:
                    times[name].append(ms)
    first, second = (outputs[n]["bbox"].numpy() for n in runners)
    return {"engine_ms": {n: round(statistics.median(t), 2) for n, t in times.items()},
            "engine_ms_range": {n: [round(min(t), 2), round(max(t), 2)] for n, t in times.items()},
            "detections": int(first.shape[0]),
            "same_detections": bool(first.shape == second.shape and np.allclose(first, second, atol=1e-4))}


def main(argv: List[str] | None = None) -> Dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--data" in argv:  # COCO-scale data, not a model: its own tool and flags
        import benchmark_data
        return benchmark_data.main([a for a in argv if a != "--data"])
    args = parse_args(argv)
    paddle.set_device("cpu")
    threads = set_cpu_threads(args.threads)
    paddle.seed(args.seed)
    rng = np.random.default_rng(args.seed)
    overrides = list(args.opt)
    if args.num_classes is not None:
        overrides.append(f"num_classes={args.num_classes}")
    cfg = load_config(os.path.join(ROOT, args.config) if not os.path.isabs(args.config) else args.config,
                      overrides)
    model = create(cfg["architecture"], cfg)
    num_classes = int(cfg.get("num_classes", 80))
    result: Dict[str, object] = {"config": os.path.relpath(cfg["config_path"], ROOT), "threads": threads,
                                 "num_classes": num_classes, "paddle": paddle.__version__}
    if args.early_stop_ab:
        import json

        h, w = hw(args.infer_size)
        result["infer_input"] = [1, 3, h, w]
        result.update(early_stop_ab(model, cfg, args, threads, random_batch(1, h, w, rng, num_classes)))
        print(json.dumps(result))
        return result
    if args.only_engine:
        from bench_engines import one_engine

        return one_engine(model, cfg, args, threads, result, random_batch(1, *hw(args.infer_size), rng, num_classes))
    engines = None if args.skip_engines else engine_benchmark(cfg, args, threads)
    return measure(model, args, rng, num_classes, random_batch, bench_infer, bench_train, result, engines)


if __name__ == "__main__":
    main()
