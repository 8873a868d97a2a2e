"""Pool a fixed-size feature per RoI: RoIAlign (bilinear) or RoIPool (max), single or multi-level.

With several FPN levels each RoI is pooled from one level, chosen by its size
(Lin et al. 2017, eq. 1): a 224 px RoI goes to the canonical level 4 (P4),
twice the size one level up. RoIs of each level are pooled in one call, and
the results are put back in the input order.
"""

from __future__ import annotations

import math
from typing import Any, List, Optional, Sequence

import paddle
from paddle.vision.ops import roi_align, roi_pool

from ppdet_retina.core.workspace import ConfigError, register
from ppdet_retina.modeling.box_ops import box_area, image_index
from ppdet_retina.modeling.shape_spec import ShapeSpec

__all__ = ["RoIAlign", "RoIPool", "assign_fpn_levels"]

# Keeps log2 finite for a zero-area RoI and lets a RoI exactly twice the
# canonical size land on the upper level despite rounding (as Paddle's
# distribute_fpn_proposals does).
_LEVEL_EPS = 1e-6


def assign_fpn_levels(rois: paddle.Tensor, min_level: int, max_level: int, canonical_level: int = 4,
                      canonical_size: float = 224.0) -> paddle.Tensor:
    """Pyramid level [R] int64 of each RoI [R, 4]: floor(canonical_level + log2(sqrt(area) / canonical_size)).

    Clamped to [min_level, max_level]; levels are absolute (P2 = 2).
    """
    scale = paddle.sqrt(box_area(rois))
    level = paddle.floor(paddle.log2(scale / canonical_size + _LEVEL_EPS) + canonical_level)
    return level.clip(min=min_level, max=max_level).astype("int64")


class _RoIPooler:
    """Shared multi-level dispatch of :class:`RoIAlign` and :class:`RoIPool`."""

    def __init__(self, resolution: int, spatial_scale: Sequence[float] | float, canonical_level: int,
                 canonical_size: float, start_level: int, end_level: int):
        if int(resolution) <= 0:
            raise ConfigError(f"{type(self).__name__}.resolution must be > 0, got {resolution}")
        if not 0 <= int(start_level) <= int(end_level):
            raise ConfigError(f"{type(self).__name__}: need 0 <= start_level <= end_level, got "
                              f"start_level={start_level}, end_level={end_level}")
        self.resolution = int(resolution)
        scales = spatial_scale if isinstance(spatial_scale, (list, tuple)) else [spatial_scale]
        self.spatial_scale = [float(s) for s in scales]
        self.canonical_level = int(canonical_level)
        self.canonical_size = float(canonical_size)
        self.start_level = int(start_level)
        self.end_level = int(end_level)

    @classmethod
    def from_config(cls, cfg: dict, input_shape: Optional[Sequence[ShapeSpec]] = None, **_: Any) -> dict:
        if input_shape is None:
            return {}
        shapes = input_shape if isinstance(input_shape, (list, tuple)) else [input_shape]
        return {"spatial_scale": [1.0 / s.stride for s in shapes]}

    def _pool(self, feat: paddle.Tensor, rois: paddle.Tensor, rois_num: paddle.Tensor,
              scale: float) -> paddle.Tensor:
        raise NotImplementedError

    def __call__(self, feats: Sequence[paddle.Tensor], rois: paddle.Tensor,
                 rois_num: paddle.Tensor) -> paddle.Tensor:
        rois_num = rois_num.astype("int32")
        if len(feats) == 1 or self.start_level == self.end_level:
            level = min(self.start_level, len(feats) - 1)
            return self._pool(feats[level], rois, rois_num, self._scale(level))
        return self._pool_by_level(feats, rois, rois_num)

    def _scale(self, level: int) -> float:
        if level >= len(self.spatial_scale):
            raise ConfigError(f"{type(self).__name__}: no spatial_scale for feature level {level} "
                              f"(spatial_scale={self.spatial_scale}); build it from the neck's out_shape")
        return self.spatial_scale[level]

    def _pool_by_level(self, feats: Sequence[paddle.Tensor], rois: paddle.Tensor,
                       rois_num: paddle.Tensor) -> paddle.Tensor:
        if self.end_level >= len(feats):
            raise ConfigError(f"{type(self).__name__}.end_level={self.end_level} but only {len(feats)} "
                              "feature maps were given")
        # Feature index 0 is the finest map, stride 1 / spatial_scale[0].
        finest = int(round(math.log2(1.0 / self._scale(0))))
        levels = assign_fpn_levels(rois, finest + self.start_level, finest + self.end_level,
                                   self.canonical_level, self.canonical_size) - finest
        image_idx = image_index(rois_num)
        batch = rois_num.shape[0]
        pooled: List[paddle.Tensor] = []
        order: List[paddle.Tensor] = []
        for level in range(self.start_level, self.end_level + 1):
            idx = paddle.nonzero(levels == level).flatten()
            level_num = paddle.bincount(paddle.gather(image_idx, idx), minlength=batch).astype("int32")
            pooled.append(self._pool(feats[level], paddle.gather(rois, idx), level_num, self._scale(level)))
            order.append(idx)
        restore = paddle.argsort(paddle.concat(order))
        return paddle.gather(paddle.concat(pooled, axis=0), restore)


