"""The shape contract between backbone, neck and head."""

from typing import NamedTuple


class ShapeSpec(NamedTuple):
    """One feature map's channel count and stride (input pixels per feature pixel)."""

    channels: int
    stride: int


def in_channel_kwargs(input_shape) -> dict:
    """``{'in_channel': C}`` of the first level of ``input_shape`` (a ShapeSpec or a list), or {} without one.

    The ``from_config`` of heads that take one channel count from the stage before them.
    """
    if input_shape is None:
        return {}
    first = input_shape[0] if isinstance(input_shape, (list, tuple)) else input_shape
    return {"in_channel": first.channels}
