"""The Faster R-CNN paper's choices in configs/faster_rcnn/faster_rcnn_vgg16_1x.yml, on hand-made cases:
anchors centred in their cell, cross-boundary anchors left out of RPN training, proposals under 16 px
of the original image dropped, and the RPN box loss (smooth L1, lambda, N_reg)."""

from __future__ import annotations

import math
import os

import numpy as np
import paddle
import pytest

from ppdet_retina.core.workspace import ConfigError, create, load_config
from ppdet_retina.modeling.anchors import AnchorGenerator
from ppdet_retina.modeling.heads.rpn_head import RPNHead
from ppdet_retina.modeling.losses import SmoothL1Loss
from ppdet_retina.modeling.proposal_generator import ProposalGenerator
from ppdet_retina.modeling.targets import RPNTargetAssign, cross_boundary

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VGG_CONFIG = os.path.join(REPO, "configs", "faster_rcnn", "faster_rcnn_vgg16_1x.yml")
LN2 = math.log(2.0)


def _t(values, dtype="float32"):
    return paddle.to_tensor(np.asarray(values, dtype=dtype))


@pytest.fixture(scope="module")
def vgg_rpn():
    cfg = load_config(VGG_CONFIG, ["VGG.channels=[4,4,8,8,8]", "TwoFCHead.out_channel=16"])
    return create(cfg["architecture"], cfg).rpn_head


def test_config_carries_the_paper_settings(vgg_rpn):
    assert vgg_rpn.anchor_generator.offset == 0.5
    assert vgg_rpn.rpn_target_assign.ignore_cross_boundary and vgg_rpn.rpn_target_assign.straddle_thresh == 0.0
    for gen in (vgg_rpn.train_proposal, vgg_rpn.test_proposal):
        assert gen.min_size == 16.0 and gen.min_size_in_original
    assert isinstance(vgg_rpn.loss_rpn_bbox, SmoothL1Loss) and vgg_rpn.loss_rpn_bbox.beta == 1.0
    assert vgg_rpn.reg_loss_weight == 10.0 and vgg_rpn.reg_normalizer == "locations"


def test_anchor_centres_are_in_the_middle_of_their_cell(vgg_rpn):
    (anchors,) = vgg_rpn.anchor_generator([(2, 3)])
    a = anchors.numpy().reshape(2, 3, 9, 4)  # (y, x, anchor)
    cx, cy = (a[..., 0] + a[..., 2]) / 2, (a[..., 1] + a[..., 3]) / 2
    np.testing.assert_allclose(cx, np.broadcast_to(np.array([8.0, 24.0, 40.0])[None, :, None], cx.shape))
    np.testing.assert_allclose(cy, np.broadcast_to(np.array([8.0, 24.0])[:, None, None], cy.shape))
    # Size 128, ratio 1 (index 1: size-major, ratios 0.5, 1, 2) at (y=1, x=2): centre (40, 24).
    np.testing.assert_allclose(a[1, 2, 1], [40 - 64, 24 - 64, 40 + 64, 24 + 64])
    # PaddleDetection's default offset 0 puts the centres on the cell corners instead.
    (corner,) = AnchorGenerator(anchor_sizes=[128], aspect_ratios=[1.0], strides=[16])([(1, 2)])
    np.testing.assert_allclose(corner.numpy(), [[-64, -64, 64, 64], [-48, -64, 80, 64]])


# Image 100 x 100; gt 0 inside, gt 1 at the left border.
GTS = [[[10, 10, 50, 50], [0, 60, 40, 100]]]
ANCHORS = [
    [10, 10, 50, 50],    # 0: IoU 1 with gt 0
    [-5, 10, 35, 50],    # 1: crosses the left border; IoU 1000/2200 = 0.45 with gt 0
    [-2, 60, 38, 100],   # 2: crosses the left border; IoU 1520/1680 = 0.90 with gt 1
    [0, 64, 32, 96],     # 3: inside; IoU 1024/1600 = 0.64 with gt 1
    [60, -10, 100, 20],  # 4: crosses the top; IoU 0
    [60, 60, 100, 100],  # 5: inside; IoU 0
    [0, 0, 100.5, 20],   # 6: 0.5 px past the right border; IoU 400/3210 = 0.12 with gt 0
]


def _assign(**kwargs):
    assign = RPNTargetAssign(use_random=False, **kwargs)
    labels, matched = assign(_t(ANCHORS), _t(GTS), paddle.ones([1, 2], dtype="bool"), None,
                             im_shape=_t([[100.0, 100.0]]))
    return labels.numpy()[0].tolist(), matched.numpy()[0].tolist()


