"""What tools/benchmark_data.py and tools/dev/ppdet_data_benchmark.py share: the synthetic COCO-scale
dataset, the detections the metric is fed, the child-process measuring and the command line.

Only numpy and the standard library are imported here, so PaddleDetection's venv can load it too and
both sides read the very same files and are measured the same way.

The data (written once into ``--work-dir`` and reused while its parameters match):

    annotations/instances_train2017.json   COCO train2017's size: 118,287 images, 860,001 boxes
    annotations/instances_val2017.json     COCO val2017's size: 5,000 images, 36,781 boxes
    train2017/, val2017/                   one empty file per image, all hard links of one file
                                           (both datasets only check that the file exists)
    val_detections.npz                     100 detections per val image, as a model's eval output

Both jsons use COCO's 80 category ids (1..90 with COCO's ten gaps), non-contiguous image and
annotation ids, ~1% crowd boxes with an RLE mask, the other boxes with a 4-point polygon (real
COCO polygons are longer; they only weigh on the json size, which no side uses).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional

import numpy as np

# COCO's category ids: 1..90 without 12, 26, 29, 30, 45, 66, 68, 69, 71, 83.
COCO_CATEGORY_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
TRAIN_IMAGES, TRAIN_BOXES = 118287, 860001
VAL_IMAGES, VAL_BOXES = 5000, 36781
DATA_FIELDS = ["image", "gt_bbox", "gt_class", "is_crowd"]
FORMAT_VERSION = 1


def build_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "ppdet_retina_coco_scale"),
                   help="where the synthetic dataset is written (reused while its parameters match)")
    p.add_argument("--images", type=int, default=TRAIN_IMAGES, help="train json images (COCO train2017's)")
    p.add_argument("--boxes", type=int, default=TRAIN_BOXES, help="train json boxes (COCO train2017's)")
    p.add_argument("--metric-images", type=int, default=VAL_IMAGES, help="val json images, all evaluated")
    p.add_argument("--metric-boxes", type=int, default=VAL_BOXES, help="val json boxes")
    p.add_argument("--dets", type=int, default=100, help="detections per evaluated image")
    p.add_argument("--batch-size", type=int, default=8, help="metric.update batch (EvalReader's for RetinaNet)")
    p.add_argument("--repeat", type=int, default=1, help="measure each case this many times")
    p.add_argument("--only", choices=["dataset", "metric"], default=None, help="one measure only")
    p.add_argument("--tracemalloc", action="store_true",
                   help="also one untimed run per measure under tracemalloc (its Python-heap peak); at COCO "
                        "scale minutes for the dataset, far longer for the metric (add --only dataset)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p


# ------------------------------------------------------------------ synthetic annotations
def coco_arrays(num_images: int, num_boxes: int, seed: int) -> Dict[str, np.ndarray]:
    """COCO-like images and boxes as arrays (``box_image`` indexes ``image_id``)."""
    rng = np.random.default_rng(seed)
    image_id = np.sort(rng.choice(np.arange(1, max(6 * num_images, 10)), num_images, replace=False))
    long_side = np.full(num_images, 640)
    short_side = rng.choice([360, 424, 426, 427, 428, 480, 512], num_images)
    portrait = rng.random(num_images) < 0.25
    width = np.where(portrait, short_side, long_side)
    height = np.where(portrait, long_side, short_side)
    # Boxes per image: a gamma-weighted multinomial, so the total is exact and ~2% of images are empty.
    weights = rng.gamma(4.0, size=num_images)
    per_image = rng.multinomial(num_boxes, weights / weights.sum())
    box_image = np.repeat(np.arange(num_images), per_image)
    w_img, h_img = width[box_image].astype(np.float64), height[box_image].astype(np.float64)
    frac = np.exp(rng.uniform(np.log(0.01), np.log(0.9), size=(num_boxes, 2)))
    bw = np.maximum(np.round(w_img * frac[:, 0], 2), 2.0)
    bh = np.maximum(np.round(h_img * frac[:, 1], 2), 2.0)
    x = np.round(rng.random(num_boxes) * (w_img - bw), 2)
    y = np.round(rng.random(num_boxes) * (h_img - bh), 2)
    return {
        "image_id": image_id, "width": width, "height": height, "box_image": box_image,
        "xywh": np.stack([x, y, bw, bh], axis=1),
        "category_id": np.asarray(COCO_CATEGORY_IDS)[rng.integers(0, 80, num_boxes)],
        "iscrowd": (rng.random(num_boxes) < 0.01).astype(np.int64),
        # COCO's annotation ids are unique but neither contiguous nor grouped by image.
        "ann_id": rng.choice(np.arange(1, 3 * num_boxes + 10), num_boxes, replace=False),
    }


def coco_json(arrays: Dict[str, np.ndarray]) -> dict:
    """The COCO instances dict of ``coco_arrays``' output, annotations in a shuffled order."""
    img_ids, heights, widths = arrays["image_id"].tolist(), arrays["height"].tolist(), arrays["width"].tolist()
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "height": h, "width": w, "license": 1}
              for i, h, w in zip(img_ids, heights, widths)]
    order = np.random.default_rng(len(images)).permutation(len(arrays["ann_id"])).tolist()
    xywh, box_image = arrays["xywh"].tolist(), arrays["box_image"].tolist()
    cats, crowd, ann_ids = (arrays["category_id"].tolist(), arrays["iscrowd"].tolist(),
                            arrays["ann_id"].tolist())
    annotations = []
    for k in order:
        x, y, w, h = xywh[k]
        im = box_image[k]
        if crowd[k]:
            seg = {"counts": [int(x) + 1, int(w), int(h)], "size": [heights[im], widths[im]]}
        else:
            seg = [[x, y, x + w, y, x + w, y + h, x, y + h]]
        annotations.append({"id": ann_ids[k], "image_id": img_ids[im], "category_id": cats[k],
                            "bbox": [x, y, w, h], "area": round(w * h, 2), "iscrowd": crowd[k],
                            "segmentation": seg})
    categories = [{"id": c, "name": f"category_{c}", "supercategory": "thing"} for c in COCO_CATEGORY_IDS]
    return {"info": {"description": "synthetic, COCO-sized"}, "licenses": [{"id": 1, "name": "none"}],
            "images": images, "annotations": annotations, "categories": categories}


