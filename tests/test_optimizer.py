"""LR schedules and the optimizer builder."""

import math
import os

import numpy as np
import paddle
import pytest

from ppdet_retina.core.workspace import ConfigError, create, load_config
from ppdet_retina.training.optimizer import (CosineDecay, LearningRate, LinearWarmup, OptimizerBuilder,
                                           PiecewiseDecay)

from conftest import REPO, ppdet_config


def _config(source: str, relative: str) -> str:
    """Our configs/<relative>, or PaddleDetection's own (the test skips when those are absent)."""
    return os.path.join(REPO, "configs", relative) if source == "ours" else ppdet_config(relative)


def lr_values(sched, n):
    out = []
    for _ in range(n):
        out.append(sched.get_lr())
        sched.step()
    return out


def test_piecewise_with_linear_warmup_values():
    lr = LearningRate(0.1, [PiecewiseDecay(gamma=0.1, milestones=[2, 3]), LinearWarmup(steps=4, start_factor=0.2)])
    values = lr_values(lr(steps_per_epoch=5), 20)
    expected_warm = [0.1 * (0.2 * (1 - i / 4) + i / 4) for i in range(4)]
    np.testing.assert_allclose(values[:4], expected_warm, rtol=1e-9)
    np.testing.assert_allclose(values[4:10], [0.1] * 6)
    np.testing.assert_allclose(values[10:15], [0.01] * 5)
    np.testing.assert_allclose(values[15:20], [0.001] * 5)


def test_piecewise_gamma_list_and_values():
    sched = LearningRate(1.0, [PiecewiseDecay(gamma=[0.5, 0.2], milestones=[1, 2], use_warmup=False),
                               LinearWarmup(steps=3)])(steps_per_epoch=2)
    # use_warmup=False on the decay disables the ramp entirely.
    assert lr_values(sched, 6) == pytest.approx([1.0, 1.0, 0.5, 0.5, 0.2, 0.2])
    sched = LearningRate(1.0, [PiecewiseDecay(values=[3.0, 2.0, 1.0], milestones=[1, 2])])(steps_per_epoch=1)
    assert lr_values(sched, 4) == pytest.approx([3.0, 2.0, 1.0, 1.0])


def test_warmup_in_epochs():
    sched = LearningRate(1.0, [PiecewiseDecay(milestones=[10, 11]), LinearWarmup(epochs=1, start_factor=0.0)])(4)
    assert lr_values(sched, 5) == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    steps_win = LinearWarmup(steps=2, epochs=1, epochs_first=False, start_factor=0.0)
    assert lr_values(LearningRate(1.0, [steps_win])(4), 3) == pytest.approx([0.0, 0.5, 1.0])


def test_cosine_after_warmup():
    base, spe, warm = 0.2, 3, 2
    sched = LearningRate(base, [CosineDecay(max_epochs=4, min_lr_ratio=0.1),
                                LinearWarmup(steps=warm, start_factor=0.5)])(spe)
    values = lr_values(sched, 12)
    assert values[0] == pytest.approx(base * 0.5)
    assert values[1] == pytest.approx(base * 0.75)
    span = 4 * spe - warm
    for it in range(warm, 12):
        expect = 0.02 + (base - 0.02) * 0.5 * (1 + math.cos(math.pi * (it - warm) / span))
        assert values[it] == pytest.approx(expect)
    assert values[2] == pytest.approx(base)


def test_cosine_without_warmup_and_plateau():
    sched = LearningRate(1.0, [CosineDecay(max_epochs=3, use_warmup=False, last_plateau_epochs=1)])(2)
    values = lr_values(sched, 6)
    half_cos = [0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]  # cosine over 2 epochs x 2 steps
    assert values[:4] == pytest.approx(half_cos)
    assert values[4:] == pytest.approx([0.0, 0.0])


def test_scheduler_state_restores_value():
    def make():
        return LearningRate(0.1, [PiecewiseDecay(gamma=0.1, milestones=[1]), LinearWarmup(steps=3)])(2)

    a = make()
    for _ in range(3):
        a.step()
    b = make()
    b.set_state_dict(a.state_dict())
    assert b.last_epoch == 3 and b() == pytest.approx(a()) == pytest.approx(0.01)
    a.step(), b.step()
    assert b() == pytest.approx(a())


