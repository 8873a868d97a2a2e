"""What tools/benchmark.py and tools/dev/ppdet_benchmark.py share: flags, timing, medians.

Only numpy and the standard library are imported here, so PaddleDetection's venv (numpy < 1.24,
no ppdet_retina) can load it too and both tools measure with the same method.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict, List, Optional, Tuple


def build_parser(description: str, default_config: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=default_config, help="model config (default: RetinaNet R50-FPN)")
    p.add_argument("--num-classes", type=int, default=None, help="override num_classes (default: the config's)")
    p.add_argument("--batch-size", type=int, default=2, help="train batch size")
    p.add_argument("--train-size", type=int, nargs="+", default=[512], help="train H [W]")
    p.add_argument("--infer-size", type=int, nargs="+", default=[800, 1216], help="inference H [W]")
    p.add_argument("--iters", type=int, default=3, help="timed iterations (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: cores available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-infer", action="store_true")
    return p


def hw(size: List[int]) -> Tuple[int, int]:
    """`--train-size 512` or `--infer-size 800 1216` -> (h, w)."""
    return (size[0], size[0]) if len(size) == 1 else (size[0], size[1])


def timed(fn: Callable[[], object]) -> tuple:
    """(fn's result, wall milliseconds)."""
    start = time.perf_counter()
    out = fn()
    return out, (time.perf_counter() - start) * 1000.0


def train_step_sample(loss_of: Callable[[], object], optimizer, t_bb: float, t_head: float,
                      t_loss: float) -> Dict[str, float]:
    """Time backward + optimizer step of the loss ``loss_of()`` returns; one train-step sample (ms)."""
    def step():
        loss = loss_of()
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        return float(loss)

    _, t_back = timed(step)
    return {"train_backbone_neck_ms": t_bb, "train_head_ms": t_head, "train_loss_ms": t_loss,
            "train_backward_ms": t_back, "train_step_ms": t_bb + t_head + t_loss + t_back}


def median_ms(fn: Callable[[], object], warmup: int, iters: int) -> float:
    """Median wall ms of ``fn()`` over ``iters`` calls after ``warmup`` untimed ones, rounded to 0.01 ms."""
    times = [timed(fn)[1] for _ in range(warmup + iters)][warmup:]
    return round(statistics.median(times), 2)


def median_of(samples: List[Dict[str, float]]) -> Dict[str, float]:
    """Per-key median of a list of timing dicts, rounded to 0.01 ms."""
    return {k: round(statistics.median(s[k] for s in samples), 2) for k in samples[0]}


def gt_boxes(rng, batch: int, h: int, w: int, num_classes: int,
             counts: Optional[List[int]] = None) -> List[tuple]:
    """3-8 random boxes (16 px to half the image) and classes per image, as numpy arrays.

    Both benchmarks draw with these same calls in this order, so one seed gives both the same batch.
    """
    import numpy as np

    counts = rng.integers(3, 9, size=batch) if counts is None else counts
    out = []
    for n in counts:
        wh = rng.uniform(16, min(h, w) / 2, size=(n, 2))
        xy = rng.uniform(0, 1, size=(n, 2)) * (np.array([w, h]) - wh)
        boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
        out.append((boxes, rng.integers(0, num_classes, size=n).astype(np.int32)))
    return out


def dense_logits(cls_logits: list) -> list:
    """The dense worst case for post-processing: every level's logits centred on 0.

    Scores then sit around 0.5, far above the 0.05 threshold, whatever the weights (a fixed
    shift would not do: a few training steps push every logit far below the threshold).
    """
    return [c - c.mean() for c in cls_logits]


def sparse_logits(cls_logits: list) -> list:
    """The light case: every level's logits shifted so that no score reaches 0.05.

    What a trained detector shows on most anchors; post-processing then costs the anchor
    selection and decoding alone, the NMS having next to nothing to do.
    """
    return [c - c.max() - 3.0 for c in cls_logits]


def post_process_variants(run: Callable[[list], object], cls_logits: list, warmup: int,
                          iters: int) -> Dict[str, float]:
    """Median ms of ``run(logits)`` on the sparse and the dense variant of ``cls_logits``."""
    out = {}
    for key, make in (("postprocess_sparse_ms", sparse_logits), ("postprocess_dense_ms", dense_logits)):
        logits = make(cls_logits)
        out[key] = median_ms(lambda: run(logits), warmup, iters)
    return out


def measure(model, args: argparse.Namespace, rng, num_classes: int, random_batch: Callable,
            bench_infer: Callable, bench_train: Callable, result: Dict[str, object],
            bench_engines: Optional[Callable] = None) -> Dict[str, object]:
    """Both tools' measuring sequence: inference, then a train step, then peak RSS; prints the JSON.

    Inference comes first, on the freshly initialised model: a few training steps on random data
    drive a randomly initialised R50 with frozen BN to huge activations, which would skew it.
    ``bench_engines(model, inputs)`` (ours only) then times the other engines on the same input.
    """
    import json

    import paddle
    from bench_data_common import peak_rss_mb

    if not args.skip_infer:
        h, w = hw(args.infer_size)
        inputs = random_batch(1, h, w, rng, num_classes)
        result["infer_input"] = [1, 3, h, w]
        result.update(bench_infer(model, inputs, args.warmup, args.iters))
        if bench_engines is not None:
            result.update(bench_engines(model, inputs))
    if not args.skip_train:
        h, w = hw(args.train_size)
        inputs = random_batch(args.batch_size, h, w, rng, num_classes)
        optimizer = paddle.optimizer.Momentum(learning_rate=1e-4, momentum=0.9, parameters=model.parameters())
        result["train_input"] = [args.batch_size, 3, h, w]
        result.update(bench_train(model, optimizer, inputs, args.warmup, args.iters))
    result["peak_rss_mb"] = round(peak_rss_mb(), 1)
    print(json.dumps(result))
    return result