def link_images(folder: str, file_names: List[str]) -> None:
    """Empty image files: hard links of one empty file per 60,000 names (ext4 allows 65,000 links)."""
    os.makedirs(folder, exist_ok=True)
    for k, name in enumerate(file_names):
        if k % 60000 == 0:
            source = os.path.join(folder, f".empty{k // 60000}")
            open(source, "wb").close()
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            os.link(source, path)


def val_detections(arrays: Dict[str, np.ndarray], dets: int, seed: int) -> Dict[str, np.ndarray]:
    """``dets`` rows (class, score, x1, y1, x2, y2) per image, as the model's eval output.

    One jittered copy of each gt box (right class 80% of the time, score 0.3-1), the rest random
    boxes with scores 0.05-0.5, sorted by score as NMS leaves them.
    """
    rng = np.random.default_rng(seed + 1)
    cat_to_cls = {c: i for i, c in enumerate(COCO_CATEGORY_IDS)}
    num_images = len(arrays["image_id"])
    order = np.argsort(arrays["box_image"], kind="stable")
    starts = np.searchsorted(arrays["box_image"][order], np.arange(num_images + 1))
    rows = np.zeros((num_images, dets, 6), np.float32)
    for i in range(num_images):
        w, h = float(arrays["width"][i]), float(arrays["height"][i])
        idx = order[starts[i]:starts[i + 1]][:dets]
        gt = arrays["xywh"][idx]
        n = len(idx)
        jitter = 1.0 + rng.normal(0.0, 0.08, size=(n, 4))
        x1, y1 = gt[:, 0] * jitter[:, 0], gt[:, 1] * jitter[:, 1]
        rows[i, :n, 2:] = np.stack([x1, y1, x1 + gt[:, 2] * jitter[:, 2], y1 + gt[:, 3] * jitter[:, 3]], 1)
        cls = np.array([cat_to_cls[c] for c in arrays["category_id"][idx].tolist()], np.int64)
        wrong = rng.random(n) < 0.2
        rows[i, :n, 0] = np.where(wrong, rng.integers(0, 80, n), cls)
        rows[i, :n, 1] = rng.uniform(0.3, 1.0, n)
        m = dets - n
        wh = rng.uniform(4.0, 0.5 * min(w, h), size=(m, 2))
        xy = rng.random((m, 2)) * (np.array([w, h]) - wh)
        rows[i, n:, 2:] = np.concatenate([xy, xy + wh], axis=1)
        rows[i, n:, 0] = rng.integers(0, 80, m)
        rows[i, n:, 1] = rng.uniform(0.05, 0.5, m)
        rows[i] = rows[i][np.argsort(-rows[i, :, 1], kind="stable")]
    return {"im_id": arrays["image_id"].astype(np.int64), "bbox": rows.reshape(-1, 6),
            "bbox_num": np.full(num_images, dets, np.int32)}


