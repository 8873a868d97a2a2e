"""COCO jsons as labelling tools export them (issue 22), run through the tools a user starts.

The export is laid out as Label Studio writes it: ``result.json`` at the export root, file names
``images/x.jpg``, image and category ids from 0. Each defect is checked where the user meets it:
a repeated image id stops train, eval and infer with both file names; annotations of an image id
'images' does not list are ignored with one warning; entries without width/height take the size
from the file's header (the same records as with the sizes written in); file names that already
start with ``image_dir`` get the fix in the missing-file error.
"""

from __future__ import annotations

import json
import logging
import os
from types import SimpleNamespace
from typing import List, Optional

import cv2
import numpy as np
import pytest

from conftest import run_tool, write_tiny_config
from ppdet_retina.data.coco import COCODataSet, ImageFolder
from ppdet_retina.data.image_header import HeaderError, header_size
from ppdet_retina.data.transforms import decode_image
from test_exif import jpeg_with_orientation

CATEGORIES = [{"id": 0, "name": "cat"}, {"id": 1, "name": "dog"}, {"id": 2, "name": "bird"}]
# (file name under images/, stored h x w, EXIF orientation or None for a PNG, viewed h x w, box xywh, category)
PICTURES = [
    ("street.jpg", (32, 48), 1, (32, 48), [4, 4, 20, 16], 0),
    ("phone photo.jpg", (40, 60), 6, (60, 40), [2, 30, 30, 20], 1),  # a space, turned by EXIF
    ("scan.png", (36, 28), None, (36, 28), [6, 6, 12, 20], 2),
]


def _picture(stored_hw, seed: int) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, stored_hw + (3,)).astype(np.uint8)


