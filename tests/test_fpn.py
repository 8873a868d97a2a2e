"""FPN neck: level shapes, numpy reference of the whole computation, config hooks, init, errors."""

import numpy as np
import paddle
import pytest

from ppdet_retina.core.workspace import ConfigError, create
from ppdet_retina.modeling.necks.fpn import FPN
from ppdet_retina.modeling.shape_spec import ShapeSpec


def _feats(channels, sizes, batch=1, seed=0):
    rng = np.random.RandomState(seed)
    return [rng.randn(batch, c, s, s).astype("float32") for c, s in zip(channels, sizes)]


def _conv_np(x, w, b, stride):
    """Brute-force conv with 'same' padding for odd kernels: x [B,C,H,W], w [O,C,k,k]."""
    k = w.shape[-1]
    pad = (k - 1) // 2
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    out_h = (x.shape[2] + 2 * pad - k) // stride + 1
    out_w = (x.shape[3] + 2 * pad - k) // stride + 1
    out = np.zeros((x.shape[0], w.shape[0], out_h, out_w), "float64")
    for ky in range(k):
        for kx in range(k):
            patch = xp[:, :, ky:ky + stride * out_h:stride, kx:kx + stride * out_w:stride]
            out += np.einsum("oc,bchw->bohw", w[:, :, ky, kx], patch)
    return out + b[None, :, None, None]


def _params(layer):
    return layer.weight.numpy(), layer.bias.numpy()


def _fpn_np(fpn, feats):
    lat = [_conv_np(f, *_params(c), 1) for c, f in zip(fpn.lateral_convs, feats)]
    for i in range(len(lat) - 1, 0, -1):
        lat[i - 1] = lat[i - 1] + lat[i].repeat(2, axis=2).repeat(2, axis=3)
    outs = [_conv_np(x, *_params(c), 1) for c, x in zip(fpn.output_convs, lat)]
    for j, conv in enumerate(fpn.extra_convs):
        if j == 0:
            src = feats[-1] if fpn.use_c5 else outs[-1]
        else:
            src = np.maximum(outs[-1], 0) if fpn.relu_before_extra_convs else outs[-1]
        outs.append(_conv_np(src, *_params(conv), 2))
    return outs


@pytest.mark.parametrize("use_c5, relu", [(True, True), (False, True), (False, False)])
def test_retinanet_p3_p7_match_numpy(use_c5, relu):
    paddle.seed(0)
    fpn = FPN(in_channels=[4, 6, 8], out_channel=5, spatial_scales=[1 / 8, 1 / 16, 1 / 32], has_extra_convs=True,
              extra_stage=2, use_c5=use_c5, relu_before_extra_convs=relu)
    for conv in list(fpn.lateral_convs) + list(fpn.output_convs) + list(fpn.extra_convs):
        conv.bias.set_value(np.random.RandomState(1).randn(5).astype("float32"))  # non-zero biases count too
    feats = _feats([4, 6, 8], [16, 8, 4])
    got = [o.numpy() for o in fpn([paddle.to_tensor(f) for f in feats])]
    want = _fpn_np(fpn, feats)
    assert [g.shape for g in got] == [(1, 5, 16, 16), (1, 5, 8, 8), (1, 5, 4, 4), (1, 5, 2, 2), (1, 5, 1, 1)]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)
    assert list(fpn.extra_convs[0].weight.shape) == [5, 8 if use_c5 else 5, 3, 3]
    assert fpn.out_shape == [ShapeSpec(5, s) for s in (8, 16, 32, 64, 128)]


def test_maxpool_extra_level_is_subsampled_top_level():
    fpn = FPN(in_channels=[3, 4, 5, 6], out_channel=4)  # Faster R-CNN defaults: one extra level, no convs
    assert len(fpn.extra_convs) == 0
    outs = fpn([paddle.to_tensor(f) for f in _feats([3, 4, 5, 6], [16, 8, 4, 2], batch=2)])
    assert [list(o.shape) for o in outs] == [[2, 4, 16, 16], [2, 4, 8, 8], [2, 4, 4, 4], [2, 4, 2, 2], [2, 4, 1, 1]]
    np.testing.assert_array_equal(outs[4].numpy(), outs[3].numpy()[:, :, ::2, ::2])
    assert [s.stride for s in fpn.out_shape] == [4, 8, 16, 32, 64]


def test_odd_sizes_upsample_to_the_finer_map():
    fpn = FPN(in_channels=[2, 3, 4], out_channel=3, has_extra_convs=True, extra_stage=2, use_c5=True)
    outs = fpn([paddle.to_tensor(f) for f in _feats([2, 3, 4], [13, 7, 4])])
    assert [o.shape[-1] for o in outs] == [13, 7, 4, 2, 1]


def test_from_config_takes_backbone_shapes():
    cfg = {"FPN": {"out_channel": 8, "spatial_scales": [0.125, 0.0625, 0.03125], "extra_stage": 2,
                   "has_extra_convs": True, "use_c5": False, "norm_type": None, "norm_decay": 0.0,
                   "freeze_norm": False, "relu_before_extra_convs": True}}
    fpn = create("FPN", cfg, input_shape=[ShapeSpec(16, 8), ShapeSpec(32, 16), ShapeSpec(64, 32)])
    assert fpn.in_channels == [16, 32, 64]
    assert fpn.spatial_scales == [0.125, 0.0625, 0.03125]
    assert [s.stride for s in fpn.out_shape] == [8, 16, 32, 64, 128]
    assert list(fpn.lateral_convs[2].weight.shape) == [8, 64, 1, 1]
    # PaddleDetection's defaults: 4 scales for 3 inputs; the inputs are the coarsest three (C3..C5)
    assert [s.stride for s in FPN().out_shape] == [8, 16, 32, 64]


def test_xavier_uniform_init_with_paddledetection_fan_out():
    paddle.seed(3)
    fpn = FPN(in_channels=[64, 128, 256], out_channel=32)
    w = fpn.lateral_convs[2].weight.numpy()
    limit = np.sqrt(6.0 / (256 + 256))  # fan_in = fan_out = 256 input channels for the 1x1 lateral
    assert np.abs(w).max() <= limit and np.abs(w).max() > 0.9 * limit
    w3 = fpn.output_convs[0].weight.numpy()
    limit3 = np.sqrt(6.0 / (32 * 9 * 2))
    assert np.abs(w3).max() <= limit3 and np.abs(w3).max() > 0.9 * limit3
    assert not fpn.lateral_convs[0].bias.numpy().any()


def test_norm_type_gn_adds_conv_norm_pairs():
    fpn = FPN(in_channels=[32, 32], out_channel=32, spatial_scales=[1 / 16, 1 / 32], norm_type="gn")
    names = set(fpn.state_dict())
    assert {"lateral_convs.0.conv.weight", "lateral_convs.0.norm.weight", "output_convs.1.norm.bias"} <= names
    assert "lateral_convs.0.conv.bias" not in names
    outs = fpn([paddle.randn([1, 32, 4, 4]), paddle.randn([1, 32, 2, 2])])
    assert [list(o.shape) for o in outs] == [[1, 32, 4, 4], [1, 32, 2, 2], [1, 32, 1, 1]]


def test_errors():
    with pytest.raises(ConfigError, match="norm_type"):
        FPN(norm_type="ln")
    with pytest.raises(ConfigError, match="spatial_scales"):
        FPN(in_channels=[1, 2, 3], spatial_scales=[0.5])
    with pytest.raises(ValueError, match="return_idx"):
        FPN(in_channels=[2, 3], spatial_scales=[0.5, 0.25], out_channel=2)([paddle.randn([1, 2, 4, 4])])