def test_cross_boundary_anchors_are_ignored():
    # PaddleDetection's default: every anchor counts; anchor 3 is nobody's best, so ignored at 0.64.
    labels, _ = _assign()
    assert labels == [1, -1, 1, -1, 0, 0, 0]
    # The paper: anchors 1, 2, 4, 6 leave the loss; anchor 3 becomes gt 1's best (low-quality) match.
    labels, matched = _assign(ignore_cross_boundary=True)
    assert labels == [1, -1, -1, 1, -1, 0, -1]
    assert matched[3] == 1
    # A 1 px tolerance lets anchor 6 (0.5 px out) back in as a negative.
    labels, _ = _assign(ignore_cross_boundary=True, straddle_thresh=1.0)
    assert labels == [1, -1, -1, 1, -1, 0, 0]
    outside = cross_boundary(_t(ANCHORS), _t([[100.0, 100.0], [200.0, 200.0]]))
    assert outside.numpy().tolist() == [[False, True, True, False, True, False, True],
                                        [False, True, True, False, True, False, False]]
    with pytest.raises(ValueError, match="im_shape"):
        RPNTargetAssign(ignore_cross_boundary=True)(_t(ANCHORS), _t(GTS), paddle.ones([1, 2], dtype="bool"))
    with pytest.raises(ConfigError, match="straddle_thresh"):
        RPNTargetAssign(straddle_thresh=-1)


def test_small_proposals_are_dropped_in_original_pixels():
    boxes = [[0, 0, 40, 10], [50, 0, 80, 50], [0, 50, 40, 57], [50, 60, 90, 70]]
    scores = [_t([[4.0, 3.0, 2.0, 1.0]])]
    deltas = [paddle.zeros([1, 4, 4])]  # zero deltas: the proposals are the anchors themselves
    im_shape = _t([[100.0, 100.0]])
    # Resized by (sy, sx) = (0.5, 2): 16 original px are 32 px wide and 8 px high here.
    scale = _t([[0.5, 2.0]])

    def kept(**kwargs):
        gen = ProposalGenerator(pre_nms_top_n=10, post_nms_top_n=10, nms_thresh=0.7, **kwargs)
        rois, _, valid = gen(scores, deltas, [_t(boxes)], im_shape, scale)
        return rois.numpy()[0][valid.numpy()[0]].tolist()

    # Box 1 is 30 < 32 px wide, box 2 is 7 < 8 px high.
    assert kept(min_size=16.0, min_size_in_original=True) == [boxes[0], boxes[3]]
    # The same 16 px in resized pixels (PaddleDetection's reading) keeps only box 1.
    assert kept(min_size=16.0) == [boxes[1]]
    with pytest.raises(ValueError, match="scale_factor"):
        ProposalGenerator(min_size=16.0, min_size_in_original=True)(scores, deltas, [_t(boxes)], im_shape)


def _rpn_losses(**kwargs):
    """One image 100x100, gt [10,10,50,50]; one level of three 1-anchor locations, all logits 0."""
    head = RPNHead(anchor_generator=AnchorGenerator(anchor_sizes=[40], aspect_ratios=[1.0], strides=[16]),
                   rpn_target_assign=RPNTargetAssign(use_random=False,
                                                     ignore_cross_boundary=kwargs.pop("ignore_cross_boundary",
                                                                                      False)),
                   in_channel=4, **kwargs)
    anchors = [_t([[10, 10, 50, 50], [60, 60, 100, 100], [-10, 0, 30, 40]])]
    scores = [paddle.zeros([1, 3])]
    # Anchor 0 is positive with target deltas 0: predicted (0.5, 0, 0, 2).
    deltas = [_t([[[0.5, 0.0, 0.0, 2.0], [0.3, 0.3, 0.3, 0.3], [1.0, 1.0, 1.0, 1.0]]])]
    inputs = {"gt_bbox": _t([[[10, 10, 50, 50]]]), "im_shape": _t([[100.0, 100.0]])}
    losses = head.loss(scores, deltas, anchors, inputs)
    return float(losses["loss_rpn_cls"]), float(losses["loss_rpn_reg"])


def test_rpn_loss_weight_normaliser_and_smooth_l1():
    # PaddleDetection's form: L1 over the positive's deltas (0.5 + 2 = 2.5) / 256; every anchor is
    # sampled (anchor 2 is a negative at IoU 600/2600 = 0.23): 3 ln 2 / 256.
    cls, reg = _rpn_losses()
    assert cls == pytest.approx(3 * LN2 / 256, rel=1e-6)
    assert reg == pytest.approx(2.5 / 256, rel=1e-6)
    # Smooth L1 (beta 1): 0.5 * 0.5^2 + (2 - 0.5) = 1.625.
    _, reg = _rpn_losses(loss_rpn_bbox=SmoothL1Loss(beta=1.0))
    assert reg == pytest.approx(1.625 / 256, rel=1e-6)
    # lambda 10 over N_reg = 3 anchor locations x 1 image; the cls term does not move.
    cls, reg = _rpn_losses(loss_rpn_bbox=SmoothL1Loss(beta=1.0), reg_loss_weight=10.0, reg_normalizer="locations")
    assert cls == pytest.approx(3 * LN2 / 256, rel=1e-6)
    assert reg == pytest.approx(10 * 1.625 / 3, rel=1e-6)
    # The cross-boundary anchor 2 leaves the cls term.
    cls, _ = _rpn_losses(ignore_cross_boundary=True)
    assert cls == pytest.approx(2 * LN2 / 256, rel=1e-6)
    with pytest.raises(ConfigError, match="reg_normalizer"):
        RPNHead(in_channel=4, reg_normalizer="anchors")
