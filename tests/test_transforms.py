"""Sample and batch ops: sizes, boxes, scale_factor and the padding contract."""

import random

import cv2
import numpy as np
import pytest

from ppdet_retina.core.workspace import ConfigError
from ppdet_retina.data.transforms import (Compose, Decode, NormalizeImage, PadBatch, Permute, RandomFlip,
                                          RandomResize, Resize, build_ops, resize_scale)


def _sample(h=60, w=100, boxes=((10, 20, 50, 40),)):
    image = np.random.RandomState(0).randint(0, 255, (h, w, 3)).astype(np.uint8)
    return {"image": image, "im_shape": np.array([h, w], np.float32), "scale_factor": np.ones(2, np.float32),
            "gt_bbox": np.array(boxes, np.float32).reshape(-1, 4)}


# ----------------------------------------------------------------------------- decode

def test_decode_rgb_gray_rgba_and_corrupt(tmp_path):
    bgr = np.zeros((20, 30, 3), np.uint8)
    bgr[..., 0] = 200  # blue in BGR
    cv2.imwrite(str(tmp_path / "c.png"), bgr)
    out = Decode()({"im_file": str(tmp_path / "c.png")})
    assert out["image"].shape == (20, 30, 3) and out["image"][0, 0].tolist() == [0, 0, 200]
    np.testing.assert_array_equal(out["im_shape"], [20, 30])
    np.testing.assert_array_equal(out["scale_factor"], [1, 1])
    assert (out["h"], out["w"]) == (20, 30)

    cv2.imwrite(str(tmp_path / "g.png"), np.full((8, 9), 77, np.uint8))
    gray = Decode()({"im_file": str(tmp_path / "g.png")})["image"]
    assert gray.shape == (8, 9, 3) and (gray == 77).all()

    rgba = np.zeros((5, 6, 4), np.uint8)
    rgba[..., 2], rgba[..., 3] = 90, 10  # BGRA: red 90, nearly transparent
    cv2.imwrite(str(tmp_path / "a.png"), rgba)
    four = Decode()({"im_file": str(tmp_path / "a.png")})["image"]
    assert four.shape == (5, 6, 3) and four[0, 0].tolist() == [90, 0, 0]

    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 not really")
    with pytest.raises(ValueError, match="bad.jpg.*corrupt"):
        Decode()({"im_file": str(tmp_path / "bad.jpg")})


def test_decode_applies_exif_orientation(tmp_path):
    # A 10x20 (h x w) JPEG tagged "rotate 90 CW" (orientation 6) must come out 20x10.
    ok, buf = cv2.imencode(".jpg", np.zeros((10, 20, 3), np.uint8))
    assert ok
    data = buf.tobytes()
    # APP1 Exif segment, big-endian TIFF, one IFD entry: tag 0x0112 SHORT count 1 value 6.
    tiff = b"MM\x00\x2a\x00\x00\x00\x08" + b"\x00\x01" + b"\x01\x12\x00\x03\x00\x00\x00\x01\x00\x06\x00\x00" \
        + b"\x00\x00\x00\x00"
    payload = b"Exif\x00\x00" + tiff
    app1 = b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload
    path = tmp_path / "rot.jpg"
    path.write_bytes(data[:2] + app1 + data[2:])
    assert Decode()({"im_file": str(path)})["image"].shape == (20, 10, 3)


# ----------------------------------------------------------------------------- resize

def test_resize_scale_keep_ratio_math():
    # Short side limited: 600x800 -> min(800/600, 1333/800) = 1.333.
    assert resize_scale(600, 800, [800, 1333], True) == pytest.approx((800 / 600, 800 / 600))
    # Long side limited: 400x1600 -> min(800/400, 1333/1600) = 0.833.
    assert resize_scale(400, 1600, [800, 1333], True) == pytest.approx((1333 / 1600, 1333 / 1600))
    # Order of target_size does not matter with keep_ratio.
    assert resize_scale(400, 1600, [1333, 800], True) == resize_scale(400, 1600, [800, 1333], True)
    assert resize_scale(50, 100, [64, 32], False) == pytest.approx((64 / 50, 32 / 100))


