"""Default label sets (no annotation file): COCO's 80 categories, VOC's 20, else indices with a warning."""

from __future__ import annotations

import logging

import pytest

from ppdet_retina.core.workspace import create
from ppdet_retina.data.labels import default_label_set
from ppdet_retina.export.paddle_inference import label_info

# The ids COCO 2017 leaves out of 1..90 (categories of the 2014 paper that were never annotated).
COCO_MISSING_IDS = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}


def test_coco_default_set(caplog):
    with caplog.at_level(logging.WARNING):
        labels = default_label_set("COCO", 80)
    assert len(labels.names) == 80 and len(set(labels.names)) == 80
    assert labels.catids == sorted(set(range(1, 91)) - COCO_MISSING_IDS)
    # Class index 6 is "train", category id 7: what a COCO-trained model's class 6 means.
    assert labels.names[6] == "train" and labels.catids[6] == 7
    assert (labels.names[0], labels.catids[0]) == ("person", 1)
    assert (labels.names[79], labels.catids[79]) == ("toothbrush", 90)
    assert labels.clsid2catid[11] == 13 and labels.catid2clsid[13] == 11  # "stop sign" after the gap at 12
    assert "TestDataset.anno_path" in caplog.text and "default COCO label set" in caplog.text
    assert default_label_set("coco").names == labels.names  # any case; num_classes unknown


def test_voc_default_set():
    labels = default_label_set("VOC", 20)
    assert labels.catids == list(range(20))
    assert labels.names[0] == "aeroplane" and labels.names[14] == "person" and labels.names[19] == "tvmonitor"


@pytest.mark.parametrize("metric, num_classes", [("WiderFace", 3), ("COCO", 3), (None, 3)])
def test_indices_otherwise_with_a_warning_that_says_how(caplog, metric, num_classes):
    with caplog.at_level(logging.WARNING):
        labels = default_label_set(metric, num_classes)
    assert labels.names == ["0", "1", "2"] and labels.catids == [0, 1, 2]
    assert "named by their index" in caplog.text and "TestDataset.anno_path" in caplog.text
    if metric != "COCO":
        assert default_label_set(metric, None).names == []  # nothing to count indices from


def test_image_folder_without_annotation_file_uses_the_metric(tmp_path):
    cfg = {"metric": "COCO", "num_classes": 80,
           "TestDataset": {"name": "ImageFolder", "dataset_dir": str(tmp_path),
                           "anno_path": "annotations/instances_val2017.json"}}
    folder = create("TestDataset", cfg)
    assert folder.get_label_list()[6] == "train" and folder.clsid2catid[6] == 7
    cfg["metric"] = "VOC"
    cfg["num_classes"] = 20
    assert create("TestDataset", cfg).get_label_list()[18] == "train"


def test_image_folder_drops_a_background_line(tmp_path):
    (tmp_path / "labels.txt").write_text("background\ncat\ndog\n")
    folder = create("TestDataset", {"TestDataset": {"name": "ImageFolder", "anno_path": str(tmp_path / "labels.txt")}})
    assert folder.get_label_list() == ["cat", "dog"] and folder.clsid2catid == {0: 0, 1: 1}


def test_export_label_info_falls_back_like_inference(tmp_path):
    cfg = {"metric": "COCO", "num_classes": 80,
           "TestDataset": {"name": "ImageFolder", "anno_path": str(tmp_path / "missing.json")}}
    names, catids = label_info(cfg)
    assert names[6] == "train" and catids[6] == 7 and len(catids) == 80
    cfg["num_classes"] = 4
    assert label_info(cfg) == (["0", "1", "2", "3"], [0, 1, 2, 3])
