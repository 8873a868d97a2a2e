"""What every architecture does with its stages: build them in order, attach them once checked.

An architecture is built from a config by ``create``; its ``from_config`` builds the backbone, then the
neck with the backbone's ``out_shape``, then the heads with the last stage's ``out_shape``.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import paddle.nn as nn

from ppdet_retina.core.workspace import ConfigError, create
from ppdet_retina.modeling.shape_spec import ShapeSpec

__all__ = ["attach_stages", "build_backbone_and_neck"]


def attach_stages(layer: nn.Layer, optional: Sequence[str] = (), **stages: Any) -> None:
    """Set each stage as a sublayer of ``layer`` (``layer.backbone = ...``).

    ConfigError unless every stage is a built layer, or None for a key in ``optional``: a name or a
    dict means the config was bypassed. Messages name ``layer``'s class, a subclass included.
    """
    owner = type(layer).__name__
    for key, value in stages.items():
        if not (isinstance(value, nn.Layer) or (value is None and key in optional)):
            raise ConfigError(f"{owner}.{key} must be a built layer (got {value!r}); build the model "
                              f"with create('{owner}') so that the {key} section is used")
        setattr(layer, key, value)


def build_backbone_and_neck(owner: str, cfg: dict, required: Sequence[str],
                            example: str) -> Tuple[nn.Layer, Optional[nn.Layer], List[ShapeSpec]]:
    """(backbone, neck or None, the out_shape the heads take) from ``cfg`` (the resolved keys).

    Each key of ``required`` must be set; the error names it and shows ``example``.
    """
    for key in required:
        if cfg.get(key) is None:
            raise ConfigError(f"{owner}: config key '{key}' is missing; e.g. {example}")
    backbone = create(cfg["backbone"])
    out_shape = backbone.out_shape
    neck = None
    if cfg.get("neck"):
        neck = create(cfg["neck"], input_shape=out_shape)
        out_shape = neck.out_shape
    return backbone, neck, out_shape