def test_resize_image_boxes_scale_factor():
    out = Resize(target_size=[120, 150], keep_ratio=True)(_sample())
    # 60x100: scale = min(120/60, 150/100) = 1.5 -> 90x150.
    assert out["image"].shape == (90, 150, 3)
    np.testing.assert_allclose(out["im_shape"], [90, 150])
    np.testing.assert_allclose(out["scale_factor"], [1.5, 1.5])
    np.testing.assert_allclose(out["gt_bbox"], [[15, 30, 75, 60]])
    assert out["gt_bbox"].dtype == np.float32 and out["scale_factor"].dtype == np.float32


def test_resize_no_keep_ratio_and_int_target():
    out = Resize(target_size=[30, 40], keep_ratio=False)(_sample())
    assert out["image"].shape == (30, 40, 3)
    np.testing.assert_array_equal(out["im_shape"], [30, 40])
    np.testing.assert_allclose(out["scale_factor"], [0.5, 0.4])
    np.testing.assert_allclose(out["gt_bbox"], [[4, 10, 20, 20]])
    assert Resize(target_size=32, keep_ratio=False)(_sample())["image"].shape == (32, 32, 3)
    # 60x100 -> 70x45: sy = 7/6, sx = 0.45; the box [10,20,50,40] -> [4.5, 23.33, 22.5, 46.67].
    odd = Resize(target_size=[70, 45], keep_ratio=False)(_sample())
    assert odd["image"].shape == (70, 45, 3)
    np.testing.assert_array_equal(odd["im_shape"], [70, 45])
    np.testing.assert_allclose(odd["scale_factor"], [70 / 60, 0.45], rtol=1e-6)
    np.testing.assert_allclose(odd["gt_bbox"], [[4.5, 70 / 3, 22.5, 140 / 3]], rtol=1e-6)


def test_resize_keeps_the_nominal_scale_and_unrounded_im_shape():
    # 60x100 to short side 37: scale 37/60 = 0.61667. OpenCV rounds the width 61.67 up to 62 pixels but
    # samples at the nominal scale; im_shape keeps 61.67 and scale_factor the scale itself (PaddleDetection).
    sample = _sample()
    pixels = sample["image"].copy()
    out = Resize(target_size=[37, 1000])(sample)
    scale = 37 / 60
    assert out["image"].shape == (37, 62, 3)
    np.testing.assert_array_equal(out["image"], cv2.resize(pixels, None, None, fx=scale, fy=scale,
                                                           interpolation=cv2.INTER_LINEAR))
    # A resize to the rounded size samples elsewhere: the pixels differ (the cause of the old mismatch).
    assert not np.array_equal(out["image"], cv2.resize(pixels, (62, 37), interpolation=cv2.INTER_LINEAR))
    np.testing.assert_allclose(out["im_shape"], [37, 100 * scale], rtol=1e-6)
    assert out["im_shape"].dtype == np.float32
    np.testing.assert_allclose(out["scale_factor"], [scale, scale], rtol=1e-6)
    np.testing.assert_allclose(out["gt_bbox"], [[10 * scale, 20 * scale, 50 * scale, 40 * scale]], rtol=1e-6)
    # A second resize reads the 37x62 pixels: min(74/37, 1000/62) = 2, and the factors multiply.
    again = Resize(target_size=[74, 1000])(out)
    assert again["image"].shape == (74, 124, 3)
    np.testing.assert_allclose(again["im_shape"], [74, 124], rtol=1e-6)
    np.testing.assert_allclose(again["scale_factor"], [2 * scale, 2 * scale], rtol=1e-6)
    # Dividing boxes by scale_factor gets back the original pixels.
    np.testing.assert_allclose(again["gt_bbox"] / np.tile(again["scale_factor"][::-1], 2),
                               [[10, 20, 50, 40]], rtol=1e-5)


