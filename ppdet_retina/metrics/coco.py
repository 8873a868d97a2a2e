"""COCO box mAP: collects detections as COCO results and scores them with pycocotools."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import tempfile
from typing import Dict, List, Mapping, Optional

import numpy as np

from ppdet_retina.data.coco import coco_index, load_coco
from ppdet_retina.utils.logger import setup_logger

__all__ = ["COCOMetric", "detections_to_coco", "coco_bbox_eval", "STAT_NAMES"]

logger = setup_logger(__name__)

STAT_NAMES = [
    "AP@[.50:.95]", "AP@.50", "AP@.75", "AP small", "AP medium", "AP large",
    "AR@1", "AR@10", "AR@100", "AR small", "AR medium", "AR large",
]


def _numpy(value) -> np.ndarray:
    return value.numpy() if hasattr(value, "numpy") else np.asarray(value)


def detections_to_coco(bbox: np.ndarray, bbox_num: np.ndarray, im_ids: np.ndarray,
                       clsid2catid: Mapping[int, int]) -> List[dict]:
    """Turn model output rows (class, score, x1, y1, x2, y2) into COCO result dicts.

    ``bbox`` is [N, 6] with the rows of image ``i`` forming the i-th block of
    ``bbox_num[i]`` rows; ``im_ids`` [B] (or [B, 1]) gives the COCO image ids.
    Rows with a negative class (NMS padding for "no detection") are dropped.
    """
    bbox = np.asarray(bbox, dtype=np.float64).reshape(-1, 6)
    counts = np.asarray(bbox_num).reshape(-1).astype(np.int64)
    im_ids = np.asarray(im_ids).reshape(-1)
    if len(counts) != len(im_ids):
        raise ValueError(f"bbox_num has {len(counts)} entries but the batch has {len(im_ids)} image ids")
    if counts.sum() > len(bbox):
        raise ValueError(f"bbox_num sums to {counts.sum()} but bbox has only {len(bbox)} rows")
    rows = bbox[:counts.sum()]
    if not np.isfinite(rows[:, 0]).all():
        return _rows_to_coco(rows, counts, im_ids, clsid2catid)
    # Whole-batch arrays, then one dict per row from plain Python lists: a per-row loop over
    # NumPy scalars costs seconds on an eval set of COCO's size.
    keep = rows[:, 0] >= 0  # a negative class is NMS padding for "no detection"
    rows = rows[keep]
    image_ids = [int(i) for i in np.repeat(im_ids, counts)[keep].tolist()]
    classes = rows[:, 0].astype(np.int64).tolist()
    cat_of = {}
    for clsid in dict.fromkeys(classes):  # first-seen order: the first unknown class is the one named
        if clsid not in clsid2catid:
            raise ValueError(f"detected class {clsid} has no COCO category id (clsid2catid has "
                             f"{len(clsid2catid)} classes); does num_classes match the dataset?")
        cat_of[clsid] = int(clsid2catid[clsid])
    xywh = np.stack([rows[:, 2], rows[:, 3], rows[:, 4] - rows[:, 2], rows[:, 5] - rows[:, 3]], axis=1)
    return [{"image_id": i, "category_id": cat_of[c], "bbox": b, "score": s}
            for i, c, b, s in zip(image_ids, classes, xywh.tolist(), rows[:, 1].tolist())]


def _rows_to_coco(bbox: np.ndarray, counts: np.ndarray, im_ids: np.ndarray,
                  clsid2catid: Mapping[int, int]) -> List[dict]:
    """``detections_to_coco`` one row at a time, for rows whose class is not a finite number."""
    results = []
    start = 0
    for im_id, count in zip(im_ids, counts):
        for cls, score, x1, y1, x2, y2 in bbox[start:start + count]:
            if cls < 0:
                continue
            clsid = int(cls)
            if clsid not in clsid2catid:
                raise ValueError(f"detected class {clsid} has no COCO category id (clsid2catid has "
                                 f"{len(clsid2catid)} classes); does num_classes match the dataset?")
            results.append({
                "image_id": int(im_id),
                "category_id": int(clsid2catid[clsid]),
                "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                "score": float(score),
            })
        start += count
    return results


def coco_bbox_eval(coco_gt, results: List[dict], verbose: bool = True, img_ids: Optional[List[int]] = None):
    """Run COCOeval (bbox) on ``results``; returns the evaluator after ``summarize``.

    ``img_ids`` limits the evaluation to the images that were run (e.g. ``sample_num``); by
    default every image of the annotation file counts, as pycocotools does.
    """
    from pycocotools.cocoeval import COCOeval

    # pycocotools prints progress lines; only the summary is worth showing.
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = results_as_coco(coco_gt, results)
        evaluator = COCOeval(coco_gt, coco_dt, "bbox")
        if img_ids is not None:
            evaluator.params.imgIds = sorted(img_ids)
        evaluator.evaluate()
        evaluator.accumulate()
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
        evaluator.summarize()
    if verbose:
        logger.info("COCO bbox metrics:\n" + summary.getvalue().rstrip())
    return evaluator


def results_as_coco(coco_gt, results: List[dict]):
    """COCO box results as a pycocotools ``COCO``, scored by ``COCOeval`` as ``coco_gt.loadRes``'s are.

    Differs from ``loadRes`` only in what no box score reads: ``results`` stay as they are (loadRes
    adds keys to them) and carry no box-outline polygon (one list per detection at loadRes's).
    """
    known = set(coco_gt.getImgIds())
    unknown = {r["image_id"] for r in results} - known
    if unknown:
        raise AssertionError("Results do not correspond to current coco set (image ids not in the "
                             f"annotation file: {sorted(unknown)[:5]})")
    return coco_index({"images": list(coco_gt.dataset["images"]),
                       "categories": copy.deepcopy(coco_gt.dataset["categories"]),
                       "annotations": [dict(r, area=r["bbox"][2] * r["bbox"][3], id=k + 1, iscrowd=0)
                                       for k, r in enumerate(results)]})


def _load_coco(anno_file: str):
    if not os.path.isfile(anno_file):
        raise FileNotFoundError(f"COCO annotation file '{anno_file}' not found; check EvalDataset "
                                f"dataset_dir / anno_path")
    return load_coco(anno_file)


def per_class_ap(evaluator, coco_gt) -> List[tuple]:
    """(category name, AP@[.5:.95]) per category, from an accumulated COCOeval."""
    precision = evaluator.eval["precision"]  # [iou thr, recall, category, area, max dets]
    rows = []
    for k, cat_id in enumerate(evaluator.params.catIds):
        values = precision[:, :, k, 0, -1]
        values = values[values > -1]
        ap = float(values.mean()) if values.size else float("nan")
        rows.append((coco_gt.cats[int(cat_id)]["name"], ap))
    return rows


def format_table(rows: List[tuple], columns: int = 3) -> str:
    """Lay out (name, AP) pairs in ``columns`` column pairs as fixed-width text."""
    cells = [(str(name), "nan" if np.isnan(ap) else f"{ap:.3f}") for name, ap in rows]
    width = max([len(c[0]) for c in cells] + [8])
    header = " | ".join(f"{'category':<{width}} {'AP':>6}" for _ in range(min(columns, len(cells)) or 1))
    lines = [header, "-" * len(header)]
    for i in range(0, len(cells), columns):
        lines.append(" | ".join(f"{n:<{width}} {a:>6}" for n, a in cells[i:i + columns]))
    return "\n".join(lines)


class COCOMetric:
    """COCO bbox mAP over every image of an annotation file.

    ``update(inputs, outputs)`` takes a batch's ``im_id`` [B, 1] and the model's
    eval output ``bbox`` [N, 6] (class, score, x1, y1, x2, y2 in original pixels)
    and ``bbox_num`` [B] (an image id seen twice counts once); ``accumulate()`` writes ``bbox.json`` (COCO results with
    original category ids, xywh) to ``output_eval`` (a temporary folder when
    None), runs pycocotools and returns ``{'bbox': [12 COCO stats]}``.

    Args:
        anno_file: the COCO ground-truth json.
        clsid2catid: contiguous class index -> COCO category id.
        classwise: also log a per-category AP table.
        output_eval: folder for ``bbox.json``.
        save_prediction_only: ``accumulate()`` only writes ``bbox.json`` and returns ``{}``
            (``tools/eval.py --save_prediction_only``).
    """

    def __init__(self, anno_file: str, clsid2catid: Mapping[int, int], classwise: bool = False,
                 output_eval: Optional[str] = None, save_prediction_only: bool = False):
        self.save_prediction_only = bool(save_prediction_only)
        self.anno_file = anno_file
        self.clsid2catid = {int(k): int(v) for k, v in dict(clsid2catid).items()}
        self.classwise = classwise
        self.output_eval = output_eval
        self.results: List[dict] = []
        self.seen_ids: set = set()
        self.stats: Dict[str, List[float]] = {}
        self.classwise_ap: List[tuple] = []

    def reset(self) -> None:
        self.results = []
        self.seen_ids = set()
        self.stats = {}
        self.classwise_ap = []

    def update(self, inputs: Mapping, outputs: Mapping) -> None:
        im_ids = _numpy(inputs["im_id"]).reshape(-1)
        bbox, bbox_num = _numpy(outputs["bbox"]), _numpy(outputs["bbox_num"]).reshape(-1)
        # An image met again (a repeated dataset, a padded sampler) must not add a second
        # copy of its detections, whether the copy is in an earlier batch or in this one.
        first = np.zeros(len(im_ids), bool)
        for j, image_id in enumerate(int(i) for i in im_ids):
            first[j] = image_id not in self.seen_ids
            self.seen_ids.add(image_id)
        rows = np.repeat(first, bbox_num.astype(np.int64))
        bbox = np.asarray(bbox).reshape(-1, 6)[:len(rows)][rows]
        self.results.extend(detections_to_coco(bbox, np.where(first, bbox_num, 0), im_ids,
                                               self.clsid2catid))

    def _write_results(self) -> str:
        folder = self.output_eval or tempfile.mkdtemp(prefix="ppdet_retina_eval_")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, "bbox.json")
        # json.dumps encodes in C in one go; json.dump streams through the pure-Python encoder
        # (six seconds for COCO val's 500,000 detections). The text is the same.
        text = json.dumps(self.results)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def accumulate(self) -> Dict[str, List[float]]:
        path = self._write_results()
        logger.info(f"{len(self.results)} detections written to {path}")
        if self.save_prediction_only:
            self.stats = {}
            return self.stats
        if not self.results:
            logger.warning("no detections on the evaluation set (every score below the threshold?): "
                           "mAP is 0")
            self.stats = {"bbox": [0.0] * 12}
            return self.stats
        coco_gt = _load_coco(self.anno_file)
        evaluator = coco_bbox_eval(coco_gt, self.results, img_ids=list(self.seen_ids))
        self.stats = {"bbox": [float(v) for v in evaluator.stats]}
        if self.classwise:
            self.classwise_ap = per_class_ap(evaluator, coco_gt)
            logger.info("Per-category bbox AP:\n" + format_table(self.classwise_ap))
        return self.stats

    def log(self) -> None:
        for name, value in zip(STAT_NAMES, self.stats.get("bbox", [])):
            logger.info(f"bbox {name}: {value:.4f}")

    def get_results(self) -> Dict[str, List[float]]:
        return self.stats
