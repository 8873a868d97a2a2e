"""COCODataSet, ImageFolder and the readers, on the ``tiny_coco`` fixture (see conftest.py)."""

import json
import logging
import os

import numpy as np
import paddle
import pytest

from conftest import make_coco
from ppdet_retina.core.workspace import ConfigError, create
from ppdet_retina.data.coco import COCODataSet, ImageFolder

SAMPLE_OPS = [{"Decode": {}}, {"Resize": {"target_size": [64, 96], "keep_ratio": True}},
              {"NormalizeImage": {"is_scale": True, "mean": [0.485, 0.456, 0.406],
                                  "std": [0.229, 0.224, 0.225]}}, {"Permute": {}}]
BATCH_OPS = [{"PadBatch": {"pad_to_stride": 32}}]


def _dataset(ns, **kw):
    return COCODataSet(dataset_dir=ns.dataset_dir, image_dir=ns.image_dir, anno_path=ns.anno_path, **kw)


def _boxes_by_id(ds):
    return {r["im_id"]: r for r in ds.roidbs}


# ----------------------------------------------------------------------------- categories and boxes

def test_category_mapping_both_ways(tiny_coco):
    ds = _dataset(tiny_coco)
    assert ds.catid2clsid == {3: 0, 7: 1, 12: 2}
    assert ds.clsid2catid == {0: 3, 1: 7, 2: 12}
    assert ds.label_names == ["c3", "c7", "c12"]
    assert ds.num_classes == 3
    for rec in ds.roidbs:
        expected = tiny_coco.expected[rec["im_id"]]
        cats = [ds.clsid2catid[int(c)] for c in rec["gt_class"][:, 0]]
        assert cats == [e[0] for e in expected]


def test_records_boxes_clipped_and_dropped_counted(tiny_coco, caplog):
    with caplog.at_level(logging.WARNING):
        ds = _dataset(tiny_coco)
    recs = _boxes_by_id(ds)
    assert sorted(recs) == [1, 2, 5]  # image 3 is empty and allow_empty is false
    for im_id, rec in recs.items():
        want = np.array([e[1] for e in tiny_coco.expected[im_id]], np.float32).reshape(-1, 4)
        np.testing.assert_array_equal(rec["gt_bbox"], want)
        assert rec["gt_bbox"].dtype == np.float32 and rec["gt_class"].dtype == np.int32
        assert rec["gt_class"].shape == (len(want), 1) and rec["is_crowd"].shape == (len(want), 1)
        assert (rec["h"], rec["w"]) == tiny_coco.images[im_id]
        assert rec["im_file"] == os.path.join(tiny_coco.image_root, f"img_{im_id}.png")
    assert ds.dropped_boxes == tiny_coco.dropped == 2
    drop_lines = [r for r in caplog.records if "dropped 2 box" in r.getMessage()]
    assert len(drop_lines) == 1


def test_crowd_boxes_skipped_or_flagged(tiny_coco):
    recs = _boxes_by_id(_dataset(tiny_coco))
    assert recs[2]["is_crowd"].sum() == 0 and len(recs[2]["gt_bbox"]) == 2
    recs = _boxes_by_id(_dataset(tiny_coco, load_crowd=True))
    rec = recs[2]
    assert rec["is_crowd"][:, 0].tolist() == [0, 0, 1]
    np.testing.assert_array_equal(rec["gt_bbox"][2], [30, 60, 50, 90])
    assert rec["gt_class"][2, 0] == 0  # category 3


def test_crowd_only_image_is_empty_unless_load_crowd(tmp_path):
    ns = make_coco(str(tmp_path), spec=[(1, 64, 64, [(3, [5, 5, 20, 20], 1)]),
                                        (2, 64, 64, [(7, [5, 5, 20, 20], 0)])])
    assert [r["im_id"] for r in _dataset(ns).roidbs] == [2]
    recs = _boxes_by_id(_dataset(ns, load_crowd=True))
    assert recs[1]["is_crowd"][:, 0].tolist() == [1]


