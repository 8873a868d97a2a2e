"""Anchor generators for dense detectors (RetinaNet) and RPNs (Faster R-CNN).

Layout shared with the heads: in one level, anchors are ordered row-major
over feature locations (y, then x) and the A anchors of one location are
contiguous, so anchor ``a`` at location ``(y, x)`` is row ``(y * W + x) * A + a``.
Within a location the order is size-major: for each size, for each ratio.
A ratio is h / w and an anchor of size s has area s * s.
"""

from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple, Union

import numpy as np
import paddle

from ppdet_retina.core.workspace import ConfigError, register

__all__ = ["AnchorGenerator", "RetinaAnchorGenerator", "cell_anchors", "grid_anchors"]


def cell_anchors(sizes: Sequence[float], ratios: Sequence[float]) -> np.ndarray:
    """The A = len(sizes) * len(ratios) anchors of one location centred at 0, [A, 4] float64."""
    rows = []
    for size in sizes:
        for ratio in ratios:
            w = math.sqrt(size * size / ratio)
            h = w * ratio
            rows.append([-0.5 * w, -0.5 * h, 0.5 * w, 0.5 * h])
    return np.asarray(rows, dtype=np.float64).reshape(-1, 4)


def grid_anchors(cell: np.ndarray, height: int, width: int, stride: float, offset: float) -> np.ndarray:
    """Tile ``cell`` [A, 4] over a ``height`` x ``width`` grid -> [height*width*A, 4] float32."""
    xs = np.arange(width, dtype=np.float64) * stride + offset * stride
    ys = np.arange(height, dtype=np.float64) * stride + offset * stride
    cy, cx = np.meshgrid(ys, xs, indexing="ij")  # row-major over (y, x)
    shifts = np.stack([cx, cy, cx, cy], axis=-1).reshape(-1, 1, 4)
    return (shifts + cell.reshape(1, -1, 4)).reshape(-1, 4).astype(np.float32)


def _grid_anchors_paddle(cell: paddle.Tensor, height, width, stride: float, offset: float) -> paddle.Tensor:
    """:func:`grid_anchors` in paddle ops, for sizes only known at run time (exported graphs)."""
    xs = paddle.arange(0, width, dtype="float32") * stride + offset * stride
    ys = paddle.arange(0, height, dtype="float32") * stride + offset * stride
    cy, cx = paddle.meshgrid(ys, xs)
    shifts = paddle.stack([cx, cy, cx, cy], axis=-1).reshape([-1, 1, 4])
    return (shifts + cell.reshape([1, -1, 4])).reshape([-1, 4])


def _is_tensor(value) -> bool:
    """True for a dygraph tensor and for a value of a graph being traced for export."""
    types = (paddle.Tensor,) + ((paddle.pir.Value,) if hasattr(paddle, "pir") else ())
    return isinstance(value, types)


def _per_level(value, num_levels: int, key: str) -> List[list]:
    """Accept one list for all levels or one list per level (PaddleDetection allows both)."""
    if not isinstance(value, (list, tuple)) or len(value) == 0:
        raise ConfigError(f"AnchorGenerator.{key} must be a non-empty list, got {value!r}")
    if isinstance(value[0], (list, tuple)):
        if len(value) != num_levels:
            raise ConfigError(
                f"AnchorGenerator.{key} has {len(value)} per-level lists but strides has "
                f"{num_levels} levels; give one list per stride or a single flat list")
        return [[float(v) for v in level] for level in value]
    return [[float(v) for v in value] for _ in range(num_levels)]


