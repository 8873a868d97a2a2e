"""Faster R-CNN's second stage: the RoI feature head (TwoFCHead), class scores and class-specific deltas
(BBoxHead), their training targets and losses. Decoding and post-processing: ``rcnn_postprocess.py``.

Output layout (PaddleDetection's pretrained weights depend on it): ``cls_score``
gives num_classes + 1 logits with background LAST (index num_classes);
``bbox_pred`` gives 4 * num_classes deltas, class c at columns 4c..4c+3
(dx, dy, dw, dh, divided by ``bbox_weight`` when decoding). Linear weights are
stored [in, out] (paddle.nn.Linear).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from paddle import ParamAttr
from paddle.nn.initializer import Normal, XavierUniform

from ppdet_retina.core.workspace import ConfigError, build_component, create, register
from ppdet_retina.modeling.box_ops import bbox2delta, delta2bbox
from ppdet_retina.modeling.losses import GIoULoss
from ppdet_retina.modeling.proposal_generator import flatten_rois
from ppdet_retina.modeling.shape_spec import ShapeSpec, in_channel_kwargs
from ppdet_retina.modeling.targets import RoITargets, gt_masks

__all__ = ["TwoFCHead", "BBoxHead", "select_class_deltas"]

# FPN's RoI feature head pools 7x7 (RoIAlign's own default, 14, is the C4 head's).
_DEFAULT_ROI_EXTRACTOR = {"name": "RoIAlign", "resolution": 7}


@register
class TwoFCHead(nn.Layer):
    """Two fully connected layers on the flattened pooled RoI feature (FPN: 1024 wide; VGG16: 4096).

    Computes relu(fc7(dropout(relu(fc6(flatten(x)))))) with dropout after fc7 too when
    ``dropout`` > 0 (VGG16's classifier uses 0.5).

    Config keys: in_channel (channels of the pooled map; from input_shape), out_channel
    (1024), resolution (7, the pooled map's side), dropout (0.0).

    forward(rois_feat [R, in_channel, resolution, resolution]) -> [R, out_channel].
    Parameters: ``fc6.{weight [in_channel*resolution^2, out_channel], bias}``, ``fc7.*``.
    """

    def __init__(self, in_channel: int = 256, out_channel: int = 1024, resolution: int = 7,
                 dropout: float = 0.0):
        super().__init__()
        fan_in = in_channel * resolution * resolution
        self.out_channel = int(out_channel)
        # Xavier with fan_out set to fan_in: the flattened input is much wider
        # than the output, so this keeps fc6's initial outputs near unit scale.
        self.fc6 = nn.Linear(fan_in, out_channel,
                             weight_attr=ParamAttr(initializer=XavierUniform(fan_out=fan_in)))
        self.fc7 = nn.Linear(out_channel, out_channel, weight_attr=ParamAttr(initializer=XavierUniform()))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None

    @classmethod
    def from_config(cls, cfg: dict, input_shape: Optional[Sequence[ShapeSpec]] = None, **_: Any) -> dict:
        return in_channel_kwargs(input_shape)

    @property
    def out_shape(self) -> list:
        return [ShapeSpec(channels=self.out_channel, stride=1)]

    def forward(self, rois_feat: paddle.Tensor) -> paddle.Tensor:
        x = F.relu(self.fc6(paddle.flatten(rois_feat, start_axis=1)))
        if self.dropout is not None:
            x = self.dropout(x)
        x = F.relu(self.fc7(x))
        if self.dropout is not None:
            x = self.dropout(x)
        return x


def _build_roi_extractor(value: Any, input_shape: Optional[Sequence[ShapeSpec]] = None) -> Any:
    """The RoI extractor from a dict of its keys (``name:`` RoIAlign by default, or RoIPool), a name or
    an object; with ``input_shape`` its spatial_scale comes from the strides unless the dict sets one."""
    value = _DEFAULT_ROI_EXTRACTOR if value is None else value
    if input_shape is None or (isinstance(value, dict) and "spatial_scale" in value):
        return build_component(value, "RoIAlign", "BBoxHead.roi_extractor")
    return build_component(value, "RoIAlign", "BBoxHead.roi_extractor", input_shape=input_shape)


def select_class_deltas(deltas: paddle.Tensor, labels: paddle.Tensor, num_classes: int) -> paddle.Tensor:
    """Rows of ``deltas`` [R, 4C] at class ``labels`` [R] -> [R, 4]; background rows take class 0's."""
    per_class = deltas.reshape([deltas.shape[0], num_classes, 4])
    index = labels.clip(max=num_classes - 1).reshape([-1, 1, 1]).expand([-1, 1, 4])
    return paddle.take_along_axis(per_class, index, axis=1).squeeze(1)


@register
class BBoxHead(nn.Layer):
    """RoI classification (num_classes + 1, background last) and class-specific box regression.

    Config keys:
        head: the RoI feature head (TwoFCHead), built with input_shape.
        in_channel: the head's output width (from the head when built from a config).
        roi_extractor: dict of RoIAlign keys (``name: RoIPool`` for max pooling; default
            RoIAlign with resolution 7).
        bbox_assigner: BBoxAssigner (training RoI sampling).
        with_pool: average-pool the head's output map to 1x1 (for conv heads).
        num_classes (shared), bbox_weight ([10, 10, 5, 5], delta encoding weights).
        bbox_loss: None = L1 on deltas; SmoothL1Loss on deltas; GIoULoss on decoded boxes.
        loss_normalize_pos: accepted and ignored (``__ignored__``).

    forward(feats, rois [B, K, 4], rois_valid [B, K], inputs) ->
    training: {'loss_bbox_cls': softmax CE averaged over sampled RoIs, 'loss_bbox_reg':
    L1 over foreground RoIs' deltas of their gt class, divided by the sampled RoIs};
    eval: ((probs [R, C+1], deltas [R, 4C]), (rois [R, 4], rois_num [B])).
    """

    __shared__ = ["num_classes"]
    __inject__ = ["bbox_assigner", "bbox_loss"]
    __ignored__ = {"loss_normalize_pos": "both of PaddleDetection's forms divide by the sampled RoIs here"}

    def __init__(self, head: Any, in_channel: int = 1024, roi_extractor: Any = None,
                 bbox_assigner: Any = "BBoxAssigner", with_pool: bool = False, num_classes: int = 80,
                 bbox_weight: Sequence[float] = (10.0, 10.0, 5.0, 5.0), bbox_loss: Any = None):
        super().__init__()
        if int(num_classes) <= 0:
            raise ConfigError(f"BBoxHead.num_classes must be > 0, got {num_classes}")
        self.head = head
        self.roi_extractor = _build_roi_extractor(roi_extractor)
        self.bbox_assigner = build_component(bbox_assigner, "BBoxAssigner", "BBoxHead.bbox_assigner",
                                             shared={"num_classes": num_classes})
        self.with_pool = bool(with_pool)
        self.num_classes = int(num_classes)
        self.bbox_weight = [float(w) for w in bbox_weight]
        self.bbox_loss = build_component(bbox_loss, None, "BBoxHead.bbox_loss")
        self.cls_score = nn.Linear(in_channel, self.num_classes + 1,
                                   weight_attr=ParamAttr(initializer=Normal(mean=0.0, std=0.01)))
        self.bbox_pred = nn.Linear(in_channel, 4 * self.num_classes,
                                   weight_attr=ParamAttr(initializer=Normal(mean=0.0, std=0.001)))

    @classmethod
    def from_config(cls, cfg: dict, input_shape: Optional[Sequence[ShapeSpec]] = None, **_: Any) -> dict:
        head = create(cfg["head"], input_shape=input_shape) if input_shape is not None else create(cfg["head"])
        return {"head": head, "in_channel": head.out_shape[0].channels,
                "roi_extractor": _build_roi_extractor(cfg.get("roi_extractor"), input_shape)}

    def forward(self, feats: Sequence[paddle.Tensor], rois: paddle.Tensor, rois_valid: paddle.Tensor,
                inputs: Optional[Dict[str, paddle.Tensor]] = None):
        if self.training:
            targets = self._sample(rois, rois_valid, inputs)
            scores, deltas = self.predict(feats, targets.rois, targets.rois_num)
            return self.loss(scores, deltas, targets)
        flat_rois, rois_num = flatten_rois(rois, rois_valid)
        scores, deltas = self.predict(feats, flat_rois, rois_num)
        return (F.softmax(scores, axis=-1), deltas), (flat_rois, rois_num)

    def predict(self, feats: Sequence[paddle.Tensor], rois: paddle.Tensor,
                rois_num: paddle.Tensor) -> Tuple[paddle.Tensor, paddle.Tensor]:
        """Logits [R, C+1] and deltas [R, 4C] of flat ``rois`` [R, 4] with per-image counts [B]."""
        feat = self.head(self.roi_extractor(list(feats), rois, rois_num))
        if self.with_pool:
            feat = F.adaptive_avg_pool2d(feat, output_size=1).flatten(start_axis=1)
        return self.cls_score(feat), self.bbox_pred(feat)

    def _sample(self, rois, rois_valid, inputs) -> RoITargets:
        if inputs is None or "gt_bbox" not in inputs:
            raise ValueError("BBoxHead in training mode needs inputs with gt_bbox and gt_class")
        gt_valid, crowd = gt_masks(inputs)
        return self.bbox_assigner(rois.detach(), rois_valid, inputs["gt_bbox"], inputs["gt_class"],
                                  gt_valid, crowd)

    def loss(self, scores: paddle.Tensor, deltas: paddle.Tensor,
             targets: RoITargets) -> Dict[str, paddle.Tensor]:
        labels = targets.labels
        # Guards an empty sample (no proposals and no gts): the losses are
        # then 0 and still depend on every parameter.
        num = paddle.maximum(paddle.to_tensor(float(labels.shape[0])), paddle.to_tensor(1.0))
        loss_cls = F.cross_entropy(scores, labels.unsqueeze(-1), reduction="sum") / num
        foreground = (labels < self.num_classes).astype(deltas.dtype)
        pred = select_class_deltas(deltas, labels, self.num_classes)
        target = bbox2delta(targets.rois, targets.gt_boxes, self.bbox_weight).detach()
        loss_reg = self._reg_loss(pred, target, targets.rois, foreground, num)
        return {"loss_bbox_cls": loss_cls, "loss_bbox_reg": loss_reg}

    def _reg_loss(self, pred, target, rois, foreground, num) -> paddle.Tensor:
        if self.bbox_loss is None:
            return (paddle.abs(pred - target).sum(axis=-1) * foreground).sum() / num
        if isinstance(self.bbox_loss, GIoULoss):
            pred = delta2bbox(pred, rois, self.bbox_weight)
            target = delta2bbox(target, rois, self.bbox_weight)
        return self.bbox_loss(pred, target, weight=foreground, normalizer=num)
