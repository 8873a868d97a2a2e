"""Turn RPN outputs into proposals: top-k per level, decode, clip, drop tiny boxes, NMS, top-k overall.

Proposals are returned padded: ``rois`` [B, K, 4] sorted by score per image,
with a [B, K] mask whose True entries form a prefix of each row.
:func:`flatten_rois` turns that into the flat ``rois`` [R, 4] + ``rois_num`` [B]
form that RoI pooling takes.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import paddle

from ppdet_retina.core.workspace import ConfigError, register
from ppdet_retina.modeling.box_ops import clip_boxes, delta2bbox
from ppdet_retina.modeling.nms import batched_nms
from ppdet_retina.modeling.trace_utils import known, reshape_like

__all__ = ["ProposalGenerator", "flatten_rois", "flatten_level_outputs"]

# Paddle's generate_proposals never keeps a box narrower than one pixel,
# whatever min_size says; the pretrained RPNs were trained with that rule.
_MIN_BOX_SIZE = 1.0


def flatten_level_outputs(scores: Sequence[paddle.Tensor],
                          deltas: Sequence[paddle.Tensor]) -> Tuple[List[paddle.Tensor], List[paddle.Tensor]]:
    """Per level, [B, A, h, w] logits -> [B, h*w*A] and [B, 4A, h, w] deltas -> [B, h*w*A, 4].

    The flattened order (y, x, anchor) is the anchor generator's order.
    """
    flat_scores, flat_deltas = [], []
    for score, delta in zip(scores, deltas):
        batch = score.shape[0]
        flat_scores.append(score.transpose([0, 2, 3, 1]).reshape([batch, -1]))
        flat_deltas.append(delta.transpose([0, 2, 3, 1]).reshape([batch, -1, 4]))
    return flat_scores, flat_deltas


def flatten_rois(rois: paddle.Tensor, valid: paddle.Tensor) -> Tuple[paddle.Tensor, paddle.Tensor]:
    """Padded ``rois`` [B, K, 4] + ``valid`` [B, K] -> (rois [R, 4] image-major, rois_num [B] int32)."""
    keep = paddle.nonzero(valid.flatten()).flatten()
    return paddle.gather(rois.reshape([-1, 4]), keep), valid.astype("int32").sum(axis=1)


@register
class ProposalGenerator:
    """RPN proposals for a batch of images (PaddleDetection's generate_proposals, batched).

    Per level and image: keep the ``pre_nms_top_n`` highest-scoring anchors,
    decode their deltas (weights 1, dw/dh clamped at log(1000/16)), clip to the
    image, drop boxes narrower or shorter than max(min_size, 1) px, NMS at
    ``nms_thresh``, keep the best ``pre_nms_top_n`` (``topk_after_collect``,
    training) or ``post_nms_top_n`` (otherwise). Then over all levels of an image
    keep the best ``post_nms_top_n``.

    Config keys: pre_nms_top_n (12000), post_nms_top_n (2000), nms_thresh (0.5),
    min_size (0.1), eta (1.0; adaptive NMS is not supported), topk_after_collect (False),
    min_size_in_original (False: min_size is in resized-image pixels, as PaddleDetection;
    True: in original-image pixels, i.e. min_size * scale_factor per axis, as the Faster R-CNN
    paper's 16 px).

    Call: ``gen(scores, deltas, anchors, im_shape, scale_factor=None)`` with per-level lists of
    scores [B, h*w*A] (logits), deltas [B, h*w*A, 4], anchors [h*w*A, 4],
    im_shape [B, 2] (h, w) and scale_factor [B, 2] (sy, sx; needed with min_size_in_original)
    -> (rois [B, K, 4], roi_scores [B, K], valid [B, K] bool),
    K = min(post_nms_top_n, candidates), rows sorted by score, valid ones first.
    """

    def __init__(self, pre_nms_top_n: int = 12000, post_nms_top_n: int = 2000, nms_thresh: float = 0.5,
                 min_size: float = 0.1, eta: float = 1.0, topk_after_collect: bool = False,
                 min_size_in_original: bool = False):
        if int(pre_nms_top_n) <= 0 or int(post_nms_top_n) <= 0:
            raise ConfigError("ProposalGenerator.pre_nms_top_n and post_nms_top_n must be > 0, got "
                              f"{pre_nms_top_n} and {post_nms_top_n}")
        if float(eta) != 1.0:
            raise ConfigError(f"ProposalGenerator.eta={eta}: adaptive NMS is not supported; use eta: 1.0")
        self.pre_nms_top_n = int(pre_nms_top_n)
        self.post_nms_top_n = int(post_nms_top_n)
        self.nms_thresh = float(nms_thresh)
        self.min_size = float(min_size)
        self.eta = float(eta)
        self.topk_after_collect = bool(topk_after_collect)
        self.min_size_in_original = bool(min_size_in_original)

    @property
    def per_level_top_n(self) -> int:
        return self.pre_nms_top_n if self.topk_after_collect else self.post_nms_top_n

    def __call__(self, scores: Sequence[paddle.Tensor], deltas: Sequence[paddle.Tensor],
                 anchors: Sequence[paddle.Tensor],
                 im_shape: paddle.Tensor,
                 scale_factor: Optional[paddle.Tensor] = None) -> Tuple[paddle.Tensor, paddle.Tensor, paddle.Tensor]:
        min_wh = self._min_wh(scale_factor)
        level_boxes, level_scores = [], []
        for score, delta, anchor in zip(scores, deltas, anchors):
            boxes, kept_scores = self._one_level(score.detach(), delta.detach(), anchor, im_shape, min_wh)
            level_boxes.append(boxes)
            level_scores.append(kept_scores)
        boxes = paddle.concat(level_boxes, axis=1)
        all_scores = paddle.concat(level_scores, axis=1)
        top_scores, order = paddle.topk(all_scores, _capped(self.post_nms_top_n, all_scores), axis=1)
        rois = paddle.take_along_axis(boxes, order.unsqueeze(-1).expand([-1, -1, 4]), axis=1)
        valid = top_scores > -math.inf
        return rois, top_scores, valid

    def _min_wh(self, scale_factor: Optional[paddle.Tensor]):
        """The smallest width and height kept: a number, or [B, 1] tensors (sx, sy scaled) per image."""
        if not self.min_size_in_original:
            return max(self.min_size, _MIN_BOX_SIZE)
        if scale_factor is None:
            raise ValueError("ProposalGenerator.min_size_in_original needs the batch's scale_factor")
        scale = scale_factor.astype("float32")
        # Never below the 1 px floor in the resized image, whatever the scale.
        return (paddle.clip(scale[:, 1:2] * self.min_size, min=_MIN_BOX_SIZE),
                paddle.clip(scale[:, 0:1] * self.min_size, min=_MIN_BOX_SIZE))

    def _one_level(self, score: paddle.Tensor, delta: paddle.Tensor, anchor: paddle.Tensor,
                   im_shape: paddle.Tensor, min_wh) -> Tuple[paddle.Tensor, paddle.Tensor]:
        """[B, k, 4] boxes and [B, k] scores, -inf where a candidate was dropped."""
        top_scores, order = paddle.topk(score, _capped(self.pre_nms_top_n, score), axis=1)  # highest first
        top_deltas = paddle.take_along_axis(delta, order.unsqueeze(-1).expand([-1, -1, 4]), axis=1)
        top_anchors = reshape_like(paddle.gather(anchor, order.flatten()), top_deltas)
        boxes = delta2bbox(top_deltas, top_anchors)
        boxes = clip_boxes(boxes, im_shape)
        keep = self._nms_keep(boxes, top_scores, self._large_enough(boxes, min_wh))
        # top_scores is sorted, so a running count of survivors is each one's rank.
        rank = paddle.cumsum(keep.astype("int32"), axis=1)
        keep = paddle.logical_and(keep, rank <= self.per_level_top_n)
        return boxes, paddle.where(keep, top_scores, paddle.full_like(top_scores, -math.inf))

    @staticmethod
    def _large_enough(boxes: paddle.Tensor, min_wh) -> paddle.Tensor:
        """[B, k] bool; boxes [B, k, 4]; min_wh a number or (min_w, min_h) [B, 1] tensors."""
        min_w, min_h = min_wh if isinstance(min_wh, tuple) else (min_wh, min_wh)
        wh = boxes[..., 2:] - boxes[..., :2]
        return paddle.logical_and(wh[..., 0] >= min_w, wh[..., 1] >= min_h)

    def _nms_keep(self, boxes: paddle.Tensor, scores: paddle.Tensor, candidate: paddle.Tensor) -> paddle.Tensor:
        """[B, k] bool: candidates surviving NMS within their own image (one NMS call for the batch)."""
        flat_idx = paddle.nonzero(candidate.flatten()).flatten()
        if paddle.in_dynamic_mode() and flat_idx.shape[0] == 0:
            return paddle.zeros_like(candidate)
        # Row width k: static in dygraph, read at run time in a graph traced with dynamic sizes.
        if paddle.in_dynamic_mode():
            width = paddle.full_like(flat_idx, scores.shape[1])
        else:
            width = paddle.shape(scores)[1:2].astype(flat_idx.dtype)
        image_idx = paddle.floor_divide(flat_idx, width)
        kept = batched_nms(paddle.gather(boxes.reshape([-1, 4]), flat_idx),
                           paddle.gather(scores.flatten(), flat_idx), image_idx, self.nms_thresh)
        mask = paddle.zeros_like(candidate, dtype="int32").flatten()
        mask = paddle.scatter(mask, paddle.gather(flat_idx, kept), paddle.ones_like(kept, dtype="int32"))
        return reshape_like(mask, candidate) > 0


def _capped(limit: int, x: paddle.Tensor):
    """min(limit, x.shape[1]): an int when the size is known, an int64 [1] tensor when a graph is
    traced with dynamic sizes (the number of anchors is then only known at run time)."""
    size = x.shape[1]
    if known(size):
        return min(limit, size)
    return paddle.minimum(paddle.shape(x)[1:2].astype("int64"), paddle.full([1], limit, dtype="int64"))
