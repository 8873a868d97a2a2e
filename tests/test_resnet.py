"""ResNet backbone: shapes, variants, frozen norm, freezing, config keys, checked against numpy."""

import numpy as np
import paddle
import pytest

from ppdet_retina.core.workspace import ConfigError, create
from ppdet_retina.modeling.backbones.resnet import AvgPoolShortcut, ConvNorm, ResNet
from ppdet_retina.modeling.shape_spec import ShapeSpec

EPS = 1e-5  # paddle BatchNorm's default epsilon


def _tiny(**kw):
    base = dict(depth=18, width_mult=0.125, freeze_norm=False, freeze_at=-1)
    base.update(kw)
    return ResNet(**base)


def test_resnet50_out_shape_and_forward():
    paddle.seed(0)
    net = ResNet(depth=50, return_idx=[0, 1, 2, 3])
    assert net.out_shape == [ShapeSpec(256, 4), ShapeSpec(512, 8), ShapeSpec(1024, 16), ShapeSpec(2048, 32)]
    # 1 stem conv + 16 bottlenecks x 3 convs + 4 shortcuts = 53 conv+BN pairs, 5 tensors each
    assert len(net.state_dict()) == 53 * 5
    net.eval()
    outs = net({"image": paddle.randn([1, 3, 64, 64])})
    assert [list(o.shape) for o in outs] == [[1, 256, 16, 16], [1, 512, 8, 8], [1, 1024, 4, 4], [1, 2048, 2, 2]]


def test_return_idx_selects_levels():
    net = _tiny(return_idx=[1, 3])
    assert net.out_shape == [ShapeSpec(16, 8), ShapeSpec(64, 32)]
    outs = net(paddle.randn([2, 3, 64, 96]))
    assert [list(o.shape) for o in outs] == [[2, 16, 8, 12], [2, 64, 2, 3]]


def test_num_stages_limits_the_network():
    net = _tiny(num_stages=2, return_idx=[0, 1])
    assert not hasattr(net, "res4")
    assert [list(o.shape) for o in net(paddle.randn([1, 3, 32, 32]))] == [[1, 8, 8, 8], [1, 16, 4, 4]]


def test_width_mult_narrows_every_stage():
    net = ResNet(depth=18, width_mult=0.25)
    assert [s.channels for s in net.out_shape] == [16, 32, 64, 128]
    assert list(net.stem[0].conv.weight.shape) == [16, 3, 7, 7]


def test_variant_d_stem_and_avgpool_shortcut_match_numpy():
    paddle.seed(1)
    net = ResNet(depth=50, variant="d", width_mult=0.125, return_idx=[3])
    assert [list(layer.conv.weight.shape) for layer in net.stem] == [[4, 3, 3, 3], [4, 4, 3, 3], [8, 4, 3, 3]]
    assert isinstance(net.res3[0].shortcut, AvgPoolShortcut)
    assert type(net.res2[0].shortcut) is ConvNorm  # res2 does not downsample: plain 1x1
    net.eval()
    shortcut = net.res3[0].shortcut
    x = np.random.RandomState(0).randn(1, 32, 6, 6).astype("float32")
    got = shortcut(paddle.to_tensor(x)).numpy()
    pooled = x.reshape(1, 32, 3, 2, 3, 2).mean(axis=(3, 5))
    w = shortcut.conv.weight.numpy()[:, :, 0, 0]
    want = np.einsum("oc,bchw->bohw", w, pooled) / np.sqrt(1 + EPS)  # fresh BN: mean 0, var 1
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_variant_b_shortcut_is_strided_conv():
    net = _tiny(depth=50)
    net.eval()
    shortcut = net.res3[0].shortcut
    x = np.random.RandomState(2).randn(1, 32, 6, 6).astype("float32")
    got = shortcut(paddle.to_tensor(x)).numpy()
    want = np.einsum("oc,bchw->bohw", shortcut.conv.weight.numpy()[:, :, 0, 0], x[:, :, ::2, ::2])
    np.testing.assert_allclose(got, want / np.sqrt(1 + EPS), rtol=1e-4, atol=1e-5)


def test_frozen_norm_uses_running_stats_and_never_updates():
    layer = ConvNorm(2, 3, 1, relu=False, freeze_norm=True)
    mean, var = np.array([0.5, -1.0, 2.0], "float32"), np.array([4.0, 0.25, 1.0], "float32")
    gamma, beta = np.array([2.0, 1.0, -1.0], "float32"), np.array([0.0, 3.0, 1.0], "float32")
    layer.norm._mean.set_value(mean)
    layer.norm._variance.set_value(var)
    layer.norm.weight.set_value(gamma)
    layer.norm.bias.set_value(beta)
    layer.train()
    x = np.random.RandomState(3).randn(4, 2, 5, 5).astype("float32")
    got = layer(paddle.to_tensor(x)).numpy()
    conv = np.einsum("oc,bchw->bohw", layer.conv.weight.numpy()[:, :, 0, 0], x)
    r = (slice(None), None, None)
    want = (conv - mean[r]) / np.sqrt(var[r] + EPS) * gamma[r] + beta[r]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(layer.norm._mean.numpy(), mean)
    np.testing.assert_array_equal(layer.norm._variance.numpy(), var)
    assert layer.norm.weight.stop_gradient and layer.norm.bias.stop_gradient
    assert not layer.conv.weight.stop_gradient


