"""Helpers that exist only so that one piece of code runs eagerly and also traces to an exact graph.

While ``paddle.jit.to_static`` traces a model for export, a dimension that is dynamic reads as
-1 (or a graph value), integer index arithmetic must avoid an op order that a Paddle inference
pass miscompiles, and numpy views are unavailable. Each helper here hides one of those
differences; the dense head (:mod:`ppdet_retina.modeling.dense_head`) is their main user.
"""

from __future__ import annotations

from typing import Union

import paddle

__all__ = ["known", "times", "times_int", "flat_index", "reshape_like", "numpy_view_ok", "max_over_classes"]

# An int, or an int64 [1] tensor when the value is only known when the graph runs.
IntOrTensor = Union[int, paddle.Tensor]


def known(dim) -> bool:
    """True for a dimension known while tracing (a non-negative int), False for -1 or a graph value."""
    return isinstance(dim, int) and dim >= 0


def times(x: paddle.Tensor, factor: IntOrTensor) -> paddle.Tensor:
    """``x * factor`` for integer index tensors (``factor`` an int or a tensor).

    While tracing, a multiply by a constant tensor instead of a ``scale`` op:
    Paddle 3.3's inference pass operator_scale_onednn_fuse_pass folds a
    ``scale`` (bias 0) that follows an add/sub/mul/div into that op, and the
    fused integer kernel then ignores the scale -- fixed-size exports once
    gathered the wrong logits that way (``((a*C + j) * hw``: classes > 0 came
    out wrong). :func:`flat_index` also avoids that op order on its own.
    """
    if paddle.in_dynamic_mode() or not isinstance(factor, int):
        return x * factor
    return paddle.multiply(x, paddle.full([1], factor, dtype=x.dtype))


def times_int(hw: IntOrTensor, factor: int) -> IntOrTensor:
    """``hw * factor`` for an int or an int64 tensor (see :func:`times`)."""
    return hw * factor if isinstance(hw, int) else times(hw, factor)


def flat_index(keep: paddle.Tensor, anchor_id: paddle.Tensor, width: int, hw: IntOrTensor) -> paddle.Tensor:
    """[B, k] kept ``a*hw + p`` -> [B, k*width]: flat entries (a*width + j)*hw + p, j < width, of [A*width, hw].

    Entry (a, j, p) of one image's [A, width, hw] map sits at
    ``keep + a*(width-1)*hw + j*hw``: one offset per kept anchor plus one per column.
    """
    base = keep + times(anchor_id, times_int(hw, width - 1))
    columns = times(paddle.arange(width, dtype=keep.dtype), hw)
    return (base.unsqueeze(-1) + columns).reshape([0, -1])


def reshape_like(x: paddle.Tensor, ref: paddle.Tensor) -> paddle.Tensor:
    """``x`` reshaped to ``ref``'s shape, read at run time when tracing (dims may be unknown)."""
    if paddle.in_dynamic_mode():
        return x.reshape(ref.shape)
    return paddle.reshape(x, paddle.shape(ref))


def numpy_view_ok(x: paddle.Tensor) -> bool:
    """True where a tensor can be read as a zero-copy numpy array (dygraph, CPU, float32)."""
    return paddle.in_dynamic_mode() and x.place.is_cpu_place() and x.dtype == paddle.float32


def max_over_classes(x: paddle.Tensor) -> paddle.Tensor:
    """[B, A, C, L] -> [B, A, 1, L]: each anchor's best class logit (``paddle.max`` over axis 2).

    This read of the whole logit map is the largest cost of inference after the convs. An
    earlier form, (16, 1) then (rest, 1) max-pools down the class axis, was the faster one on
    older Paddle builds; with paddle 3.3 on a Sapphire Rapids CPU the plain reduction is faster
    in both exported engines (P3 of R50-FPN at 800 x 1216, alternated in one process: Paddle
    Inference +11 ms for the reduction against +56 ms for the pools in fp32, OpenVINO about 0
    against +25-33 ms, where the pools ran as generic pooling kernels; docs/DESIGN.md,
    "Performance notes").
    """
    return paddle.max(x, axis=2, keepdim=True)
