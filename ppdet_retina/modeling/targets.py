"""Training targets: which anchors / RoIs are learned from, and what.

The target assigners of the two Faster R-CNN stages (:class:`RPNTargetAssign`, :class:`BBoxAssigner`)
and the helpers every head's targets use: :func:`gt_masks` (which padded gt rows are real, which are
crowd), :func:`matched_on_positives` (the matched gt's boxes or classes on positive rows) and
:func:`box_targets` (the encoded deltas of the matched gt boxes on positive anchors).

Both assigners are batched over images: ground truths come padded to G per
image with a validity mask (padding and crowd boxes are invalid), proposals
come padded to P per image with their own mask, and the fg/bg sampling runs
on [B, N] label maps (``subsample_labels``), so no Python loop runs per image.
"""

from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Sequence, Tuple, Union

import paddle

from ppdet_retina.core.workspace import ConfigError, register
from ppdet_retina.modeling.box_ops import bbox2delta, pairwise_iou
from ppdet_retina.modeling.matching import IGNORE, label_box, subsample_labels

__all__ = ["RPNTargetAssign", "BBoxAssigner", "RoITargets", "gt_masks", "matched_on_positives",
           "box_targets", "ignore_near_crowd", "cross_boundary"]


def gt_masks(inputs: Dict[str, paddle.Tensor]) -> Tuple[paddle.Tensor, paddle.Tensor]:
    """(valid [B, G] bool: real and not crowd, crowd [B, G] bool: real crowd boxes) from a batch dict.

    ``pad_gt_mask`` and ``is_crowd`` ([B, G, 1]) are optional; without them
    every gt row counts as a real, non-crowd box.
    """
    gt_bbox = inputs["gt_bbox"]
    shape = gt_bbox.shape[:2]
    real = paddle.ones(shape, dtype="bool")
    if inputs.get("pad_gt_mask") is not None:
        real = inputs["pad_gt_mask"].reshape(shape) > 0
    crowd = paddle.zeros(shape, dtype="bool")
    if inputs.get("is_crowd") is not None:
        crowd = paddle.logical_and(inputs["is_crowd"].reshape(shape) > 0, real)
    return paddle.logical_and(real, paddle.logical_not(crowd)), crowd


def matched_on_positives(values: paddle.Tensor, matched: paddle.Tensor, positive: paddle.Tensor,
                         fallback: Union[paddle.Tensor, float]) -> paddle.Tensor:
    """Per row, the matched gt's entry where ``positive``, ``fallback`` elsewhere.

    values [B, G, K] (boxes) or [B, G] (classes); matched [B, N] gt index per row; positive [B, N]
    bool; fallback a tensor shaped like the result ([B, N, K] / [B, N]) or a number. Returns
    [B, N, K] / [B, N]. Non-positive rows never carry their (maybe padding) gt: a zero-size
    padding box would make log-size deltas -inf.
    """
    rows = values if values.ndim == 3 else values.unsqueeze(-1)
    taken = _gather_rows(rows, matched.astype("int64"))
    if values.ndim == 2:
        taken, keep = taken.squeeze(-1), positive
    else:
        keep = positive.unsqueeze(-1)
    if not isinstance(fallback, paddle.Tensor):
        fallback = paddle.full_like(taken, fallback)
    return paddle.where(keep, taken, fallback)


def box_targets(anchors: paddle.Tensor, gt_bbox: paddle.Tensor, matched: paddle.Tensor,
                positive: paddle.Tensor, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0)) -> paddle.Tensor:
    """[B, N, 4] deltas (:func:`bbox2delta` with ``weights``) encoding the matched gt on positives, 0 elsewhere.

    anchors [N, 4]; gt_bbox [B, G, 4]; matched [B, N] gt index per anchor; positive [B, N] bool.
    Non-positive anchors encode themselves (delta 0), never a zero-size padding box.
    """
    anchors_b = anchors.unsqueeze(0).expand([gt_bbox.shape[0], -1, 4])
    return bbox2delta(anchors_b, matched_on_positives(gt_bbox, matched, positive, anchors_b), weights)


