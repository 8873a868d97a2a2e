"""Small building blocks shared by backbones and heads."""

from __future__ import annotations

from typing import Optional

import paddle
import paddle.nn as nn
import paddle.nn.functional as F


def make_norm(norm_type: Optional[str], channels: int) -> Optional[nn.Layer]:
    """The norm layer a config's ``norm_type`` names (None, 'bn', 'sync_bn', 'gn' with 32 groups)."""
    if norm_type == "gn":
        return nn.GroupNorm(num_groups=32, num_channels=channels)
    if norm_type == "sync_bn":
        return nn.SyncBatchNorm(channels)
    if norm_type == "bn":
        return nn.BatchNorm2D(channels)
    return None


class ConvNormReLU(nn.Layer):
    """conv -> optional norm -> ReLU; sublayers named ``conv`` and (with a norm) ``norm``."""

    def __init__(self, conv: nn.Conv2D, norm: Optional[nn.Layer] = None):
        super().__init__()
        self.conv = conv
        self.norm = norm

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = self.conv(x)
        if self.norm is not None:
            x = self.norm(x)
        return F.relu(x)