def test_allow_empty_and_empty_ratio(tiny_coco):
    ds = _dataset(tiny_coco, allow_empty=True)
    recs = _boxes_by_id(ds)
    assert sorted(recs) == [1, 2, 3, 5]
    assert recs[3]["gt_bbox"].shape == (0, 4) and recs[3]["gt_class"].shape == (0, 1)
    # 3 images with boxes, ratio 0.2 -> at most int(3 * 0.25) = 0 empty images.
    assert sorted(_boxes_by_id(_dataset(tiny_coco, allow_empty=True, empty_ratio=0.2))) == [1, 2, 5]
    assert sorted(_boxes_by_id(_dataset(tiny_coco, allow_empty=True, empty_ratio=0.5))) == [1, 2, 3, 5]


def test_sample_num_repeat_and_data_fields(tiny_coco):
    ds = _dataset(tiny_coco, sample_num=2, repeat=3)
    assert [r["im_id"] for r in ds.roidbs] == [1, 2]
    assert len(ds) == 6 and ds[5]["im_id"] == 2
    ds = _dataset(tiny_coco, data_fields=["image"])
    assert "gt_bbox" not in ds.roidbs[0] and "im_file" in ds.roidbs[0]
    with pytest.raises(ConfigError, match="gt_poly"):
        _dataset(tiny_coco, data_fields=["image", "gt_poly"])


def test_accessors(tiny_coco):
    ds = _dataset(tiny_coco)
    assert ds.get_anno() == tiny_coco.anno_file
    assert ds.get_imid2path()[5] == os.path.join(tiny_coco.image_root, "img_5.png")
    assert ds.get_label_list() == ["c3", "c7", "c12"]


def test_created_from_the_coco_detection_config_keys(tiny_coco):
    ds = create({"name": "COCODataSet", "image_dir": tiny_coco.image_dir, "anno_path": tiny_coco.anno_path,
                 "dataset_dir": tiny_coco.dataset_dir, "allow_empty": True,
                 "data_fields": ["image", "gt_bbox", "gt_class", "is_crowd"]})
    assert len(ds) == 4
    with pytest.raises(ConfigError, match="anno_pth"):
        create({"name": "COCODataSet", "anno_pth": "x.json"})


# ----------------------------------------------------------------------------- bad input

def test_missing_dataset_dir_and_anno(tmp_path):
    with pytest.raises(ConfigError) as err:
        COCODataSet(dataset_dir=str(tmp_path / "nope"), image_dir="images", anno_path="a.json")
    # A dataset other than the demo's is laid out, not generated.
    assert "nope" in str(err.value) and "make demo-data" not in str(err.value)
    assert "annotations/instances_train2017.json" in str(err.value) and "TrainDataset.dataset_dir" in str(err.value)
    with pytest.raises(ConfigError, match="a.json.*lay the data out as COCO"):
        COCODataSet(dataset_dir=str(tmp_path), image_dir="images", anno_path="a.json")
    with pytest.raises(ConfigError, match="shapes.*make demo-data"):
        COCODataSet(dataset_dir=str(tmp_path / "dataset" / "shapes"), image_dir="images/val", anno_path="a.json")
    with pytest.raises(ConfigError, match="anno_path"):
        COCODataSet(dataset_dir=str(tmp_path))


def test_missing_image_file_names_file_and_id(tiny_coco):
    os.remove(os.path.join(tiny_coco.image_root, "img_5.png"))
    with pytest.raises(ValueError) as err:
        _dataset(tiny_coco)
    assert "img_5.png" in str(err.value) and "image id 5" in str(err.value)


def test_not_coco_json(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError) as err:
        COCODataSet(dataset_dir=str(tmp_path), anno_path="a.json")
    assert "a.json" in str(err.value) and "annotations" in str(err.value) and "categories" in str(err.value)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="a.json.*cannot parse"):
        COCODataSet(dataset_dir=str(tmp_path), anno_path="a.json")
    # width and height may be left out (they are read from the file); the file name may not.
    path.write_text(json.dumps({"images": [{"id": 4, "height": 8, "width": 8}], "annotations": [],
                                "categories": [{"id": 1}]}))
    with pytest.raises(ValueError, match=r"image entry 4 lacks \['file_name'\]"):
        COCODataSet(dataset_dir=str(tmp_path), anno_path="a.json")


