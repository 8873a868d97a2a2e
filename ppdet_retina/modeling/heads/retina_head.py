"""RetinaNet's head: the two conv towers, the output convs, prior init, targets and losses.

Everything a dense detector shares (the per-level layout and flattening, assign -> loss,
top-k selection, decoding, NMS, export candidates) lives in
:class:`ppdet_retina.modeling.dense_head.DenseHead`; the output layout the pretrained
weights depend on is described there.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import paddle
import paddle.nn as nn
from paddle import ParamAttr
from paddle.nn.initializer import Constant, Normal

from ppdet_retina.core.workspace import ConfigError, build_component, register
from ppdet_retina.modeling.dense_head import Assignment, DenseHead, HeadOutputs, flatten_level
from ppdet_retina.modeling.layers import NORM_TYPES, ConvNorm
from ppdet_retina.modeling.targets import box_targets, matched_on_positives

__all__ = ["RetinaFeat", "RetinaHead"]


def _normal_conv(ch_in: int, ch_out: int, bias: float = 0.0) -> nn.Conv2D:
    """3x3 same-size conv initialised N(0, 0.01) with a constant bias, as in the RetinaNet paper."""
    return nn.Conv2D(ch_in, ch_out, kernel_size=3, stride=1, padding=1,
                     weight_attr=ParamAttr(initializer=Normal(mean=0.0, std=0.01)),
                     bias_attr=ParamAttr(initializer=Constant(bias)))


def _tower_conv(ch_in: int, ch_out: int, norm_type: Optional[str]) -> ConvNorm:
    """3x3 conv (N(0, 0.01) weights, zero bias) [+ norm] + ReLU.

    As PaddleDetection's RetinaFeat (FCOSFeat) has them: the conv bias learns at twice the base LR
    (with the optimizer's weight decay), and a norm's scale and shift get no weight decay.
    """
    return ConvNorm(ch_in, ch_out, 3, norm_type=norm_type,
                    weight_attr=ParamAttr(initializer=Normal(mean=0.0, std=0.01)),
                    bias_attr=ParamAttr(initializer=Constant(0.0), learning_rate=2.0),
                    norm_decay=0.0)


@register
class RetinaFeat(nn.Layer):
    """The classification and box-regression towers shared by every FPN level.

    Each tower is ``num_convs`` x (3x3 conv [+ norm] + ReLU), the first conv
    taking ``feat_in`` channels, the others ``feat_out``. Parameters:
    ``cls_tower.{i}.conv.{weight,bias}``, ``box_tower.{i}.conv.*`` and, with a
    norm, ``.norm.*``.

    Config keys: ``feat_in`` (256), ``feat_out`` (256), ``num_convs`` (4),
    ``norm_type`` (null; 'gn' = GroupNorm(32), 'bn' = BatchNorm, 'sync_bn' = BatchNorm synchronised
    across GPU processes),
    ``use_dcn`` (false; deformable convs are not supported).

    forward(feats: list of [B, feat_in, h_l, w_l]) ->
    (cls_feats, box_feats): two lists of [B, feat_out, h_l, w_l].
    """

    def __init__(self, feat_in: int = 256, feat_out: int = 256, num_convs: int = 4,
                 norm_type: Optional[str] = None, use_dcn: bool = False):
        super().__init__()
        if use_dcn:
            raise ConfigError("RetinaFeat.use_dcn: deformable conv is not supported; set use_dcn: false")
        if norm_type not in NORM_TYPES:
            raise ConfigError(f"RetinaFeat.norm_type: '{norm_type}' is not one of {list(NORM_TYPES)}")
        if num_convs < 0:
            raise ConfigError(f"RetinaFeat.num_convs must be >= 0, got {num_convs}")
        if norm_type == "gn" and feat_out % 32 != 0:
            raise ConfigError(f"RetinaFeat.feat_out={feat_out}: GroupNorm uses 32 groups, so feat_out must be "
                              f"a multiple of 32 (or use norm_type: null)")
        if num_convs == 0 and feat_in != feat_out:
            raise ConfigError(f"RetinaFeat: with num_convs 0 the towers are identities, so feat_out "
                              f"({feat_out}) must equal feat_in ({feat_in})")
        self.feat_in = feat_in
        self.feat_out = feat_out
        self.num_convs = num_convs
        self.norm_type = norm_type
        self.cls_tower = self._tower(feat_in, feat_out, num_convs, norm_type)
        self.box_tower = self._tower(feat_in, feat_out, num_convs, norm_type)

    @staticmethod
    def _tower(feat_in: int, feat_out: int, num_convs: int, norm_type: Optional[str]) -> nn.LayerList:
        return nn.LayerList([_tower_conv(feat_in if i == 0 else feat_out, feat_out, norm_type)
                             for i in range(num_convs)])

    def forward(self, feats: Sequence[paddle.Tensor]) -> Tuple[List[paddle.Tensor], List[paddle.Tensor]]:
        cls_feats, box_feats = [], []
        for feat in feats:
            cls_feat, box_feat = feat, feat
            for layer in self.cls_tower:
                cls_feat = layer(cls_feat)
            for layer in self.box_tower:
                box_feat = layer(box_feat)
            cls_feats.append(cls_feat)
            box_feats.append(box_feat)
        return cls_feats, box_feats


@register
class RetinaHead(DenseHead):
    """RetinaNet head (Lin et al. 2017): per-anchor class logits and box deltas, focal loss.

    Config keys: ``num_classes`` (80, shared), ``conv_feat`` (RetinaFeat),
    ``anchor_generator`` (RetinaAnchorGenerator), ``bbox_assigner``
    (MaxIoUAssigner), ``loss_class`` (FocalLoss), ``loss_bbox``
    (SmoothL1Loss), ``nms`` (MultiClassNMS) -- all injected components --
    ``prior_prob`` (0.01: the initial foreground probability, sets the
    classifier bias to -log((1-p)/p)), ``nms_pre`` (1000: anchors kept per
    level and image before NMS), ``weights`` ([1,1,1,1]: box-coder weights).

    Parameters: ``conv_feat.*``, ``cls_logits`` (3x3, A*C outputs),
    ``bbox_deltas`` (3x3, A*4 outputs).

    forward(feats: list of [B, feat_in, h_l, w_l]) -> (cls_logits list of
    [B, A*C, h_l, w_l], deltas list of [B, A*4, h_l, w_l]).
    get_loss(head_outs, inputs) -> {'loss_cls', 'loss_reg'} scalars.
    post_process(head_outs, im_shape [B,2], scale_factor [B,2]) ->
    (bbox [K, 6] = class, score, x1, y1, x2, y2 in original pixels, bbox_num [B]);
    decode_candidates(...) -> (boxes [B, M, 4], scores [B, C, M]): both from DenseHead.
    """

    __shared__ = ["num_classes"]
    __inject__ = ["conv_feat", "anchor_generator", "bbox_assigner", "loss_class", "loss_bbox", "nms"]

    def __init__(self, num_classes: int = 80, conv_feat: Any = "RetinaFeat",
                 anchor_generator: Any = "RetinaAnchorGenerator", bbox_assigner: Any = "MaxIoUAssigner",
                 loss_class: Any = "FocalLoss", loss_bbox: Any = "SmoothL1Loss", nms: Any = "MultiClassNMS",
                 prior_prob: float = 0.01, nms_pre: int = 1000,
                 weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0)):
        if not 0.0 < prior_prob < 1.0:
            raise ConfigError(f"RetinaHead.prior_prob must be in (0, 1), got {prior_prob}")
        conv_feat = build_component(conv_feat, "RetinaFeat", "RetinaHead.conv_feat")
        anchor_generator = build_component(anchor_generator, "RetinaAnchorGenerator", "RetinaHead.anchor_generator")
        bbox_assigner = build_component(bbox_assigner, "MaxIoUAssigner", "RetinaHead.bbox_assigner")
        loss_class = build_component(loss_class, "FocalLoss", "RetinaHead.loss_class")
        loss_bbox = build_component(loss_bbox, "SmoothL1Loss", "RetinaHead.loss_bbox")
        nms = build_component(nms, "MultiClassNMS", "RetinaHead.nms")
        super().__init__(num_classes, anchor_generator, bbox_assigner, nms, nms_pre, weights)
        self.conv_feat = conv_feat
        self.loss_class = loss_class
        self.loss_bbox = loss_bbox
        self.prior_prob = float(prior_prob)

        feat_out = self.conv_feat.feat_out
        # Every anchor starts as background with probability 1 - prior_prob, so
        # the ~100k easy negatives do not swamp the first steps of training.
        cls_bias = -math.log((1.0 - self.prior_prob) / self.prior_prob)
        self.cls_logits = _normal_conv(feat_out, self.num_anchors * self.num_classes, bias=cls_bias)
        self.bbox_deltas = _normal_conv(feat_out, self.num_anchors * 4)

    @classmethod
    def from_config(cls, cfg: dict, input_shape: Optional[Sequence] = None) -> dict:
        """Check the neck's ``input_shape`` (list of ShapeSpec) against ``conv_feat`` and the anchors."""
        if not input_shape:
            return {}
        channels = {s.channels for s in input_shape}
        if len(channels) != 1:
            raise ConfigError(f"RetinaHead shares its towers across levels, so every input level needs the "
                              f"same channels; the neck gives {[s.channels for s in input_shape]}")
        conv_feat = cfg.get("conv_feat")
        feat_in = getattr(conv_feat, "feat_in", None)
        if feat_in is not None and feat_in != next(iter(channels)):
            raise ConfigError(f"RetinaHead.conv_feat.feat_in is {feat_in} but the neck outputs "
                              f"{next(iter(channels))} channels; set feat_in: {next(iter(channels))}")
        strides = getattr(cfg.get("anchor_generator"), "strides", None)
        if strides is not None and len(strides) != len(input_shape):
            raise ConfigError(f"RetinaHead.anchor_generator has {len(strides)} strides {list(strides)} but the "
                              f"neck gives {len(input_shape)} levels (strides {[s.stride for s in input_shape]})")
        return {}

    # ------------------------------------------------------------------ forward

    def forward(self, feats: Sequence[paddle.Tensor]) -> HeadOutputs:
        cls_feats, box_feats = self.conv_feat(feats)
        cls_logits = [self.cls_logits(f) for f in cls_feats]
        deltas = [self.bbox_deltas(f) for f in box_feats]
        return cls_logits, deltas

    # ------------------------------------------------------------------ targets and losses

    def losses(self, head_outs: HeadOutputs, assignment: Assignment) -> Dict[str, paddle.Tensor]:
        """Focal loss over all non-ignored anchors and box loss over positives, both / max(1, #positives).

        Every parameter stays in the graph even for a batch without any gt.
        """
        cls_logits_list, deltas_list = head_outs
        anchors, gt_bbox, gt_class, matched, labels = assignment
        deltas = paddle.concat([flatten_level(x, 4) for x in deltas_list], axis=1)  # [B, N, 4]
        pos = labels == 1
        pos_f = pos.astype(deltas.dtype)
        num_pos = paddle.clip(pos_f.sum(), min=1.0)

        cls_target = self._class_targets(gt_class, matched, pos)
        not_ignored = (labels >= 0).astype(deltas.dtype)
        loss_cls = self._class_loss(cls_logits_list, cls_target, not_ignored, num_pos)

        box_target = box_targets(anchors, gt_bbox, matched, pos, self.weights)  # [B, N, 4], 0 off positives
        loss_reg = self.loss_bbox(deltas.reshape([-1, 4]), box_target.reshape([-1, 4]),
                                  weight=pos_f.reshape([-1]), normalizer=num_pos)
        return {"loss_cls": loss_cls, "loss_reg": loss_reg}

    def _class_loss(self, cls_logits_list: Sequence[paddle.Tensor], cls_target: paddle.Tensor,
                    weight: paddle.Tensor, normalizer: paddle.Tensor) -> paddle.Tensor:
        """Focal loss level by level on the logits' own [B, A, C, h*w] layout.

        Flattening the logits to [B, N, C] would copy the largest tensor of the
        step twice (transpose, concat); rearranging the [B, N] targets to
        [B, A, h*w] instead costs next to nothing, and the sum is the same.
        """
        num_a, num_c = self.num_anchors, self.num_classes
        total, start = None, 0
        for logits in cls_logits_list:
            hw = int(logits.shape[2]) * int(logits.shape[3])
            stop = start + hw * num_a
            target = cls_target[:, start:stop].reshape([0, hw, num_a]).transpose([0, 2, 1])
            level_weight = weight[:, start:stop].reshape([0, hw, num_a]).transpose([0, 2, 1])
            loss = self.loss_class(logits.reshape([0, num_a, num_c, hw]), target, weight=level_weight,
                                   normalizer=normalizer, class_axis=2)
            total = loss if total is None else total + loss
            start = stop
        return total

    def _class_targets(self, gt_class: paddle.Tensor, matched: paddle.Tensor,
                       pos: paddle.Tensor) -> paddle.Tensor:
        """[B, N] int64: the matched gt's class on positives, ``num_classes`` (background) elsewhere.

        Class ids rather than a one-hot [B, N, C] tensor: the focal loss then
        needs only one pass over the logits (see FocalLoss).
        """
        return matched_on_positives(gt_class, matched, pos, self.num_classes)
