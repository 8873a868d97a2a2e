"""Region Proposal Network head (Faster R-CNN's first stage)."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from paddle import ParamAttr
from paddle.nn.initializer import Normal

from ppdet_retina.core.workspace import ConfigError, build_component, register
from ppdet_retina.modeling.proposal_generator import flatten_level_outputs
from ppdet_retina.modeling.shape_spec import ShapeSpec, in_channel_kwargs
from ppdet_retina.modeling.targets import box_targets, gt_masks

__all__ = ["RPNHead"]


def _conv(ch_in: int, ch_out: int, kernel: int) -> nn.Conv2D:
    # N(0, 0.01) weights and zero bias, the initialisation of the Faster R-CNN paper.
    return nn.Conv2D(ch_in, ch_out, kernel, padding=kernel // 2,
                     weight_attr=ParamAttr(initializer=Normal(mean=0.0, std=0.01)))


@register
class RPNHead(nn.Layer):
    """Objectness and box deltas for every anchor of every level, proposals, and the RPN loss.

    Computes, with weights shared by all levels: ``rpn_conv`` (3x3, in_channel ->
    in_channel) + ReLU, then ``objectness`` (1x1 -> A logits) and ``deltas``
    (1x1 -> 4A, (dx, dy, dw, dh) of anchor a at channels 4a..4a+3).

    Config keys:
        anchor_generator: AnchorGenerator (dict of its keys or a component).
        rpn_target_assign: RPNTargetAssign (training targets and sampling).
        train_proposal / test_proposal: ProposalGenerator used in train / eval mode.
        in_channel: input channels (from the neck's out_shape when built from a config).
        loss_rpn_bbox: None (L1 on the positive anchors' deltas, PaddleDetection's default) or a
            box loss called as ``loss(pred, target, weight=positive, normalizer=n)`` (e.g.
            ``SmoothL1Loss``, the paper's choice).
        reg_loss_weight: the paper's lambda, multiplying the box term (1.0).
        reg_normalizer: 'batch' (batch_size_per_im * B, PaddleDetection's) or 'locations' (the
            number of anchor locations, sum of h_l * w_l, times B: the paper's N_reg).

    forward(feats: list of [B, in_channel, h_l, w_l], inputs: batch dict) ->
    (rois [B, K, 4], rois_valid [B, K] bool, losses): losses is None in eval mode, else
    {'loss_rpn_cls': BCE over sampled anchors / (batch_size_per_im * B), 'loss_rpn_reg':
    reg_loss_weight * box loss over positive anchors' deltas / reg_normalizer}.
    Training reads inputs['gt_bbox'], 'im_shape' and the optional 'pad_gt_mask' / 'is_crowd';
    proposals read 'im_shape' and 'scale_factor'.
    """

    __inject__ = ["anchor_generator", "rpn_target_assign", "train_proposal", "test_proposal", "loss_rpn_bbox"]

    def __init__(self, anchor_generator: Any = "AnchorGenerator", rpn_target_assign: Any = "RPNTargetAssign",
                 train_proposal: Any = "ProposalGenerator", test_proposal: Any = "ProposalGenerator",
                 in_channel: int = 1024, loss_rpn_bbox: Any = None, reg_loss_weight: float = 1.0,
                 reg_normalizer: str = "batch"):
        super().__init__()
        if reg_normalizer not in _REG_NORMALIZERS:
            raise ConfigError(f"RPNHead.reg_normalizer '{reg_normalizer}' is not one of {list(_REG_NORMALIZERS)}")
        if float(reg_loss_weight) < 0:
            raise ConfigError(f"RPNHead.reg_loss_weight must be >= 0, got {reg_loss_weight}")
        loss_rpn_bbox = build_component(loss_rpn_bbox, None, "RPNHead.loss_rpn_bbox")
        if loss_rpn_bbox is not None and not callable(loss_rpn_bbox):
            raise ConfigError(f"RPNHead.loss_rpn_bbox must name a loss component (e.g. SmoothL1Loss) or be "
                              f"null, got {loss_rpn_bbox!r}")
        self.loss_rpn_bbox = loss_rpn_bbox
        self.reg_loss_weight = float(reg_loss_weight)
        self.reg_normalizer = reg_normalizer
        self.anchor_generator = build_component(anchor_generator, "AnchorGenerator", "RPNHead.anchor_generator")
        self.rpn_target_assign = build_component(rpn_target_assign, "RPNTargetAssign",
                                                 "RPNHead.rpn_target_assign")
        self.train_proposal = build_component(train_proposal, "ProposalGenerator", "RPNHead.train_proposal")
        self.test_proposal = build_component(test_proposal, "ProposalGenerator", "RPNHead.test_proposal")
        num_anchors = self.anchor_generator.num_anchors
        self.rpn_conv = _conv(in_channel, in_channel, 3)
        self.objectness = _conv(in_channel, num_anchors, 1)
        self.deltas = _conv(in_channel, 4 * num_anchors, 1)

    @classmethod
    def from_config(cls, cfg: dict, input_shape: Optional[Sequence[ShapeSpec]] = None, **_: Any) -> dict:
        return in_channel_kwargs(input_shape)

    def forward(self, feats: Sequence[paddle.Tensor],
                inputs: Dict[str, paddle.Tensor]) -> Tuple[paddle.Tensor, paddle.Tensor, Optional[dict]]:
        scores, deltas = self.predict(feats)
        anchors = self.anchor_generator(list(feats))
        proposal_gen = self.train_proposal if self.training else self.test_proposal
        rois, _, valid = proposal_gen(scores, deltas, anchors, inputs["im_shape"], inputs.get("scale_factor"))
        if not self.training:
            return rois, valid, None
        return rois, valid, self.loss(scores, deltas, anchors, inputs)

    def predict(self, feats: Sequence[paddle.Tensor]) -> Tuple[List[paddle.Tensor], List[paddle.Tensor]]:
        """Per level, logits [B, h*w*A] and deltas [B, h*w*A, 4]."""
        scores, deltas = [], []
        for feat in feats:
            hidden = F.relu(self.rpn_conv(feat))
            scores.append(self.objectness(hidden))
            deltas.append(self.deltas(hidden))
        return flatten_level_outputs(scores, deltas)

    def loss(self, scores: Sequence[paddle.Tensor], deltas: Sequence[paddle.Tensor],
             anchors: Sequence[paddle.Tensor], inputs: Dict[str, paddle.Tensor]) -> Dict[str, paddle.Tensor]:
        logits = paddle.concat(list(scores), axis=1)  # [B, N]
        pred_deltas = paddle.concat(list(deltas), axis=1)  # [B, N, 4]
        all_anchors = paddle.concat(list(anchors), axis=0)  # [N, 4]
        gt_bbox = inputs["gt_bbox"]
        gt_valid, crowd = gt_masks(inputs)
        labels, matched = self.rpn_target_assign(all_anchors, gt_bbox, gt_valid, crowd,
                                                 im_shape=inputs.get("im_shape"))
        batch = gt_bbox.shape[0]
        norm = self.rpn_target_assign.normalizer(batch)
        num_locations = sum(int(a.shape[0]) for a in anchors) // self.anchor_generator.num_anchors
        reg_norm = norm if self.reg_normalizer == "batch" else float(num_locations * batch)

        sampled = (labels >= 0).astype(logits.dtype)
        positive = labels == 1
        bce = F.binary_cross_entropy_with_logits(logits, (labels == 1).astype(logits.dtype), reduction="none")
        loss_cls = (bce * sampled).sum() / norm

        # Non-positive anchors get themselves as target (delta 0).
        target = box_targets(all_anchors, gt_bbox, matched, positive).detach()
        if self.loss_rpn_bbox is None:
            l1 = paddle.abs(pred_deltas - target).sum(axis=-1)
            loss_reg = (l1 * positive.astype(l1.dtype)).sum() / reg_norm
        else:
            loss_reg = self.loss_rpn_bbox(pred_deltas, target, weight=positive, normalizer=reg_norm)
        return {"loss_rpn_cls": loss_cls, "loss_rpn_reg": loss_reg * self.reg_loss_weight}


_REG_NORMALIZERS = ("batch", "locations")
