"""Shared test fixtures: a tiny COCO dataset with known boxes (``tiny_coco``) and a json writer.

``tiny_coco`` layout (all under a tmp dir)::

    images/img_{id}.png            grey background, each box drawn as a filled colour rectangle
    annotations/instances.json     categories 12, 3, 7 (listed out of order) named c12, c3, c7

    image 1: 96x128 (h x w)  cat 3 [10,20,40,60], cat 12 [50,10,90,40]
    image 2: 128x64          cat 7 [5,5,25,25], cat 12 [50,100,80,140] (clipped to [50,100,64,128]),
                             crowd cat 3 [30,60,50,90]
    image 3: 64x64           no annotations (empty image)
    image 5: 80x100          cat 7 [20,30,60,50]; plus a zero-width box and a box fully outside
                             the image (both dropped: 2 dropped boxes in total)
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace
from typing import List, Sequence

import cv2
import numpy as np
import pytest

# (image id, h, w, [(category id, xywh, iscrowd), ...])
_TINY_IMAGES = [
    (1, 96, 128, [(3, [10, 20, 30, 40], 0), (12, [50, 10, 40, 30], 0)]),
    (2, 128, 64, [(7, [5, 5, 20, 20], 0), (12, [50, 100, 30, 40], 0), (3, [30, 60, 20, 30], 1)]),
    (3, 64, 64, []),
    (5, 80, 100, [(7, [10, 10, 0, 5], 0), (3, [200, 200, 10, 10], 0), (7, [20, 30, 40, 20], 0)]),
]
# Non-contiguous ids listed out of order: the dataset must sort them (3 -> 0, 7 -> 1, 12 -> 2).
TINY_CATEGORIES = [{"id": 12, "name": "c12"}, {"id": 3, "name": "c3"}, {"id": 7, "name": "c7"}]
# What COCODataSet should load: non-crowd boxes after clipping, as (category id, xyxy).
TINY_EXPECTED = {
    1: [(3, [10, 20, 40, 60]), (12, [50, 10, 90, 40])],
    2: [(7, [5, 5, 25, 25]), (12, [50, 100, 64, 128])],
    3: [],
    5: [(7, [20, 30, 60, 50])],
}
TINY_CROWD = {2: [(3, [30, 60, 50, 90])]}
TINY_DROPPED = 2


def write_image(path: str, h: int, w: int, boxes_xywh: Sequence[Sequence[float]] = (), seed: int = 0) -> None:
    """A grey PNG with each box filled in its own colour (so flips can be checked on pixels)."""
    rng = np.random.RandomState(seed)
    image = np.full((h, w, 3), 128, np.uint8)
    for x, y, bw, bh in boxes_xywh:
        colour = [int(c) for c in rng.randint(0, 256, 3)]
        x1, y1 = int(max(x, 0)), int(max(y, 0))
        x2, y2 = int(min(x + bw, w)), int(min(y + bh, h))
        if x2 > x1 and y2 > y1:
            image[y1:y2, x1:x2] = colour
    os.makedirs(os.path.dirname(path), exist_ok=True)
    cv2.imwrite(path, image)


def write_coco_json(path: str, images: List[dict], annotations: List[dict], categories: List[dict]) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    return path


def make_coco(root: str, spec=_TINY_IMAGES, categories=TINY_CATEGORIES, image_dir: str = "images",
              anno_path: str = "annotations/instances.json") -> SimpleNamespace:
    """Write images and a COCO json for ``spec`` = [(id, h, w, [(cat, xywh, crowd), ...]), ...]."""
    images, annotations, ann_id = [], [], 100
    for img_id, h, w, anns in spec:
        name = f"img_{img_id}.png"
        write_image(os.path.join(root, image_dir, name), h, w, [a[1] for a in anns], seed=img_id)
        images.append({"id": img_id, "file_name": name, "height": h, "width": w})
        for cat, xywh, crowd in anns:
            annotations.append({"id": ann_id, "image_id": img_id, "category_id": cat, "bbox": list(xywh),
                                "area": float(xywh[2] * xywh[3]), "iscrowd": crowd, "segmentation": []})
            ann_id += 1
    anno_file = write_coco_json(os.path.join(root, anno_path), images, annotations, categories)
    return SimpleNamespace(dataset_dir=root, image_dir=image_dir, anno_path=anno_path,
                           anno_file=anno_file, image_root=os.path.join(root, image_dir),
                           images={i[0]: (i[1], i[2]) for i in spec})


@pytest.fixture
def tiny_coco(tmp_path) -> SimpleNamespace:
    """A tiny COCO dataset; see the module docstring.

    Attributes: dataset_dir, image_dir, anno_path (relative to dataset_dir),
    anno_file and image_root (absolute), images {id: (h, w)}, expected
    {id: [(category id, xyxy)]} (non-crowd, clipped), crowd {id: [(cat, xyxy)]},
    dropped (boxes dropped when loading), categories (the json's list),
    catid2clsid {3: 0, 7: 1, 12: 2}.
    """
    ns = make_coco(str(tmp_path / "tiny_coco"))
    ns.expected = TINY_EXPECTED
    ns.crowd = TINY_CROWD
    ns.dropped = TINY_DROPPED
    ns.categories = TINY_CATEGORIES
    ns.catid2clsid = {3: 0, 7: 1, 12: 2}
    return ns
