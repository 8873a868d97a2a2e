"""Box arithmetic shared by every detector: IoU, delta encoding, clipping.

Boxes are ``x1, y1, x2, y2`` in pixels with no ``+1`` convention: a box's
width is ``x2 - x1``. Every function is plain paddle ops, batched over any
leading dimensions, so it runs in dygraph and in an exported graph alike.
"""

from __future__ import annotations

import math
from typing import Sequence

import paddle

__all__ = ["box_area", "pairwise_iou", "bbox2delta", "delta2bbox", "clip_boxes", "xyxy_scale", "image_index",
           "DEFAULT_MAX_RATIO"]

# Largest log-scale step a decoded box may take: a 16 px anchor may grow to
# at most 1000 px; larger values only come from a diverging network and would
# overflow exp().
DEFAULT_MAX_RATIO = math.log(1000.0 / 16)


def box_area(boxes: paddle.Tensor) -> paddle.Tensor:
    """Area of ``boxes`` [..., 4] -> [...]; inverted boxes count as area 0."""
    wh = (boxes[..., 2:] - boxes[..., :2]).clip(min=0)
    return wh[..., 0] * wh[..., 1]


def pairwise_iou(boxes1: paddle.Tensor, boxes2: paddle.Tensor) -> paddle.Tensor:
    """IoU of every box in ``boxes1`` [..., N, 4] with every box in ``boxes2`` [..., M, 4].

    Returns [..., N, M]. Leading dimensions broadcast. A pair whose union is
    empty (two zero-area boxes) has IoU 0, never NaN.
    """
    area1 = box_area(boxes1).unsqueeze(-1)  # [..., N, 1]
    area2 = box_area(boxes2).unsqueeze(-2)  # [..., 1, M]
    top_left = paddle.maximum(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
    bottom_right = paddle.minimum(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    wh = (bottom_right - top_left).clip(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1 + area2 - inter
    # Where the union is empty the intersection is too; dividing by 1 there
    # gives 0 instead of 0/0.
    safe_union = paddle.where(union > 0, union, paddle.ones_like(union))
    return inter / safe_union


def _centre_size(boxes: paddle.Tensor):
    wh = boxes[..., 2:] - boxes[..., :2]
    ctr = boxes[..., :2] + 0.5 * wh
    return ctr, wh


def _weights_tensor(weights: Sequence[float], like: paddle.Tensor) -> paddle.Tensor:
    if len(weights) != 4:
        raise ValueError(f"box coder weights must have 4 values (wx, wy, ww, wh), got {list(weights)}")
    return paddle.to_tensor([float(w) for w in weights], dtype=like.dtype)


def bbox2delta(src: paddle.Tensor, tgt: paddle.Tensor,
               weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0)) -> paddle.Tensor:
    """Regression targets (dx, dy, dw, dh) [..., 4] that move ``src`` onto ``tgt`` ([..., 4] each).

    dx = wx * (tcx - scx) / sw, dw = ww * log(tw / sw) (same for y/h).
    ``src`` must have positive width and height (anchors and proposals do).
    """
    w = _weights_tensor(weights, src)
    src_ctr, src_wh = _centre_size(src)
    tgt_ctr, tgt_wh = _centre_size(tgt)
    d_ctr = (tgt_ctr - src_ctr) / src_wh
    d_wh = paddle.log(tgt_wh / src_wh)
    return paddle.concat([d_ctr, d_wh], axis=-1) * w


# The default below is DEFAULT_MAX_RATIO written as a literal: to_static
# re-creates this function where module names are not yet visible to defaults.
def delta2bbox(deltas: paddle.Tensor, boxes: paddle.Tensor,
               weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
               max_ratio: float = 4.135166556742356) -> paddle.Tensor:
    """Apply ``deltas`` [..., 4] (dx, dy, dw, dh) to ``boxes`` [..., 4]; inverse of :func:`bbox2delta`.

    Deltas are divided by ``weights``; dw, dh are clamped at ``max_ratio``
    before exp. Returns x1y1x2y2 boxes [..., 4].
    """
    d = deltas / _weights_tensor(weights, deltas)
    ctr, wh = _centre_size(boxes)
    pred_ctr = d[..., :2] * wh + ctr
    pred_wh = paddle.exp(d[..., 2:].clip(max=max_ratio)) * wh
    return paddle.concat([pred_ctr - 0.5 * pred_wh, pred_ctr + 0.5 * pred_wh], axis=-1)


def clip_boxes(boxes: paddle.Tensor, im_shape: paddle.Tensor) -> paddle.Tensor:
    """Clip ``boxes`` [..., 4] to ``[0, w] x [0, h]`` given ``im_shape`` [..., 2] as (h, w).

    ``im_shape`` broadcasts against the boxes' leading dimensions after a
    middle axis is added, so [B, N, 4] boxes take a [B, 2] shape.
    """
    im_shape = paddle.cast(im_shape, boxes.dtype)
    if im_shape.ndim == boxes.ndim - 1 and boxes.ndim >= 3:
        im_shape = im_shape.unsqueeze(-2)
    h = im_shape[..., 0:1]
    w = im_shape[..., 1:2]
    zero = paddle.zeros_like(h)
    x1 = paddle.minimum(paddle.maximum(boxes[..., 0:1], zero), w)
    y1 = paddle.minimum(paddle.maximum(boxes[..., 1:2], zero), h)
    x2 = paddle.minimum(paddle.maximum(boxes[..., 2:3], zero), w)
    y2 = paddle.minimum(paddle.maximum(boxes[..., 3:4], zero), h)
    return paddle.concat([x1, y1, x2, y2], axis=-1)


def xyxy_scale(scale_factor: paddle.Tensor, dtype) -> paddle.Tensor:
    """(sy, sx) [B, 2] -> (sx, sy, sx, sy) [B, 4] in ``dtype``: what x1y1x2y2 boxes are divided by
    to go from resized to original pixels."""
    sf = scale_factor.astype(dtype)
    sy, sx = sf[:, 0:1], sf[:, 1:2]
    return paddle.concat([sx, sy, sx, sy], axis=1)


def image_index(rows_num: paddle.Tensor) -> paddle.Tensor:
    """[R] int64 image of each row of a flat image-major batch, from per-image counts ``rows_num`` [B].

    The flat layout of RoIs (``rois`` [R, 4] + ``rois_num``) and of NMS output (``bbox`` + ``bbox_num``).
    """
    return paddle.repeat_interleave(paddle.arange(rows_num.shape[0], dtype="int64"), rows_num.astype("int64"))
