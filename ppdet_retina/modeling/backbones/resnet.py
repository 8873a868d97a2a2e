"""ResNet backbone (depths 18-200, variants a/b/c/d) with PaddleDetection's config keys.

Parameter names (ours; ``ppdet_retina.io.checkpoint`` maps PaddleDetection's onto them):

* stem: ``stem.{i}.conv.weight`` and ``stem.{i}.norm.{weight,bias,_mean,_variance}``; one 7x7 conv
  (i = 0) for variants a/b, three 3x3 convs (i = 0, 1, 2) for variants c/d.
* stages: ``res{s}.{j}.{conv1,conv2,conv3,shortcut}.{conv,norm}.*`` for stage s in 2..5 and block j
  (``conv3`` only in bottleneck blocks, ``shortcut`` only in the first block of each stage).
"""

from __future__ import annotations

import warnings
from typing import Dict, List, Sequence, Union

import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from paddle import ParamAttr
from paddle.nn.initializer import KaimingNormal

from ppdet_retina.core.workspace import ConfigError, register, serializable
from ppdet_retina.modeling import layers
from ppdet_retina.modeling.shape_spec import ShapeSpec

__all__ = ["ResNet", "ConvNorm", "BasicBlock", "BottleneckBlock"]

# blocks per stage (res2..res5) and whether the depth uses bottleneck blocks
_DEPTH_CFG = {
    18: ([2, 2, 2, 2], False),
    34: ([3, 4, 6, 3], False),
    50: ([3, 4, 6, 3], True),
    101: ([3, 4, 23, 3], True),
    152: ([3, 8, 36, 3], True),
    200: ([3, 12, 48, 3], True),
}
_STAGE_WIDTHS = [64, 128, 256, 512]
_VARIANTS = ("a", "b", "c", "d")
_NORM_TYPES = ("bn", "sync_bn")

# Paddle's BatchNorm warns on every training forward that it tracks running stats; that is the
# behaviour we want, and the message would flood training logs.
warnings.filterwarnings("ignore", message="When training, we now always track global mean and variance")


class ConvNorm(layers.ConvNorm):
    """ResNet's conv block: :class:`ppdet_retina.modeling.layers.ConvNorm` with a Kaiming-normal conv
    without bias, a BatchNorm whose scale and shift get ``norm_decay`` weight decay (frozen by
    default), and the stage's learning-rate multiplier ``lr`` on every parameter.

    Input [B, ch_in, H, W] -> output [B, ch_out, ceil(H / stride), ceil(W / stride)].
    Parameters: ``conv.weight``, ``norm.{weight,bias,_mean,_variance}``.
    """

    def __init__(self, ch_in: int, ch_out: int, kernel: int, stride: int = 1, groups: int = 1,
                 relu: bool = True, norm_type: str = "bn", norm_decay: float = 0.0,
                 freeze_norm: bool = True, lr: float = 1.0):
        super().__init__(ch_in, ch_out, kernel, stride, groups, norm_type=norm_type, relu=relu,
                         weight_attr=ParamAttr(learning_rate=lr, initializer=KaimingNormal()), bias_attr=False,
                         norm_decay=norm_decay, freeze_norm=freeze_norm, norm_lr=lr)


class AvgPoolShortcut(ConvNorm):
    """Variant-d downsampling shortcut: 2x2 average pool, then 1x1 conv + norm (keeps all input pixels).

    [B, ch_in, H, W] -> [B, ch_out, ceil(H / 2), ceil(W / 2)]. Parameters as :class:`ConvNorm`.
    """

    def __init__(self, ch_in: int, ch_out: int, **norm_kw):
        super().__init__(ch_in, ch_out, 1, 1, relu=False, **norm_kw)
        self.pool = nn.AvgPool2D(kernel_size=2, stride=2, padding=0, ceil_mode=True)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return super().forward(self.pool(x))


def _make_shortcut(ch_in: int, ch_out: int, stride: int, variant: str, norm_kw: dict) -> nn.Layer:
    if variant == "d" and stride == 2:
        return AvgPoolShortcut(ch_in, ch_out, **norm_kw)
    return ConvNorm(ch_in, ch_out, 1, stride, relu=False, **norm_kw)


