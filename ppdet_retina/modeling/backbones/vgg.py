"""VGG convolutional backbone (Simonyan & Zisserman 2015) as used by the original Faster R-CNN."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Union

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ppdet_retina.core.workspace import ConfigError, register
from ppdet_retina.modeling.layers import ConvNorm
from ppdet_retina.modeling.shape_spec import ShapeSpec

__all__ = ["VGG"]

# 3x3 convs per stage for each depth (configurations A, B, D, E of the paper).
_CONVS_PER_STAGE = {11: (1, 1, 2, 2, 2), 13: (2, 2, 2, 2, 2), 16: (2, 2, 3, 3, 3), 19: (2, 2, 4, 4, 4)}
_DEFAULT_CHANNELS = (64, 128, 256, 512, 512)


def _conv_relu(ch_in: int, ch_out: int, norm_type: Optional[str]) -> ConvNorm:
    """3x3 same-size conv (+ BatchNorm) + ReLU with Paddle's default init; a bias only without a norm."""
    return ConvNorm(ch_in, ch_out, 3, norm_type=norm_type, bias_attr=None if norm_type is None else False)


@register
class VGG(nn.Layer):
    """VGG conv stages 1-5 with the 2x2 max pools after stages 1-4 only: one map at stride 16.

    Faster R-CNN drops VGG's fifth pool and its classifier, so conv5_3 (stride 16,
    512 channels) is the single feature level; RoI pooling then stands in for pool5.

    Config keys: depth (16; 11/13/19 also exist), channels (per-stage widths,
    [64, 128, 256, 512, 512]; narrow them for tests), norm_type (None, 'bn' or 'sync_bn'),
    freeze_at (-1: train everything; k: stages 0..k get no gradient, the paper
    freezes conv1-conv2, i.e. 1).

    forward(inputs: {'image': [B, 3, H, W]} or the tensor) -> [[B, channels[-1], H/16, W/16]].
    Parameters: ``stages.{s}.{i}.conv.{weight,bias}`` (and ``.norm.*`` with BN).
    """

    def __init__(self, depth: int = 16, channels: Sequence[int] = _DEFAULT_CHANNELS,
                 norm_type: Optional[str] = None, freeze_at: int = -1):
        super().__init__()
        if depth not in _CONVS_PER_STAGE:
            raise ConfigError(f"VGG.depth must be one of {sorted(_CONVS_PER_STAGE)}, got {depth}")
        if len(channels) != 5:
            raise ConfigError(f"VGG.channels needs 5 stage widths, got {list(channels)}")
        if norm_type not in (None, "bn", "sync_bn"):
            raise ConfigError(f"VGG.norm_type must be null, 'bn' or 'sync_bn', got {norm_type!r}")
        self.channels = [int(c) for c in channels]
        stages = []
        ch_in = 3
        for num_convs, ch_out in zip(_CONVS_PER_STAGE[depth], self.channels):
            stages.append(nn.Sequential(*[_conv_relu(ch_in if i == 0 else ch_out, ch_out, norm_type)
                                          for i in range(num_convs)]))
            ch_in = ch_out
        self.stages = nn.LayerList(stages)
        self._freeze(int(freeze_at))

    def _freeze(self, freeze_at: int) -> None:
        for stage in self.stages[:freeze_at + 1]:
            for param in stage.parameters():
                param.stop_gradient = True

    @property
    def out_shape(self) -> List[ShapeSpec]:
        return [ShapeSpec(channels=self.channels[-1], stride=16)]

    def forward(self, inputs: Union[Dict[str, paddle.Tensor], paddle.Tensor]) -> List[paddle.Tensor]:
        x = inputs["image"] if isinstance(inputs, dict) else inputs
        last = len(self.stages) - 1
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i < last:
                x = F.max_pool2d(x, kernel_size=2, stride=2, ceil_mode=True)
        return [x]