@pytest.mark.parametrize("source", ["ours", "ppdet"])
def test_optimizer_1x_config(source):
    cfg = load_config(_config(source, "retinanet/_base_/optimizer_1x.yml"))
    lr = create("LearningRate", cfg)
    assert isinstance(lr.decay, PiecewiseDecay) and lr.decay.milestones == [8, 11]
    assert lr.warmup.steps == 500 and lr.warmup.start_factor == 0.001
    f = lr.lr_function(steps_per_epoch=100)
    assert f(0) == pytest.approx(0.01 * 0.001)
    assert f(500) == pytest.approx(0.01)
    assert f(800) == pytest.approx(0.001)
    assert f(1100) == pytest.approx(0.0001)
    builder = create("OptimizerBuilder", cfg)
    model = paddle.nn.Linear(3, 2)
    opt = builder(lr(100), model)
    assert isinstance(opt, paddle.optimizer.Momentum)
    assert opt.get_lr() == pytest.approx(1e-5)


@pytest.mark.parametrize("source,name,milestones,warmup", [
    ("ppdet", "retinanet/_base_/optimizer_2x.yml", [16, 22], (500, 0.001)),
    ("ppdet", "faster_rcnn/_base_/optimizer_1x.yml", [8, 11], (1000, 0.1)),
    ("ours", "faster_rcnn/_base_/optimizer_1x.yml", [8, 11], (1000, 0.1)),
])
def test_other_optimizer_configs(source, name, milestones, warmup):
    lr = create("LearningRate", load_config(_config(source, name)))
    assert lr.decay.milestones == milestones
    assert (lr.warmup.steps, lr.warmup.start_factor) == warmup
    assert lr.lr_function(100)(milestones[1] * 100) == pytest.approx(1e-4)


def _one_step(opt_builder, lr=0.5):
    paddle.seed(0)
    model = paddle.nn.Linear(2, 1, bias_attr=False)
    model.weight.set_value(paddle.to_tensor([[1.0], [-2.0]]))
    opt = opt_builder(lr, model)
    loss = (model(paddle.to_tensor([[1.0, 1.0]])) * 10).sum()
    loss.backward()
    opt.step()
    return model.weight.numpy().ravel()


def test_optimizer_types_and_regularizer():
    # SGD with L2: w <- w - lr * (grad + factor * w); grad = 10 for both weights.
    w = _one_step(OptimizerBuilder(regularizer={"type": "L2", "factor": 0.1}, optimizer={"type": "SGD"}))
    np.testing.assert_allclose(w, [1 - 0.5 * (10 + 0.1), -2 - 0.5 * (10 - 0.2)], rtol=1e-6)
    # Clip by value bounds the gradient at 1.
    w = _one_step(OptimizerBuilder(clip_grad_by_value=1.0, regularizer=None, optimizer={"type": "SGD"}))
    np.testing.assert_allclose(w, [0.5, -2.5], rtol=1e-6)
    # Global-norm clip: grad (10, 10) scaled to norm 1.
    momentum = {"type": "Momentum", "momentum": 0.9}
    w = _one_step(OptimizerBuilder(clip_grad_by_norm=1.0, regularizer=None, optimizer=momentum))
    np.testing.assert_allclose(w, [1 - 0.5 / math.sqrt(2), -2 - 0.5 / math.sqrt(2)], rtol=1e-5)
    # AdamW's weight_decay is decoupled: each step first shrinks w by lr * decay, then takes Adam's step
    # (about lr * sign(grad) here, so an L2 term added to the gradient would leave no trace). The
    # builder's regularizer does not apply to AdamW.
    adamw = OptimizerBuilder(regularizer={"type": "L2", "factor": 0.1},
                             optimizer={"type": "AdamW", "weight_decay": 0.05})
    model = paddle.nn.Linear(2, 1, bias_attr=False)
    model.weight.set_value(paddle.to_tensor([[1.0], [-2.0]]))
    opt = adamw(0.5, model)
    assert isinstance(opt, paddle.optimizer.AdamW)
    w, m, v, grad = np.array([1.0, -2.0]), np.zeros(2), np.zeros(2), np.array([10.0, 10.0])
    for t in (1, 2):
        (model(paddle.to_tensor([[1.0, 1.0]])) * 10).sum().backward()
        opt.step()
        opt.clear_grad()
        w = w * (1 - 0.5 * 0.05)
        m, v = 0.9 * m + 0.1 * grad, 0.999 * v + 0.001 * grad ** 2
        w = w - 0.5 * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
        # atol: Paddle keeps beta2 ** t in float32, and 1 - 0.999 ** 2 loses digits to cancellation.
        np.testing.assert_allclose(model.weight.numpy().ravel(), w, atol=1e-5)
    np.testing.assert_allclose(w, [1 * 0.975 ** 2 - 0.5 * 0.975 - 0.5, -2 * 0.975 ** 2 - 0.5 * 0.975 - 0.5])


