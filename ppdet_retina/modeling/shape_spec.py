"""The shape contract between backbone, neck and head."""

from typing import NamedTuple


class ShapeSpec(NamedTuple):
    """One feature map's channel count and stride (input pixels per feature pixel)."""

    channels: int
    stride: int
