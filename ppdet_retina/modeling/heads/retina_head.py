"""RetinaNet's head: the two conv towers, the output convs, the loss and the decoding.

Layout of the outputs (the pretrained weights depend on it): level l gives
``cls_logits`` [B, A*C, h, w] with anchor ``a``, class ``c`` at channel
``a*C + c`` and ``bbox_deltas`` [B, A*4, h, w] with (dx, dy, dw, dh) of anchor
``a`` at channels ``4a..4a+3``. Flattened, anchor index ``(y*w + x)*A + a``
matches the anchor generator's order, so a permute to [B, h, w, A*C] and a
reshape to [B, h*w*A, C] line predictions up with anchors.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from paddle import ParamAttr
from paddle.nn.initializer import Constant, Normal

from ppdet_retina.core.workspace import ConfigError, create, register
from ppdet_retina.modeling.box_ops import bbox2delta, delta2bbox
from ppdet_retina.modeling.layers import NORM_TYPES, ConvNorm

__all__ = ["RetinaFeat", "RetinaHead"]

HeadOutputs = Tuple[List[paddle.Tensor], List[paddle.Tensor]]


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


def _flatten_level(x: paddle.Tensor, last: int) -> paddle.Tensor:
    """[B, A*last, h, w] -> [B, h*w*A, last] in the anchor generator's order."""
    return x.transpose([0, 2, 3, 1]).reshape([0, -1, last])


def _gather_rows(x: paddle.Tensor, idx: paddle.Tensor) -> paddle.Tensor:
    """Batched row gather: x [B, N, K], idx [B, M] -> [B, M, K].

    One flat gather with per-image offsets; take_along_axis with a broadcast
    index is ~6x slower here.
    """
    num_rows, width = x.shape[1], x.shape[2]
    batch = x.shape[0] if paddle.in_dynamic_mode() else paddle.shape(x)[0]
    offsets = paddle.arange(batch, dtype=idx.dtype).unsqueeze(1) * num_rows
    rows = paddle.gather(x.reshape([-1, width]), (idx + offsets).reshape([-1]))
    return rows.reshape([-1, idx.shape[1], width])


def _take_flat(x: paddle.Tensor, idx: paddle.Tensor) -> paddle.Tensor:
    """Per image, entries ``idx`` [B, M] of ``x`` flattened to [B, L] -> [B, M]."""
    return paddle.take_along_axis(x.reshape([0, -1]), idx, axis=1, broadcast=False)


def _gt_valid_mask(inputs: Dict[str, paddle.Tensor], gt_bbox: paddle.Tensor) -> paddle.Tensor:
    """[B, G] bool: a real (not padding) gt that is not a crowd region."""
    shape = gt_bbox.shape[:2]
    valid = paddle.ones(shape, dtype="bool")
    if inputs.get("pad_gt_mask") is not None:
        valid = inputs["pad_gt_mask"].reshape(shape) > 0
    if inputs.get("is_crowd") is not None:
        valid = paddle.logical_and(valid, inputs["is_crowd"].reshape(shape) == 0)
    return valid