def test_resize_clips_boxes_to_the_unrounded_size():
    # A box reaching past the right edge ends at w * scale = 61.67, not at the 62-pixel border.
    out = Resize(target_size=[37, 1000])(_sample(boxes=((50, 10, 130, 30),)))
    np.testing.assert_allclose(out["gt_bbox"], [[50 * 37 / 60, 10 * 37 / 60, 100 * 37 / 60, 30 * 37 / 60]],
                               rtol=1e-6)


def test_resize_to_nothing_names_the_file():
    sample = _sample(h=1, w=3000, boxes=())
    sample["im_file"] = "thin.png"
    with pytest.raises(ValueError, match="thin.png.*no pixel"):
        Resize(target_size=[10, 100])(sample)


def test_resize_bad_config():
    with pytest.raises(ConfigError, match="target_size"):
        Resize(target_size=[0, 10])
    with pytest.raises(ConfigError, match="interp"):
        Resize(target_size=10, interp=9)


def test_random_resize_picks_from_list_and_range():
    random.seed(0)
    op = RandomResize(target_size=[[30, 1000], [45, 1000]], keep_ratio=True)
    shorts = {op(_sample())["image"].shape[0] for _ in range(20)}
    assert shorts == {30, 45}
    # Each pick resizes as Resize does: nominal scale short/60, unrounded width 100 * short/60.
    for _ in range(4):
        out = op(_sample())
        scale = out["image"].shape[0] / 60
        np.testing.assert_allclose(out["scale_factor"], [scale, scale], rtol=1e-6)
        np.testing.assert_allclose(out["im_shape"], [60 * scale, 100 * scale], rtol=1e-6)
    ranged = RandomResize(target_size=[[30, 1000], [45, 1000]], random_range=True)
    shorts = {ranged(_sample())["image"].shape[0] for _ in range(30)}
    assert min(shorts) >= 30 and max(shorts) <= 45 and len(shorts) > 2
    fixed = RandomResize(target_size=[40, 1000], random_size=False)
    assert fixed(_sample())["image"].shape[0] == 40


# ----------------------------------------------------------------------------- flip / normalise / permute

def test_flip_boxes_and_pixels():
    sample = _sample(boxes=[(10, 20, 50, 40), (0, 0, 100, 60)])
    image = sample["image"].copy()
    out = RandomFlip(prob=1.0)(sample)
    np.testing.assert_array_equal(out["gt_bbox"], [[50, 20, 90, 40], [0, 0, 100, 60]])
    np.testing.assert_array_equal(out["image"], image[:, ::-1])
    untouched = RandomFlip(prob=0.0)(_sample())
    np.testing.assert_array_equal(untouched["gt_bbox"], [[10, 20, 50, 40]])
    with pytest.raises(ConfigError, match="prob"):
        RandomFlip(prob=2)


def test_normalize_and_permute():
    sample = {"image": np.full((2, 3, 3), 255, np.uint8)}
    out = NormalizeImage(mean=[0.5, 0.5, 0.5], std=[0.25, 0.5, 1.0])(sample)
    assert out["image"].dtype == np.float32
    np.testing.assert_allclose(out["image"][0, 0], [2.0, 1.0, 0.5], rtol=1e-6)
    raw = NormalizeImage(is_scale=False, norm_type="none")({"image": np.full((1, 1, 3), 7, np.uint8)})
    np.testing.assert_allclose(raw["image"][0, 0], [7, 7, 7])
    chw = Permute()({"image": np.arange(24, dtype=np.float32).reshape(2, 4, 3)})["image"]
    assert chw.shape == (3, 2, 4) and chw[1, 0, 2] == 7 and chw.flags["C_CONTIGUOUS"]
    with pytest.raises(ConfigError, match="norm_type"):
        NormalizeImage(norm_type="minmax")


# ----------------------------------------------------------------------------- pad batch

