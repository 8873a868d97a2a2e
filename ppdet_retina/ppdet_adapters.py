"""Our components as PaddleDetection builds and calls them (used by :mod:`ppdet_retina.ppdet_plugin`).

PaddleDetection's registry (``ppdet.core.workspace``) builds a class from the module that
defines it, under the class's own name, with the keys of its config section. So each adapter
here is named exactly like the PaddleDetection class whose name it takes over, takes that
class's config keys (with its defaults), and keeps its calling convention for every caller in
PaddleDetection, while the work is done by our component it subclasses. Our components' own
contracts are unchanged: an adapter only adds the PaddleDetection convention beside ours.

Nothing here imports ``ppdet``: the plugin puts these classes into its registry. The one
exception is :class:`MultiClassNMS`, which hands the inputs our NMS does not take (rotated
boxes, the TensorRT and CPU switches) to PaddleDetection's own implementation.

Parameter names equal PaddleDetection's (``head.conv_feat.fcos_head_cls_tower_conv_0.conv.weight``,
``head.retina_cls.weight`` ...), so its Trainer loads and saves its own weight files unchanged.
"""

from __future__ import annotations

import inspect
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ppdet_retina.core.workspace import ConfigError, unknown_keys_error
from ppdet_retina.modeling.anchors import RetinaAnchorGenerator as _OurAnchorGenerator
from ppdet_retina.modeling.dense_head import flatten_level
from ppdet_retina.modeling.heads.retina_head import RetinaFeat as _OurRetinaFeat
from ppdet_retina.modeling.heads.retina_head import RetinaHead as _OurRetinaHead
from ppdet_retina.modeling.losses import FocalLoss as _OurFocalLoss
from ppdet_retina.modeling.losses import SmoothL1Loss as _OurSmoothL1Loss
from ppdet_retina.modeling.matching import MaxIoUAssigner as _OurMaxIoUAssigner
from ppdet_retina.modeling.nms import MultiClassNMS as _OurMultiClassNMS

__all__ = ["RetinaHead", "RetinaFeat", "RetinaAnchorGenerator", "MaxIoUAssigner", "FocalLoss",
           "MultiClassNMS", "ADAPTERS"]


def _reject_unknown(cls: type, unknown: Dict[str, Any]) -> None:
    """Our registry's unknown-key error for keys PaddleDetection's config gave but ``cls`` does not take."""
    if unknown:
        keys = [p for p in inspect.signature(cls.__init__).parameters
                if p not in ("self", "unknown")]
        raise unknown_keys_error(cls.__name__, cls.__name__, sorted(unknown), keys)


def _rename_sublayer(layer: nn.Layer, old: str, new: str) -> None:
    """Register sublayer ``old`` under ``new`` (the name its parameters are saved under), keeping
    ``layer.<old>`` as a plain attribute so our component's code still reaches it."""
    sub = layer._sub_layers.pop(old)
    layer.add_sublayer(new, sub)
    object.__setattr__(layer, old, sub)


class RetinaFeat(_OurRetinaFeat):
    """Our RetinaNet towers under PaddleDetection's ``RetinaFeat`` name and parameter names.

    Config keys (PaddleDetection's, with its defaults): ``feat_in`` (256), ``feat_out`` (256),
    ``num_convs`` (4), ``norm_type`` ('bn'; null, 'gn', 'bn', 'sync_bn'), ``use_dcn`` (false only).
    Parameters ``fcos_head_{cls,reg}_tower_conv_{i}.conv.*`` (and ``.norm.*``).

    Called as PaddleDetection does, ``feat(x [B, feat_in, h, w])`` -> (cls_feat, reg_feat), or as
    ours, with a list of levels -> two lists.
    """

    def __init__(self, feat_in: int = 256, feat_out: int = 256, num_convs: int = 4,
                 norm_type: Optional[str] = "bn", use_dcn: bool = False, **unknown: Any):
        _reject_unknown(RetinaFeat, unknown)
        super().__init__(feat_in, feat_out, num_convs, norm_type, use_dcn)
        cls_tower, box_tower = self.cls_tower, self.box_tower
        self._sub_layers.pop("cls_tower")
        self._sub_layers.pop("box_tower")
        object.__setattr__(self, "cls_tower", cls_tower)
        object.__setattr__(self, "box_tower", box_tower)
        # Interleaved as PaddleDetection creates them, so a saved state dict lists them in its order.
        for i in range(num_convs):
            self.add_sublayer(f"fcos_head_cls_tower_conv_{i}", cls_tower[i])
            self.add_sublayer(f"fcos_head_reg_tower_conv_{i}", box_tower[i])

    def forward(self, feats):
        # Explicit base calls (not super()): dy2static recompiles these methods for export.
        if isinstance(feats, (list, tuple)):
            return _OurRetinaFeat.forward(self, feats)
        cls_feats, box_feats = _OurRetinaFeat.forward(self, [feats])
        return cls_feats[0], box_feats[0]