def test_trainable_norm_updates_stats_in_training():
    paddle.seed(0)
    layer = ConvNorm(2, 3, 1, freeze_norm=False)
    layer.train()
    x = np.random.default_rng(0).normal(3.0, 1.0, size=(4, 2, 5, 5)).astype("float32")
    layer(paddle.to_tensor(x))
    # A 1x1 conv without bias: the batch mean per output channel is W @ (the input's channel means).
    # The running mean starts at 0 and moves with momentum 0.9: 0.1 x that batch mean.
    batch_mean = layer.conv.weight.numpy()[:, :, 0, 0] @ x.mean(axis=(0, 2, 3))
    np.testing.assert_allclose(layer.norm._mean.numpy(), 0.1 * batch_mean, rtol=1e-4, atol=1e-6)
    assert np.abs(batch_mean).min() > 0.05  # so the check above sees a real update
    assert not layer.norm.weight.stop_gradient


def test_freeze_norm_default_is_true_like_paddledetection():
    net = ResNet(depth=18, width_mult=0.125)
    norm_params = [p for n, p in net.named_parameters() if n.endswith((".norm.weight", ".norm.bias"))]
    assert norm_params and all(p.stop_gradient for p in norm_params)


def _frozen_prefixes(net):
    # paddle keeps BN running stats as parameters that never take gradients; they say nothing here
    return sorted({n.split(".")[0] for n, p in net.named_parameters()
                   if p.stop_gradient and not n.endswith(("_mean", "_variance"))})


def test_freeze_at():
    assert _frozen_prefixes(_tiny(freeze_at=-1)) == []
    assert _frozen_prefixes(_tiny(freeze_at=0)) == ["res2", "stem"]
    assert _frozen_prefixes(_tiny(freeze_at=2)) == ["res2", "res3", "res4", "stem"]
    assert _frozen_prefixes(_tiny(freeze_at=2, freeze_stem_only=True)) == ["stem"]


def test_frozen_stage_gets_no_gradient():
    net = _tiny(freeze_at=0)
    sum(o.mean() for o in net(paddle.randn([1, 3, 32, 32]))).backward()
    assert net.stem[0].conv.weight.grad is None
    assert net.res2[0].conv1.conv.weight.grad is None
    assert net.res3[0].conv1.conv.weight.grad is not None


def test_lr_mult_and_norm_decay_reach_parameters():
    net = _tiny(lr_mult_list=[0.1, 0.2, 0.3, 0.4], norm_decay=0.5)
    assert net.res4[1].conv2.conv.weight.optimize_attr["learning_rate"] == pytest.approx(0.3)
    assert net.res2[0].conv1.norm.weight.regularizer._coeff == pytest.approx(0.5)


def test_resnext_grouped_width():
    net = ResNet(depth=50, groups=32, base_width=4, width_mult=0.5, return_idx=[0])
    # width = int(ch_out * base_width / 64) * groups = int(32 * 4 / 64) * 32 = 64 for res2 (ch_out 64 * 0.5)
    assert list(net.res2[0].conv2.conv.weight.shape) == [64, 2, 3, 3]


def test_every_paddledetection_key_accepted_from_config():
    cfg = {"ResNet": {"depth": 34, "ch_in": 64, "variant": "d", "lr_mult_list": [1.0, 1.0, 1.0, 1.0],
                      "groups": 1, "base_width": 64, "norm_type": "sync_bn", "norm_decay": 0.0,
                      "freeze_norm": True, "freeze_at": 0, "return_idx": [1, 2, 3], "dcn_v2_stages": [-1],
                      "num_stages": 4, "std_senet": False, "freeze_stem_only": False, "width_mult": 0.125}}
    net = create("ResNet", cfg)
    assert [s.stride for s in net.out_shape] == [8, 16, 32]
    assert len(net.res4) == 6  # ResNet-34: 3, 4, 6, 3 blocks


@pytest.mark.parametrize("kw, word", [
    ({"dcn_v2_stages": [1, 2]}, "dcn_v2_stages"),
    ({"std_senet": True}, "std_senet"),
    ({"depth": 42}, "depth"),
    ({"variant": "e"}, "variant"),
    ({"norm_type": "gn"}, "norm_type"),
    ({"return_idx": [1, 4]}, "return_idx"),
    ({"lr_mult_list": [1.0]}, "lr_mult_list"),
])
def test_bad_config_names_the_key(kw, word):
    with pytest.raises(ConfigError, match=word):
        _tiny(**kw)
