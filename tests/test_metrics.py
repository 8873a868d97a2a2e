"""COCOMetric on cases worked out by hand, and the category ids' round trip through the dataset."""

import json
import os

import numpy as np
import pytest

from ppdet_retina.data.coco import COCODataSet
from ppdet_retina.metrics.coco import COCOMetric, detections_to_coco

from conftest import make_coco

# Sparse, non-contiguous category ids on purpose: the metric must map class index -> id.
CATS = [{"id": 3, "name": "car"}, {"id": 7, "name": "dog"}]
CLSID2CATID = {0: 3, 1: 7}


def write_gt(path):
    rng = np.random.RandomState(0)
    images, annos = [], []
    for im_id in (11, 12, 13):
        images.append({"id": im_id, "file_name": f"{im_id}.jpg", "height": 100, "width": 120})
        for k in range(3):
            x, y = rng.uniform(0, 60, size=2)
            w, h = rng.uniform(10, 40, size=2)
            annos.append({"id": len(annos) + 1, "image_id": im_id, "category_id": CATS[k % 2]["id"],
                          "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": annos, "categories": CATS}, f)
    return annos


def batch_from(annos, im_ids, jitter, rng):
    rows, counts = [], []
    for im_id in im_ids:
        mine = [a for a in annos if a["image_id"] == im_id]
        for a in mine:
            x, y, w, h = np.asarray(a["bbox"]) + rng.uniform(-jitter, jitter, size=4)
            cls = [k for k, v in CLSID2CATID.items() if v == a["category_id"]][0]
            rows.append([cls, rng.uniform(0.3, 1.0), x, y, x + w, y + h])
        rows.append([1, 0.2, 0, 0, 30, 30])  # a false positive per image
        counts.append(len(mine) + 1)
    inputs = {"im_id": np.asarray(im_ids, dtype=np.int64).reshape(-1, 1)}
    return inputs, {"bbox": np.asarray(rows, np.float32), "bbox_num": np.asarray(counts, np.int32)}


# ----------------------------------------------------------------------------- a case worked out by hand

# Three 100x120 images; every box 40x40 (area 1600: COCO's "medium"). Categories listed out of order.
HAND_CATS = [{"id": 7, "name": "dog"}, {"id": 3, "name": "car"}]
HAND_GT = [
    (11, 100, 120, [(3, [10, 10, 40, 40], 0), (7, [60, 20, 40, 40], 0)]),
    (12, 100, 120, [(3, [20, 30, 40, 40], 0), (3, [70, 10, 40, 40], 0)]),
    (13, 100, 120, [(7, [30, 30, 40, 40], 0)]),  # never run through the model: must not count
]
# (class index, score, x1, y1, x2, y2) per image. Cars by score: hit, miss (no car there), hit, hit;
# the dog: one hit. Every hit is exact (IoU 1), the miss overlaps nothing (IoU 0).
HAND_DETS = {
    11: [[0, 0.9, 10, 10, 50, 50], [0, 0.8, 60, 60, 100, 100], [1, 0.5, 60, 20, 100, 60]],
    12: [[0, 0.7, 20, 30, 60, 70], [0, 0.6, 70, 10, 110, 50]],
}
# Car: precision 1, 1/2, 2/3, 3/4 at recall 1/3, 1/3, 2/3, 1; made monotone from the right: 1, 3/4, 3/4,
# 3/4. Of COCO's 101 recall points 0.00 ... 0.33 (34 points) read precision 1, 0.34 ... 1.00 (67) read 3/4.
CAR_AP = (34 * 1.0 + 67 * 0.75) / 101
DOG_AP = 1.0  # image 13's dog is not scored: 1 of 1
MEAN_AP = (CAR_AP + DOG_AP) / 2
# At most one detection per image and category: car recalls A and C of its 3 (2/3), dog 1 of 1.
AR_1 = (2 / 3 + 1.0) / 2


def _hand_batch(im_ids):
    rows = [r for i in im_ids for r in HAND_DETS[i]]
    return ({"im_id": np.asarray(im_ids, np.int64).reshape(-1, 1)},
            {"bbox": np.asarray(rows, np.float32), "bbox_num": np.asarray([len(HAND_DETS[i]) for i in im_ids])})