@register
class RoIAlign(_RoIPooler):
    """Bilinear RoI pooling to ``resolution`` x ``resolution`` per RoI.

    Config keys: resolution (14; 7 in the FPN configs), spatial_scale (1 / stride per
    feature map; from input_shape when built from a config), sampling_ratio (0: adaptive
    ceil(roi_size / resolution) samples per bin), canonical_level (4) and canonical_size
    (224) of the FPN level rule (``canconical_level``, PaddleDetection's spelling, is also
    accepted), start_level / end_level (0 / 3: feature maps 0..3, P2-P5, take RoIs),
    aligned (True: half-pixel shift, Detectron2's ROIAlignV2).

    Call: ``extractor(feats, rois [R, 4], rois_num [B])`` -> [R, C, resolution, resolution].
    """

    def __init__(self, resolution: int = 14, spatial_scale: Sequence[float] | float = 0.0625,
                 sampling_ratio: int = 0, canonical_level: int = 4, canonical_size: float = 224.0,
                 start_level: int = 0, end_level: int = 3, aligned: bool = False,
                 canconical_level: Optional[int] = None):
        level = canonical_level if canconical_level is None else canconical_level
        super().__init__(resolution, spatial_scale, level, canonical_size, start_level, end_level)
        self.sampling_ratio = int(sampling_ratio)
        self.aligned = bool(aligned)

    def _pool(self, feat, rois, rois_num, scale):
        return roi_align(feat, rois, rois_num, self.resolution, spatial_scale=scale,
                         sampling_ratio=self.sampling_ratio, aligned=self.aligned)


@register
class RoIPool(_RoIPooler):
    """Max RoI pooling (Fast R-CNN) to ``resolution`` x ``resolution`` per RoI.

    Config keys: resolution (7), spatial_scale, canonical_level, canonical_size,
    start_level, end_level, as :class:`RoIAlign`.

    Call: ``extractor(feats, rois [R, 4], rois_num [B])`` -> [R, C, resolution, resolution].
    """

    def __init__(self, resolution: int = 7, spatial_scale: Sequence[float] | float = 0.0625,
                 canonical_level: int = 4, canonical_size: float = 224.0, start_level: int = 0,
                 end_level: int = 3):
        super().__init__(resolution, spatial_scale, canonical_level, canonical_size, start_level, end_level)

    def _pool(self, feat, rois, rois_num, scale):
        return roi_pool(feat, rois, rois_num, self.resolution, spatial_scale=scale)