def test_unknown_category_names_annotation_and_image(tmp_path):
    ns = make_coco(str(tmp_path), spec=[(9, 64, 64, [(99, [5, 5, 20, 20], 0)])])
    with pytest.raises(ValueError) as err:
        _dataset(ns)
    msg = str(err.value)
    assert "annotation id 100" in msg and "image id 9" in msg and "category_id 99" in msg


def test_empty_after_filtering_says_why(tmp_path):
    ns = make_coco(str(tmp_path), spec=[(1, 64, 64, []), (2, 64, 64, [(3, [5, 5, 0, 0], 0)])])
    with pytest.raises(ValueError, match="all 2 image.*allow_empty"):
        _dataset(ns)


def test_corrupt_image_names_file(tiny_coco):
    bad = os.path.join(tiny_coco.image_root, "img_1.png")
    with open(bad, "wb") as f:
        f.write(b"this is not a png")
    ds = _dataset(tiny_coco)
    from ppdet_retina.data.transforms import Compose, Decode
    ds.set_transform(Compose([Decode()]))
    with pytest.raises(ValueError) as err:
        ds[0]
    assert "img_1.png" in str(err.value) and "image id 1" in str(err.value)


# ----------------------------------------------------------------------------- readers

def _check_batch(batch, batch_size, num_gt):
    expected = {"image": paddle.float32, "im_shape": paddle.float32, "scale_factor": paddle.float32,
                "im_id": paddle.int64, "gt_bbox": paddle.float32, "gt_class": paddle.int32,
                "is_crowd": paddle.int32, "pad_gt_mask": paddle.float32}
    assert set(batch) == set(expected)
    for key, dtype in expected.items():
        assert isinstance(batch[key], paddle.Tensor), key
        assert batch[key].dtype == dtype, key
    b, c, h, w = batch["image"].shape
    assert (b, c) == (batch_size, 3) and h % 32 == 0 and w % 32 == 0
    assert batch["im_shape"].shape == [b, 2] and batch["scale_factor"].shape == [b, 2]
    assert batch["im_id"].shape == [b, 1]
    assert batch["gt_bbox"].shape == [b, num_gt, 4]
    for key in ("gt_class", "is_crowd", "pad_gt_mask"):
        assert batch[key].shape == [b, num_gt, 1]


def test_eval_reader_yields_design_batch(tiny_coco):
    ds = _dataset(tiny_coco, allow_empty=True)
    reader = create({"name": "EvalReader", "sample_transforms": SAMPLE_OPS,
                     "batch_transforms": BATCH_OPS, "batch_size": 2})
    batches = list(reader(ds, 0))
    assert len(batches) == 2
    first, second = batches
    _check_batch(first, 2, 2)
    _check_batch(second, 2, 1)
    assert first["im_id"].numpy()[:, 0].tolist() == [1, 2]
    assert second["im_id"].numpy()[:, 0].tolist() == [3, 5]
    # Image 1 is 96x128: keep-ratio scale min(64/96, 96/128) = 2/3 -> 64x85 pixels, im_shape the
    # unrounded 64x85.33 and scale_factor the nominal 2/3 (PaddleDetection's Resize).
    np.testing.assert_allclose(first["im_shape"].numpy()[0], [64, 128 * 2 / 3], rtol=1e-6)
    np.testing.assert_allclose(first["scale_factor"].numpy()[0], [2 / 3, 2 / 3], rtol=1e-6)
    np.testing.assert_allclose(first["gt_bbox"].numpy()[0, 0], np.array([10, 20, 40, 60]) * 2 / 3, rtol=1e-5)
    assert second["pad_gt_mask"].numpy()[:, :, 0].tolist() == [[0.0], [1.0]]  # image 3 is empty


