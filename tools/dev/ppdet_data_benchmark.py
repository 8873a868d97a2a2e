"""PaddleDetection 2.6's side of tools/benchmark_data.py: its COCODataSet and COCOMetric on the same files.

Run with PaddleDetection's venv (it imports ppdet; the project never does); same flags and JSON keys
as tools/benchmark_data.py, whose docstring says what is measured. Its dataset is built as its
trainer does (constructor, then ``parse_dataset()``), its metric fed the same numpy batches.

    /tmp/ppdet_venv/bin/python tools/dev/ppdet_data_benchmark.py --repeat 1
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, Dict, List, Optional

TOOLS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, TOOLS)
os.environ.setdefault("GLOG_minloglevel", "2")

import bench_data_common as common  # noqa: E402


def _quiet_ppdet() -> None:
    import logging
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("ppdet"):
            logging.getLogger(name).setLevel(logging.ERROR)


def measure_dataset(args: argparse.Namespace, paths: Dict[str, str]) -> Callable[[], dict]:
    from ppdet.data.source.coco import COCODataSet
    _quiet_ppdet()

    def build() -> dict:
        dataset = COCODataSet(dataset_dir=paths["dataset_dir"], image_dir=paths["train_images"],
                              anno_path=paths["train_anno"], data_fields=list(common.DATA_FIELDS))
        dataset.parse_dataset()
        return {"images": args.images, "boxes": args.boxes, "records": len(dataset.roidbs),
                "record_boxes": int(sum(len(r["gt_bbox"]) for r in dataset.roidbs))}
    return build


def measure_metric(args: argparse.Namespace, paths: Dict[str, str]) -> Callable[[], dict]:
    from ppdet.metrics import COCOMetric
    _quiet_ppdet()
    batches = list(common.detection_batches(paths["detections"], args.batch_size))

    def score() -> dict:
        metric = COCOMetric(os.path.join(paths["dataset_dir"], paths["val_anno"]),
                            clsid2catid=dict(enumerate(common.COCO_CATEGORY_IDS)),
                            output_eval=os.path.join(paths["dataset_dir"], "eval_ppdet"))
        start = time.perf_counter()
        for inputs, outputs in batches:
            metric.update(inputs, outputs)
        update_s = time.perf_counter() - start
        metric.accumulate()
        return {"images": args.metric_images, "detections": len(metric.results["bbox"]),
                "batch_size": args.batch_size, "update_s": round(update_s, 2),
                "accumulate_s": round(time.perf_counter() - start - update_s, 2),
                "map": round(float(metric.get_results()["bbox"][0]), 4)}
    return score


def main(argv: Optional[List[str]] = None) -> List[dict]:
    return common.main(os.path.abspath(__file__), argv, __doc__, "PaddleDetection",
                       {"dataset": measure_dataset, "metric": measure_metric})


if __name__ == "__main__":
    main()
