"""EMA of the weights (use_ema): the update rule worked by hand, checkpoints and resume."""

import math
import os

import numpy as np
import paddle
import pytest

from ppdet_retina.core.workspace import ConfigError, load_config
from ppdet_retina.training.ema import ModelEMA, build_ema
from ppdet_retina.training.trainer import Trainer

from conftest import write_tiny_config


class TwoParams(paddle.nn.Layer):
    """Two parameters: ``a`` (one value) and ``b`` (two values)."""

    def __init__(self, dtype="float32"):
        super().__init__()
        self.a = self.create_parameter([1], dtype=dtype)
        self.b = self.create_parameter([2], dtype=dtype)


def _set(model, a, b):
    model.a.set_value(np.array([a], model.a.dtype.name.lower()))
    model.b.set_value(np.array(b, model.b.dtype.name.lower()))


def _run(ema, model, steps):
    for a, b in steps:
        _set(model, a, b)  # the weights after an optimizer step
        ema.update()


def _averaged(ema):
    return {k: v.numpy() for k, v in ema.averaged_state().items()}


@pytest.mark.parametrize("dtype", ["float32", "float64"])  # float64: the Paddle-kernel path (as on GPU)
def test_threshold_decay_warms_up_and_corrects_the_zero_start(dtype):
    model = TwoParams(dtype)
    ema = ModelEMA(model, decay=0.9998)  # 'threshold': decay_s = min(0.9998, (1 + s) / (10 + s))
    assert [ema.decay_at(s) for s in (0, 1, 2)] == pytest.approx([1 / 10, 2 / 11, 3 / 12])
    _run(ema, model, [(1.0, [0.0, 10.0]), (2.0, [0.0, 20.0]), (4.0, [6.0, 40.0])])
    # a: acc = 0.9 * 1 = 0.9 -> 2/11 * 0.9 + 9/11 * 2 = 1.8 -> 0.25 * 1.8 + 0.75 * 4 = 3.45
    # b[1]: 9 -> 2/11 * 9 + 9/11 * 20 = 18 -> 0.25 * 18 + 0.75 * 40 = 34.5; b[0]: 0, 0, 0.75 * 6 = 4.5
    corr = 1 - 0.25 ** 3  # the last decay, to the power of the update count
    got = _averaged(ema)
    np.testing.assert_allclose(got["a"], [3.45 / corr], rtol=1e-6)
    np.testing.assert_allclose(got["b"], [4.5 / corr, 34.5 / corr], rtol=1e-6)
    assert ema.step == 3


def test_normal_and_exponential_decay():
    model = TwoParams()
    ema = ModelEMA(model, decay=0.5, decay_type="normal")
    _run(ema, model, [(1.0, [1.0, 1.0]), (2.0, [1.0, 1.0]), (4.0, [1.0, 1.0])])
    # acc: 0.5 -> 0.25 + 1 = 1.25 -> 0.625 + 2 = 2.625; corrected by 1 - 0.5 ** 3
    np.testing.assert_allclose(_averaged(ema)["a"], [2.625 / 0.875], rtol=1e-6)
    np.testing.assert_allclose(_averaged(ema)["b"], [1.0, 1.0], rtol=1e-6)

    ema = ModelEMA(model, decay=0.9, decay_type="exponential")
    d0, d1 = 0.9 * (1 - math.exp(-1 / 2000)), 0.9 * (1 - math.exp(-2 / 2000))
    _run(ema, model, [(1.0, [0.0, 0.0]), (3.0, [0.0, 0.0])])
    # no zero-start correction for 'exponential'
    np.testing.assert_allclose(_averaged(ema)["a"], [d1 * (1 - d0) * 1.0 + (1 - d1) * 3.0], rtol=1e-6)


def test_black_list_filter_no_grad_and_applied_weights():
    model = TwoParams()
    ema = ModelEMA(model, decay=0.5, decay_type="normal", black_list=["b"])
    assert ema.names == ["a"]
    _run(ema, model, [(2.0, [5.0, 5.0]), (4.0, [7.0, 7.0])])  # a: acc 1 -> 2.5, / 0.75
    with ema.applied() as trained:
        np.testing.assert_allclose(model.a.numpy(), [2.5 / 0.75], rtol=1e-6)
        np.testing.assert_allclose(model.b.numpy(), [7.0, 7.0])  # not averaged: the live value
        np.testing.assert_allclose(trained["a"].numpy(), [4.0])
    np.testing.assert_allclose(model.a.numpy(), [4.0])  # the trained weights are back

    net = paddle.nn.Sequential(paddle.nn.Conv2D(1, 2, 1), paddle.nn.BatchNorm2D(2))
    net[0].bias.stop_gradient = True
    net[1]._mean.stop_gradient = True
    names = ModelEMA(net, filter_no_grad=True).names
    assert "0.bias" not in names and {"0.weight", "1._mean", "1._variance", "1.weight"} <= set(names)