class RetinaAnchorGenerator(_OurAnchorGenerator):
    """Our RetinaNet anchors under PaddleDetection's name.

    Config keys (PaddleDetection's): ``octave_base_scale`` (4), ``scales_per_octave`` (3),
    ``aspect_ratios`` ([0.5, 1, 2]), ``strides`` ([8 .. 128]), ``variance`` (kept as an attribute,
    unused as there), ``offset`` (0). ``gen(feature maps)`` -> one [h*w*A, 4] tensor per level,
    as there; ``num_anchors`` and ``cell_anchors`` as there.
    """

    def __init__(self, octave_base_scale: float = 4, scales_per_octave: int = 3,
                 aspect_ratios: Sequence = (0.5, 1.0, 2.0),
                 strides: Sequence[float] = (8.0, 16.0, 32.0, 64.0, 128.0),
                 variance: Sequence[float] = (1.0, 1.0, 1.0, 1.0), offset: float = 0.0, **unknown: Any):
        _reject_unknown(RetinaAnchorGenerator, unknown)
        super().__init__(octave_base_scale, scales_per_octave, list(aspect_ratios), list(strides), offset)
        self.variance = list(variance)

    def forward(self, feats):
        return self(feats)

    @property
    def cell_anchors(self) -> List[paddle.Tensor]:
        return [paddle.to_tensor(cell.astype(np.float32)) for cell in self.cells]


class MaxIoUAssigner(_OurMaxIoUAssigner):
    """Our ``label_box`` matcher under PaddleDetection's name.

    Config keys (PaddleDetection's): ``positive_overlap``, ``negative_overlap`` (both required
    there), ``allow_low_quality`` (true).

    PaddleDetection calls it per image: ``assigner(anchors [N, 4], gt_bbox [G, 4])`` ->
    (matches [N] int64, labels [N] int32 in {-1, 0, 1}); ours is batched, with a validity mask:
    ``assigner(anchors, gt_bbox [B, G, 4], gt_valid [B, G])`` -> [B, N] each. Both work.
    """

    def __init__(self, positive_overlap: float, negative_overlap: float, allow_low_quality: bool = True,
                 **unknown: Any):
        _reject_unknown(MaxIoUAssigner, unknown)
        super().__init__(positive_overlap, negative_overlap, allow_low_quality)

    def __call__(self, anchors: paddle.Tensor, gt_bbox: paddle.Tensor,
                 gt_valid: Optional[paddle.Tensor] = None) -> Tuple[paddle.Tensor, paddle.Tensor]:
        if gt_valid is None and gt_bbox.ndim == 2:
            valid = paddle.ones([1, gt_bbox.shape[0]], dtype="bool")
            matched, labels = super().__call__(anchors, gt_bbox.unsqueeze(0), valid)
            return matched[0], labels[0]
        if gt_valid is None:
            gt_valid = paddle.ones(gt_bbox.shape[:2], dtype="bool")
        return super().__call__(anchors, gt_bbox, gt_valid)