def _gather_rows(x: paddle.Tensor, idx: paddle.Tensor) -> paddle.Tensor:
    """Batched row gather: x [B, G, K], idx [B, N] -> [B, N, K].

    One flat gather with per-image offsets (take_along_axis with a broadcast index is several
    times slower on the [B, ~100k] anchor maps).
    """
    num_rows, width = x.shape[1], x.shape[2]
    batch = x.shape[0] if paddle.in_dynamic_mode() else paddle.shape(x)[0]
    offsets = paddle.arange(batch, dtype=idx.dtype).unsqueeze(1) * num_rows
    rows = paddle.gather(x.reshape([-1, width]), (idx + offsets).reshape([-1]))
    return rows.reshape([-1, idx.shape[1], width])


def ignore_near_crowd(iou: paddle.Tensor, crowd: Optional[paddle.Tensor],
                      ignore_thresh: float) -> Tuple[paddle.Tensor, Optional[paddle.Tensor]]:
    """Hide boxes that overlap a crowd region by more than ``ignore_thresh``.

    iou [B, N, G], crowd [B, G] bool. Returns the IoU with such boxes' rows set
    to -1 (so they are no gt's best match either) and a [B, N] bool mask of
    them, or (iou, None) when the feature is off (``ignore_thresh <= 0``).
    """
    if ignore_thresh <= 0 or crowd is None:
        return iou, None
    crowd_iou = paddle.where(crowd.unsqueeze(1), iou, paddle.zeros_like(iou))
    near = (crowd_iou > ignore_thresh).any(axis=2)  # [B, N]
    iou = paddle.where(near.unsqueeze(2), paddle.full_like(iou, -1.0), iou)
    return iou, near


def cross_boundary(anchors: paddle.Tensor, im_shape: paddle.Tensor, tolerance: float = 0.0) -> paddle.Tensor:
    """[B, N] bool: anchor n reaches more than ``tolerance`` px outside image b.

    anchors [N, 4] x1y1x2y2; im_shape [B, 2] (h, w) of the resized image before padding. An anchor
    is inside when x1, y1 >= -tolerance, x2 <= w + tolerance and y2 <= h + tolerance.
    """
    x1, y1, x2, y2 = [c.unsqueeze(0) for c in paddle.unbind(anchors, axis=1)]  # [1, N] each
    h = im_shape[:, 0:1].astype(anchors.dtype)
    w = im_shape[:, 1:2].astype(anchors.dtype)
    outside = paddle.logical_or(x1 < -tolerance, y1 < -tolerance)
    outside = paddle.logical_or(outside, x2 > w + tolerance)
    return paddle.logical_or(outside, y2 > h + tolerance)


_ON_CPU_WHY = "PaddleDetection's device switch; the batched assignment runs where the model runs"


def _check_fraction(owner: str, batch_size_per_im: int, fg_fraction: float) -> None:
    if int(batch_size_per_im) <= 0:
        raise ConfigError(f"{owner}.batch_size_per_im must be > 0, got {batch_size_per_im}")
    if not 0.0 <= fg_fraction <= 1.0:
        raise ConfigError(f"{owner}.fg_fraction must be in [0, 1], got {fg_fraction}")


