"""Anchor coordinates by hand and the (y, x, anchor) layout shared with the heads."""

import math

import numpy as np
import paddle
import pytest

from ppdet_retina.core.workspace import ConfigError, create
from ppdet_retina.modeling.anchors import AnchorGenerator, RetinaAnchorGenerator, _grid_anchors_paddle


def loop_anchors(sizes, ratios, h, w, stride, offset=0.0):
    """Brute-force reference: explicit loops in the documented order."""
    rows = []
    for y in range(h):
        for x in range(w):
            cx, cy = x * stride + offset * stride, y * stride + offset * stride
            for s in sizes:
                for r in ratios:
                    aw = math.sqrt(s * s / r)
                    ah = aw * r
                    rows.append([cx - aw / 2, cy - ah / 2, cx + aw / 2, cy + ah / 2])
    return np.array(rows)


def test_p3_anchors_by_hand():
    gen = RetinaAnchorGenerator()
    assert gen.num_anchors == 9 and gen.num_levels == 5
    np.testing.assert_allclose(gen.anchor_sizes[0], [32.0, 40.3175, 50.7968], rtol=1e-5)
    p3 = gen([(2, 3), (1, 2), (1, 1), (1, 1), (1, 1)])[0].numpy()
    assert p3.shape == (2 * 3 * 9, 4) and p3.dtype == np.float32
    np.testing.assert_allclose(p3[0], [-22.627, -11.314, 22.627, 11.314], atol=1e-3)
    np.testing.assert_allclose(p3[1], [-16.0, -16.0, 16.0, 16.0], atol=1e-5)
    np.testing.assert_allclose(p3[2], [-11.314, -22.627, 11.314, 22.627], atol=1e-3)
    # size 40.32, ratio 1 is anchor 4; size 50.80 ratio 2 is anchor 8.
    np.testing.assert_allclose(p3[4], [-20.159, -20.159, 20.159, 20.159], atol=1e-3)
    w8 = math.sqrt(50.7968 ** 2 / 2.0)
    np.testing.assert_allclose(p3[8], [-w8 / 2, -w8, w8 / 2, w8], atol=1e-3)
    # location (y=1, x=2): index (1*3 + 2)*9; centre (16, 8).
    np.testing.assert_allclose(p3[45], [16 - 22.627, 8 - 11.314, 16 + 22.627, 8 + 11.314], atol=1e-3)


def test_all_levels_match_loop_reference():
    gen = RetinaAnchorGenerator()
    sizes = [(4, 5), (2, 3), (1, 2), (1, 1), (1, 1)]
    out = gen(sizes)
    for level, ((h, w), stride) in enumerate(zip(sizes, [8, 16, 32, 64, 128])):
        ref = loop_anchors(gen.anchor_sizes[level], [0.5, 1.0, 2.0], h, w, stride)
        np.testing.assert_allclose(out[level].numpy(), ref, rtol=1e-5, atol=1e-3)


def test_offset_shifts_centres():
    gen = AnchorGenerator(anchor_sizes=[32], aspect_ratios=[1.0], strides=[16.0], offset=0.5)
    a = gen([(2, 2)])[0].numpy()
    np.testing.assert_allclose(a, loop_anchors([32], [1.0], 2, 2, 16, 0.5))
    np.testing.assert_allclose(a[3], [24 - 16, 24 - 16, 24 + 16, 24 + 16])


def test_faster_rcnn_per_level_sizes():
    gen = AnchorGenerator(anchor_sizes=[[32], [64], [128], [256], [512]], aspect_ratios=[0.5, 1.0, 2.0],
                          strides=[4, 8, 16, 32, 64])
    assert gen.num_anchors == 3 and gen.num_levels == 5
    out = gen([(2, 2)] * 5)
    np.testing.assert_allclose(out[1].numpy(), loop_anchors([64], [0.5, 1, 2], 2, 2, 8), rtol=1e-6)
    np.testing.assert_allclose(out[4].numpy()[1], [-256, -256, 256, 256])


def test_flat_sizes_apply_to_every_level():
    gen = AnchorGenerator(anchor_sizes=[32, 64], aspect_ratios=[1.0], strides=[16.0])
    assert gen.num_anchors == 2
    np.testing.assert_allclose(gen([(1, 2)])[0].numpy(),
                               [[-16, -16, 16, 16], [-32, -32, 32, 32], [0, -16, 32, 16], [-16, -32, 48, 32]])


def test_cache_returns_same_object_and_tensors_accepted():
    gen = RetinaAnchorGenerator(strides=[8.0, 16.0])
    first = gen([(4, 4), (2, 2)])
    again = gen([(4, 4), (2, 2)])
    assert first[0] is again[0] and first[1] is again[1]
    feats = [paddle.zeros([1, 2, 4, 4]), paddle.zeros([1, 2, 2, 2])]
    from_tensors = gen(feats)
    assert from_tensors[0] is first[0]
    other = gen([(3, 4), (2, 2)])
    assert other[0] is not first[0] and other[0].shape == [3 * 4 * 9, 4]
    assert first[0].stop_gradient


def test_runtime_shape_path_matches_cached_path():
    gen = RetinaAnchorGenerator(strides=[8.0])
    cell = paddle.to_tensor(gen.cells[0].astype(np.float32))
    dyn = _grid_anchors_paddle(cell, paddle.to_tensor(3), paddle.to_tensor(5), 8.0, 0.0)
    np.testing.assert_allclose(dyn.numpy(), gen([(3, 5)])[0].numpy(), rtol=1e-6, atol=1e-4)


def test_create_from_config_and_errors():
    gen = create({"name": "RetinaAnchorGenerator", "octave_base_scale": 4, "scales_per_octave": 3,
                  "aspect_ratios": [0.5, 1.0, 2.0], "strides": [8.0, 16.0, 32.0, 64.0, 128.0]})
    assert isinstance(gen, RetinaAnchorGenerator) and gen.num_anchors == 9
    with pytest.raises(ConfigError, match="anchor_sizes"):
        AnchorGenerator(anchor_sizes=[[32], [64]], strides=[4, 8, 16])
    with pytest.raises(ConfigError, match="strides"):
        AnchorGenerator(strides=[])
    with pytest.raises(ValueError, match="feature levels"):
        RetinaAnchorGenerator()([(4, 4)])