def test_hand_worked_ap_and_ar(tmp_path):
    coco = make_coco(str(tmp_path / "hand"), HAND_GT, HAND_CATS)
    metric = COCOMetric(coco.anno_file, {0: 3, 1: 7}, classwise=True, output_eval=str(tmp_path / "out"))
    metric.update(*_hand_batch([11, 11]))  # the same image twice in one batch counts once
    metric.update(*_hand_batch([12]))
    stats = metric.accumulate()["bbox"]
    # Exact hits and an IoU-0 miss: the same AP at every IoU threshold; no small or large gt (-1).
    want = [MEAN_AP, MEAN_AP, MEAN_AP, -1.0, MEAN_AP, -1.0, AR_1, 1.0, 1.0, -1.0, 1.0, -1.0]
    np.testing.assert_allclose(stats, want, rtol=1e-9)
    assert MEAN_AP == pytest.approx(0.917079, abs=1e-6)
    assert metric.classwise_ap == [("car", pytest.approx(CAR_AP)), ("dog", pytest.approx(DOG_AP))]


def test_category_ids_round_trip_through_the_dataset(tmp_path):
    """COCO ids 3 / 7 -> the dataset's classes 0 / 1 -> detections -> ids 3 / 7 again in bbox.json."""
    coco = make_coco(str(tmp_path / "hand"), HAND_GT, HAND_CATS)
    dataset = COCODataSet(dataset_dir=coco.dataset_dir, image_dir=coco.image_dir, anno_path=coco.anno_path)
    assert dataset.catid2clsid == {3: 0, 7: 1} and dataset.clsid2catid == {0: 3, 1: 7}
    records = {r["im_id"]: r for r in dataset.roidbs}
    im_ids = [11, 12]
    # The dataset's own ground truth, as detections: its contiguous classes and x1y1x2y2 boxes.
    rows = [[float(c), 0.9, *box] for i in im_ids
            for c, box in zip(records[i]["gt_class"][:, 0], records[i]["gt_bbox"])]
    metric = COCOMetric(dataset.get_anno(), dataset.clsid2catid, output_eval=str(tmp_path / "out"))
    metric.update({"im_id": np.asarray(im_ids).reshape(-1, 1)},
                  {"bbox": np.asarray(rows, np.float32), "bbox_num": np.asarray([2, 2])})
    stats = metric.accumulate()["bbox"]
    with open(tmp_path / "out" / "bbox.json") as f:
        written = sorted((d["image_id"], d["category_id"], d["bbox"]) for d in json.load(f))
    assert written == sorted((i, cat, [float(v) for v in xywh]) for i, _, _, anns in HAND_GT if i in im_ids
                             for cat, xywh, _ in anns)
    assert stats[0] == pytest.approx(1.0)


def test_perfect_detections_score_one(tmp_path):
    anno_file = str(tmp_path / "gt.json")
    annos = write_gt(anno_file)
    metric = COCOMetric(anno_file, CLSID2CATID)
    inputs, outputs = batch_from(annos, [11, 12, 13], jitter=0.0, rng=np.random.RandomState(2))
    keep = outputs["bbox"][:, 1] > 0.25  # drop the false positives
    outputs = {"bbox": outputs["bbox"][keep], "bbox_num": outputs["bbox_num"] - 1}
    metric.update(inputs, outputs)
    assert metric.accumulate()["bbox"][0] == pytest.approx(1.0)


def test_xywh_and_category_mapping():
    res = detections_to_coco(np.array([[1, 0.9, 10, 20, 40, 60], [-1, 0, 0, 0, 0, 0]]), np.array([1, 1]),
                             np.array([[5], [6]]), CLSID2CATID)
    assert res == [{"image_id": 5, "category_id": 7, "bbox": [10.0, 20.0, 30.0, 40.0], "score": pytest.approx(0.9)}]
    with pytest.raises(ValueError, match="num_classes"):
        detections_to_coco(np.array([[5, 0.9, 0, 0, 1, 1]]), np.array([1]), np.array([1]), CLSID2CATID)


def test_zero_detections(tmp_path):
    anno_file = str(tmp_path / "gt.json")
    write_gt(anno_file)
    metric = COCOMetric(anno_file, CLSID2CATID, output_eval=str(tmp_path))
    metric.update({"im_id": np.array([[11]])}, {"bbox": np.zeros((0, 6), np.float32), "bbox_num": np.array([0])})
    assert metric.accumulate() == {"bbox": [0.0] * 12}
    assert os.path.isfile(tmp_path / "bbox.json")


def test_repeated_image_counts_once(tmp_path):
    anno_file = str(tmp_path / "gt.json")
    annos = write_gt(anno_file)
    once = COCOMetric(anno_file, CLSID2CATID)
    twice = COCOMetric(anno_file, CLSID2CATID)
    batch = batch_from(annos, [11, 12], jitter=2.0, rng=np.random.RandomState(3))
    once.update(*batch)
    twice.update(*batch)
    twice.update(*batch)
    assert len(twice.results) == len(once.results) == 8
    assert twice.accumulate() == once.accumulate()
