"""DenseHead: what every one-stage (dense) detector head shares, so that a new head writes only its own parts.

A dense head predicts, at every location of every FPN level, class logits and box deltas for
each of its A anchors. This base owns everything that does not depend on which head it is:

* the layout: level l gives ``cls_logits`` [B, A*C, h_l, w_l] (anchor ``a``, class ``c`` at
  channel ``a*C + c``) and ``bbox_deltas`` [B, A*4, h_l, w_l] (anchor ``a`` at channels
  ``4a..4a+3``). Flattened, anchor index ``(y*w + x)*A + a`` matches the anchor generator's
  order (:func:`flatten_level`);
* training, assign then loss: anchors -> ``bbox_assigner`` -> :class:`Assignment` ->
  the subclass's :meth:`DenseHead.losses`;
* inference: per level the ``nms_pre`` best anchors (a traced and a NumPy path side by side,
  with the same early stop), one decode over all levels, one batched NMS;
  :meth:`DenseHead.decode_candidates` is the same without the NMS (exports).

A subclass writes: ``forward(feats) -> (cls_logits list, bbox_deltas list)`` in the layout above
and ``losses(head_outs, assignment) -> dict of scalar losses``. It may override
:meth:`DenseHead.decode_boxes` (default: the delta coder with ``weights``),
:meth:`DenseHead.scores_from_logits` (default: sigmoid) and, when a score is not a monotonic
function of the class logit alone, :meth:`DenseHead.candidate_logit_floor` (return None).
docs/DESIGN.md has a worked example.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ppdet_retina.core.workspace import ConfigError
from ppdet_retina.modeling.box_ops import delta2bbox, xyxy_scale
from ppdet_retina.modeling.targets import gt_masks
from ppdet_retina.modeling.trace_utils import (flat_index, known, max_over_classes, numpy_view_ok,
                                               reshape_like, times)

__all__ = ["DenseHead", "Assignment", "HeadOutputs", "flatten_level", "padded_gts"]

HeadOutputs = Tuple[List[paddle.Tensor], List[paddle.Tensor]]

# Kept below the exact logit of the NMS score threshold, so that float32 rounding of the
# sigmoid can never make the early stop drop an anchor the NMS would have kept.
_FLOOR_MARGIN = 1e-3


class Assignment(NamedTuple):
    """The assigner's verdict on one batch, handed to :meth:`DenseHead.losses`.

    anchors [N, 4] (all levels, generator order); gt_bbox [B, G, 4]; gt_class [B, G] int64;
    matched [B, N] (index of each anchor's gt); labels [B, N] (1 positive, 0 negative, -1 ignored).
    """

    anchors: paddle.Tensor
    gt_bbox: paddle.Tensor
    gt_class: paddle.Tensor
    matched: paddle.Tensor
    labels: paddle.Tensor


def flatten_level(x: paddle.Tensor, last: int) -> paddle.Tensor:
    """[B, A*last, h, w] -> [B, h*w*A, last] in the anchor generator's order."""
    return x.transpose([0, 2, 3, 1]).reshape([0, -1, last])


def padded_gts(inputs: Dict[str, paddle.Tensor]) -> Tuple[paddle.Tensor, paddle.Tensor, paddle.Tensor]:
    """gt_bbox [B,G,4], gt_class [B,G] int64, gt_valid [B,G]; a batch with G = 0 gets one invalid row."""
    gt_bbox = inputs["gt_bbox"].astype("float32")
    batch = gt_bbox.shape[0]
    gt_class = inputs["gt_class"].reshape([batch, -1]).astype("int64")
    if gt_bbox.shape[1] == 0:
        zeros = paddle.zeros([batch, 1, 4], dtype="float32")
        return zeros, paddle.zeros([batch, 1], dtype="int64"), paddle.zeros([batch, 1], dtype="bool")
    return gt_bbox, gt_class, gt_masks(inputs)[0]


def _take_flat(x: paddle.Tensor, idx: paddle.Tensor) -> paddle.Tensor:
    """Per image, entries ``idx`` [B, M] of ``x`` flattened to [B, L] -> [B, M]."""
    return paddle.take_along_axis(x.reshape([0, -1]), idx, axis=1, broadcast=False)


class DenseHead(nn.Layer):
    """Base of one-stage heads: flattening, assign -> loss, top-k + decode, NMS (see the module doc).

    Not registered: a subclass is the config component. Its constructor builds its components
    and calls ``super().__init__(num_classes, anchor_generator, bbox_assigner, nms, nms_pre,
    weights)``, which checks and stores them (messages name the subclass's config section):

        num_classes: C, classes without background.
        anchor_generator: called with the per-level logit maps, returns [N_l, 4] anchors per level;
            ``num_anchors`` (A per location), ``strides``, ``cells``, ``offset`` describe it.
        bbox_assigner: ``(anchors [N,4], gt_bbox [B,G,4], gt_valid [B,G]) -> (matched, labels)``.
        nms: a MultiClassNMS (``nms(boxes [B,M,4], scores [B,C,M]) -> (bbox, bbox_num)``).
        nms_pre: anchors kept per level and image before the NMS (None keeps all).
        weights: the box coder's (wx, wy, ww, wh).
    """

    def __init__(self, num_classes: int, anchor_generator: Any, bbox_assigner: Any, nms: Any,
                 nms_pre: Optional[int], weights: Sequence[float]):
        super().__init__()
        name = type(self).__name__
        if num_classes < 1:
            raise ConfigError(f"{name}.num_classes must be >= 1, got {num_classes}")
        if nms_pre is not None and nms_pre < 1:
            raise ConfigError(f"{name}.nms_pre must be >= 1 (or null to keep every anchor), got {nms_pre}")
        if len(weights) != 4:
            raise ConfigError(f"{name}.weights needs 4 values (wx, wy, ww, wh), got {list(weights)}")
        self.num_classes = int(num_classes)
        self.anchor_generator = anchor_generator
        self.bbox_assigner = bbox_assigner
        self.nms = nms
        self.nms_pre = nms_pre
        self.weights = [float(w) for w in weights]
        self.num_anchors = int(anchor_generator.num_anchors)

    # ------------------------------------------------------------------ what a subclass writes

    def losses(self, head_outs: HeadOutputs, assignment: Assignment) -> Dict[str, paddle.Tensor]:
        """The head's losses (scalars) given its outputs and the assigner's verdict."""
        raise NotImplementedError(f"{type(self).__name__} must implement losses(head_outs, assignment)")

    def decode_boxes(self, deltas: paddle.Tensor, anchors: paddle.Tensor) -> paddle.Tensor:
        """deltas [B, M, 4] on anchors [B, M, 4] -> x1y1x2y2 boxes [B, M, 4] in resized pixels."""
        return delta2bbox(deltas, anchors, self.weights)

    def scores_from_logits(self, logits: paddle.Tensor) -> paddle.Tensor:
        """[B, M, C] class logits -> scores (independent sigmoids, as focal-loss heads train them)."""
        return F.sigmoid(logits)

    def candidate_logit_floor(self) -> Optional[float]:
        """The class logit below which no score can pass the NMS score threshold; None disables the stop.

        Valid as long as a score is an increasing function of its own logit alone (sigmoid):
        an anchor whose best logit is under the floor then has every score under the
        threshold, and the NMS drops all of its rows. A head whose score mixes in another
        output (e.g. FCOS's centerness) returns None.
        """
        threshold = getattr(self.nms, "score_threshold", None)
        if threshold is None or not 0.0 < float(threshold) < 1.0:
            return None
        return math.log(threshold / (1.0 - threshold)) - _FLOOR_MARGIN

    # ------------------------------------------------------------------ training

    def anchors(self, cls_logits: Sequence[paddle.Tensor]) -> List[paddle.Tensor]:
        """Per level [h*w*A, 4] anchors for the given logit maps."""
        # Passing the maps (not their sizes) lets the generator read run-time
        # shapes when the graph is traced for export.
        return self.anchor_generator(list(cls_logits))

    def get_loss(self, head_outs: HeadOutputs, inputs: Dict[str, paddle.Tensor]) -> Dict[str, paddle.Tensor]:
        """Assign gts to all anchors, then the subclass's :meth:`losses`.

        ``inputs`` needs ``gt_bbox`` [B, G, 4] and ``gt_class`` [B, G, 1];
        ``pad_gt_mask`` and ``is_crowd`` [B, G, 1] are used when present.
        """
        for key in ("gt_bbox", "gt_class"):
            if inputs.get(key) is None:
                raise ValueError(f"{type(self).__name__}.get_loss: the batch has no '{key}'; training needs "
                                 f"the reader to provide gt_bbox [B,G,4] and gt_class [B,G,1]")
        anchors = paddle.concat(self.anchors(head_outs[0]), axis=0)  # [N, 4]
        gt_bbox, gt_class, gt_valid = padded_gts(inputs)
        matched, labels = self.bbox_assigner(anchors, gt_bbox, gt_valid)  # [B, N] each
        return self.losses(head_outs, Assignment(anchors, gt_bbox, gt_class, matched, labels))

    # ------------------------------------------------------------------ inference

    def post_process(self, head_outs: HeadOutputs, im_shape: paddle.Tensor,
                     scale_factor: paddle.Tensor) -> Tuple[paddle.Tensor, paddle.Tensor]:
        """Decode the ``nms_pre`` best anchors per level and image, rescale, and run one batched NMS.

        Returns bbox [K, 6] (class, score, x1, y1, x2, y2 in original pixels) and bbox_num [B].
        Boxes are divided by ``scale_factor`` (sy, sx) to reach original-image pixels; like
        PaddleDetection they are not clipped first. ``im_shape`` is accepted for interface symmetry.
        """
        boxes, scores = self._candidates(head_outs, scale_factor, self.candidate_logit_floor())
        out = self.nms(boxes, scores)
        return out[0], out[1]

    def decode_candidates(self, head_outs: HeadOutputs, im_shape: paddle.Tensor,
                          scale_factor: paddle.Tensor) -> Tuple[paddle.Tensor, paddle.Tensor]:
        """What :meth:`post_process` hands its NMS: boxes [B, M, 4] (original pixels), scores [B, C, M].

        Without the early stop: these feed an NMS outside the graph, whose score threshold a
        runtime may change.
        """
        return self._candidates(head_outs, scale_factor, None)

    def decode_settings(self) -> Dict[str, Any]:
        """What a runtime needs to turn the raw head outputs into candidates (infer_cfg.yml ``anchors``)."""
        gen = self.anchor_generator
        return {
            "num_classes": self.num_classes,
            "num_anchors": self.num_anchors,
            "strides": [float(s) for s in gen.strides],
            "cell_anchors": [np.asarray(c, np.float64).round(6).tolist() for c in gen.cells],
            "anchor_offset": float(gen.offset),
            "box_weights": list(self.weights),
            "nms_pre": None if self.nms_pre is None else int(self.nms_pre),
        }

    def _candidates(self, head_outs: HeadOutputs, scale_factor: paddle.Tensor,
                    floor: Optional[float]) -> Tuple[paddle.Tensor, paddle.Tensor]:
        cls_logits_list, deltas_list = head_outs
        anchors_list = self.anchors(cls_logits_list)
        parts = [self._select_level(*level, floor) for level in zip(cls_logits_list, deltas_list, anchors_list)]
        # One decode and one score pass over every level's candidates: the same
        # elementwise results as level by level, with a fifth of the small ops.
        deltas, anchors, logits = (paddle.concat(list(group), axis=1) for group in zip(*parts))
        boxes = self.decode_boxes(deltas, anchors)  # [B, M, 4]
        scores = self.scores_from_logits(logits).transpose([0, 2, 1])  # [B, C, M]
        return boxes / xyxy_scale(scale_factor, boxes.dtype).unsqueeze(1), scores

    # Every branch below is decided in Python from static shapes; kept out of
    # dy2static's rewriting, whose early-return handling turns them into graph
    # conditionals that fail to trace.
    @paddle.jit.not_to_static
    def _select_level(self, logits: paddle.Tensor, deltas: paddle.Tensor, anchors: paddle.Tensor,
                      floor: Optional[float]) -> Tuple[paddle.Tensor, paddle.Tensor, paddle.Tensor]:
        """One level's NMS candidates: [B, A*C, h, w], [B, A*4, h, w], [N_l, 4] ->
        deltas [B, k, 4], anchors [B, k, 4], logits [B, k, C] (decoded later, all levels at once).

        ``floor`` (a logit, or None) lets the top-k stop at the anchors that can still pass the
        NMS threshold (:meth:`candidate_logit_floor`).
        """
        hw, k = self._level_top_k(logits)
        if k is None:
            return self._all_anchors(logits, deltas, anchors)
        if numpy_view_ok(logits) and isinstance(hw, int):
            return self._top_anchors_numpy(logits, deltas, anchors, hw, k, floor)
        return self._top_anchors(logits, deltas, anchors, hw, k, floor)

    def _level_top_k(self, logits: paddle.Tensor):
        """(hw, k): a level's locations and how many anchors its top-k keeps; k None keeps them all.

        The level size comes from the logits' static shape, so dygraph and a
        fixed-size export choose in Python and trace no graph ``If``. With a
        size unknown while tracing, hw and k = min(nms_pre, h*w*A) are int64 [1]
        tensors computed at run time: a level no larger than ``nms_pre`` then
        keeps every anchor, as in dygraph, only in score order (the same
        detections unless two anchors tie exactly on a class score, as the NMS
        sorts by score).
        """
        if self.nms_pre is None:
            return None, None
        # While tracing, an unknown dimension reads as -1 or as a graph value.
        height, width = logits.shape[2], logits.shape[3]
        if known(height) and known(width):
            hw = height * width
            return hw, (None if hw * self.num_anchors <= self.nms_pre else self.nms_pre)
        shape = paddle.shape(logits).astype("int64")
        hw = shape[2:3] * shape[3:4]
        return hw, paddle.minimum(times(hw, self.num_anchors), paddle.full([1], self.nms_pre, dtype="int64"))

    def _all_anchors(self, logits: paddle.Tensor, deltas: paddle.Tensor,
                     anchors: paddle.Tensor) -> Tuple[paddle.Tensor, paddle.Tensor, paddle.Tensor]:
        """Every anchor of a level, in the generator's order."""
        flat_deltas = flatten_level(deltas, 4)
        return flat_deltas, paddle.expand_as(anchors.unsqueeze(0), flat_deltas), \
            flatten_level(logits, self.num_classes)

    # The two top-k paths below select the same anchors with the same values: the paddle-op
    # path traces (exports) and runs on GPU, the NumPy path is dygraph on CPU. Both rank by
    # each anchor's best class logit (sigmoid is monotonic), keep the top k with paddle.topk
    # (so ties break alike), and cut k with the same early stop.

    @staticmethod
    def _stop_early(best: paddle.Tensor, k, floor: Optional[float]):
        """Paddle-op early stop: k cut to the largest per-image count of anchors with best >= floor, >= 1.

        The kept anchors are a prefix of the full top-k (same detections, less to gather and
        suppress). Trace-safe: while tracing, k becomes an int64 [1] graph value that topk
        reads at run time, so a fixed-size export gets dynamic candidate counts but no graph
        ``If``. ``best`` is [B, L]; ``k`` an int or an int64 [1] tensor.
        """
        if floor is None:
            return k
        above = (best >= floor).astype("int64").sum(axis=1).max()
        if paddle.in_dynamic_mode():
            # Eagerly the count is read anyway (the output shape depends on it): plain ints
            # keep the index arithmetic that follows on ints.
            return max(1, min(int(k), int(above)))
        limit = paddle.full([1], k, dtype="int64") if isinstance(k, int) else k
        return paddle.maximum(paddle.minimum(limit, above.reshape([1])), paddle.ones([1], dtype="int64"))

    @staticmethod
    def _stop_early_numpy(best: np.ndarray, k: int, floor: Optional[float]) -> int:
        """:meth:`_stop_early` on a numpy ``best`` [B, L]."""
        if floor is None:
            return k
        return max(1, min(k, int((best >= floor).sum(axis=1).max())))

    def _top_anchors(self, logits: paddle.Tensor, deltas: paddle.Tensor, anchors: paddle.Tensor,
                     hw, k, floor: Optional[float]) -> Tuple[paddle.Tensor, paddle.Tensor, paddle.Tensor]:
        """The ``k`` anchors with the best class logit per image: their deltas, anchors and logits.

        ``hw`` (locations) and ``k`` are ints, or int64 [1] tensors when the
        size is only known at run time. Works on the conv's own [B, A, C, h*w]
        layout: the class max reads the logits once and only the k kept rows
        are gathered, instead of transposing the whole map.
        """
        num_a, num_c = self.num_anchors, self.num_classes
        # The class max and the gather read one reshape of the map: OpenVINO converts the conv's
        # blocked layout to a plain one for each reshape of it (11-15 ms a copy at P3 in bf16).
        grouped = logits.reshape([0, num_a, num_c, -1])
        best = max_over_classes(grouped).reshape([0, -1])
        k = self._stop_early(best, k, floor)
        _, keep = paddle.topk(best, k=k, axis=1)  # [B, k], index a*hw + p
        anchor_id = keep // hw
        top_logits = _take_flat(grouped, flat_index(keep, anchor_id, num_c, hw)).reshape([0, -1, num_c])
        top_deltas = _take_flat(deltas, flat_index(keep, anchor_id, 4, hw)).reshape([0, -1, 4])
        # The generator orders a level's anchors (y*w + x)*A + a.
        rows = times(keep % hw, num_a) + anchor_id
        top_anchors = reshape_like(paddle.gather(anchors, rows.reshape([-1])), top_deltas)
        return top_deltas, top_anchors, top_logits

    def _top_anchors_numpy(self, logits: paddle.Tensor, deltas: paddle.Tensor, anchors: paddle.Tensor,
                           hw: int, k: int, floor: Optional[float]
                           ) -> Tuple[paddle.Tensor, paddle.Tensor, paddle.Tensor]:
        """:meth:`_top_anchors` for dygraph on CPU, reading the maps through zero-copy numpy views.

        Paddle's CPU reductions and gathers over the whole P3 map cost several times what
        numpy's vectorised max and fancy indexing do (docs/DESIGN.md, "Performance notes").
        """
        num_a, num_c = self.num_anchors, self.num_classes
        batch = int(logits.shape[0])
        # detach(): a view of the same memory; DLPack refuses tensors that track gradients.
        maps = np.from_dlpack(logits.detach()).reshape(batch, num_a, num_c, hw)
        best = maps.max(axis=2).reshape(batch, num_a * hw)
        k = self._stop_early_numpy(best, k, floor)
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
