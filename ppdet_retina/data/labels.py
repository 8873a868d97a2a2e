"""Default label sets, used when no annotation file names the classes (PaddleDetection's fallback).

A model trained on COCO and run on one's own photographs usually has no annotation file at hand.
PaddleDetection then labels by the config's ``metric``: COCO's 80 categories with their
original ids (1..90 with gaps), or PASCAL VOC's 20 classes (ids 0..19). This module holds those
two tables and the choice between them; :func:`default_label_set` is the one entry point.
"""

from __future__ import annotations

import logging
from typing import Dict, List, NamedTuple, Optional, Tuple

__all__ = ["LabelSet", "COCO_CATEGORIES", "VOC_CLASSES", "default_label_set"]

logger = logging.getLogger(__name__)

# (category id, name) of the 80 COCO 2017 detection categories, in id order (= class index order).
COCO_CATEGORIES: Tuple[Tuple[int, str], ...] = (
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"),
    (7, "train"), (8, "truck"), (9, "boat"), (10, "traffic light"), (11, "fire hydrant"),
    (13, "stop sign"), (14, "parking meter"), (15, "bench"), (16, "bird"), (17, "cat"), (18, "dog"),
    (19, "horse"), (20, "sheep"), (21, "cow"), (22, "elephant"), (23, "bear"), (24, "zebra"),
    (25, "giraffe"), (27, "backpack"), (28, "umbrella"), (31, "handbag"), (32, "tie"), (33, "suitcase"),
    (34, "frisbee"), (35, "skis"), (36, "snowboard"), (37, "sports ball"), (38, "kite"),
    (39, "baseball bat"), (40, "baseball glove"), (41, "skateboard"), (42, "surfboard"),
    (43, "tennis racket"), (44, "bottle"), (46, "wine glass"), (47, "cup"), (48, "fork"), (49, "knife"),
    (50, "spoon"), (51, "bowl"), (52, "banana"), (53, "apple"), (54, "sandwich"), (55, "orange"),
    (56, "broccoli"), (57, "carrot"), (58, "hot dog"), (59, "pizza"), (60, "donut"), (61, "cake"),
    (62, "chair"), (63, "couch"), (64, "potted plant"), (65, "bed"), (67, "dining table"), (70, "toilet"),
    (72, "tv"), (73, "laptop"), (74, "mouse"), (75, "remote"), (76, "keyboard"), (77, "cell phone"),
    (78, "microwave"), (79, "oven"), (80, "toaster"), (81, "sink"), (82, "refrigerator"), (84, "book"),
    (85, "clock"), (86, "vase"), (87, "scissors"), (88, "teddy bear"), (89, "hair drier"),
    (90, "toothbrush"),
)

# PASCAL VOC's 20 classes in alphabetical order; PaddleDetection numbers them 0..19.
VOC_CLASSES: Tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)


class LabelSet(NamedTuple):
    """Class names and the category id written for each class index (both of length C)."""

    names: List[str]
    catids: List[int]

    @property
    def clsid2catid(self) -> Dict[int, int]:
        return dict(enumerate(self.catids))

    @property
    def catid2clsid(self) -> Dict[int, int]:
        return {c: i for i, c in enumerate(self.catids)}


def _coco() -> LabelSet:
    return LabelSet([n for _, n in COCO_CATEGORIES], [c for c, _ in COCO_CATEGORIES])


def _voc() -> LabelSet:
    return LabelSet(list(VOC_CLASSES), list(range(len(VOC_CLASSES))))


_DEFAULTS = {"COCO": _coco, "VOC": _voc}


def default_label_set(metric: Optional[str], num_classes: Optional[int] = None,
                      where: str = "TestDataset") -> LabelSet:
    """The labels to use when ``where``'s ``anno_path`` cannot be read, with a warning saying so.

    ``metric`` COCO (any case) gives COCO's 80 names and ids, VOC the 20 VOC classes. Any other
    metric, or a ``num_classes`` that does not match the default set (a model trained on other
    classes), gives the indices "0".."C-1" as names and ids (empty when ``num_classes`` is None).
    """
    how = (f"set {where}.anno_path to the training annotation json (or a .txt label list, one class "
           f"name per line) to name the classes")
    kind = str(metric or "").upper()
    if kind in _DEFAULTS:
        labels = _DEFAULTS[kind]()
        if num_classes is None or int(num_classes) == len(labels.names):
            logger.warning(f"{where}: no readable annotation file, so the default {kind} label set is used "
                           f"({len(labels.names)} classes, metric: {metric}); {how}")
            return labels
        logger.warning(f"{where}: no readable annotation file and num_classes {num_classes} does not match the "
                       f"{len(labels.names)} default {kind} classes: classes are named by their index; {how}")
    else:
        logger.warning(f"{where}: no readable annotation file and no default label set for metric {metric!r} "
                       f"(COCO and VOC have one): classes are named by their index; {how}")
    count = int(num_classes or 0)
    return LabelSet([str(i) for i in range(count)], list(range(count)))