class FocalLoss(_OurFocalLoss):
    """Our sigmoid focal loss under PaddleDetection's name.

    Config keys (PaddleDetection's): ``use_sigmoid`` (true only), ``alpha`` (0.25), ``gamma`` (2.0),
    ``loss_weight`` (1.0).

    PaddleDetection's convention, ``loss(pred [N, C], target [N] class ids, C = background,
    reduction='none'|'sum'|'mean')`` -> [N, C] / scalar, holds for every caller that passes no
    ``weight``/``normalizer``/``class_axis``; a call with any of those is ours (see our FocalLoss).
    """

    def __init__(self, use_sigmoid: bool = True, alpha: float = 0.25, gamma: float = 2.0,
                 loss_weight: float = 1.0, **unknown: Any):
        _reject_unknown(FocalLoss, unknown)
        super().__init__(alpha=alpha, gamma=gamma, loss_weight=loss_weight, use_sigmoid=use_sigmoid)
        self.use_sigmoid = bool(use_sigmoid)

    def __call__(self, pred: paddle.Tensor, target: paddle.Tensor, reduction: Optional[str] = None,
                 weight: Optional[paddle.Tensor] = None, normalizer: Any = None,
                 class_axis: Optional[int] = None) -> paddle.Tensor:
        if reduction is None and (weight is not None or normalizer is not None or class_axis is not None):
            return super().__call__(pred, target, weight=weight,
                                    normalizer=1.0 if normalizer is None else normalizer,
                                    class_axis=-1 if class_axis is None else class_axis)
        reduction = reduction or "none"
        if reduction == "sum":
            return super().__call__(pred, target)
        if reduction not in ("none", "mean"):
            raise ValueError(f"FocalLoss: reduction must be 'none', 'sum' or 'mean', got {reduction!r}")
        # The per-element form has no sparse shortcut: one-hot targets, background (id C) dropped.
        num_classes = pred.shape[1]
        one_hot = F.one_hot(target.reshape([-1]), num_classes + 1).astype(pred.dtype)[:, :-1].detach()
        loss = F.sigmoid_focal_loss(pred, one_hot, alpha=self.alpha, gamma=self.gamma, reduction=reduction)
        return loss * self.loss_weight

    def forward(self, *args, **kwargs):
        return self(*args, **kwargs)


class MultiClassNMS(_OurMultiClassNMS):
    """Our multi-class NMS under PaddleDetection's name, with its calling convention.

    Config keys (PaddleDetection's): ``score_threshold`` (0.05), ``nms_top_k`` (-1),
    ``keep_top_k`` (100), ``nms_threshold`` (0.5), ``normalized`` (true), ``nms_eta`` (1.0),
    ``return_index`` (false), ``return_rois_num`` (true), ``trt`` (false), ``cpu`` (false).

    ``nms(bboxes [B, M, 4], scores [B, C, M])`` or ``nms((bboxes [R, C, 4], rois_num [B]),
    scores [R, C], background_label)`` -> (bbox [K, 6], bbox_num [B], index [K, 1] or None):
    always three values, as PaddleDetection's callers unpack them. Rotated boxes (last axis not 4)
    and the ``trt`` / ``cpu`` switches go to PaddleDetection's own NMS, which handles them.
    """

    def __init__(self, score_threshold: float = 0.05, nms_top_k: int = -1, keep_top_k: int = 100,
                 nms_threshold: float = 0.5, normalized: bool = True, nms_eta: float = 1.0,
                 return_index: bool = False, return_rois_num: bool = True, trt: bool = False,
                 cpu: bool = False, **unknown: Any):
        _reject_unknown(MultiClassNMS, unknown)
        super().__init__(score_threshold=score_threshold, nms_top_k=nms_top_k, keep_top_k=keep_top_k,
                         nms_threshold=nms_threshold, normalized=normalized, nms_eta=nms_eta,
                         background_label=-1, return_index=return_index)
        self.return_rois_num = bool(return_rois_num)
        self.trt = bool(trt)
        self.cpu = bool(cpu)
        self._ppdet_keys = dict(score_threshold=score_threshold, nms_top_k=nms_top_k, keep_top_k=keep_top_k,
                                nms_threshold=nms_threshold, normalized=normalized, nms_eta=nms_eta,
                                return_index=return_index, return_rois_num=return_rois_num, trt=trt, cpu=cpu)

    def __call__(self, bboxes, score: paddle.Tensor, background_label: int = -1,
                 rois_num: Optional[paddle.Tensor] = None):
        boxes = bboxes[0] if isinstance(bboxes, (tuple, list)) else bboxes
        if self.trt or self.cpu or boxes.shape[-1] != 4:
            from ppdet.modeling.layers import MultiClassNMS as PaddleDetectionNMS
            return PaddleDetectionNMS(**self._ppdet_keys)(bboxes, score, background_label)
        out = _OurMultiClassNMS.__call__(self, bboxes, score, rois_num=rois_num, background_label=background_label)
        return out if len(out) == 3 else (out[0], out[1], None)


