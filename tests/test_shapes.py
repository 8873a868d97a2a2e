"""The synthetic shapes dataset: deterministic, tight boxes, COCO-loadable, resumable."""

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest

from ppdet_retina.data.coco import COCODataSet
from ppdet_retina.data.shapes import CATEGORIES, MARKER, ensure_demo_dataset, render_image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _digest(path):
    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(path)):
        for name in sorted(files):
            with open(os.path.join(dirpath, name), "rb") as f:
                h.update(name.encode() + f.read())
    return h.hexdigest()


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    return ensure_demo_dataset(str(tmp_path_factory.mktemp("shapes")), num_train=12, num_val=4, size=96, seed=3)


def test_deterministic_for_a_seed(shapes_dir, tmp_path):
    again = ensure_demo_dataset(str(tmp_path / "again"), num_train=12, num_val=4, size=96, seed=3)
    assert _digest(again) == _digest(shapes_dir)
    other = ensure_demo_dataset(str(tmp_path / "other"), num_train=12, num_val=4, size=96, seed=4)
    assert _digest(other) != _digest(shapes_dir)


def test_coco_layout_and_pycocotools(shapes_dir):
    from pycocotools.coco import COCO
    for split, count in (("train", 12), ("val", 4)):
        anno = os.path.join(shapes_dir, "annotations", f"instances_{split}.json")
        coco = COCO(anno)
        assert len(coco.getImgIds()) == count
        assert sorted(coco.getCatIds()) == [1, 2, 3]
        assert [c["name"] for c in coco.loadCats([1, 2, 3])] == ["circle", "rectangle", "triangle"]
        per_image = [len(coco.getAnnIds(imgIds=[i])) for i in coco.getImgIds()]
        assert min(per_image) >= 1 and max(per_image) <= 5
        for ann in coco.loadAnns(coco.getAnnIds()):
            assert ann["iscrowd"] == 0 and ann["area"] > 0 and len(ann["bbox"]) == 4
        for img in coco.loadImgs(coco.getImgIds()):
            assert os.path.isfile(os.path.join(shapes_dir, "images", split, img["file_name"]))
            assert (img["height"], img["width"]) == (96, 96)
    ds = COCODataSet(dataset_dir=shapes_dir, image_dir="images/train", anno_path="annotations/instances_train.json")
    assert len(ds) == 12 and ds.clsid2catid == {0: 1, 1: 2, 2: 3}


def test_boxes_are_tight_around_drawn_pixels():
    rng = np.random.default_rng(7)
    sizes = []
    for _ in range(20):
        image, anns = render_image(rng, 96)
        assert image.shape == (96, 96, 3) and image.dtype == np.uint8
        for ann in anns:
            x, y, w, h = ann["bbox"]
            sizes.append(max(w, h))
            assert 0 <= x and 0 <= y and x + w <= 96 and y + h <= 96
            assert ann["area"] <= w * h
            assert ann["category_id"] in {c["id"] for c in CATEGORIES}
    assert min(sizes) >= 6 and max(sizes) <= 96 * 0.75


def test_boxes_match_the_pixels_of_the_shape_colour():
    # Without noise every visible pixel of a shape has its exact colour, so the
    # extent of that colour in the image must be the annotated box.
    rng = np.random.default_rng(11)
    checked = 0
    for _ in range(15):
        image, anns = render_image(rng, 96, noise_sigma=0.0)
        for ann in anns:
            x, y, w, h = ann["bbox"]
            crop = image[y:y + h, x:x + w].reshape(-1, 3)
            colours, counts = np.unique(crop, axis=0, return_counts=True)
            colour = colours[counts.argmax()]
            ys, xs = np.nonzero((image == colour).all(axis=2))
            assert [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()] == [x, y, w, h]
            assert counts.max() == ann["area"]
            checked += 1
    assert checked > 20


def test_skips_complete_and_regenerates_half_written(tmp_path):
    path = str(tmp_path / "d")
    ensure_demo_dataset(path, num_train=3, num_val=2, size=64, seed=0)
    marker = os.path.join(path, MARKER)
    stamp = os.path.getmtime(os.path.join(path, "annotations", "instances_train.json"))
    os.utime(marker)
    ensure_demo_dataset(path, num_train=3, num_val=2, size=64, seed=0)
    assert os.path.getmtime(os.path.join(path, "annotations", "instances_train.json")) == stamp
    # Half written: no marker, a stray file in an output folder -> regenerated from scratch.
    os.remove(marker)
    open(os.path.join(path, "images", "train", "stray.png"), "wb").close()
    ensure_demo_dataset(path, num_train=3, num_val=2, size=64, seed=0)
    assert os.path.isfile(marker)
    assert sorted(os.listdir(os.path.join(path, "images", "train"))) == ["000001.png", "000002.png", "000003.png"]
    # Other parameters -> regenerated with them.
    ensure_demo_dataset(path, num_train=4, num_val=2, size=64, seed=0)
    assert len(os.listdir(os.path.join(path, "images", "train"))) == 4
    with pytest.raises(ValueError, match="num_train"):
        ensure_demo_dataset(path, num_train=0)


def test_cli_writes_and_skips(tmp_path):
    out = str(tmp_path / "cli")
    cmd = [sys.executable, os.path.join(ROOT, "tools", "make_demo_data.py"), "--output", out,
           "--num-train", "2", "--num-val", "1", "--size", "64", "--seed", "1"]
    env = dict(os.environ, GLOG_minloglevel="2", PYTHONWARNINGS="ignore")
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert first.returncode == 0, first.stderr
    assert "wrote 2 train + 1 val" in first.stdout
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert second.returncode == 0 and "nothing to do" in second.stdout
