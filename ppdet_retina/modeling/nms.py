"""Non-maximum suppression: multi-class NMS for detections, batched NMS for proposals."""

from __future__ import annotations

from typing import Optional, Tuple

import paddle

from ppdet_retina.core.workspace import ConfigError, register

__all__ = ["MultiClassNMS", "batched_nms"]


@register
class MultiClassNMS:
    """Class-aware greedy NMS per image, then the best ``keep_top_k`` over all classes.

    Runs ``multiclass_nms3`` (one fused op, exportable). Boxes of different
    classes never suppress each other.

    Config keys:
        score_threshold: drop (box, class) pairs scoring below this first.
        nms_top_k: per class, keep the best this many before NMS (-1: all).
        keep_top_k: per image, keep the best this many after NMS (-1: all).
        nms_threshold: IoU above which the lower-scored box is suppressed.
        normalized: True computes IoU without a +1 (our box convention; the
            PaddleDetection default); False adds 1 to widths and heights.
        nms_eta: adaptive NMS factor (1.0 = plain NMS).
        background_label: class index skipped entirely (-1: none).
        return_index: also return each kept row's index into the flattened
            input boxes ([K, 1] int32, third output).
        return_rois_num, trt, cpu: accepted and ignored (``__ignored__``).

    Defaults are PaddleDetection's (nms_top_k -1, normalized True), so configs
    that leave a key out behave as they do there.

    Call: ``nms(bboxes [B, M, 4], scores [B, C, M])`` (one box per anchor, shared
    by classes) or ``nms(bboxes [R, C, 4], scores [R, C], rois_num [B])`` (a box per
    class per RoI, images given by ``rois_num``); ``bboxes`` may also be the tuple
    ``(bboxes, rois_num)``. Returns ``bbox`` [K, 6] float32 rows (class, score,
    x1, y1, x2, y2), grouped by image, inside an image by class, then by
    decreasing score ([B, M, 4] form) or by RoI (``rois_num`` form), and
    ``bbox_num`` [B] int32.
    When nothing survives, ``bbox`` is an empty [0, 6] tensor and ``bbox_num`` zeros.
    """

    __ignored__ = {"return_rois_num": "bbox_num is always returned",
                   "trt": "PaddleDetection's TensorRT switch; the NMS op is the same",
                   "cpu": "PaddleDetection's device switch; the NMS op is the same"}

    def __init__(self, score_threshold: float = 0.05, nms_top_k: int = -1, keep_top_k: int = 100,
                 nms_threshold: float = 0.5, normalized: bool = True, nms_eta: float = 1.0,
                 background_label: int = -1, return_index: bool = False):
        if not 0.0 <= nms_threshold <= 1.0:
            raise ConfigError(f"MultiClassNMS.nms_threshold must be in [0, 1], got {nms_threshold}")
        if nms_top_k == 0 or keep_top_k == 0:
            raise ConfigError("MultiClassNMS.nms_top_k and keep_top_k must be > 0 or -1 (keep all), "
                              f"got nms_top_k={nms_top_k}, keep_top_k={keep_top_k}")
        self.score_threshold = float(score_threshold)
        self.nms_top_k = int(nms_top_k)
        self.keep_top_k = int(keep_top_k)
        self.nms_threshold = float(nms_threshold)
        self.normalized = bool(normalized)
        self.nms_eta = float(nms_eta)
        self.background_label = int(background_label)
        self.return_index = bool(return_index)

    def __call__(self, bboxes: paddle.Tensor, scores: paddle.Tensor,
                 rois_num: Optional[paddle.Tensor] = None,
                 background_label: Optional[int] = None) -> Tuple[paddle.Tensor, ...]:
        if isinstance(bboxes, (tuple, list)):
            bboxes, rois_num = bboxes
        self._check_shapes(bboxes, scores, rois_num)
        background = self.background_label if background_label is None else int(background_label)
        out, index, bbox_num = paddle._C_ops.multiclass_nms3(
            bboxes, scores, rois_num, self.score_threshold, self.nms_top_k, self.keep_top_k,
            self.nms_threshold, self.normalized, self.nms_eta, background)
        out, bbox_num, index = self._honest_empty(out, bbox_num, index)
        if self.return_index:
            return out, bbox_num, index
        return out, bbox_num

    @staticmethod
    def _check_shapes(bboxes: paddle.Tensor, scores: paddle.Tensor, rois_num) -> None:
        if rois_num is None:
            ok = bboxes.ndim == 3 and scores.ndim == 3 and bboxes.shape[-1] == 4
            hint = "bboxes [B, M, 4] and scores [B, C, M]"
        else:
            ok = bboxes.ndim == 3 and scores.ndim == 2 and bboxes.shape[-1] == 4
            hint = "bboxes [R, C, 4], scores [R, C] and rois_num [B]"
        if not ok:
            raise ValueError(f"MultiClassNMS expects {hint}; got bboxes {list(bboxes.shape)}, "
                             f"scores {list(scores.shape)}")

    @staticmethod
    def _honest_empty(out: paddle.Tensor, bbox_num: paddle.Tensor,
                      index: paddle.Tensor) -> Tuple[paddle.Tensor, paddle.Tensor, paddle.Tensor]:
        # Paddle 3.3 already returns [0, 6] when nothing survives; older
        # versions returned one row of -1. Normalise to [0, 6] in dygraph so
        # callers can rely on bbox.shape[0] == bbox_num.sum().
        bbox_num = bbox_num.astype("int32")
        if paddle.in_dynamic_mode() and (out.ndim != 2 or out.shape[-1] != 6 or int(bbox_num.sum()) == 0):
            out = paddle.zeros([0, 6], dtype="float32")
            index = paddle.zeros([0, 1], dtype="int32")
        return out, bbox_num, index


def batched_nms(boxes: paddle.Tensor, scores: paddle.Tensor, idxs: paddle.Tensor,
                iou_threshold: float) -> paddle.Tensor:
    """Class-aware NMS: indices [K] int64 into ``boxes`` [N, 4] kept, by decreasing score.

    Boxes with different ``idxs`` [N] never suppress each other. IoU is computed
    without a +1. Runs one NMS over all classes by shifting each class's boxes
    into its own disjoint region, so there is no loop over classes.
    """
    if boxes.shape[0] == 0:
        return paddle.zeros([0], dtype="int64")
    # Offsets larger than any coordinate put classes far apart; IoU is
    # shift-invariant inside a class.
    span = boxes.max() - boxes.min() + 1.0
    shifted = boxes - boxes.min() + idxs.astype(boxes.dtype).unsqueeze(1) * span
    keep = paddle.vision.ops.nms(shifted, iou_threshold=iou_threshold, scores=scores)
    return keep.astype("int64")