@register
class RPNTargetAssign:
    """Label anchors for the RPN and sample the ones its loss sees.

    An anchor is positive when its best IoU with a valid gt is >= positive_overlap
    or it is (one of) the best anchors of some gt (IoU > 0); negative when its best
    IoU is < negative_overlap; ignored in between. Then at most
    ``batch_size_per_im * fg_fraction`` positives and ``batch_size_per_im - #pos``
    negatives are kept per image. Crowd and padded gts never make positives.

    Config keys: batch_size_per_im (256), fg_fraction (0.5), positive_overlap (0.7),
    negative_overlap (0.3), ignore_thresh (-1: off; > 0 ignores anchors overlapping a
    crowd box by more than this), use_random (True: random subset; False: lowest
    indices), ignore_cross_boundary (False, as PaddleDetection; True: anchors reaching more than
    ``straddle_thresh`` px (0) outside the image are neither positive, negative nor any gt's
    best match, as the Faster R-CNN paper trains its RPN). assign_on_cpu is accepted and
    ignored (``__ignored__``).

    Call: ``assign(anchors [N, 4], gt_bbox [B, G, 4], gt_valid [B, G], crowd [B, G] | None,
    im_shape [B, 2] (needed with ignore_cross_boundary))``
    -> ``(labels [B, N] int32: 1 sampled positive, 0 sampled negative, -1 not sampled;
    matched_gt [B, N] int64)``. The loss normaliser is ``batch_size_per_im * B``.
    """

    __ignored__ = {"assign_on_cpu": _ON_CPU_WHY}

    def __init__(self, batch_size_per_im: int = 256, fg_fraction: float = 0.5,
                 positive_overlap: float = 0.7, negative_overlap: float = 0.3,
                 ignore_thresh: float = -1.0, use_random: bool = True,
                 ignore_cross_boundary: bool = False, straddle_thresh: float = 0.0):
        _check_fraction("RPNTargetAssign", batch_size_per_im, fg_fraction)
        if not 0.0 <= negative_overlap <= positive_overlap <= 1.0:
            raise ConfigError("RPNTargetAssign needs 0 <= negative_overlap <= positive_overlap <= 1, got "
                              f"negative_overlap={negative_overlap}, positive_overlap={positive_overlap}")
        self.batch_size_per_im = int(batch_size_per_im)
        self.fg_fraction = float(fg_fraction)
        self.positive_overlap = float(positive_overlap)
        self.negative_overlap = float(negative_overlap)
        self.ignore_thresh = float(ignore_thresh)
        self.use_random = bool(use_random)
        self.ignore_cross_boundary = bool(ignore_cross_boundary)
        if float(straddle_thresh) < 0:
            raise ConfigError(f"RPNTargetAssign.straddle_thresh must be >= 0 (px), got {straddle_thresh}")
        self.straddle_thresh = float(straddle_thresh)

    def __call__(self, anchors: paddle.Tensor, gt_bbox: paddle.Tensor, gt_valid: paddle.Tensor,
                 crowd: Optional[paddle.Tensor] = None,
                 im_shape: Optional[paddle.Tensor] = None) -> Tuple[paddle.Tensor, paddle.Tensor]:
        batch = gt_bbox.shape[0]
        iou = pairwise_iou(anchors.unsqueeze(0), gt_bbox)  # [B, N, G]
        iou, ignored = ignore_near_crowd(iou, crowd, self.ignore_thresh)
        if self.ignore_cross_boundary:
            if im_shape is None:
                raise ValueError("RPNTargetAssign.ignore_cross_boundary needs the batch's im_shape")
            outside = cross_boundary(anchors, im_shape, self.straddle_thresh)
            # IoU -1: not a gt's best anchor either (the low-quality match would revive it).
            iou = paddle.where(outside.unsqueeze(2), paddle.full_like(iou, -1.0), iou)
            ignored = outside if ignored is None else paddle.logical_or(ignored, outside)
        matched, labels = label_box(iou, self.positive_overlap, self.negative_overlap, True, gt_valid)
        if ignored is not None:
            labels = paddle.where(ignored, paddle.full_like(labels, IGNORE), labels)
        pos, neg = subsample_labels(labels, self.batch_size_per_im, self.fg_fraction, self.use_random)
        sampled = paddle.full([batch, anchors.shape[0]], IGNORE, dtype="int32")
        sampled = paddle.where(neg, paddle.zeros_like(sampled), sampled)
        sampled = paddle.where(pos, paddle.ones_like(sampled), sampled)
        return sampled, matched

    def normalizer(self, batch_size: int) -> float:
        """PaddleDetection divides both RPN losses by the sample budget, not the samples drawn."""
        return float(self.batch_size_per_im * batch_size)


class RoITargets(NamedTuple):
    """The RoIs sampled for the box head, flattened image-major.

    rois [R, 4]; rois_num [B] int32; labels [R] int64 (0..C-1 foreground,
    C = background); gt_boxes [R, 4] (the matched gt; equal to the RoI itself
    for background rows, so encoding it never divides by zero).
    """

    rois: paddle.Tensor
    rois_num: paddle.Tensor
    labels: paddle.Tensor
    gt_boxes: paddle.Tensor