@register
class AnchorGenerator:
    """Anchors for every feature level, as used by Faster R-CNN's RPN.

    Config keys:
        anchor_sizes: sizes (sqrt of area, pixels); a flat list used at every
            level, or a list of lists, one per level (``[[32], [64], ...]``).
        aspect_ratios: h / w ratios; flat, or one list per level.
        strides: one stride per level; their count sets the number of levels.
        offset: anchor centre offset in units of stride (0 = at ``x*stride``).
        variance: accepted and ignored (``__ignored__``).

    Call: ``gen(feature_sizes)`` with a list of ``(h, w)`` or of feature tensors
    [B, C, h, w], returns one float32 tensor [h*w*A, 4] per level (x1y1x2y2).
    Results for a given (level, h, w) are cached.
    """

    __ignored__ = {"variance": "PaddleDetection's box-coder weights; the heads' own coder weights are used"}

    def __init__(self, anchor_sizes: Sequence = (32, 64, 128, 256, 512),
                 aspect_ratios: Sequence = (0.5, 1.0, 2.0), strides: Sequence[float] = (16.0,),
                 offset: float = 0.0):
        if not isinstance(strides, (list, tuple)) or len(strides) == 0:
            raise ConfigError(f"AnchorGenerator.strides must be a non-empty list, got {strides!r}")
        self.strides = [float(s) for s in strides]
        self.anchor_sizes = _per_level(list(anchor_sizes), len(self.strides), "anchor_sizes")
        self.aspect_ratios = _per_level(list(aspect_ratios), len(self.strides), "aspect_ratios")
        self._check_positive()
        self.offset = float(offset)
        self.cells = [cell_anchors(s, r) for s, r in zip(self.anchor_sizes, self.aspect_ratios)]
        counts = {len(c) for c in self.cells}
        if len(counts) != 1:
            raise ConfigError(
                "AnchorGenerator: every level must have the same number of anchors per location "
                f"(len(anchor_sizes[i]) * len(aspect_ratios[i])), got {sorted(counts)}")
        self._cache: Dict[Tuple[int, int, int, str], paddle.Tensor] = {}

    def _check_positive(self) -> None:
        for key, levels in (("anchor_sizes", self.anchor_sizes), ("aspect_ratios", self.aspect_ratios),
                            ("strides", [self.strides])):
            if any(v <= 0 for level in levels for v in level):
                raise ConfigError(f"AnchorGenerator.{key} must all be > 0, got {levels}")

    @property
    def num_anchors(self) -> int:
        """Anchors per feature location (A)."""
        return len(self.cells[0])

    @property
    def num_levels(self) -> int:
        return len(self.strides)

    def __call__(self, feature_sizes: Sequence[Union[Tuple[int, int], paddle.Tensor]]) -> List[paddle.Tensor]:
        if len(feature_sizes) != self.num_levels:
            raise ValueError(
                f"AnchorGenerator got {len(feature_sizes)} feature levels but has {self.num_levels} "
                f"strides {self.strides}; the neck's outputs and anchor_generator.strides must agree")
        return [self._level(i, size) for i, size in enumerate(feature_sizes)]

    def _level(self, level: int, size) -> paddle.Tensor:
        if _is_tensor(size):
            if paddle.in_dynamic_mode():
                h, w = int(size.shape[2]), int(size.shape[3])
            else:
                # Shapes are unknown while tracing an exported graph: build the
                # grid from the run-time shape instead of the cache.
                shape = paddle.shape(size)
                cell = paddle.to_tensor(self.cells[level].astype(np.float32))
                return _grid_anchors_paddle(cell, shape[2], shape[3], self.strides[level], self.offset)
        else:
            h, w = int(size[0]), int(size[1])
        key = (level, h, w, str(paddle.get_device()))
        anchors = self._cache.get(key)
        if anchors is None:
            grid = grid_anchors(self.cells[level], h, w, self.strides[level], self.offset)
            anchors = paddle.to_tensor(grid, dtype="float32")
            anchors.stop_gradient = True
            self._cache[key] = anchors
        return anchors


@register
class RetinaAnchorGenerator(AnchorGenerator):
    """RetinaNet anchors: ``scales_per_octave`` sizes per level between octaves.

    Level ``l`` with stride ``s`` gets sizes ``s * octave_base_scale * 2**(i / scales_per_octave)``
    for ``i`` in ``range(scales_per_octave)`` (P3: 32, 40.3, 50.8), each with every
    aspect ratio, so A = scales_per_octave * len(aspect_ratios) (9 by default).

    Config keys: octave_base_scale, scales_per_octave, aspect_ratios, strides,
    offset; variance is ignored (see :class:`AnchorGenerator`). Call and output as there:
    one [h*w*A, 4] float32 tensor per level.
    """

    def __init__(self, octave_base_scale: float = 4, scales_per_octave: int = 3,
                 aspect_ratios: Sequence = (0.5, 1.0, 2.0),
                 strides: Sequence[float] = (8.0, 16.0, 32.0, 64.0, 128.0), offset: float = 0.0):
        if int(scales_per_octave) < 1:
            raise ConfigError(f"RetinaAnchorGenerator.scales_per_octave must be >= 1, got {scales_per_octave}")
        if not isinstance(strides, (list, tuple)) or len(strides) == 0:
            raise ConfigError(f"RetinaAnchorGenerator.strides must be a non-empty list, got {strides!r}")
        self.octave_base_scale = float(octave_base_scale)
        self.scales_per_octave = int(scales_per_octave)
        sizes = [[float(stride) * self.octave_base_scale * 2.0 ** (i / self.scales_per_octave)
                  for i in range(self.scales_per_octave)] for stride in strides]
        super().__init__(anchor_sizes=sizes, aspect_ratios=aspect_ratios, strides=strides, offset=offset)