def test_bad_optimizer_config_errors():
    with pytest.raises(ConfigError, match="Momentum"):
        OptimizerBuilder(optimizer={"type": "Lion"})
    with pytest.raises(ConfigError, match="regularizer"):
        OptimizerBuilder(regularizer={"type": "L3", "factor": 1})(0.1, paddle.nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="milestones"):
        PiecewiseDecay(gamma=[0.1], milestones=[8, 11])
    with pytest.raises(ValueError, match="steps_per_epoch"):
        LearningRate(0.1)(0)


def test_clip_and_per_parameter_attrs_follow_paddledetection():
    """Global-norm clip over the raw gradients, then Momentum with the optimizer's L2 for parameters
    without their own regularizer; a ParamAttr's L2Decay(0) and learning_rate=2 win for the bias
    (PaddleDetection's RetinaFeat bias LR, its norm_decay=0 on norm parameters)."""
    from paddle.regularizer import L2Decay

    model = paddle.nn.Linear(2, 1, bias_attr=paddle.ParamAttr(learning_rate=2.0, regularizer=L2Decay(0.0)))
    model.weight.set_value(paddle.to_tensor([[1.0], [-2.0]]))
    model.bias.set_value(paddle.to_tensor([0.5]))
    builder = OptimizerBuilder(clip_grad_by_norm=5.0, regularizer="None", optimizer={"type": "Momentum",
                                                                                    "momentum": 0.9})
    assert builder.regularizer is None
    builder = OptimizerBuilder(clip_grad_by_norm=5.0, regularizer={"type": "L2", "factor": 0.1},
                               optimizer={"type": "Momentum", "momentum": 0.9})
    opt = builder(0.5, model)
    x = paddle.to_tensor([[3.0, 4.0]])
    # Gradients of 10 * (3 w0 + 4 w1 + b): (30, 40) and 10; global norm sqrt(2600); clipped to 5.
    f = 5.0 / math.sqrt(2600.0)
    w, b = np.array([1.0, -2.0]), 0.5
    v_w, v_b = np.zeros(2), 0.0
    for _ in range(2):
        (model(x) * 10).sum().backward()
        opt.step()
        opt.clear_grad()
        v_w = 0.9 * v_w + (np.array([30.0, 40.0]) * f + 0.1 * w)  # decay added after the clip
        v_b = 0.9 * v_b + 10.0 * f  # own L2Decay(0): no decay
        w = w - 0.5 * v_w
        b = b - 2 * 0.5 * v_b  # learning_rate 2 doubles the step
        np.testing.assert_allclose(model.weight.numpy().ravel(), w, rtol=1e-5)
        np.testing.assert_allclose(model.bias.numpy(), [b], rtol=1e-5)
    # Clip by value acts per element: (30, 40, 10) bounded at 15 -> (15, 15, 10).
    model = paddle.nn.Linear(2, 1)
    model.weight.set_value(paddle.to_tensor([[1.0], [-2.0]]))
    model.bias.set_value(paddle.to_tensor([0.5]))
    opt = OptimizerBuilder(clip_grad_by_value=15.0, regularizer=None, optimizer={"type": "SGD"})(0.1, model)
    (model(x) * 10).sum().backward()
    opt.step()
    np.testing.assert_allclose(model.weight.numpy().ravel(), [1 - 1.5, -2 - 1.5], rtol=1e-6)
    np.testing.assert_allclose(model.bias.numpy(), [0.5 - 1.0], rtol=1e-6)
