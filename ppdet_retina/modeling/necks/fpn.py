"""Feature Pyramid Network neck with PaddleDetection's config keys.

Parameter names (ours; ``ppdet_retina.io.checkpoint`` maps PaddleDetection's onto them), with
input level i = 0 the finest backbone map given:

* ``lateral_convs.{i}.{weight,bias}``: 1x1 conv of input level i (PaddleDetection
  ``fpn_inner_res{k}_sum_lateral``, the coarsest one ``fpn_inner_res5_sum``);
* ``output_convs.{i}.{weight,bias}``: 3x3 conv giving output level i (``fpn_res{k}_sum``);
* ``extra_convs.{j}.{weight,bias}``: stride-2 3x3 convs of the extra levels (``fpn_{6 + j}``).

With ``norm_type`` set each of these is a conv without bias plus a norm: ``.conv.weight`` and
``.norm.*`` under the same prefixes.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from paddle import ParamAttr
from paddle.nn.initializer import Constant, XavierUniform

from ppdet_retina.core.workspace import ConfigError, register, serializable
from ppdet_retina.modeling.layers import NORM_TYPES, ConvNorm
from ppdet_retina.modeling.shape_spec import ShapeSpec

__all__ = ["FPN"]


def _conv(ch_in: int, ch_out: int, kernel: int, stride: int, fan_out: int, norm_type: Optional[str],
          norm_decay: float, freeze_norm: bool) -> nn.Layer:
    """A plain conv with bias, or conv without bias + norm when ``norm_type`` is set; Xavier-uniform init."""
    weight_attr = ParamAttr(initializer=XavierUniform(fan_out=fan_out))
    if norm_type is not None:
        return ConvNorm(ch_in, ch_out, kernel, stride, norm_type=norm_type, relu=False, weight_attr=weight_attr,
                        bias_attr=False, norm_decay=norm_decay, freeze_norm=freeze_norm)
    return nn.Conv2D(ch_in, ch_out, kernel, stride=stride, padding=(kernel - 1) // 2, weight_attr=weight_attr,
                     bias_attr=ParamAttr(initializer=Constant(0.0)))


@register
@serializable
class FPN(nn.Layer):
    """Feature Pyramid Network: backbone maps C_i -> pyramid maps P_i of ``out_channel`` channels.

    Computes: lateral 1x1 conv per input; top-down, each coarser sum is nearest-upsampled (to the finer
    map's size; x2 when sizes divide) and added; a 3x3 conv per level. Then ``extra_stage`` coarser
    levels: with ``has_extra_convs``, stride-2 3x3 convs, the first on C5 (``use_c5``) or on the top P
    level, each later one on the previous extra level (after a ReLU if ``relu_before_extra_convs``);
    without, a 1x1 max-pool of stride 2 on the previous level (Faster R-CNN's P6).

    Config keys (PaddleDetection's FPN, same defaults): in_channels, out_channel, spatial_scales
    (1 / stride per input; both filled from the backbone's out_shape when built from a config),
    has_extra_convs, extra_stage, use_c5, norm_type (None|'bn'|'sync_bn'|'gn'), norm_decay, freeze_norm,
    relu_before_extra_convs.

    Input: list of len(in_channels) maps [B, in_channels[i], H_i, W_i], finest first.
    Output: list of len(in_channels) + extra_stage maps [B, out_channel, h, w], finest first; their
    strides are ``out_shape``.
    """

    def __init__(self, in_channels: Sequence[int] = (512, 1024, 2048), out_channel: int = 256,
                 spatial_scales: Sequence[float] = (0.25, 0.125, 0.0625, 0.03125), has_extra_convs: bool = False,
                 extra_stage: int = 1, use_c5: bool = True, norm_type: Optional[str] = None,
                 norm_decay: float = 0.0, freeze_norm: bool = False, relu_before_extra_convs: bool = True):
        super().__init__()
        in_channels = [int(c) for c in in_channels]
        _check_config(in_channels, spatial_scales, extra_stage, norm_type)
        self.in_channels = in_channels
        self.out_channel = int(out_channel)
        # PaddleDetection's default lists 4 scales (C2..C5) for 3 inputs (C3..C5): inputs end at the coarsest.
        self.spatial_scales = [float(s) for s in spatial_scales][-len(in_channels):]
        self.has_extra_convs = bool(has_extra_convs)
        self.extra_stage = int(extra_stage)
        self.use_c5 = bool(use_c5)
        self.relu_before_extra_convs = bool(relu_before_extra_convs)
        conv_kw = dict(norm_type=norm_type, norm_decay=float(norm_decay), freeze_norm=bool(freeze_norm))
        out3x3_fan = self.out_channel * 9
        self.lateral_convs = nn.LayerList(
            [_conv(c, self.out_channel, 1, 1, c, **conv_kw) for c in in_channels])
        self.output_convs = nn.LayerList(
            [_conv(self.out_channel, self.out_channel, 3, 1, out3x3_fan, **conv_kw) for _ in in_channels])
        extra = []
        if self.has_extra_convs:
            for j in range(self.extra_stage):
                ch_in = in_channels[-1] if (j == 0 and self.use_c5) else self.out_channel
                extra.append(_conv(ch_in, self.out_channel, 3, 2, out3x3_fan, **conv_kw))
        self.extra_convs = nn.LayerList(extra)

    @classmethod
    def from_config(cls, cfg: dict, input_shape: Optional[Sequence[ShapeSpec]] = None, **_: object) -> Dict:
        if input_shape is None:
            return {}
        return {"in_channels": [s.channels for s in input_shape],
                "spatial_scales": [1.0 / s.stride for s in input_shape]}

    @property
    def out_shape(self) -> List[ShapeSpec]:
        strides = [int(round(1.0 / s)) for s in self.spatial_scales]
        strides += [strides[-1] * 2 ** (j + 1) for j in range(self.extra_stage)]
        return [ShapeSpec(channels=self.out_channel, stride=s) for s in strides]

    def forward(self, feats: Sequence[paddle.Tensor]) -> List[paddle.Tensor]:
        if len(feats) != len(self.in_channels):
            raise ValueError(f"FPN got {len(feats)} feature maps but was built for {len(self.in_channels)} "
                             f"(in_channels={self.in_channels}); check the backbone's return_idx")
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
        for i in range(len(laterals) - 1, 0, -1):
            finer = laterals[i - 1]
            # Upsampling to the finer map's exact size keeps odd input sizes working (x2 would be off by one).
            laterals[i - 1] = finer + F.interpolate(laterals[i], size=finer.shape[2:], mode="nearest")
        outs = [conv(x) for conv, x in zip(self.output_convs, laterals)]
        outs.extend(self._extra_levels(feats[-1], outs[-1]))
        return outs

    def _extra_levels(self, c_top: paddle.Tensor, p_top: paddle.Tensor) -> List[paddle.Tensor]:
        extra: List[paddle.Tensor] = []
        if not self.has_extra_convs:
            prev = p_top
            for _ in range(self.extra_stage):
                prev = F.max_pool2d(prev, kernel_size=1, stride=2)
                extra.append(prev)
            return extra
        for j, conv in enumerate(self.extra_convs):
            if j == 0:
                src = c_top if self.use_c5 else p_top
            else:
                src = F.relu(extra[-1]) if self.relu_before_extra_convs else extra[-1]
            extra.append(conv(src))
        return extra


def _check_config(in_channels: List[int], spatial_scales: Sequence[float], extra_stage: int,
                  norm_type: Optional[str]) -> None:
    if not in_channels:
        raise ConfigError("FPN.in_channels is empty; give the backbone's output channels (e.g. [512, 1024, 2048])")
    if len(spatial_scales) < len(in_channels):
        raise ConfigError(f"FPN.spatial_scales={list(spatial_scales)} needs one value (1/stride) per input "
                          f"level; in_channels has {len(in_channels)}")
    if any(not 0 < float(s) <= 1 for s in spatial_scales):
        raise ConfigError(f"FPN.spatial_scales={list(spatial_scales)} must be 1/stride values in (0, 1]")
    if extra_stage < 0:
        raise ConfigError(f"FPN.extra_stage={extra_stage} must be >= 0")
    if norm_type not in NORM_TYPES:
        raise ConfigError(f"FPN.norm_type='{norm_type}' is not supported; use null, 'bn', 'sync_bn' or 'gn'")
