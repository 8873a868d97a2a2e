"""The COCO-scale data benchmark's generator keeps its contract (counts, COCO's ids, files), its records
come back through COCODataSet box for box, and tools/benchmark.py --data prints its two JSON lines.
Sizes are cut down (200 images); no timing is judged here."""

import json
import os
import sys

import numpy as np
import pytest

from conftest import REPO, run_tool

sys.path.insert(0, os.path.join(REPO, "tools"))

import bench_data_common as common  # noqa: E402
from ppdet_retina.data.coco import COCODataSet  # noqa: E402

# COCO's 80 category ids: 1..90 less these ten.
COCO_GAPS = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}
SMALL = ["--images", "200", "--boxes", "1500", "--metric-images", "20", "--metric-boxes", "150", "--dets", "10"]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    work = str(tmp_path_factory.mktemp("coco_scale"))
    args = common.build_parser("").parse_args(["--work-dir", work] + SMALL)
    paths = common.prepare(args)
    with open(os.path.join(work, paths["train_anno"])) as f:
        data = json.load(f)
    return args, paths, data


def test_counts_and_ids(small):
    _, _, data = small
    assert len(data["images"]) == 200 and len(data["annotations"]) == 1500
    cat_ids = [c["id"] for c in data["categories"]]
    assert len(cat_ids) == 80 and cat_ids[0] == 1 and cat_ids[-1] == 90
    assert set(cat_ids) == set(range(1, 91)) - COCO_GAPS
    img_ids = [im["id"] for im in data["images"]]
    assert len(set(img_ids)) == 200 and img_ids != list(range(1, 201))  # unique, not 1..N
    ann_ids = [a["id"] for a in data["annotations"]]
    assert len(set(ann_ids)) == 1500
    assert {a["image_id"] for a in data["annotations"]} <= set(img_ids)
    assert {a["category_id"] for a in data["annotations"]} <= set(cat_ids)
    assert {a["iscrowd"] for a in data["annotations"]} == {0, 1}
    sizes = {im["id"]: (im["width"], im["height"]) for im in data["images"]}
    for a in data["annotations"]:
        x, y, w, h = a["bbox"]
        iw, ih = sizes[a["image_id"]]
        assert w >= 2 and h >= 2 and x >= 0 and y >= 0 and x + w <= iw + 1e-6 and y + h <= ih + 1e-6


def test_files_exist_and_are_reused(small):
    args, paths, data = small
    folder = os.path.join(paths["dataset_dir"], paths["train_images"])
    assert all(os.path.isfile(os.path.join(folder, im["file_name"])) for im in data["images"])
    anno = os.path.join(paths["dataset_dir"], paths["train_anno"])
    stamp = os.stat(anno).st_mtime_ns
    common.prepare(args)  # same parameters: nothing is written again
    assert os.stat(anno).st_mtime_ns == stamp
    dets = np.load(paths["detections"])
    assert dets["bbox"].shape == (20 * 10, 6) and dets["bbox_num"].tolist() == [10] * 20
    assert set(dets["bbox"][:, 0].astype(int).tolist()) <= set(range(80))


def test_records_round_trip(small):
    """Each record's boxes are the generator's non-crowd xywh boxes as x1y1x2y2, classes their rank."""
    args, paths, _ = small
    arrays = common.coco_arrays(args.images, args.boxes, args.seed)
    dataset = COCODataSet(dataset_dir=paths["dataset_dir"], image_dir=paths["train_images"],
                          anno_path=paths["train_anno"], data_fields=common.DATA_FIELDS)
    rank = {c: i for i, c in enumerate(sorted(common.COCO_CATEGORY_IDS))}
    plain = arrays["iscrowd"] == 0
    with_boxes = np.unique(arrays["box_image"][plain])
    assert [r["im_id"] for r in dataset.roidbs] == arrays["image_id"][with_boxes].tolist()
    for record in dataset.roidbs[::17]:
        k = int(np.flatnonzero(arrays["image_id"] == record["im_id"])[0])
        mine = np.flatnonzero(plain & (arrays["box_image"] == k))
        xywh = arrays["xywh"][mine]
        want = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1).astype(np.float32)
        got = record["gt_bbox"]
        # Same boxes; the json lists them shuffled, the record in the json's order.
        assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, want.tolist()))
        classes = sorted(zip(map(tuple, got.tolist()), record["gt_class"][:, 0].tolist()))
        assert classes == sorted(zip(map(tuple, want.tolist()),
                                     [rank[c] for c in arrays["category_id"][mine].tolist()]))
        assert record["h"] == arrays["height"][k] and record["w"] == arrays["width"][k]
        assert record["im_file"] == os.path.join(paths["dataset_dir"], "train2017", f"{record['im_id']:012d}.jpg")


def test_benchmark_data_json(small, tmp_path):
    _, paths, _ = small
    proc = run_tool("benchmark.py", "--data", "--work-dir", paths["dataset_dir"], *SMALL, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert [(d["measure"], d["impl"]) for d in lines] == [("dataset", "ppdet_retina"), ("metric", "ppdet_retina")]
    dataset, metric = lines
    assert dataset["images"] == 200 and dataset["records"] <= 200 and dataset["record_boxes"] < 1500
    assert metric["detections"] == 20 * 10 and 0.0 < metric["map"] <= 1.0
    for d in lines:
        assert d["time_s"] > 0 and d["peak_rss_mb"] >= d["rss_before_mb"] > 0