def test_cycle_epoch_restarts_and_resume_continues_exactly():
    model = TwoParams()
    ema = ModelEMA(model, decay=0.9998, cycle_epoch=2)
    _run(ema, model, [(1.0, [0.0, 0.0]), (2.0, [0.0, 0.0]), (4.0, [0.0, 0.0])])
    # A resumed EMA, rebuilt from the averaged weights and the update count, continues as the original.
    resumed = ModelEMA(model, decay=0.9998, cycle_epoch=2)
    resumed.load(ema.averaged_state(), ema.step, ema.epoch)
    _run(ema, model, [(8.0, [0.0, 0.0])])
    _run(resumed, model, [(8.0, [0.0, 0.0])])
    d3 = 4 / 13
    want = (d3 * 3.45 + (1 - d3) * 8.0) / (1 - d3 ** 4)
    np.testing.assert_allclose(_averaged(ema)["a"], [want], rtol=1e-6)
    np.testing.assert_allclose(_averaged(resumed)["a"], [want], rtol=1e-6)
    ema.snapshot_done()
    assert ema.step == 4 and ema.epoch == 1
    ema.snapshot_done()  # the second snapshot: the average starts again
    assert ema.step == 0 and ema.epoch == 0
    np.testing.assert_allclose(_averaged(ema)["a"], [8.0])  # no update yet: the model's own weights


def test_bad_ema_keys_are_config_errors():
    with pytest.raises(ConfigError, match="ema_decay_type 'linear'"):
        build_ema({"use_ema": True, "ema_decay_type": "linear"}, TwoParams())
    with pytest.raises(ConfigError, match="ema_decay must be in"):
        build_ema({"use_ema": True, "ema_decay": 1.5}, TwoParams())
    assert build_ema({"use_ema": False}, TwoParams()) is None


def _load(path):
    return {k: np.asarray(v) for k, v in paddle.load(path, return_numpy=True).items()}


def test_training_saves_the_average_and_resume_restores_it(tmp_path, tiny_coco):
    """Two epochs of one step each: .pdparams holds the hand-computed average of the two trained
    weights (.pdema); a run resumed after epoch 0 ends with the same average."""
    cfg_path = write_tiny_config(tmp_path, tiny_coco, epoch=2)
    overrides = ["use_ema=true", "ema_decay=0.9998"]
    paddle.seed(0)
    trainer = Trainer(load_config(cfg_path, overrides), mode="train")
    trainer.train()
    out = trainer.output_dir
    w1, w2 = _load(os.path.join(out, "0.pdema")), _load(os.path.join(out, "model_final.pdema"))
    averaged = _load(os.path.join(out, "model_final.pdparams"))
    d1 = 2 / 11  # threshold decay of update 1; update 0 (decay 0.1) leaves acc = 0.9 * w1
    name = "head.cls_logits.weight"
    want = (d1 * 0.9 * w1[name] + (1 - d1) * w2[name]) / (1 - d1 ** 2)
    np.testing.assert_allclose(averaged[name], want, rtol=1e-5, atol=1e-7)
    assert not np.allclose(averaged[name], w2[name])
    # After one update the average equals the trained weights (the correction undoes the zero start).
    np.testing.assert_allclose(_load(os.path.join(out, "0.pdparams"))[name], w1[name], rtol=1e-5, atol=1e-7)

    paddle.seed(7)  # another init: everything must come from the checkpoint
    resumed = Trainer(load_config(cfg_path, overrides), mode="train")
    resumed.resume_weights(os.path.join(out, "0"))
    assert resumed.ema.step == 1
    np.testing.assert_allclose(resumed.model.state_dict()[name].numpy(), w1[name])  # trained weights
    # -r may name any of the checkpoint's files: the .pdema next to it is found from the same prefix.
    by_record = Trainer(load_config(cfg_path, overrides), mode="train")
    by_record.resume_weights(os.path.join(out, "0.commit.json"))
    assert by_record.ema.step == 1
    np.testing.assert_allclose(by_record.model.state_dict()[name].numpy(), w1[name])
    resumed.train()
    np.testing.assert_allclose(_load(os.path.join(out, "model_final.pdparams"))[name], averaged[name],
                               rtol=1e-5, atol=1e-7)