@register
class BBoxAssigner:
    """Label and sample proposals (plus the gts themselves) for the RoI box head.

    The valid gts of each image are appended to its proposals, so every image
    has positives from the first step. A candidate whose best IoU with a valid gt
    is >= fg_thresh is foreground with that gt's class, < bg_thresh background
    (class ``num_classes``). Then at most ``batch_size_per_im * fg_fraction``
    foreground and ``batch_size_per_im - #fg`` background RoIs are kept per image.

    Config keys: batch_size_per_im (512), fg_fraction (0.25), fg_thresh (0.5),
    bg_thresh (0.5), ignore_thresh (-1: off; see RPNTargetAssign), use_random (True),
    num_classes (shared, 80); cascade_iou and assign_on_cpu are accepted and ignored
    (``__ignored__``).

    Call: ``assign(rois [B, P, 4], rois_valid [B, P], gt_bbox [B, G, 4], gt_class [B, G, 1],
    gt_valid [B, G], crowd [B, G] | None)`` -> :class:`RoITargets`.
    """

    # assign_on_cpu stays shared so that a top-level key of that name is accepted too.
    __shared__ = ["num_classes", "assign_on_cpu"]
    __ignored__ = {"assign_on_cpu": _ON_CPU_WHY, "cascade_iou": "Cascade R-CNN's stage IoUs; there is no cascade here"}

    def __init__(self, batch_size_per_im: int = 512, fg_fraction: float = 0.25, fg_thresh: float = 0.5,
                 bg_thresh: float = 0.5, ignore_thresh: float = -1.0, use_random: bool = True,
                 num_classes: int = 80):
        _check_fraction("BBoxAssigner", batch_size_per_im, fg_fraction)
        if not 0.0 <= bg_thresh <= fg_thresh <= 1.0:
            raise ConfigError("BBoxAssigner needs 0 <= bg_thresh <= fg_thresh <= 1, got "
                              f"bg_thresh={bg_thresh}, fg_thresh={fg_thresh}")
        self.batch_size_per_im = int(batch_size_per_im)
        self.fg_fraction = float(fg_fraction)
        self.fg_thresh = float(fg_thresh)
        self.bg_thresh = float(bg_thresh)
        self.ignore_thresh = float(ignore_thresh)
        self.use_random = bool(use_random)
        self.num_classes = int(num_classes)

    def __call__(self, rois: paddle.Tensor, rois_valid: paddle.Tensor, gt_bbox: paddle.Tensor,
                 gt_class: paddle.Tensor, gt_valid: paddle.Tensor,
                 crowd: Optional[paddle.Tensor] = None) -> RoITargets:
        batch, num_gts = gt_bbox.shape[0], gt_bbox.shape[1]
        boxes = paddle.concat([rois.astype(gt_bbox.dtype), gt_bbox], axis=1)  # [B, N = P + G, 4]
        valid = paddle.concat([paddle.cast(rois_valid, "bool"), gt_valid], axis=1)
        labels, matched = self._label(boxes, valid, gt_bbox, gt_valid, crowd)
        pos, neg = subsample_labels(labels, self.batch_size_per_im, self.fg_fraction, self.use_random)

        classes = matched_on_positives(gt_class.reshape([batch, num_gts]).astype("int64"), matched, pos,
                                       self.num_classes)
        gt_boxes = matched_on_positives(gt_bbox, matched, pos, boxes)

        keep = paddle.nonzero(paddle.logical_or(pos, neg).flatten()).flatten()  # image-major order
        rois_num = paddle.logical_or(pos, neg).astype("int32").sum(axis=1)
        return RoITargets(rois=paddle.gather(boxes.reshape([-1, 4]), keep),
                          rois_num=rois_num,
                          labels=paddle.gather(classes.flatten(), keep),
                          gt_boxes=paddle.gather(gt_boxes.reshape([-1, 4]), keep))

    def _label(self, boxes, valid, gt_bbox, gt_valid, crowd):
        iou = pairwise_iou(boxes, gt_bbox)  # [B, N, G]
        iou, near_crowd = ignore_near_crowd(iou, crowd, self.ignore_thresh)
        matched, labels = label_box(iou, self.fg_thresh, self.bg_thresh, False, gt_valid)
        labels = paddle.where(valid, labels, paddle.full_like(labels, IGNORE))
        if near_crowd is not None:
            labels = paddle.where(near_crowd, paddle.full_like(labels, IGNORE), labels)
        return labels, matched
