"""Anchor-to-ground-truth matching and foreground/background sampling.

Everything is batched over images: ground truths are padded to G per image
and a validity mask says which are real, so no Python loop runs per image.
"""

from __future__ import annotations

from typing import Tuple

import paddle

from ppdet_retina.core.workspace import ConfigError, register
from ppdet_retina.modeling.box_ops import pairwise_iou

__all__ = ["label_box", "MaxIoUAssigner", "subsample_labels", "IGNORE", "NEGATIVE", "POSITIVE"]

IGNORE, NEGATIVE, POSITIVE = -1, 0, 1

# IoU given to (anchor, invalid gt) pairs: below every real IoU, so an invalid
# gt can never be an anchor's best match nor have a low-quality match.
_INVALID_IOU = -1.0


def _all_negative(batch: int, num_anchors: int) -> Tuple[paddle.Tensor, paddle.Tensor]:
    return (paddle.zeros([batch, num_anchors], dtype="int64"),
            paddle.zeros([batch, num_anchors], dtype="int32"))


def label_box(iou: paddle.Tensor, positive_overlap: float, negative_overlap: float,
              allow_low_quality: bool, gt_valid: paddle.Tensor) -> Tuple[paddle.Tensor, paddle.Tensor]:
    """Match each of N anchors to its best of G ground truths and label it.

    Args:
        iou: [B, N, G] IoU of every anchor with every gt.
        positive_overlap: best IoU >= this -> positive (1).
        negative_overlap: best IoU < this -> negative (0); in between -> ignore (-1).
        allow_low_quality: also make positive, for every valid gt, each anchor
            whose IoU with it equals that gt's best IoU (ties included), when
            that IoU > 0. Such an anchor keeps its own best-IoU gt as its match,
            as PaddleDetection and detectron2 do.
        gt_valid: [B, G] bool or 0/1; invalid gts (padding, crowd) never match.

    Returns:
        matched_gt [B, N] int64 (index of the best valid gt; 0 where the image
        has no valid gt) and labels [B, N] int32 in {-1, 0, 1}. An image without
        valid gts has every anchor negative.
    """
    if iou.ndim != 3:
        raise ValueError(f"label_box expects iou of shape [B, N, G], got {list(iou.shape)}")
    if negative_overlap > positive_overlap:
        raise ConfigError(
            f"negative_overlap ({negative_overlap}) must not exceed positive_overlap ({positive_overlap})")
    batch, num_anchors, num_gts = iou.shape
    if num_gts == 0:
        return _all_negative(batch, num_anchors)

    valid = paddle.cast(gt_valid, "bool").reshape([batch, 1, num_gts])
    iou = paddle.where(valid, iou, paddle.full_like(iou, _INVALID_IOU))

    best_iou = iou.max(axis=2)  # [B, N]
    matched_gt = iou.argmax(axis=2).astype("int64")
    labels = paddle.full([batch, num_anchors], IGNORE, dtype="int32")
    labels = paddle.where(best_iou < negative_overlap, paddle.full_like(labels, NEGATIVE), labels)
    labels = paddle.where(best_iou >= positive_overlap, paddle.full_like(labels, POSITIVE), labels)

    if allow_low_quality:
        best_per_gt = iou.max(axis=1, keepdim=True)  # [B, 1, G]
        is_best = paddle.logical_and(iou == best_per_gt, best_per_gt > 0)
        is_best = paddle.logical_and(is_best, valid)
        low_quality = is_best.any(axis=2)
        labels = paddle.where(low_quality, paddle.full_like(labels, POSITIVE), labels)

    # Images without a valid gt have best_iou == _INVALID_IOU (< any
    # negative_overlap >= 0): already all negative; reset their match index.
    matched_gt = paddle.where(best_iou > _INVALID_IOU, matched_gt, paddle.zeros_like(matched_gt))
    return matched_gt, labels