def test_pad_batch_shapes_and_mask():
    a = {"image": np.ones((3, 40, 50), np.float32), "gt_bbox": np.array([[1, 2, 3, 4]] * 3, np.float32),
         "gt_class": np.array([[0], [2], [1]], np.int32), "is_crowd": np.array([[0], [0], [1]], np.int32)}
    b = {"image": np.ones((3, 65, 30), np.float32), "gt_bbox": np.zeros((0, 4), np.float32),
         "gt_class": np.zeros((0, 1), np.int32), "is_crowd": np.zeros((0, 1), np.int32)}
    out = PadBatch(pad_to_stride=32)([a, b])
    assert out[0]["image"].shape == out[1]["image"].shape == (3, 96, 64)
    assert out[0]["image"][:, :40, :50].min() == 1 and out[0]["image"][:, 40:].max() == 0
    assert out[1]["gt_bbox"].shape == (3, 4) and out[1]["gt_class"].shape == (3, 1)
    assert out[0]["pad_gt_mask"][:, 0].tolist() == [1, 1, 1]
    assert out[1]["pad_gt_mask"][:, 0].tolist() == [0, 0, 0]
    assert out[0]["gt_class"][:, 0].tolist() == [0, 2, 1] and out[0]["is_crowd"][:, 0].tolist() == [0, 0, 1]
    assert out[1]["pad_gt_mask"].dtype == np.float32 and out[1]["gt_class"].dtype == np.int32


def test_pad_batch_all_empty_gives_one_padded_gt_and_no_stride():
    samples = [{"image": np.ones((3, 7, 9), np.float32), "gt_bbox": np.zeros((0, 4), np.float32)}]
    out = PadBatch()(samples)
    assert out[0]["image"].shape == (3, 7, 9)
    assert out[0]["gt_bbox"].shape == (1, 4) and out[0]["pad_gt_mask"][0, 0] == 0
    no_mask = PadBatch(return_gt_mask=False)([{"image": np.ones((3, 7, 9), np.float32),
                                                "gt_bbox": np.zeros((0, 4), np.float32)}])
    assert "pad_gt_mask" not in no_mask[0]


# ----------------------------------------------------------------------------- building from config

def test_build_ops_from_yaml_entries_and_errors():
    ops = build_ops([{"Decode": {}}, {"Resize": {"target_size": [800, 1333], "keep_ratio": True, "interp": 2}},
                     {"RandomFlip": None}, "Permute", {"name": "NormalizeImage", "is_scale": False}])
    assert [type(o).__name__ for o in ops] == ["Decode", "Resize", "RandomFlip", "Permute", "NormalizeImage"]
    assert ops[1].target_size == [800, 1333] and ops[1].interp == 2
    with pytest.raises(ConfigError, match=r"ops\[0\].*Resize.*'size'"):
        build_ops([{"Resize": {"size": 3}}], "ops")
    with pytest.raises(ConfigError, match="one-key"):
        build_ops([{"Resize": {}, "Decode": {}}])
    with pytest.raises(ConfigError, match="Permute.*to_bgr"):
        build_ops([{"Permute": {"to_bgr": True}}])


def test_compose_keeps_boxes_consistent_through_pipeline(tmp_path):
    image = np.zeros((50, 80, 3), np.uint8)
    image[10:30, 20:60] = 255  # box [20, 10, 60, 30]
    cv2.imwrite(str(tmp_path / "x.png"), image)
    pipeline = Compose(build_ops([{"Decode": {}}, {"Resize": {"target_size": [100, 1000]}},
                                  {"RandomFlip": {"prob": 1.0}}, {"NormalizeImage": {}}, {"Permute": {}}]))
    out = pipeline({"im_file": str(tmp_path / "x.png"), "gt_bbox": np.array([[20, 10, 60, 30]], np.float32)})
    assert out["image"].shape == (3, 100, 160)
    np.testing.assert_allclose(out["gt_bbox"], [[40, 20, 120, 60]])
    x1, y1, x2, y2 = out["gt_bbox"][0].astype(int)
    # White (> 2 after normalisation) fills the box; bilinear blending touches only its edge pixels.
    assert out["image"][:, y1 + 1:y2 - 1, x1 + 1:x2 - 1].min() > 2.0
    assert out["image"][:, :y1 - 1, :].max() < 0 and out["image"][:, :, :x1 - 1].max() < 0
