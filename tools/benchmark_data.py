"""COCO-scale data: how long building ``COCODataSet`` and scoring with ``COCOMetric`` take, and their memory.

Writes a synthetic COCO train2017-sized json (118,287 images, 860,001 boxes, COCO's 80 category
ids; empty image files) and a val2017-sized one (5,000 images) with 100 detections per image, once,
into ``--work-dir`` (see tools/bench_data_common.py). Then, each in a fresh process, prints one JSON
line per measure:

    dataset  COCODataSet(train json, data_fields image/gt_bbox/gt_class/is_crowd) construction
    metric   COCOMetric: update() per eval batch of 8 as the trainer calls it, then accumulate()

with ``time_s`` (wall), ``peak_rss_mb`` (the process's peak resident memory), ``rss_growth_mb`` (that
peak minus the resident memory right before the measured call, i.e. what the call added) and, with
``--tracemalloc``, ``tracemalloc_peak_mb`` from an extra untimed run. PaddleDetection's side, on the
same files: ``tools/dev/ppdet_data_benchmark.py`` (same flags). Usage:

    python tools/benchmark_data.py                         # both measures, COCO sizes
    python tools/benchmark.py --data --repeat 2            # the same through tools/benchmark.py
    python tools/benchmark_data.py --images 2000 --boxes 15000 --only dataset
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import Callable, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("GLOG_minloglevel", "2")

import bench_data_common as common  # noqa: E402


def measure_dataset(args: argparse.Namespace, paths: Dict[str, str]) -> Callable[[], dict]:
    from ppdet_retina.data.coco import COCODataSet

    def build() -> dict:
        dataset = COCODataSet(dataset_dir=paths["dataset_dir"], image_dir=paths["train_images"],
                              anno_path=paths["train_anno"], data_fields=common.DATA_FIELDS)
        return {"images": args.images, "boxes": args.boxes, "records": len(dataset.roidbs),
                "record_boxes": int(sum(len(r["gt_bbox"]) for r in dataset.roidbs))}
    return build


def measure_metric(args: argparse.Namespace, paths: Dict[str, str]) -> Callable[[], dict]:
    from ppdet_retina.metrics.coco import COCOMetric
    batches = list(common.detection_batches(paths["detections"], args.batch_size))

    def score() -> dict:
        metric = COCOMetric(os.path.join(paths["dataset_dir"], paths["val_anno"]),
                            dict(enumerate(common.COCO_CATEGORY_IDS)),
                            output_eval=os.path.join(paths["dataset_dir"], "eval_ppdet_retina"))
        start = time.perf_counter()
        for inputs, outputs in batches:
            metric.update(inputs, outputs)
        update_s = time.perf_counter() - start
        stats = metric.accumulate()
        return {"images": args.metric_images, "detections": len(metric.results), "batch_size": args.batch_size,
                "update_s": round(update_s, 2), "accumulate_s": round(time.perf_counter() - start - update_s, 2),
                "map": round(stats["bbox"][0], 4)}
    return score


def main(argv: Optional[List[str]] = None) -> List[dict]:
    logging.getLogger("ppdet_retina").setLevel(logging.WARNING)
    return common.main(os.path.abspath(__file__), argv, __doc__, "ppdet_retina",
                       {"dataset": measure_dataset, "metric": measure_metric})


if __name__ == "__main__":
    main()