def _our_box_loss(loss_bbox: Any) -> Any:
    """The box loss our head calls: ours, or ours built from PaddleDetection's SmoothL1Loss's keys."""
    if loss_bbox is None or isinstance(loss_bbox, (str, dict, _OurSmoothL1Loss)):
        return loss_bbox
    if type(loss_bbox).__name__ == "SmoothL1Loss":
        return _OurSmoothL1Loss(beta=loss_bbox.beta, loss_weight=loss_bbox.loss_weight)
    raise ConfigError(f"RetinaHead.loss_bbox: {type(loss_bbox).__name__} is not supported under the "
                      f"ppdet_retina plugin; use SmoothL1Loss (beta 0 is L1)")


class RetinaHead(_OurRetinaHead):
    """Our RetinaHead under PaddleDetection's name, with its RetinaNet calling convention.

    Config keys (PaddleDetection's, all ours too): ``num_classes`` (80, shared), ``conv_feat``
    (RetinaFeat), ``anchor_generator`` (RetinaAnchorGenerator), ``bbox_assigner`` (MaxIoUAssigner),
    ``loss_class`` (FocalLoss), ``loss_bbox`` (SmoothL1Loss; PaddleDetection's is read for its
    ``beta`` and ``loss_weight``), ``nms`` (MultiClassNMS), ``prior_prob`` (0.01), ``nms_pre``
    (1000), ``weights`` ([1, 1, 1, 1]).

    Parameters: ``conv_feat.*``, ``retina_cls`` (A*C outputs), ``retina_reg`` (A*4), as there.

    PaddleDetection's RetinaNet calls ``head(feats, inputs)`` in training -> {'loss_cls',
    'loss_reg', 'loss'}; in eval ``head(feats)`` -> (cls_logits list, deltas list), then
    ``head.post_process(head_outs, im_shape [B, 2], scale_factor [B, 2])`` -> (bbox [K, 6],
    bbox_num [B], nms_keep_idx or None). Its batches carry gt_bbox / gt_class as per-image lists
    (``collate_batch: false``) or padded tensors; both are accepted.
    """

    # How many values post_process returns: the plugin sets it from the RetinaNet it finds.
    post_process_outputs = 3

    def __init__(self, num_classes: int = 80, conv_feat: Any = "RetinaFeat",
                 anchor_generator: Any = "RetinaAnchorGenerator", bbox_assigner: Any = "MaxIoUAssigner",
                 loss_class: Any = "FocalLoss", loss_bbox: Any = "SmoothL1Loss", nms: Any = "MultiClassNMS",
                 prior_prob: float = 0.01, nms_pre: int = 1000,
                 weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0), **unknown: Any):
        _reject_unknown(RetinaHead, unknown)
        super().__init__(num_classes=num_classes, conv_feat=conv_feat, anchor_generator=anchor_generator,
                         bbox_assigner=bbox_assigner, loss_class=loss_class, loss_bbox=_our_box_loss(loss_bbox),
                         nms=nms, prior_prob=prior_prob, nms_pre=nms_pre, weights=list(weights))
        _rename_sublayer(self, "cls_logits", "retina_cls")
        _rename_sublayer(self, "bbox_deltas", "retina_reg")

    def forward(self, feats, targets: Optional[Dict[str, Any]] = None):
        head_outs = _OurRetinaHead.forward(self, feats)  # not super(): see RetinaFeat.forward
        if self.training:
            return self.get_loss(head_outs, targets)
        return head_outs

    def get_loss(self, head_outs, targets: Dict[str, Any]) -> Dict[str, paddle.Tensor]:
        losses = _OurRetinaHead.get_loss(self, head_outs, padded_targets(targets))
        losses["loss"] = losses["loss_cls"] + losses["loss_reg"]
        return losses

    def post_process(self, head_outs, im_shape: paddle.Tensor, scale_factor: paddle.Tensor):
        out = self.nms_outputs(head_outs, scale_factor)
        return out[:self.post_process_outputs]

    def nms_outputs(self, head_outs, scale_factor: paddle.Tensor):
        """(bbox, bbox_num, index or None) of our post-processing (index with ``nms.return_index``)."""
        boxes, scores = self._candidates(head_outs, scale_factor, self.candidate_logit_floor())
        out = self.nms(boxes, scores)
        return (out[0], out[1], out[2] if len(out) > 2 else None)

    def decode_cls_logits(self, cls_logits_list: Sequence[paddle.Tensor]) -> paddle.Tensor:
        """PaddleDetection's extra-data output: per image the ``nms_pre`` best anchors' logits of each
        level, [B, C, M]."""
        parts = []
        for logits in cls_logits_list:
            flat = flatten_level(logits, self.num_classes)  # [B, L, C]
            if self.nms_pre is not None and flat.shape[1] > self.nms_pre:
                _, keep = paddle.topk(flat.max(axis=2), k=self.nms_pre, axis=1)
                flat = paddle.take_along_axis(flat, keep.unsqueeze(2), axis=1, broadcast=True)
            parts.append(flat)
        return paddle.concat(parts, axis=1).transpose([0, 2, 1])