def write_export(root: str, sizes: bool = True, images: Optional[List[dict]] = None,
                 extra_annotations: Optional[List[dict]] = None) -> SimpleNamespace:
    """The pictures above under ``root/images`` and ``root/result.json`` listing them as
    ``images/<name>`` with ids 0..2 (with width/height unless ``sizes`` is False); ``images``
    replaces the json's image entries."""
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    entries, annotations = [], []
    for img_id, (name, stored, orientation, viewed, box, cat) in enumerate(PICTURES):
        path = os.path.join(root, "images", name)
        if orientation is None:
            cv2.imwrite(path, _picture(stored, img_id))
        else:
            with open(path, "wb") as f:
                f.write(jpeg_with_orientation(_picture(stored, img_id), orientation))
        entry = {"id": img_id, "file_name": f"images/{name}"}
        if sizes:
            entry.update(height=viewed[0], width=viewed[1])
        entries.append(entry)
        annotations.append({"id": img_id, "image_id": img_id, "category_id": cat, "bbox": box,
                            "area": float(box[2] * box[3]), "iscrowd": 0})
    annotations += extra_annotations or []
    with open(os.path.join(root, "result.json"), "w", encoding="utf-8") as f:
        json.dump({"images": entries if images is None else images, "annotations": annotations,
                   "categories": CATEGORIES}, f)
    # image_dir '' (rendered as YAML's empty string): the json's file names start at the export root.
    return SimpleNamespace(dataset_dir=root, image_dir="''", anno_path="result.json",
                           anno_file=os.path.join(root, "result.json"))


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: List[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def coco_log():
    """Messages (info and up) of the dataset's logger, caught at the logger itself."""
    handler, logger = _Lines(), logging.getLogger("ppdet_retina.data.coco")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler.lines
    logger.removeHandler(handler)
    logger.setLevel(level)


def _error_line(proc) -> str:
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def _dataset(export, image_dir: str = "") -> COCODataSet:
    return COCODataSet(dataset_dir=export.dataset_dir, image_dir=image_dir, anno_path=export.anno_path)


# ----------------------------------------------------------------------------- repeated image ids

def test_repeated_image_id_stops_train_eval_and_infer_naming_both_files(tmp_path):
    merged = [{"id": 0, "file_name": "images/street.jpg", "height": 32, "width": 48},
              {"id": 1, "file_name": "images/phone photo.jpg", "height": 60, "width": 40},
              {"id": 1, "file_name": "images/scan.png", "height": 36, "width": 28}]
    export = write_export(str(tmp_path / "export"), images=merged)
    cfg = write_tiny_config(tmp_path, export, epoch=1)
    want = (f"error: {export.anno_file}: image id 1 is listed twice in 'images', for 'images/phone photo.jpg' "
            f"and 'images/scan.png' (exports merged by hand?); give each image its own id and point its "
            f"annotations' image_id at it")
    assert _error_line(run_tool("train.py", "-c", cfg, timeout=80)) == want
    assert _error_line(run_tool("eval.py", "-c", cfg, "-o", "weights=never_read", timeout=80)) == want
    picture = os.path.join(export.dataset_dir, "images", "street.jpg")
    assert _error_line(run_tool("infer.py", "-c", cfg, "-o", "weights=never_read", "--infer_img", picture,
                                timeout=80)) == want


def test_image_folder_refuses_a_repeated_id_in_its_label_json(tmp_path):
    merged = [{"id": 5, "file_name": "a.jpg"}, {"id": 5, "file_name": "b.jpg"}]
    export = write_export(str(tmp_path), images=merged)
    with pytest.raises(ValueError, match=r"image id 5 is listed twice in 'images', for 'a.jpg' and 'b.jpg'"):
        ImageFolder(dataset_dir=export.dataset_dir, anno_path=export.anno_path)


# ----------------------------------------------------------------------------- unlisted image ids

def test_annotations_of_unlisted_images_are_ignored_with_one_warning(tmp_path):
    strays = [{"id": 100 + k, "image_id": img_id, "category_id": 0, "bbox": [1, 1, 5, 5], "area": 25.0,
               "iscrowd": 0} for k, img_id in enumerate([7, 9, 7])]
    export = write_export(str(tmp_path / "export"), extra_annotations=strays)
    # Training runs (one step: 3 images, batch 3; file names from the export root) and says so once.
    cfg = write_tiny_config(tmp_path, export, epoch=1, batch_size=3)
    proc = run_tool("train.py", "-c", cfg, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    want = (f"{export.anno_file}: ignored 3 annotation(s) whose image_id is not in 'images' (image ids 7, 9); "
            f"add those images to 'images' or remove their annotations")
    assert log.count(want) == 1, log[-3000:]
    # The listed images keep exactly their own boxes.
    ds = _dataset(export)
    assert [(r["im_id"], r["gt_bbox"].tolist()) for r in ds.roidbs] == [
        (0, [[4, 4, 24, 20]]), (1, [[2, 30, 32, 50]]), (2, [[6, 6, 18, 26]])]


def test_unlisted_ids_below_between_and_above_the_listed_ones_are_all_counted(tmp_path, coco_log):
    # 'images' lists 0 and 2 only, so the export's own annotation of image 1 is unlisted too.
    listed = [{"id": 0, "file_name": "images/street.jpg", "height": 32, "width": 48},
              {"id": 2, "file_name": "images/scan.png", "height": 36, "width": 28}]
    strays = [{"id": 100 + k, "image_id": img_id, "category_id": 0, "bbox": [1, 1, 5, 5], "iscrowd": 0}
              for k, img_id in enumerate([50, 51, 52, 53, 54, 55, -1])]
    export = write_export(str(tmp_path), images=listed, extra_annotations=strays)
    assert [r["im_id"] for r in _dataset(export).roidbs] == [0, 2]
    lines = [m for m in coco_log if "not in 'images'" in m]
    assert lines == [f"{export.anno_file}: ignored 8 annotation(s) whose image_id is not in 'images' (image ids "
                     f"1, 50, 51, 52, 53, ... (8 ids in all)); add those images to 'images' or remove their "
                     f"annotations"]


# ----------------------------------------------------------------------------- sizes from headers

def _assert_same_records(got: List[dict], want: List[dict]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert sorted(a) == sorted(b)
        for key in a:
            if isinstance(b[key], np.ndarray):
                assert a[key].dtype == b[key].dtype
                np.testing.assert_array_equal(a[key], b[key])
            else:
                assert a[key] == b[key] and type(a[key]) is type(b[key]), key


def test_sizes_missing_from_the_json_are_read_from_headers_giving_the_same_records(tmp_path, coco_log):
    with_sizes = _dataset(write_export(str(tmp_path / "with")))
    assert coco_log == []
    export = write_export(str(tmp_path / "without"), sizes=False)
    without = _dataset(export)
    # The EXIF-turned photo counts in its viewed 60x40 size, as its box (x up to 32, y up to 50) needs.
    assert [(r["h"], r["w"]) for r in without.roidbs] == [(32, 48), (60, 40), (36, 28)]
    moved = [dict(r, im_file=r["im_file"].replace(str(tmp_path / "without"), str(tmp_path / "with")))
             for r in without.roidbs]
    _assert_same_records(moved, with_sizes.roidbs)
    assert coco_log == [f"{export.anno_file}: 3 image entries without width/height: sizes read from the image "
                     f"files' headers"]


def test_training_on_a_json_without_sizes_says_so_once(tmp_path):
    export = write_export(str(tmp_path / "export"), sizes=False)
    cfg = write_tiny_config(tmp_path, export, epoch=1, batch_size=3)
    proc = run_tool("train.py", "-c", cfg, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = f"{export.anno_file}: 3 image entries without width/height: sizes read from the image files' headers"
    assert (proc.stdout + proc.stderr).count(line) == 1


def test_a_header_without_a_size_stops_training_naming_the_file(tmp_path):
    export = write_export(str(tmp_path / "export"), sizes=False)
    broken = os.path.join(export.dataset_dir, "images", "phone photo.jpg")
    with open(broken, "rb") as f:
        data = f.read()
    with open(broken, "wb") as f:
        f.write(data[:40])  # SOI and the EXIF segment, cut before the frame header
    cfg = write_tiny_config(tmp_path, export, epoch=1)
    line = _error_line(run_tool("train.py", "-c", cfg, timeout=80))
    assert line == (f"error: {export.anno_file}: image id 1 has no width/height, and its size cannot be read "
                    f"from the header of {broken}: its JPEG header has no frame size (the header is cut short "
                    f"or malformed); write \"width\" and \"height\" into its entry in 'images' or replace the file")


def test_header_size_matches_the_decoded_image(tmp_path):
    image = _picture((37, 53), 0)
    for orientation in range(1, 9):
        path = str(tmp_path / f"o{orientation}.jpg")
        with open(path, "wb") as f:
            f.write(jpeg_with_orientation(image, orientation, little_endian=orientation % 2 == 0))
        want = (53, 37) if orientation >= 5 else (37, 53)
        assert header_size(path) == want == decode_image(path).shape[:2]
    cases = {"progressive.jpg": [cv2.IMWRITE_JPEG_PROGRESSIVE, 1], "plain.png": [], "plain.bmp": []}
    for name, params in cases.items():
        path = str(tmp_path / name)
        assert cv2.imwrite(path, image, params)
        assert header_size(path) == (37, 53) == decode_image(path).shape[:2], name
    deep = str(tmp_path / "deep.png")  # 16-bit grey
    assert cv2.imwrite(deep, np.full((9, 300), 40000, np.uint16))
    assert header_size(deep) == (9, 300)


def test_header_size_refuses_what_it_cannot_read(tmp_path):
    ok, webp = cv2.imencode(".webp", _picture((8, 8), 0))
    assert ok
    zero_bmp = b"BM" + bytes(12) + (40).to_bytes(4, "little") + bytes(8)  # a 0x0 info header
    cases = {"photo.webp": (webp.tobytes(), "not a JPEG, PNG or BMP file"),
             "empty.png": (b"", "not a JPEG, PNG or BMP file"),
             "cut.png": (b"\x89PNG\r\n\x1a\n\x00\x00", "its PNG header has no IHDR chunk first"),
             "zero.bmp": (zero_bmp, "its BMP header gives a size of 0x0")}
    for name, (data, reason) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(HeaderError, match=reason):
            header_size(str(tmp_path / name))


# ----------------------------------------------------------------------------- image_dir joined twice

def test_file_names_that_start_with_image_dir_get_the_fix_in_the_error(tmp_path):
    export = write_export(str(tmp_path / "export"))
    export.image_dir = "images"  # as the dataset configs set it; the export's names already carry it
    cfg = write_tiny_config(tmp_path, export, epoch=1)
    line = _error_line(run_tool("train.py", "-c", cfg, timeout=80))
    doubled = os.path.join(export.dataset_dir, "images", "images", "street.jpg")
    assert f"3 image file(s) listed in the json do not exist: {doubled} (image id 0);" in line
    assert line.endswith("; the json's file names already start with image_dir 'images' (e.g. 'images/street.jpg'): "
                         "set image_dir: '' (TrainDataset.image_dir, EvalDataset.image_dir for evaluation) or "
                         "strip 'images/' from the file names")
    # The first fix it names works.
    assert len(_dataset(export, image_dir="")) == 3


def test_missing_files_under_another_folder_get_no_image_dir_hint(tmp_path):
    export = write_export(str(tmp_path))
    with pytest.raises(ValueError) as err:
        _dataset(export, image_dir="pictures")
    assert "do not exist" in str(err.value) and "already start with image_dir" not in str(err.value)
