"""Detection losses: sigmoid focal loss, smooth L1 / L1, generalized IoU.

Every loss is a small callable object (no parameters) so that a head can
take it from the config through ``__inject__``. They share one calling
convention::

    loss(pred, target, weight=None, normalizer=1.0) -> scalar Tensor

``weight`` multiplies the element-wise loss before the sum (0 removes an
element, e.g. an ignored anchor), ``normalizer`` (a number or a Tensor of
one element, e.g. the number of positive anchors) divides the sum, and
``loss_weight`` (a config key) scales the result.
"""

from __future__ import annotations

from typing import Optional, Union

import paddle
import paddle.nn.functional as F

from ppdet_retina.core.workspace import ConfigError, register

__all__ = ["FocalLoss", "SmoothL1Loss", "GIoULoss", "smooth_l1", "giou"]

Normalizer = Union[float, int, paddle.Tensor]
_REDUCTIONS = ("none", "sum", "mean")


def _apply_weight(loss: paddle.Tensor, weight: Optional[paddle.Tensor]) -> paddle.Tensor:
    """Multiply ``loss`` by ``weight``, letting a per-row weight [M] scale a [M, K] loss."""
    if weight is None:
        return loss
    weight = weight.astype(loss.dtype)
    if weight.ndim == loss.ndim - 1:
        weight = weight.unsqueeze(-1)
    return loss * weight


def _divide(total: paddle.Tensor, normalizer: Normalizer) -> paddle.Tensor:
    if isinstance(normalizer, paddle.Tensor):
        return total / normalizer.astype(total.dtype).reshape([])
    return total / float(normalizer)