def prepare(args: argparse.Namespace) -> Dict[str, str]:
    """Write the dataset into ``args.work_dir`` unless the same parameters already did; return its paths."""
    params = {"version": FORMAT_VERSION, "images": args.images, "boxes": args.boxes,
              "metric_images": args.metric_images, "metric_boxes": args.metric_boxes, "dets": args.dets,
              "seed": args.seed}
    root = os.path.abspath(args.work_dir)
    paths = {"dataset_dir": root, "train_anno": "annotations/instances_train2017.json", "train_images": "train2017",
             "val_anno": "annotations/instances_val2017.json", "val_images": "val2017",
             "detections": os.path.join(root, "val_detections.npz")}
    stamp = os.path.join(root, "params.json")
    if os.path.isfile(stamp):
        with open(stamp, "r", encoding="utf-8") as f:
            if json.load(f) == params:
                return paths
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    for n_img, n_box, seed, anno, folder in (
            (args.images, args.boxes, args.seed, paths["train_anno"], paths["train_images"]),
            (args.metric_images, args.metric_boxes, args.seed + 100, paths["val_anno"], paths["val_images"])):
        arrays = coco_arrays(n_img, n_box, seed)
        data = coco_json(arrays)
        with open(os.path.join(root, anno), "w", encoding="utf-8") as f:
            json.dump(data, f)
        link_images(os.path.join(root, folder), [img["file_name"] for img in data["images"]])
        del data
    np.savez(paths["detections"], **val_detections(arrays, args.dets, args.seed))
    with open(stamp, "w", encoding="utf-8") as f:
        json.dump(params, f)
    return paths


def detection_batches(path: str, batch_size: int):
    """(inputs, outputs) per eval batch, as the trainer hands them to ``metric.update`` (numpy arrays)."""
    data = np.load(path)
    im_id, bbox, bbox_num = data["im_id"], data["bbox"], data["bbox_num"]
    offsets = np.concatenate([[0], np.cumsum(bbox_num)])
    for s in range(0, len(im_id), batch_size):
        e = min(s + batch_size, len(im_id))
        yield ({"im_id": im_id[s:e].reshape(-1, 1)},
               {"bbox": bbox[offsets[s]:offsets[e]], "bbox_num": bbox_num[s:e]})


# ------------------------------------------------------------------ measuring
def rss_mb() -> float:
    """Resident memory now (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm", "r") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except (OSError, ValueError):
        return 0.0


def peak_rss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def measure_call(fn: Callable[[], dict], use_tracemalloc: bool = False) -> dict:
    """Run ``fn`` once; its dict plus wall seconds, peak RSS and the peak's growth over the RSS before.

    Meant for a fresh process (``run_child``) whose imports are done: ``ru_maxrss`` is the process's
    peak, so only then is the growth ``fn``'s own.
    """
    import tracemalloc
    gc.collect()
    before = rss_mb()
    if use_tracemalloc:
        tracemalloc.start()
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    result = dict(out)
    if use_tracemalloc:
        result["tracemalloc_peak_mb"] = round(tracemalloc.get_traced_memory()[1] / 2 ** 20, 1)
        tracemalloc.stop()
    else:
        result["time_s"] = round(seconds, 2)
    peak = peak_rss_mb()
    result.update(peak_rss_mb=round(peak, 1), rss_before_mb=round(before, 1), rss_growth_mb=round(peak - before, 1))
    return result


def run_child(script: str, argv: List[str], measure: str, use_tracemalloc: bool) -> dict:
    """Measure ``measure`` in a fresh ``python script`` process; its last JSON line."""
    cmd = [sys.executable, script, *argv, "--child", measure + (":tracemalloc" if use_tracemalloc else "")]
    env = dict(os.environ, GLOG_minloglevel="2")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def main(script: str, argv: Optional[List[str]], description: str, impl: str,
         measures: Dict[str, Callable[[argparse.Namespace, Dict[str, str]], Callable[[], dict]]]) -> List[dict]:
    """Both tools' driver: prepare the data, then each measure in its own child; one JSON line each.

    ``measures[name](args, paths)`` imports what it needs and returns the call to measure (imports
    and input loading stay out of the time and of the memory growth).
    """
    args = build_parser(description).parse_args(argv)
    if args.child:
        name, _, mode = args.child.partition(":")
        paths = prepare(args)
        result = measure_call(measures[name](args, paths), use_tracemalloc=mode == "tracemalloc")
        print(json.dumps(result), flush=True)
        return [result]
    prepare(args)  # the data once, before the children (each finds it ready)
    forwarded = [a for a in (argv if argv is not None else sys.argv[1:])]
    names = [args.only] if args.only else list(measures)
    results = []
    for _ in range(args.repeat):
        for name in names:
            result = {"measure": name, "impl": impl}
            result.update(run_child(script, forwarded, name, False))
            if args.tracemalloc:
                result.update({k: v for k, v in run_child(script, forwarded, name, True).items()
                               if k == "tracemalloc_peak_mb"})
            print(json.dumps(result), flush=True)
            results.append(result)
    return results