def _as_tensor(value: Any, dtype: str) -> paddle.Tensor:
    return value.astype(dtype) if isinstance(value, paddle.Tensor) else paddle.to_tensor(np.asarray(value), dtype)


def padded_targets(targets: Dict[str, Any]) -> Dict[str, Any]:
    """PaddleDetection's batch with per-image gt lists -> ours: gt_bbox [B, G, 4], gt_class [B, G, 1],
    pad_gt_mask [B, G, 1] (and is_crowd [B, G, 1] when given). Padded tensors pass through."""
    if targets is None or targets.get("gt_bbox") is None:
        raise ValueError("RetinaHead: training needs gt_bbox and gt_class in the batch (PaddleDetection's "
                         "TrainReader provides them)")
    if isinstance(targets["gt_bbox"], paddle.Tensor):
        return targets
    boxes = [_as_tensor(b, "float32").reshape([-1, 4]) for b in targets["gt_bbox"]]
    counts = [int(b.shape[0]) for b in boxes]
    most = max(counts) if counts else 0
    out = dict(targets)
    out["gt_bbox"] = paddle.stack([_pad_rows(b, most) for b in boxes]) if boxes else paddle.zeros([0, 0, 4])
    for key in ("gt_class", "is_crowd"):
        if targets.get(key) is not None:
            rows = [_as_tensor(v, "int32").reshape([-1, 1]) for v in targets[key]]
            out[key] = paddle.stack([_pad_rows(r, most) for r in rows])
    mask = np.zeros([len(counts), most, 1], np.float32)
    for i, count in enumerate(counts):
        mask[i, :count] = 1.0
    out["pad_gt_mask"] = paddle.to_tensor(mask)
    return out


def _pad_rows(rows: paddle.Tensor, total: int) -> paddle.Tensor:
    missing = total - int(rows.shape[0])
    if missing == 0:
        return rows
    return paddle.concat([rows, paddle.zeros([missing, rows.shape[1]], dtype=rows.dtype)], axis=0)


# PaddleDetection registry name -> adapter, in the order the plugin reports them.
ADAPTERS: Dict[str, type] = {cls.__name__: cls for cls in (
    RetinaHead, RetinaFeat, RetinaAnchorGenerator, MaxIoUAssigner, FocalLoss, MultiClassNMS)}