@register
class RetinaHead(nn.Layer):
    """RetinaNet head (Lin et al. 2017): per-anchor class logits and box deltas, focal loss, decoding.

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
    (bbox [K, 6] = class, score, x1, y1, x2, y2 in original pixels, bbox_num [B]).
    """

    __shared__ = ["num_classes"]
    __inject__ = ["conv_feat", "anchor_generator", "bbox_assigner", "loss_class", "loss_bbox", "nms"]

    def __init__(self, num_classes: int = 80, conv_feat: Any = "RetinaFeat",
                 anchor_generator: Any = "RetinaAnchorGenerator", bbox_assigner: Any = "MaxIoUAssigner",
                 loss_class: Any = "FocalLoss", loss_bbox: Any = "SmoothL1Loss", nms: Any = "MultiClassNMS",
                 prior_prob: float = 0.01, nms_pre: int = 1000,
                 weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0)):
        super().__init__()
        if num_classes < 1:
            raise ConfigError(f"RetinaHead.num_classes must be >= 1, got {num_classes}")
        if not 0.0 < prior_prob < 1.0:
            raise ConfigError(f"RetinaHead.prior_prob must be in (0, 1), got {prior_prob}")
        if nms_pre is not None and nms_pre < 1:
            raise ConfigError(f"RetinaHead.nms_pre must be >= 1 (or null to keep every anchor), got {nms_pre}")
        if len(weights) != 4:
            raise ConfigError(f"RetinaHead.weights needs 4 values (wx, wy, ww, wh), got {list(weights)}")
        self.num_classes = int(num_classes)
        self.conv_feat = _build(conv_feat, "conv_feat")
        self.anchor_generator = _build(anchor_generator, "anchor_generator")
        self.bbox_assigner = _build(bbox_assigner, "bbox_assigner")
        self.loss_class = _build(loss_class, "loss_class")
        self.loss_bbox = _build(loss_bbox, "loss_bbox")
        self.nms = _build(nms, "nms")
        self.prior_prob = float(prior_prob)
        self.nms_pre = nms_pre
        self.weights = [float(w) for w in weights]

        self.num_anchors = int(self.anchor_generator.num_anchors)
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

    def _anchors(self, cls_logits: Sequence[paddle.Tensor]) -> List[paddle.Tensor]:
        # Passing the maps (not their sizes) lets the generator read run-time
        # shapes when the graph is traced for export.
        return self.anchor_generator(list(cls_logits))

    # ------------------------------------------------------------------ loss

    def get_loss(self, head_outs: HeadOutputs, inputs: Dict[str, paddle.Tensor]) -> Dict[str, paddle.Tensor]:
        """Focal loss over all non-ignored anchors and box loss over positives, both / max(1, #positives).

        ``inputs`` needs ``gt_bbox`` [B, G, 4] and ``gt_class`` [B, G, 1];
        ``pad_gt_mask`` and ``is_crowd`` [B, G, 1] are used when present.
        Every parameter stays in the graph even for a batch without any gt.
        """
        cls_logits_list, deltas_list = head_outs
        for key in ("gt_bbox", "gt_class"):
            if inputs.get(key) is None:
                raise ValueError(f"RetinaHead.get_loss: the batch has no '{key}'; training needs the "
                                 f"reader to provide gt_bbox [B,G,4] and gt_class [B,G,1]")
        anchors = paddle.concat(self._anchors(cls_logits_list), axis=0)  # [N, 4]
        deltas = paddle.concat([_flatten_level(x, 4) for x in deltas_list], axis=1)  # [B, N, 4]

        gt_bbox, gt_class, gt_valid = self._padded_gts(inputs)
        matched, labels = self.bbox_assigner(anchors, gt_bbox, gt_valid)  # [B, N] each
        pos = labels == 1
        pos_f = pos.astype(deltas.dtype)
        num_pos = paddle.clip(pos_f.sum(), min=1.0)

        cls_target = self._class_targets(gt_class, matched, pos)
        not_ignored = (labels >= 0).astype(deltas.dtype)
        loss_cls = self._class_loss(cls_logits_list, cls_target, not_ignored, num_pos)

        box_target = self._box_targets(anchors, gt_bbox, matched, pos)
        loss_reg = self.loss_bbox(deltas.reshape([-1, 4]), box_target.reshape([-1, 4]),
                                  weight=pos_f.reshape([-1]), normalizer=num_pos)
        return {"loss_cls": loss_cls, "loss_reg": loss_reg}

    @staticmethod
    def _padded_gts(inputs: Dict[str, paddle.Tensor]):
        """gt_bbox [B,G,4], gt_class [B,G] int64, gt_valid [B,G]; a batch with G = 0 gets one invalid row."""
        gt_bbox = inputs["gt_bbox"].astype("float32")
        batch = gt_bbox.shape[0]
        gt_class = inputs["gt_class"].reshape([batch, -1]).astype("int64")
        if gt_bbox.shape[1] == 0:
            zeros = paddle.zeros([batch, 1, 4], dtype="float32")
            return zeros, paddle.zeros([batch, 1], dtype="int64"), paddle.zeros([batch, 1], dtype="bool")
        return gt_bbox, gt_class, _gt_valid_mask(inputs, gt_bbox)

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
        cls = paddle.take_along_axis(gt_class, matched.astype("int64"), axis=1)
        return paddle.where(pos, cls, paddle.full_like(cls, self.num_classes))

    def _box_targets(self, anchors: paddle.Tensor, gt_bbox: paddle.Tensor, matched: paddle.Tensor,
                     pos: paddle.Tensor) -> paddle.Tensor:
        """[B, N, 4] encoded deltas of the matched gt on positives, 0 elsewhere."""
        matched_boxes = _gather_rows(gt_bbox, matched.astype("int64"))
        anchors_b = anchors.unsqueeze(0).expand_as(matched_boxes)
        # Non-positive anchors may be matched to a padding box of zero size,
        # whose log-size delta is -inf; encode the anchor itself there instead.
        targets = paddle.where(pos.unsqueeze(-1), matched_boxes, anchors_b)
        return bbox2delta(anchors_b, targets, self.weights)

    # ------------------------------------------------------------------ inference

    def post_process(self, head_outs: HeadOutputs, im_shape: paddle.Tensor,
                     scale_factor: paddle.Tensor) -> Tuple[paddle.Tensor, paddle.Tensor]:
        """Decode the ``nms_pre`` best anchors per level and image, rescale, and run one batched NMS.

        Boxes are divided by ``scale_factor`` (sy, sx) to reach original-image
        pixels; like PaddleDetection they are not clipped first. ``im_shape``
        is accepted for interface symmetry.
        """
        cls_logits_list, deltas_list = head_outs
        anchors_list = self._anchors(cls_logits_list)
        parts = [self._select_level(*level) for level in zip(cls_logits_list, deltas_list, anchors_list)]
        # One decode and one sigmoid over every level's candidates: the same
        # elementwise results as level by level, with a fifth of the small ops.
        deltas, anchors, logits = (paddle.concat(list(group), axis=1) for group in zip(*parts))
        boxes = delta2bbox(deltas, anchors, self.weights)  # [B, M, 4]
        scores = F.sigmoid(logits).transpose([0, 2, 1])  # [B, C, M]
        boxes = boxes / _xyxy_scale(scale_factor, boxes.dtype)
        out = self.nms(boxes, scores)
        return out[0], out[1]

    # Every branch below is decided in Python from static shapes; kept out of
    # dy2static's rewriting, whose early-return handling turns them into graph
    # conditionals that fail to trace.
    @paddle.jit.not_to_static
    def _select_level(self, logits: paddle.Tensor, deltas: paddle.Tensor,
                      anchors: paddle.Tensor) -> Tuple[paddle.Tensor, paddle.Tensor, paddle.Tensor]:
        """One level's NMS candidates: [B, A*C, h, w], [B, A*4, h, w], [N_l, 4] ->
        deltas [B, k, 4], anchors [B, k, 4], logits [B, k, C] (decoded later, all levels at once).

        The level size comes from the logits' static shape, so dygraph and a
        fixed-size export choose in Python and trace no graph ``If``. With a
        size unknown while tracing, the graph runs top-k with
        k = min(nms_pre, h*w*A) computed at run time: a level no larger than
        ``nms_pre`` then keeps every anchor, as in dygraph, only in score order
        (the same detections unless two anchors tie exactly on a class score,
        as the NMS sorts by score).
        """
        if self.nms_pre is None:
            return self._all_anchors(logits, deltas, anchors)
        # While tracing, an unknown dimension reads as -1 or as a graph value.
        height, width = logits.shape[2], logits.shape[3]
        if _known(height) and _known(width):
            if height * width * self.num_anchors <= self.nms_pre:
                return self._all_anchors(logits, deltas, anchors)
            return self._top_anchors(logits, deltas, anchors, height * width, self.nms_pre)
        shape = paddle.shape(logits).astype("int64")
        hw = shape[2:3] * shape[3:4]
        k = paddle.minimum(_times(hw, self.num_anchors), paddle.full([1], self.nms_pre, dtype="int64"))
        return self._top_anchors(logits, deltas, anchors, hw, k)

    def _all_anchors(self, logits: paddle.Tensor, deltas: paddle.Tensor,
                     anchors: paddle.Tensor) -> Tuple[paddle.Tensor, paddle.Tensor, paddle.Tensor]:
        """Every anchor of a level, in the generator's order."""
        flat_deltas = _flatten_level(deltas, 4)
        return flat_deltas, paddle.expand_as(anchors.unsqueeze(0), flat_deltas), \
            _flatten_level(logits, self.num_classes)

    def _top_anchors(self, logits: paddle.Tensor, deltas: paddle.Tensor, anchors: paddle.Tensor,
                     hw, k) -> Tuple[paddle.Tensor, paddle.Tensor, paddle.Tensor]:
        """The ``k`` anchors with the best class logit per image: their deltas, anchors and logits.

        ``hw`` (locations) and ``k`` are ints, or int64 [1] tensors when the
        size is only known at run time. Works on the conv's own [B, A, C, h*w]
        layout: the class max reads the logits once and only the k kept rows
        are gathered, instead of transposing the whole map. Sigmoid is
        monotonic, so ranking logits ranks scores.
        """
        if _numpy_view_ok(logits) and isinstance(hw, int):
            return self._top_anchors_numpy(logits, deltas, anchors, hw, k)
        num_a, num_c = self.num_anchors, self.num_classes
        best = _max_over_classes(logits.reshape([0, num_a, num_c, -1]))
        _, keep = paddle.topk(best.reshape([0, -1]), k=k, axis=1)  # [B, k], index a*hw + p
        anchor_id = keep // hw
        # Entry (a, j, p) of one image's [A, K, h*w] map sits at (a*K + j)*hw + p
        # = keep + a*(K-1)*hw + j*hw: one offset per kept anchor plus one per column.
        top_logits = _take_flat(logits, _flat_index(keep, anchor_id, num_c, hw)).reshape([0, -1, num_c])
        top_deltas = _take_flat(deltas, _flat_index(keep, anchor_id, 4, hw)).reshape([0, -1, 4])
        # The generator orders a level's anchors (y*w + x)*A + a.
        rows = _times(keep % hw, num_a) + anchor_id
        top_anchors = _reshape_like(paddle.gather(anchors, rows.reshape([-1])), top_deltas)
        return top_deltas, top_anchors, top_logits

    def _candidates_needed(self, best: np.ndarray, k: int) -> int:
        """How many of a level's top-``k`` anchors can still yield a detection, at least 1.

        An anchor whose best class logit is below the NMS score threshold has
        every class score below it, and the NMS drops such rows; so the top-k
        can stop at the largest per-image count of anchors above it (the kept
        ones are a prefix of the full top-k: same detections, less to gather
        and suppress). A small margin keeps float32 sigmoid rounding on the safe side.
        """
        threshold = getattr(self.nms, "score_threshold", None)
        if threshold is None or not 0.0 < float(threshold) < 1.0:
            return k
        min_logit = math.log(threshold / (1.0 - threshold)) - 1e-3
        above = int((best >= min_logit).sum(axis=1).max())
        return max(1, min(k, above))

    def _top_anchors_numpy(self, logits: paddle.Tensor, deltas: paddle.Tensor, anchors: paddle.Tensor,
                           hw: int, k: int) -> Tuple[paddle.Tensor, paddle.Tensor, paddle.Tensor]:
        """:meth:`_top_anchors` for dygraph on CPU, reading the maps through zero-copy numpy views.

        Same selection (the top-k itself stays ``paddle.topk``, so ties break
        alike) and the same values. Paddle's CPU reductions and gathers over
        the whole P3 map cost ~25 ms at 800x1216 with 80 classes; numpy's
        vectorised max and fancy indexing do the same in a few ms.
        """
        num_a, num_c = self.num_anchors, self.num_classes
        batch = int(logits.shape[0])
        # detach(): a view of the same memory; DLPack refuses tensors that track gradients.
        maps = np.from_dlpack(logits.detach()).reshape(batch, num_a, num_c, hw)
        best = maps.max(axis=2).reshape(batch, num_a * hw)
        k = self._candidates_needed(best, k)
        keep = paddle.topk(paddle.to_tensor(best), k=k, axis=1)[1].numpy()  # [B, k], index a*hw + p
        anchor_id, pos = keep // hw, keep % hw
        image = np.arange(batch)[:, None, None]
        a, p = anchor_id[:, :, None], pos[:, :, None]
        top_logits = maps[image, a, np.arange(num_c), p]  # [B, k, C]
        box_maps = np.from_dlpack(deltas.detach()).reshape(batch, num_a, 4, hw)
        top_deltas = box_maps[image, a, np.arange(4), p]  # [B, k, 4]
        # The generator orders a level's anchors (y*w + x)*A + a.
        top_anchors = np.from_dlpack(anchors.detach())[pos * num_a + anchor_id]  # [B, k, 4]
        return tuple(paddle.to_tensor(np.ascontiguousarray(t)) for t in (top_deltas, top_anchors, top_logits))