def test_train_reader_builds_reference_reader_config(tiny_coco):
    cfg = {"sample_transforms": [
        {"Decode": {}},
        {"RandomResize": {"target_size": [[64, 96], [80, 96]], "keep_ratio": True, "interp": 1}},
        {"RandomFlip": {}},
        {"NormalizeImage": {"is_scale": True, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}},
        {"Permute": {}}],
        "batch_transforms": BATCH_OPS, "batch_size": 2, "shuffle": True, "drop_last": True,
        "collate_batch": False}
    reader = create("TrainReader", {"TrainReader": cfg, "num_classes": 3})
    # PaddleDetection-only keys are accepted and not kept; the changed defaults stay the subclass's.
    assert not hasattr(reader, "num_classes") and not hasattr(reader, "collate_batch")
    assert (reader.shuffle, reader.drop_last, reader.max_bad_image_ratio) == (True, True, 0.01)
    assert create("TestReader").max_bad_image_ratio == 1.0 and create("EvalReader").shuffle is False
    batches = list(reader(_dataset(tiny_coco), 0))
    assert len(batches) == 1  # 3 images, drop_last
    _check_batch(batches[0], 2, batches[0]["gt_bbox"].shape[1])


def test_reader_refuses_a_setup_that_makes_no_batch(tiny_coco):
    reader = create({"name": "TrainReader", "sample_transforms": [{"Decode": {}}], "batch_size": 8,
                     "drop_last": True})
    with pytest.raises(ValueError, match="make no batch of batch_size 8 with drop_last: true"):
        reader(_dataset(tiny_coco), 0)


def test_reader_bad_op_or_key_raises_config_error():
    with pytest.raises(ConfigError, match=r"sample_transforms\[1\].*Resize.*target_sz"):
        create({"name": "TrainReader", "sample_transforms": [{"Decode": {}}, {"Resize": {"target_sz": 5}}]})
    with pytest.raises(ConfigError, match=r"sample_transforms\[0\].*unknown component 'Decod'"):
        create({"name": "TrainReader", "sample_transforms": [{"Decod": {}}]})
    with pytest.raises(ConfigError, match="Decode.*foo"):
        create({"name": "EvalReader", "sample_transforms": [{"Decode": {"foo": 1}}]})


@pytest.mark.parametrize("workers", [0, 1])
def test_worker_error_surfaces_file_name(tiny_coco, workers):
    with open(os.path.join(tiny_coco.image_root, "img_2.png"), "wb") as f:
        f.write(b"\x89PNG broken")
    ds = _dataset(tiny_coco)
    reader = create({"name": "EvalReader", "sample_transforms": SAMPLE_OPS,
                     "batch_transforms": BATCH_OPS, "batch_size": 1})
    loader = reader(ds, workers)
    assert loader.dataset.clsid2catid == {0: 3, 1: 7, 2: 12}
    with pytest.raises(ValueError) as err:
        list(loader)
    assert "img_2.png" in str(err.value) and "image id 2" in str(err.value)


def test_unpadded_batch_error_names_pad_batch(tiny_coco):
    reader = create({"name": "EvalReader", "sample_transforms": SAMPLE_OPS, "batch_size": 2})
    with pytest.raises(ValueError, match="PadBatch"):
        list(reader(_dataset(tiny_coco), 0))


def test_image_folder_for_inference(tiny_coco):
    folder = ImageFolder(dataset_dir=tiny_coco.dataset_dir, anno_path=tiny_coco.anno_path)
    assert folder.label_names == ["c3", "c7", "c12"] and folder.clsid2catid[2] == 12
    folder.set_images(tiny_coco.image_root)
    assert len(folder) == 4
    reader = create({"name": "TestReader", "sample_transforms": SAMPLE_OPS, "batch_transforms": BATCH_OPS})
    batch = next(iter(reader(folder, 0)))
    assert set(batch) == {"image", "im_shape", "scale_factor", "im_id"}
    assert batch["im_id"].dtype == paddle.int64
    assert folder.get_imid2path()[int(batch["im_id"].numpy()[0, 0])].endswith("img_1.png")
    no_labels = ImageFolder(anno_path=None)
    assert no_labels.label_names == []
    with pytest.raises(ValueError, match="does not exist"):
        no_labels.set_images([os.path.join(tiny_coco.image_root, "missing.png")])