def _check_reduction(reduction: str, owner: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ConfigError(f"{owner}.reduction: '{reduction}' is not one of {list(_REDUCTIONS)}")


def _power(p: paddle.Tensor, gamma: float) -> paddle.Tensor:
    """p ** gamma; small integer powers as products (paddle.pow is much slower than a multiply on CPU)."""
    if gamma == 0:
        return paddle.ones_like(p)
    if float(gamma).is_integer() and 1 <= gamma <= 4:
        out = p
        for _ in range(int(gamma) - 1):
            out = out * p
        return out
    return paddle.pow(p, gamma)


def _focal_terms(logits: paddle.Tensor, alpha: float, gamma: float):
    """Element-wise focal loss of ``logits`` as a negative (target 0) and as a positive (target 1).

    Uses -log(1 - p) = softplus(x) and -log(p) = softplus(-x), which stay
    finite for any logit.
    """
    p = F.sigmoid(logits)
    as_negative = (1.0 - alpha) * _power(p, gamma) * F.softplus(logits)
    as_positive = alpha * _power(1.0 - p, gamma) * F.softplus(-logits)
    return as_negative, as_positive


@register
class FocalLoss:
    """Sigmoid focal loss (Lin et al. 2017) summed over anchors and classes.

    loss = loss_weight * sum_ij w_i * FL(p_ij, t_ij) / normalizer, with
    FL = -alpha_t (1 - p_t)^gamma log(p_t).

    Config keys: ``alpha`` (0.25, weight of the positive term), ``gamma``
    (2.0, focusing exponent), ``loss_weight`` (1.0), ``use_sigmoid`` (True;
    accepted for PaddleDetection configs, only the sigmoid form exists).

    Call: ``pred`` logits [M, C]; ``target`` either float [M, C] (one-hot or
    soft; all zero for background) or int [M] class ids where any id outside
    0..C-1 (e.g. C or -1) means background; ``weight`` [M] or, with a float
    target, [M, C] (0 drops an ignored anchor); ``normalizer`` number or [1]
    Tensor; ``class_axis`` (-1) the class axis of ``pred``, so that a head's
    [B, A, C, h*w] map can be scored without a transpose (``target`` and
    ``weight`` then lack that axis: [B, A, h*w]). Returns a scalar Tensor.

    The class-id form is the fast one: every element is first scored as a
    negative (one sigmoid, one softplus over [M, C]) and only the M target
    entries are corrected to their positive value, which is several times faster than
    ``paddle.nn.functional.sigmoid_focal_loss`` (used for float targets).
    """

    def __init__(self, alpha: float = 0.25, gamma: float = 2.0, loss_weight: float = 1.0,
                 use_sigmoid: bool = True):
        if not use_sigmoid:
            raise ConfigError("FocalLoss.use_sigmoid: only the sigmoid focal loss is implemented; "
                              "set use_sigmoid: true or remove the key")
        if gamma < 0:
            raise ConfigError(f"FocalLoss.gamma must be >= 0, got {gamma}")
        self.alpha = float(alpha)
        self.gamma = float(gamma)
        self.loss_weight = float(loss_weight)

    def __call__(self, pred: paddle.Tensor, target: paddle.Tensor, weight: Optional[paddle.Tensor] = None,
                 normalizer: Normalizer = 1.0, class_axis: int = -1) -> paddle.Tensor:
        axis = class_axis % pred.ndim
        if target.ndim == pred.ndim - 1 and not paddle.is_floating_point(target):
            total = self._sparse_sum(pred, target, weight, axis)
        else:
            total = self._dense_sum(pred, target, weight, axis)
        return _divide(total, normalizer) * self.loss_weight

    def _dense_sum(self, pred: paddle.Tensor, target: paddle.Tensor,
                   weight: Optional[paddle.Tensor], axis: int) -> paddle.Tensor:
        target = target.astype(pred.dtype)
        if weight is None:
            return F.sigmoid_focal_loss(pred, target, alpha=self.alpha, gamma=self.gamma, reduction="sum")
        loss = F.sigmoid_focal_loss(pred, target, alpha=self.alpha, gamma=self.gamma, reduction="none")
        # A per-anchor weight is applied after summing the classes: one [M]
        # multiply instead of an [M, C] one.
        if weight.ndim == pred.ndim - 1:
            return (loss.sum(axis=axis) * weight.astype(loss.dtype)).sum()
        return (loss * weight.astype(loss.dtype)).sum()

    def _sparse_sum(self, pred: paddle.Tensor, labels: paddle.Tensor,
                    weight: Optional[paddle.Tensor], axis: int) -> paddle.Tensor:
        if weight is not None and weight.ndim != labels.ndim:
            raise ValueError(f"FocalLoss: with class-id targets {list(labels.shape)} the weight must be per "
                             f"row ({list(labels.shape)}), got {list(weight.shape)}")
        num_classes = pred.shape[axis]
        p = F.sigmoid(pred)
        row_loss = ((1.0 - self.alpha) * _power(p, self.gamma) * F.softplus(pred)).sum(axis=axis)
        labels = labels.astype("int64")
        is_fg = paddle.logical_and(labels >= 0, labels < num_classes)
        safe = paddle.where(is_fg, labels, paddle.zeros_like(labels))
        # broadcast=False: the index already has pred's shape bar the class
        # axis, and the broadcasting path copies.
        target_logit = paddle.take_along_axis(pred, safe.unsqueeze(axis), axis=axis,
                                              broadcast=False).squeeze(axis)
        as_negative, as_positive = _focal_terms(target_logit, self.alpha, self.gamma)
        row_loss = row_loss + (as_positive - as_negative) * is_fg.astype(pred.dtype)
        if weight is not None:
            row_loss = row_loss * weight.astype(pred.dtype)
        return row_loss.sum()


def smooth_l1(pred: paddle.Tensor, target: paddle.Tensor, beta: float) -> paddle.Tensor:
    """Element-wise smooth L1: 0.5 d^2 / beta where |d| < beta, else |d| - 0.5 beta; beta <= 0 is L1."""
    diff = paddle.abs(pred - target)
    if beta <= 0:
        return diff
    return paddle.where(diff < beta, 0.5 * diff * diff / beta, diff - 0.5 * beta)


@register
class SmoothL1Loss:
    """Smooth L1 loss summed over elements; ``beta: 0`` gives the plain L1 loss.

    loss = loss_weight * sum w * smooth_l1(pred - target) / normalizer.

    Config keys: ``beta`` (1.0, where the quadratic part ends; 0 = L1),
    ``loss_weight`` (1.0).

    Call: ``pred``, ``target`` [M, 4] (any equal shapes); ``weight`` [M] or
    the same shape; ``normalizer`` number or [1] Tensor. Returns a scalar.
    """

    def __init__(self, beta: float = 1.0, loss_weight: float = 1.0):
        if beta < 0:
            raise ConfigError(f"SmoothL1Loss.beta must be >= 0 (0 means L1), got {beta}")
        self.beta = float(beta)
        self.loss_weight = float(loss_weight)

    def __call__(self, pred: paddle.Tensor, target: paddle.Tensor,
                 weight: Optional[paddle.Tensor] = None, normalizer: Normalizer = 1.0) -> paddle.Tensor:
        loss = _apply_weight(smooth_l1(pred, target, self.beta), weight)
        return _divide(loss.sum(), normalizer) * self.loss_weight


def giou(pred: paddle.Tensor, target: paddle.Tensor, eps: float = 1e-10) -> paddle.Tensor:
    """Generalized IoU of matching rows of two [M, 4] x1y1x2y2 box sets -> [M]."""
    px1, py1, px2, py2 = paddle.unbind(pred, axis=-1)
    tx1, ty1, tx2, ty2 = paddle.unbind(target, axis=-1)
    area_p = (px2 - px1).clip(min=0) * (py2 - py1).clip(min=0)
    area_t = (tx2 - tx1).clip(min=0) * (ty2 - ty1).clip(min=0)
    inter_w = (paddle.minimum(px2, tx2) - paddle.maximum(px1, tx1)).clip(min=0)
    inter_h = (paddle.minimum(py2, ty2) - paddle.maximum(py1, ty1)).clip(min=0)
    inter = inter_w * inter_h
    union = area_p + area_t - inter
    iou = inter / (union + eps)
    # The smallest box enclosing both: its empty part penalises distant boxes
    # even when they do not overlap (IoU 0 has no gradient).
    hull = ((paddle.maximum(px2, tx2) - paddle.minimum(px1, tx1)) *
            (paddle.maximum(py2, ty2) - paddle.minimum(py1, ty1)))
    return iou - (hull - union) / (hull + eps)


@register
class GIoULoss:
    """Generalized IoU loss, 1 - GIoU, on x1y1x2y2 boxes.

    Config keys: ``loss_weight`` (1.0), ``eps`` (1e-10, guards empty unions),
    ``reduction`` ('sum': sum / normalizer; 'mean': mean over boxes;
    'none': the per-box loss [M]).

    Call: ``pred``, ``target`` [M, 4]; ``weight`` [M]; ``normalizer`` number or
    [1] Tensor (used with 'sum'). Returns a scalar, or [M] with 'none'.
    """

    def __init__(self, loss_weight: float = 1.0, eps: float = 1e-10, reduction: str = "sum"):
        _check_reduction(reduction, "GIoULoss")
        self.loss_weight = float(loss_weight)
        self.eps = float(eps)
        self.reduction = reduction

    def __call__(self, pred: paddle.Tensor, target: paddle.Tensor,
                 weight: Optional[paddle.Tensor] = None, normalizer: Normalizer = 1.0) -> paddle.Tensor:
        loss = _apply_weight(1.0 - giou(pred, target, self.eps), weight)
        if self.reduction == "none":
            return loss * self.loss_weight
        if self.reduction == "mean":
            return loss.mean() * self.loss_weight
        return _divide(loss.sum(), normalizer) * self.loss_weight