# Rows of the class axis one pooling pass reduces (see _max_over_classes).
_CLASS_POOL_ROWS = 16


def _numpy_view_ok(x: paddle.Tensor) -> bool:
    """True where a tensor can be read as a zero-copy numpy array (dygraph, CPU, float32)."""
    return paddle.in_dynamic_mode() and x.place.is_cpu_place() and x.dtype == paddle.float32


def _max_over_classes(x: paddle.Tensor) -> paddle.Tensor:
    """[B, A, C, L] -> [B, A, 1, L]: the max over classes, as max-pools down the class axis.

    This read of the whole logit map is the largest cost of inference after
    the convs. A (C, 1) max-pool is ~1.4x faster on CPU than paddle.max over a
    middle axis, and two passes -- windows of 16 rows, then the rest -- are
    another ~1.5x faster at C = 80 (16 ms -> 10 ms for P3 at 800x1216): each
    output walks its window down rows L floats apart, and 80 such streams at
    once defeat the hardware prefetcher where 16 do not. Max is exact in any
    grouping; ``ceil_mode`` lets the last window be partial when 16 does not divide C.
    """
    rows = int(x.shape[2])
    if rows > _CLASS_POOL_ROWS:
        x = F.max_pool2d(x, kernel_size=(_CLASS_POOL_ROWS, 1), ceil_mode=True)
        rows = -(-rows // _CLASS_POOL_ROWS)
    return F.max_pool2d(x, kernel_size=(rows, 1)) if rows > 1 else x


def _times(x: paddle.Tensor, factor) -> paddle.Tensor:
    """``x * factor`` for integer index tensors (``factor`` an int or a tensor).

    While tracing, a multiply by a constant tensor instead of a ``scale`` op:
    Paddle 3.3's inference pass operator_scale_onednn_fuse_pass folds a
    ``scale`` (bias 0) that follows an add/sub/mul/div into that op, and the
    fused integer kernel then ignores the scale -- fixed-size exports once
    gathered the wrong logits that way (``((a*C + j) * hw``: classes > 0 came
    out wrong). The index formulas below also avoid that op order on their own.
    """
    if paddle.in_dynamic_mode() or not isinstance(factor, int):
        return x * factor
    return paddle.multiply(x, paddle.full([1], factor, dtype=x.dtype))


def _known(dim) -> bool:
    return isinstance(dim, int) and dim >= 0


def _flat_index(keep: paddle.Tensor, anchor_id: paddle.Tensor, width: int, hw) -> paddle.Tensor:
    """[B, k] kept a*hw + p -> [B, k*width]: flat entries (a*width + j)*hw + p, j < width, of [A*width, hw]."""
    base = keep + _times(anchor_id, _times_int(hw, width - 1))
    columns = _times(paddle.arange(width, dtype=keep.dtype), hw)
    return (base.unsqueeze(-1) + columns).reshape([0, -1])


def _times_int(hw, factor: int):
    """``hw * factor`` for an int or an int64 tensor (see :func:`_times`)."""
    return hw * factor if isinstance(hw, int) else _times(hw, factor)


def _reshape_like(x: paddle.Tensor, ref: paddle.Tensor) -> paddle.Tensor:
    """``x`` reshaped to ``ref``'s shape, read at run time when tracing (dims may be unknown)."""
    if paddle.in_dynamic_mode():
        return x.reshape(ref.shape)
    return paddle.reshape(x, paddle.shape(ref))


def _xyxy_scale(scale_factor: paddle.Tensor, dtype) -> paddle.Tensor:
    """(sy, sx) [B, 2] -> (sx, sy, sx, sy) [B, 1, 4] to divide x1y1x2y2 boxes."""
    sf = scale_factor.astype(dtype)
    sy, sx = sf[:, 0:1], sf[:, 1:2]
    return paddle.concat([sx, sy, sx, sy], axis=1).unsqueeze(1)


def _build(component: Any, key: str) -> Any:
    """Build a component given by name (direct Python use); built objects pass through."""
    if component is None:
        raise ConfigError(f"RetinaHead.{key} is required; give a component name or a mapping with 'name:'")
    if isinstance(component, (str, dict)):
        return create(component)
    return component
