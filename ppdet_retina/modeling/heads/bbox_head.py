"""Faster R-CNN's second stage: RoI feature head, class scores and class-specific deltas, decoding.

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
from ppdet_retina.modeling.box_ops import bbox2delta, clip_boxes, delta2bbox, image_index
from ppdet_retina.modeling.losses import GIoULoss
from ppdet_retina.modeling.proposal_generator import flatten_rois
from ppdet_retina.modeling.samplers import RoITargets, gt_masks
from ppdet_retina.modeling.shape_spec import ShapeSpec, in_channel_kwargs

__all__ = ["TwoFCHead", "BBoxHead", "RCNNBox", "BBoxPostProcess"]

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


_EXPORT_ONNX_WHY = "PaddleDetection's ONNX export switch; engine/onnx.py converts the one exported graph"


@register
class RCNNBox:
    """Decode class-specific deltas of the RoI head into boxes in resized-image pixels.

    boxes = delta2bbox(deltas / prior_box_var, roi) per class, clipped to the resized
    image (im_shape). They stay in the resized frame: PaddleDetection runs the NMS there and
    rescales afterwards (:class:`BBoxPostProcess`). The background score column is dropped.

    Config keys: prior_box_var ([10, 10, 5, 5]; must equal BBoxHead.bbox_weight),
    num_classes (shared); code_type and box_normalized are checked (only centre-size decoding
    in pixels exists); export_onnx is accepted and ignored (``__ignored__``).

    Call: ``decode((probs [R, C+1], deltas [R, 4C]), rois [R, 4], rois_num [B], im_shape [B, 2],
    scale_factor [B, 2])`` -> (boxes [R, C, 4], scores [R, C]); scale_factor is not read
    (kept for PaddleDetection's call signature).
    """

    # export_onnx stays shared so that a top-level key of that name is accepted too.
    __shared__ = ["num_classes", "export_onnx"]
    __ignored__ = {"export_onnx": _EXPORT_ONNX_WHY}

    def __init__(self, prior_box_var: Sequence[float] = (10.0, 10.0, 5.0, 5.0),
                 code_type: str = "decode_center_size", box_normalized: bool = False,
                 num_classes: int = 80):
        if code_type != "decode_center_size" or box_normalized:
            raise ConfigError("RCNNBox supports only code_type: decode_center_size with "
                              f"box_normalized: false, got {code_type!r}, {box_normalized!r}")
        self.prior_box_var = [float(v) for v in prior_box_var]
        self.num_classes = int(num_classes)

    def __call__(self, head_out: Tuple[paddle.Tensor, paddle.Tensor], rois: paddle.Tensor,
                 rois_num: paddle.Tensor, im_shape: paddle.Tensor,
                 scale_factor: paddle.Tensor) -> Tuple[paddle.Tensor, paddle.Tensor]:
        probs, deltas = head_out
        num_rois = deltas.shape[0]
        per_class = deltas.reshape([num_rois, -1, 4])
        boxes = delta2bbox(per_class, rois.unsqueeze(1), self.prior_box_var)  # [R, C, 4]
        roi_shape = paddle.gather(im_shape.astype(boxes.dtype), image_index(rois_num))  # [R, 2]
        return clip_boxes(boxes, roi_shape), probs[:, :-1]


@register
class BBoxPostProcess:
    """Decode the RoI head's output, run class-aware NMS per image, rescale to the original image.

    PaddleDetection's order, which its weights are judged with: decode and clip in the resized
    image, NMS there, then divide by scale_factor and clip to the original size (see
    :func:`rescale_to_original`). A row that the clipping leaves with no width or height
    keeps its place with class -1 (every consumer skips negative classes).

    Config keys: decode (RCNNBox), nms (MultiClassNMS), num_classes (shared);
    export_onnx / export_eb are accepted and ignored (``__ignored__``).

    Call: ``post(head_out, rois [R, 4], rois_num [B], im_shape [B, 2], scale_factor [B, 2])``
    -> (bbox [K, 6] rows (class, score, x1, y1, x2, y2) in original pixels, bbox_num [B] int32).
    """

    __shared__ = ["num_classes", "export_onnx", "export_eb"]
    __inject__ = ["decode", "nms"]
    __ignored__ = {"export_onnx": _EXPORT_ONNX_WHY,
                   "export_eb": "PaddleDetection's switch to keep empty-box rows in exports; the export mode decides"}

    def __init__(self, num_classes: int = 80, decode: Any = "RCNNBox", nms: Any = "MultiClassNMS"):
        self.num_classes = int(num_classes)
        self.decode = build_component(decode, "RCNNBox", "BBoxPostProcess.decode",
                                      shared={"num_classes": num_classes})
        self.nms = build_component(nms, "MultiClassNMS", "BBoxPostProcess.nms")

    def __call__(self, head_out: Tuple[paddle.Tensor, paddle.Tensor], rois: paddle.Tensor,
                 rois_num: paddle.Tensor, im_shape: paddle.Tensor,
                 scale_factor: paddle.Tensor) -> Tuple[paddle.Tensor, paddle.Tensor]:
        boxes, scores = self.decode(head_out, rois, rois_num, im_shape, scale_factor)
        bbox, bbox_num = self.nms(boxes, scores, rois_num.astype("int32"))
        return rescale_to_original(bbox, bbox_num, im_shape, scale_factor), bbox_num


def rescale_to_original(bbox: paddle.Tensor, bbox_num: paddle.Tensor, im_shape: paddle.Tensor,
                        scale_factor: paddle.Tensor) -> paddle.Tensor:
    """NMS rows [K, 6] in resized pixels -> original pixels, clipped; emptied rows get class -1.

    Boxes are divided by (sx, sy, sx, sy) and clipped to the original size, taken as
    floor(im_shape / scale_factor + 0.5) (whole pixels, as PaddleDetection). A box that
    ends up with zero width or height (it lay beyond the original border) is marked class -1
    in place, so ``bbox_num`` still counts it, as in PaddleDetection's output.
    """
    if bbox.shape[0] == 0:
        return bbox
    image_idx = image_index(bbox_num)
    scale = paddle.gather(scale_factor.astype(bbox.dtype), image_idx)  # [K, 2] as (sy, sx)
    original = paddle.floor(im_shape.astype(bbox.dtype) / scale_factor.astype(bbox.dtype) + 0.5)  # [B, 2]
    limits = paddle.gather(original, image_idx)  # [K, 2] as (h, w)
    scale_xyxy = paddle.concat([scale[:, 1:2], scale[:, 0:1], scale[:, 1:2], scale[:, 0:1]], axis=1)
    boxes = clip_boxes(bbox[:, 2:] / scale_xyxy, limits)
    kept = paddle.logical_and(boxes[:, 2:3] > boxes[:, 0:1], boxes[:, 3:4] > boxes[:, 1:2])
    labels = paddle.where(kept, bbox[:, 0:1], paddle.full_like(bbox[:, 0:1], -1.0))
    return paddle.concat([labels, bbox[:, 1:2], boxes], axis=1)