@register
class MaxIoUAssigner:
    """Assign anchors to ground truths by maximum IoU (RetinaNet, RPN).

    Config keys: positive_overlap (IoU >= -> positive), negative_overlap
    (IoU < -> negative; between the two -> ignored), allow_low_quality (each gt's
    best anchors become positive too, see :func:`label_box`).

    Call: ``assigner(anchors [N, 4], gt_bbox [B, G, 4], gt_valid [B, G])``
    -> ``(matched_gt [B, N] int64, labels [B, N] int32 in {-1, 0, 1})``.
    """

    def __init__(self, positive_overlap: float = 0.5, negative_overlap: float = 0.4,
                 allow_low_quality: bool = True):
        if not 0.0 <= negative_overlap <= positive_overlap <= 1.0:
            raise ConfigError(
                "MaxIoUAssigner needs 0 <= negative_overlap <= positive_overlap <= 1, got "
                f"negative_overlap={negative_overlap}, positive_overlap={positive_overlap}")
        self.positive_overlap = float(positive_overlap)
        self.negative_overlap = float(negative_overlap)
        self.allow_low_quality = bool(allow_low_quality)

    def __call__(self, anchors: paddle.Tensor, gt_bbox: paddle.Tensor,
                 gt_valid: paddle.Tensor) -> Tuple[paddle.Tensor, paddle.Tensor]:
        if gt_bbox.ndim != 3 or gt_bbox.shape[-1] != 4:
            raise ValueError(f"MaxIoUAssigner expects gt_bbox of shape [B, G, 4], got {list(gt_bbox.shape)}")
        batch, num_gts = gt_bbox.shape[0], gt_bbox.shape[1]
        if num_gts == 0:
            return _all_negative(batch, anchors.shape[0])
        gt_valid = paddle.cast(gt_valid, "bool").reshape([batch, num_gts])
        iou = pairwise_iou(anchors.unsqueeze(0), gt_bbox)  # [B, N, G]
        return label_box(iou, self.positive_overlap, self.negative_overlap,
                         self.allow_low_quality, gt_valid)


def _take_first_k(candidates: paddle.Tensor, k: paddle.Tensor, use_random: bool) -> paddle.Tensor:
    """Per row of ``candidates`` [B, N] (bool), keep ``k`` [B] of the True entries.

    With ``use_random`` the kept ones are a uniform random subset, otherwise
    the lowest indices. Returns a [B, N] bool mask.
    """
    batch, n = candidates.shape
    if use_random:
        key = paddle.rand([batch, n], dtype="float32")
    else:
        key = paddle.arange(n, dtype="float32").unsqueeze(0).expand([batch, n]) / max(n, 1)
    # Non-candidates sort after every candidate (keys are in [0, 1)).
    key = paddle.where(candidates, key, paddle.full_like(key, 2.0))
    order = paddle.argsort(key, axis=1)
    rank = paddle.argsort(order, axis=1)  # position of each entry in the sorted order
    return paddle.logical_and(rank < k.unsqueeze(1), candidates)


def subsample_labels(labels: paddle.Tensor, num_samples: int, positive_fraction: float,
                     use_random: bool = True) -> Tuple[paddle.Tensor, paddle.Tensor]:
    """Sample at most ``num_samples`` anchors per image, at most ``positive_fraction`` of them positive.

    Args:
        labels: [B, N] in {-1, 0, 1} (ignore / negative / positive).
        num_samples: samples per image (RPN ``batch_size_per_im``).
        positive_fraction: largest share of positives (``fg_fraction``); the
            rest is filled with negatives.
        use_random: pick a random subset; otherwise the first ones by index.

    Returns:
        (positive_mask, negative_mask), each [B, N] bool.
    """
    if labels.ndim != 2:
        raise ValueError(f"subsample_labels expects labels of shape [B, N], got {list(labels.shape)}")
    if not 0.0 <= positive_fraction <= 1.0:
        raise ConfigError(f"positive_fraction (fg_fraction) must be in [0, 1], got {positive_fraction}")
    positive = labels == POSITIVE
    negative = labels == NEGATIVE
    max_pos = int(num_samples * positive_fraction)
    num_pos = paddle.minimum(positive.astype("int64").sum(axis=1), paddle.full([1], max_pos, dtype="int64"))
    num_neg = paddle.minimum(negative.astype("int64").sum(axis=1), num_samples - num_pos)
    return (_take_first_k(positive, num_pos, use_random),
            _take_first_k(negative, num_neg, use_random))