class BasicBlock(nn.Layer):
    """Two 3x3 convs plus shortcut (ResNet-18/34). [B, ch_in, H, W] -> [B, ch_out, H/stride, W/stride]."""

    expansion = 1

    def __init__(self, ch_in: int, ch_out: int, stride: int, project: bool, variant: str,
                 groups: int, base_width: int, norm_kw: dict):
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ConfigError("ResNet: groups/base_width (ResNeXt) need depth >= 50; "
                              f"got groups={groups}, base_width={base_width} with basic blocks")
        self.conv1 = ConvNorm(ch_in, ch_out, 3, stride, **norm_kw)
        self.conv2 = ConvNorm(ch_out, ch_out, 3, 1, relu=False, **norm_kw)
        self.shortcut = _make_shortcut(ch_in, ch_out, stride, variant, norm_kw) if project else None

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        short = x if self.shortcut is None else self.shortcut(x)
        return F.relu(self.conv2(self.conv1(x)) + short)


class BottleneckBlock(nn.Layer):
    """1x1 reduce, 3x3 (grouped for ResNeXt), 1x1 expand x4, plus shortcut.

    Variant a strides the first 1x1 conv; b/c/d stride the 3x3 conv.
    [B, ch_in, H, W] -> [B, 4 * ch_out, H/stride, W/stride].
    """

    expansion = 4

    def __init__(self, ch_in: int, ch_out: int, stride: int, project: bool, variant: str,
                 groups: int, base_width: int, norm_kw: dict):
        super().__init__()
        width = ch_out if groups == 1 else int(ch_out * base_width / 64.0) * groups
        stride1, stride3 = (stride, 1) if variant == "a" else (1, stride)
        self.conv1 = ConvNorm(ch_in, width, 1, stride1, **norm_kw)
        self.conv2 = ConvNorm(width, width, 3, stride3, groups=groups, **norm_kw)
        self.conv3 = ConvNorm(width, ch_out * 4, 1, 1, relu=False, **norm_kw)
        self.shortcut = _make_shortcut(ch_in, ch_out * 4, stride, variant, norm_kw) if project else None

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        short = x if self.shortcut is None else self.shortcut(x)
        return F.relu(self.conv3(self.conv2(self.conv1(x))) + short)


def _freeze(layer: nn.Layer) -> None:
    for param in layer.parameters():
        param.stop_gradient = True


