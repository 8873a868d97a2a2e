"""One engine of eval / infer timed on its own: what tools/benchmark.py --engines / --only-engine report.

For an engine (``dygraph``, ``paddle_inference``, ``openvino``; ``--bf16`` for bf16): the one-off
trace + compile seconds (traced into a temporary folder, never the user's export cache), the
forward's median and range in ms (NMS included: inside Paddle Inference's graph, NumPy after
OpenVINO's), and the evaluation loop's images/s (forward, NMS, detections to COCO results).
"""

from __future__ import annotations

import json
import statistics
from typing import Any, Dict

import paddle

from bench_common import timed


def time_engine(model, cfg: Dict[str, Any], engine: str, args: Any, threads: int,
                inputs: Dict[str, Any]) -> Dict[str, Any]:
    """{description, trace_compile_s, forward_ms, forward_ms_range, eval_images_per_s} of ``engine``."""
    from ppdet_retina.inference import engines as fast_engine
    from ppdet_retina.metrics.coco import detections_to_coco

    catids = {c: c + 1 for c in range(int(cfg.get("num_classes", 80)))}
    with paddle.no_grad():
        runner, setup_ms = timed(lambda: fast_engine.inference_runner(
            model, cfg, engine, args.bf16, "cpu", cache=False, threads=threads))
        for _ in range(max(1, args.warmup)):  # first runs create kernels / dynamic-shape plans
            runner(inputs)
        forward = [timed(lambda: runner(inputs))[1] for _ in range(args.iters)]

        def one():
            out = runner(inputs)
            return detections_to_coco(out["bbox"].numpy(), out["bbox_num"].numpy(), inputs["im_id"].numpy(), catids)

        evals = [timed(one)[1] for _ in range(args.iters)]
    return {"description": getattr(runner, "description", "dygraph"),
            "trace_compile_s": round(setup_ms / 1000.0, 2),
            "forward_ms": round(statistics.median(forward), 1),
            "forward_ms_range": [round(min(forward), 1), round(max(forward), 1)],
            "eval_images_per_s": round(1000.0 * len(evals) / sum(evals), 3)}


def one_engine(model, cfg: Dict[str, Any], args: Any, threads: int, result: Dict[str, Any],
               inputs: Dict[str, Any]) -> Dict[str, Any]:
    """``--only-engine``: nothing but that engine runs in this process; prints the JSON."""
    from bench_data_common import peak_rss_mb

    result["infer_input"] = list(inputs["image"].shape)
    result["engine"] = args.only_engine
    result.update(time_engine(model, cfg, args.only_engine, args, threads, inputs))
    result["peak_rss_mb"] = round(peak_rss_mb(), 1)
    print(json.dumps(result))
    return result
