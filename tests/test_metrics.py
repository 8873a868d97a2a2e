"""COCOMetric against pycocotools run directly."""

import contextlib
import io
import json
import os

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ppdet_retina.metrics.coco import COCOMetric, detections_to_coco

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


def test_metric_equals_pycocotools(tmp_path):
    anno_file = str(tmp_path / "gt.json")
    annos = write_gt(anno_file)
    rng = np.random.RandomState(1)
    metric = COCOMetric(anno_file, CLSID2CATID, classwise=True, output_eval=str(tmp_path / "out"))
    for ids in ([11, 12], [13]):
        metric.update(*batch_from(annos, ids, jitter=4.0, rng=rng))
    stats = metric.accumulate()["bbox"]
    assert len(stats) == 12

    with open(tmp_path / "out" / "bbox.json") as f:
        dets = json.load(f)
    assert len(dets) == 9 + 3
    assert {d["category_id"] for d in dets} == {3, 7}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(anno_file)
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.evaluate(), ev.accumulate(), ev.summarize()
    np.testing.assert_allclose(stats, ev.stats, rtol=1e-12)
    assert 0.0 < stats[0] < 1.0
    assert [name for name, _ in metric.classwise_ap] == ["car", "dog"]
    assert all(0.0 <= ap <= 1.0 for _, ap in metric.classwise_ap)


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


def test_repeated_image_in_one_batch_counts_once_and_unrun_images_do_not_count(tmp_path):
    anno_file = str(tmp_path / "gt.json")
    annos = write_gt(anno_file)
    rng = np.random.RandomState(2)
    metric = COCOMetric(anno_file, CLSID2CATID, output_eval=str(tmp_path / "out"))
    inputs, outputs = batch_from(annos, [11, 11, 12], jitter=2.0, rng=rng)
    metric.update(inputs, outputs)
    per_image = {11: 4, 12: 4}  # 3 gts + 1 false positive each, image 11's second copy dropped
    dets = metric.results
    assert {i: sum(d["image_id"] == i for d in dets) for i in per_image} == per_image
    stats = metric.accumulate()["bbox"]
    # Image 13 was never run (e.g. sample_num): it is not scored as all misses.
    coco_gt = COCO(anno_file)
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(coco_gt, coco_gt.loadRes(dets), "bbox")
        ev.params.imgIds = [11, 12]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    np.testing.assert_allclose(stats, ev.stats, atol=1e-9)
    assert stats[8] > 0.5  # AR@100 over images 11 and 12 only
