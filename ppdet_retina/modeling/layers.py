"""The one norm factory and the one conv-norm block shared by backbones, necks and heads.

``norm_type`` is spelled as in PaddleDetection's configs: ``None`` (no norm), ``'bn'``,
``'sync_bn'`` or ``'gn'`` (GroupNorm, 32 groups). ``'sync_bn'`` builds a plain BatchNorm marked
as wanting synchronisation; :func:`convert_sync_batchnorm` turns the marked layers into
``paddle.nn.SyncBatchNorm`` when more than one GPU process trains. The parameter names are
the same either way (``weight``, ``bias``, ``_mean``, ``_variance``), so weights load into both.
"""

from __future__ import annotations

import logging
from typing import List, Optional, Union

import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from paddle import ParamAttr
from paddle.nn.initializer import Constant
from paddle.regularizer import L2Decay

__all__ = ["NORM_TYPES", "SyncableBatchNorm", "make_norm", "ConvNorm", "convert_sync_batchnorm"]

NORM_TYPES = (None, "bn", "sync_bn", "gn")
GN_GROUPS = 32

logger = logging.getLogger("ppdet_retina.modeling.layers")


class SyncableBatchNorm(nn.BatchNorm2D):
    """A ``BatchNorm2D`` a config asked to synchronise (``norm_type: sync_bn``).

    It computes exactly what ``BatchNorm2D`` computes; it only marks the layer for
    :func:`convert_sync_batchnorm`, which decides once the device and process count are known.
    """


def _norm_attr(init: float, lr: float, norm_decay: Optional[float]) -> ParamAttr:
    # norm_decay None leaves the optimizer's global weight decay in charge of the parameter;
    # a number (0.0 in PaddleDetection's backbones) overrides it for this parameter only.
    regularizer = None if norm_decay is None else L2Decay(float(norm_decay))
    return ParamAttr(learning_rate=lr, regularizer=regularizer, initializer=Constant(init))


def make_norm(norm_type: Optional[str], channels: int, norm_decay: Optional[float] = None,
              freeze_norm: bool = False, lr: float = 1.0, gn_groups: int = GN_GROUPS) -> Optional[nn.Layer]:
    """The norm layer for ``norm_type`` over ``channels`` channels, or None for ``norm_type`` None.

    Args:
        norm_type: None, 'bn', 'sync_bn' (a :class:`SyncableBatchNorm`) or 'gn' (``gn_groups`` groups).
        norm_decay: L2 weight decay of the scale and shift; None: the optimizer's global decay.
        freeze_norm: scale and shift get no gradient and learning rate 0, and BatchNorm always
            normalises with its running statistics (which then never change); never synchronised.
        lr: learning-rate multiplier of the scale and shift.

    Scale starts at 1 and shift at 0. Input and output [B, channels, H, W].
    """
    if norm_type not in NORM_TYPES:
        raise ValueError(f"norm_type '{norm_type}' is not one of {list(NORM_TYPES)}")
    if norm_type is None:
        return None
    param_lr = 0.0 if freeze_norm else float(lr)
    weight_attr = _norm_attr(1.0, param_lr, norm_decay)
    bias_attr = _norm_attr(0.0, param_lr, norm_decay)
    if norm_type == "gn":
        norm = nn.GroupNorm(gn_groups, channels, weight_attr=weight_attr, bias_attr=bias_attr)
    else:
        # A frozen BN never uses batch statistics, so there is nothing to synchronise.
        cls = SyncableBatchNorm if norm_type == "sync_bn" and not freeze_norm else nn.BatchNorm2D
        norm = cls(channels, weight_attr=weight_attr, bias_attr=bias_attr,
                   use_global_stats=True if freeze_norm else None)
    if freeze_norm:
        norm.weight.stop_gradient = True
        norm.bias.stop_gradient = True
    return norm


class ConvNorm(nn.Layer):
    """conv -> optional norm -> optional ReLU: the conv block of ResNet, FPN, VGG and the head towers.

    Args:
        ch_in, ch_out, kernel, stride, groups: the conv (padding keeps the size at stride 1).
        norm_type, norm_decay, freeze_norm, norm_lr: the norm, see :func:`make_norm`.
        relu: apply ReLU last.
        weight_attr, bias_attr: the conv's ``ParamAttr`` as ``paddle.nn.Conv2D`` takes them
            (``bias_attr=False``: no bias; None: Paddle's default initialisers).

    Input [B, ch_in, H, W] -> output [B, ch_out, ceil(H / stride), ceil(W / stride)].
    Parameters: ``conv.weight`` (``conv.bias`` with a bias) and, with a norm, ``norm.*``.
    """

    def __init__(self, ch_in: int, ch_out: int, kernel: int, stride: int = 1, groups: int = 1,
                 norm_type: Optional[str] = None, relu: bool = True,
                 weight_attr: Optional[ParamAttr] = None, bias_attr: Union[ParamAttr, bool, None] = False,
                 norm_decay: Optional[float] = None, freeze_norm: bool = False, norm_lr: float = 1.0):
        super().__init__()
        self.conv = nn.Conv2D(ch_in, ch_out, kernel, stride=stride, padding=(kernel - 1) // 2, groups=groups,
                              weight_attr=weight_attr, bias_attr=bias_attr)
        self.norm = make_norm(norm_type, ch_out, norm_decay=norm_decay, freeze_norm=freeze_norm, lr=norm_lr)
        self.relu = bool(relu)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = self.conv(x)
        if self.norm is not None:
            x = self.norm(x)
        return F.relu(x) if self.relu else x


def _wants_sync(layer: nn.Layer, every_batchnorm: bool) -> bool:
    if isinstance(layer, SyncableBatchNorm):
        return True
    # A frozen BN (use_global_stats) never uses batch statistics: nothing to synchronise.
    return every_batchnorm and type(layer) is nn.BatchNorm2D and layer._use_global_stats is not True


def convert_sync_batchnorm(model: nn.Layer, synchronise: bool, every_batchnorm: bool = False) -> int:
    """Replace every :class:`SyncableBatchNorm` in ``model`` (with ``every_batchnorm``, as a top-level
    ``norm_type: sync_bn`` asks in PaddleDetection, every trainable BatchNorm2D too) by
    ``paddle.nn.SyncBatchNorm`` when ``synchronise`` (several GPU processes); otherwise keep them
    plain BatchNorm and log that once.

    The new layers share the old ones' parameter and statistics tensors, so an optimizer built
    before the conversion keeps updating them and state-dict names do not change.
    Returns the number of layers asked to synchronise.
    """
    found: List[tuple] = []
    for parent in [model] + list(model.sublayers()):
        for name, child in parent.named_children():
            if _wants_sync(child, every_batchnorm):
                found.append((parent, name, child))
    if not found:
        return 0
    if not synchronise:
        logger.info(f"norm_type sync_bn: {len(found)} norm layer(s) run as plain BatchNorm (synchronised "
                    f"batch norm needs more than one GPU process)")
        return len(found)
    for parent, name, child in found:
        parent.add_sublayer(name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
    logger.info(f"norm_type sync_bn: {len(found)} norm layer(s) synchronised across processes")
    return len(found)
