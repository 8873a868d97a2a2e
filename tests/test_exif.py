"""EXIF orientation: real JPEG files carrying an Orientation tag, decoded to agree with the annotation.

The photo is stored 40x60 (h x w) with a red block in its stored top-left corner (rows 0-10,
columns 0-20) and tagged orientation 6 ("rotate 90 degrees clockwise to view"): a viewer shows it
60x40 with the block in the top-right corner (rows 0-20, columns 30-40). An annotation tool may
record either frame; the decoded image must be the one whose size the json records, so that
the json's box covers the red block either way.
"""

from __future__ import annotations

import os

import cv2
import numpy as np
import pytest

from conftest import write_coco_json
from ppdet_retina.data.coco import COCODataSet, ImageFolder
from ppdet_retina.data.transforms import (BadImageError, Compose, Decode, apply_exif_orientation, decode_image,
                                          exif_orientation)

STORED_HW = (40, 60)
VIEWED_HW = (60, 40)
STORED_BOX = [0, 0, 20, 10]   # x1, y1, x2, y2 of the red block as stored
VIEWED_BOX = [30, 0, 40, 20]  # the same block after a 90 degree clockwise turn


def exif_app1(orientation: int, little_endian: bool = False) -> bytes:
    """An APP1 Exif segment whose TIFF header has one IFD entry: Orientation (0x0112), SHORT, 1 value."""
    if little_endian:
        tiff = b"II*\x00" + (8).to_bytes(4, "little") + (1).to_bytes(2, "little") \
            + b"\x12\x01" + b"\x03\x00" + (1).to_bytes(4, "little") + orientation.to_bytes(2, "little") + b"\x00\x00"
    else:
        tiff = b"MM\x00*" + (8).to_bytes(4, "big") + (1).to_bytes(2, "big") \
            + b"\x01\x12" + b"\x00\x03" + (1).to_bytes(4, "big") + orientation.to_bytes(2, "big") + b"\x00\x00"
    payload = b"Exif\x00\x00" + tiff + b"\x00\x00\x00\x00"  # no next IFD
    return b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload


def jpeg_with_orientation(image_bgr: np.ndarray, orientation: int, little_endian: bool = False) -> bytes:
    ok, buf = cv2.imencode(".jpg", image_bgr, [cv2.IMWRITE_JPEG_QUALITY, 98])
    assert ok
    data = buf.tobytes()
    return data[:2] + exif_app1(orientation, little_endian) + data[2:]  # right after SOI


def stored_photo() -> np.ndarray:
    image = np.full(STORED_HW + (3,), 128, np.uint8)
    image[0:10, 0:20] = (0, 0, 255)  # BGR red
    return image


@pytest.fixture
def photo(tmp_path) -> str:
    path = tmp_path / "images" / "phone.jpg"
    path.parent.mkdir()
    path.write_bytes(jpeg_with_orientation(stored_photo(), 6))
    return str(path)


def _is_red(image_rgb: np.ndarray, box) -> bool:
    x1, y1, x2, y2 = [int(v) for v in box]
    inner = image_rgb[y1 + 2:y2 - 2, x1 + 2:x2 - 2].reshape(-1, 3).mean(axis=0)  # off the JPEG edges
    return inner[0] > 220 and inner[1] < 40 and inner[2] < 40


def _dataset(tmp_path, hw, box) -> COCODataSet:
    write_coco_json(str(tmp_path / "annotations" / "instances.json"),
                    [{"id": 42, "file_name": "phone.jpg", "height": hw[0], "width": hw[1]}],
                    [{"id": 1, "image_id": 42, "category_id": 1, "area": 200.0, "iscrowd": 0,
                      "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]}],
                    [{"id": 1, "name": "block"}])
    ds = COCODataSet(dataset_dir=str(tmp_path), image_dir="images", anno_path="annotations/instances.json")
    ds.set_transform(Compose([Decode()]))
    return ds


def test_orientation_tag_is_read_and_applied_as_opencv_does():
    image = stored_photo()
    image[30:40, 50:60] = (255, 0, 0)  # a second, blue block so that every flip is visible
    for orientation in range(1, 9):
        for little in (False, True):
            data = jpeg_with_orientation(image, orientation, little)
            assert exif_orientation(data) == orientation
            raw = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
            viewer = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)  # OpenCV applies EXIF
            np.testing.assert_array_equal(apply_exif_orientation(raw, orientation), viewer)
    ok, plain = cv2.imencode(".jpg", image)
    assert exif_orientation(plain.tobytes()) == 1


def test_annotation_recorded_in_the_viewed_orientation(tmp_path, photo):
    sample = _dataset(tmp_path, VIEWED_HW, VIEWED_BOX)[0]
    assert sample["image"].shape == VIEWED_HW + (3,)
    assert (sample["h"], sample["w"]) == VIEWED_HW
    np.testing.assert_array_equal(sample["gt_bbox"], [VIEWED_BOX])
    assert _is_red(sample["image"], sample["gt_bbox"][0])


def test_annotation_recorded_in_the_stored_orientation(tmp_path, photo):
    sample = _dataset(tmp_path, STORED_HW, STORED_BOX)[0]
    assert sample["image"].shape == STORED_HW + (3,)
    np.testing.assert_array_equal(sample["gt_bbox"], [STORED_BOX])
    assert _is_red(sample["image"], sample["gt_bbox"][0])
    np.testing.assert_array_equal(sample["im_shape"], STORED_HW)


def test_size_matching_neither_orientation_names_file_and_id(tmp_path, photo):
    ds = _dataset(tmp_path, (50, 50), [5, 5, 20, 20])
    with pytest.raises(BadImageError) as err:
        ds[0]
    msg = str(err.value)
    assert photo in msg and "image id 42" in msg
    assert "40x60" in msg and "60x40" in msg and "50x50" in msg


def test_image_folder_shows_the_photo_as_viewers_do(tmp_path, photo):
    folder = ImageFolder()
    folder.set_images(os.path.dirname(photo))
    folder.set_transform(Compose([Decode()]))
    image = folder[0]["image"]
    assert image.shape == VIEWED_HW + (3,)
    assert _is_red(image, VIEWED_BOX)
    # The stored orientation is the same pixels turned back.
    np.testing.assert_array_equal(decode_image(photo, STORED_HW), cv2.rotate(image, cv2.ROTATE_90_COUNTERCLOCKWISE))


def test_image_folder_follows_the_size_its_json_records(tmp_path, photo):
    def decoded(hw):
        _dataset(tmp_path, hw, [5, 5, 20, 20])  # writes the json
        folder = ImageFolder(dataset_dir=str(tmp_path), anno_path="annotations/instances.json")
        folder.set_images(photo)
        folder.set_transform(Compose([Decode()]))
        sample = folder[0]
        assert sample["im_id"] == 42  # the json's id, for --save_results
        return sample["image"].shape[:2]

    # So that saved results line up with that json's boxes; no boxes to misplace, so a size that
    # fits neither orientation (a resized copy) is no error: the viewer's orientation is used.
    assert decoded(STORED_HW) == STORED_HW
    assert decoded(VIEWED_HW) == VIEWED_HW
    assert decoded((50, 50)) == VIEWED_HW