@register
@serializable
class ResNet(nn.Layer):
    """ResNet backbone returning the C2..C5 feature maps picked by ``return_idx``.

    Computes: stem (7x7/2 conv, or three 3x3 convs 32-32-64 for variants c/d) -> 3x3/2 max pool ->
    stages res2..res5 of basic (depth 18/34) or bottleneck (50+) blocks; the first block of each stage
    has a projection shortcut (variant d: 2x2 avg pool + 1x1 conv when it downsamples).

    Config keys (PaddleDetection's ResNet, same defaults):
      depth (18|34|50|101|152|200), ch_in (stem output width, 64), variant ('a'|'b'|'c'|'d'),
      lr_mult_list (4 learning-rate multipliers, one per stage), groups / base_width (ResNeXt),
      norm_type ('bn'|'sync_bn', also read from the top level; sync_bn synchronises the batch statistics
      across GPU processes), norm_decay (weight decay of norm params, 0.),
      freeze_norm (True: BN uses its running stats always and its affine params are frozen),
      freeze_at (stem and stages 0..freeze_at get stop_gradient; -1 = none; 0 = stem + res2),
      freeze_stem_only (with freeze_at >= 0, freeze only the stem), return_idx (0 = res2 ... 3 = res5),
      num_stages (1..4 stages built), dcn_v2_stages / std_senet (not supported: must be off).
      Our own key: width_mult (scales every channel count; 0.25 gives a narrow demo network).

    Input: ``inputs['image']`` [B, 3, H, W] (or the tensor itself).
    Output: list of [B, out_shape[k].channels, ~H / stride_k, ~W / stride_k], one per ``return_idx``.
    """

    # As in PaddleDetection, a top-level ``norm_type`` (e.g. sync_bn) reaches the backbone.
    __shared__ = ["norm_type"]

    def __init__(self, depth: int = 50, ch_in: int = 64, variant: str = "b",
                 lr_mult_list: Sequence[float] = (1.0, 1.0, 1.0, 1.0), groups: int = 1, base_width: int = 64,
                 norm_type: str = "bn", norm_decay: float = 0.0, freeze_norm: bool = True, freeze_at: int = 0,
                 return_idx: Sequence[int] = (0, 1, 2, 3), dcn_v2_stages: Sequence[int] = (-1,),
                 num_stages: int = 4, std_senet: bool = False, freeze_stem_only: bool = False,
                 width_mult: float = 1.0):
        super().__init__()
        _check_config(depth, variant, lr_mult_list, norm_type, return_idx, dcn_v2_stages, num_stages,
                      std_senet, width_mult)
        counts, bottleneck = _DEPTH_CFG[depth]
        block_cls = BottleneckBlock if bottleneck else BasicBlock
        self.depth = depth
        self.variant = variant
        self.return_idx = list(return_idx)
        self.num_stages = num_stages
        norm_kw = dict(norm_type=norm_type, norm_decay=float(norm_decay), freeze_norm=bool(freeze_norm))

        stem_ch = max(1, int(round(ch_in * width_mult)))
        self.stem = self._build_stem(stem_ch, variant, norm_kw)
        widths = [max(1, int(round(w * width_mult))) for w in _STAGE_WIDTHS]
        self._out_channels = [w * block_cls.expansion for w in widths]
        self.stage_names: List[str] = []
        channels = stem_ch
        for i in range(num_stages):
            name = f"res{i + 2}"
            stage_kw = dict(norm_kw, lr=float(lr_mult_list[i]))
            blocks = nn.LayerList([
                block_cls(channels if j == 0 else self._out_channels[i], widths[i],
                          stride=2 if (j == 0 and i > 0) else 1, project=(j == 0), variant=variant,
                          groups=groups, base_width=base_width, norm_kw=stage_kw)
                for j in range(counts[i])])
            self.add_sublayer(name, blocks)
            self.stage_names.append(name)
            channels = self._out_channels[i]

        if freeze_at >= 0:
            _freeze(self.stem)
            if not freeze_stem_only:
                for i in range(min(freeze_at + 1, num_stages)):
                    _freeze(getattr(self, self.stage_names[i]))

    @staticmethod
    def _build_stem(stem_ch: int, variant: str, norm_kw: dict) -> nn.LayerList:
        if variant in ("c", "d"):
            half = max(1, stem_ch // 2)
            specs = [(3, half, 2), (half, half, 1), (half, stem_ch, 1)]
            return nn.LayerList([ConvNorm(i, o, 3, s, **norm_kw) for i, o, s in specs])
        return nn.LayerList([ConvNorm(3, stem_ch, 7, 2, **norm_kw)])

    @property
    def out_shape(self) -> List[ShapeSpec]:
        return [ShapeSpec(channels=self._out_channels[i], stride=4 * 2 ** i) for i in self.return_idx]

    def forward(self, inputs: Union[Dict[str, paddle.Tensor], paddle.Tensor]) -> List[paddle.Tensor]:
        x = inputs["image"] if isinstance(inputs, dict) else inputs
        for layer in self.stem:
            x = layer(x)
        x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
        outs = []
        for i, name in enumerate(self.stage_names):
            for block in getattr(self, name):
                x = block(x)
            if i in self.return_idx:
                outs.append(x)
        return outs


def _check_config(depth, variant, lr_mult_list, norm_type, return_idx, dcn_v2_stages, num_stages,
                  std_senet, width_mult) -> None:
    if depth not in _DEPTH_CFG:
        raise ConfigError(f"ResNet.depth={depth} is not supported; use one of {sorted(_DEPTH_CFG)}")
    if variant not in _VARIANTS:
        raise ConfigError(f"ResNet.variant='{variant}' is not supported; use one of {list(_VARIANTS)}")
    if norm_type not in _NORM_TYPES:
        raise ConfigError(f"ResNet.norm_type='{norm_type}' is not supported; use 'bn' or 'sync_bn'")
    if not 1 <= num_stages <= 4:
        raise ConfigError(f"ResNet.num_stages={num_stages} must be between 1 and 4")
    if len(lr_mult_list) != 4:
        raise ConfigError(f"ResNet.lr_mult_list needs 4 values (one per stage), got {list(lr_mult_list)}")
    if not return_idx or any(not 0 <= int(i) < num_stages for i in return_idx):
        raise ConfigError(f"ResNet.return_idx={list(return_idx)} must be non-empty, each in 0..{num_stages - 1} "
                          f"(0 = res2 ... 3 = res5; num_stages={num_stages})")
    if list(return_idx) != sorted(set(return_idx)):
        raise ConfigError(f"ResNet.return_idx={list(return_idx)} must be strictly increasing")
    if any(int(s) >= 0 for s in (dcn_v2_stages or [])):
        raise ConfigError(f"ResNet.dcn_v2_stages={list(dcn_v2_stages)}: deformable convs are not supported "
                          "by ppdet_retina; set dcn_v2_stages: [-1]")
    if std_senet:
        raise ConfigError("ResNet.std_senet=true: SE blocks are not supported by ppdet_retina; set std_senet: false")
    if not width_mult > 0:
        raise ConfigError(f"ResNet.width_mult={width_mult} must be > 0")
