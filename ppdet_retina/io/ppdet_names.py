"""PaddleDetection parameter names -> ours.

Weight files come in three key styles, told apart by their names:

* ``ours``: the model's own names (``backbone.res2.0.conv1.conv.weight``);
* ``ppdet``: a PaddleDetection model (``backbone.res2.res2a.branch2a.conv.weight``, ``neck.fpn_6.weight``,
  ``head.retina_cls.weight``);
* ``ppdet_backbone``: a PaddleDetection ImageNet backbone (the backbone names without ``backbone.``).

:func:`convert_ppdet_state_dict` renames the last two onto ours, driven by two tables: plain prefix renames
(``_PREFIX_RENAMES``) and the renames that compute an index (``_PPDET_RULES``).
Only names change here; loading, shape checks and file IO live in :mod:`ppdet_retina.io.checkpoint`.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Dict, Iterable, List, Tuple

__all__ = ["convert_ppdet_state_dict", "detect_key_style"]

# A name matching this comes from PaddleDetection, not from our model.
_PPDET_MARKER = re.compile(
    r"(^|\.)conv1\.conv1(_\d)?\.|(^|\.)res\d\.res\d[a-z]\d*\.|(^|\.)fpn_(inner_)?res\d_sum|^neck\.fpn_\d+\."
    r"|fcos_head_(cls|reg)_tower|(^|\.)retina_(cls|reg)\.|^rpn_head\.rpn_(feat|rois_)|^bbox_head\.bbox_(score|delta)\.")

_BRANCH_TO_OURS = {"branch2a": "conv1", "branch2b": "conv2", "branch2c": "conv3"}


def _block_index(letter: str, digits: str) -> int:
    """PaddleDetection block suffix -> index: 'a' 0, 'b' 1, 'c' 2 ...; deep stages 'a' 0, 'b1' 1, 'b22' 22."""
    return int(digits) if digits else ord(letter) - ord("a")


# Plain renames: a PaddleDetection name prefix and ours; the rest of the name is kept. Tried first.
_PREFIX_RENAMES: Dict[str, str] = {
    # ResNet stem: one 7x7 conv (variant b) or three 3x3 convs (variants c and d)
    "backbone.conv1.conv1.": "backbone.stem.0.", "backbone.conv1.conv1_1.": "backbone.stem.0.",
    "backbone.conv1.conv1_2.": "backbone.stem.1.", "backbone.conv1.conv1_3.": "backbone.stem.2.",
    # RetinaNet head (PaddleDetection builds its towers with FCOSFeat: 'reg' is our box tower)
    "head.conv_feat.fcos_head_cls_tower_conv_": "head.conv_feat.cls_tower.",
    "head.conv_feat.fcos_head_reg_tower_conv_": "head.conv_feat.box_tower.",
    "head.retina_cls.": "head.cls_logits.", "head.retina_reg.": "head.bbox_deltas.",
    # Faster R-CNN: same tensor layouts (cls_score background last, bbox_pred 4 columns per class)
    "rpn_head.rpn_feat.rpn_conv.": "rpn_head.rpn_conv.", "rpn_head.rpn_rois_score.": "rpn_head.objectness.",
    "rpn_head.rpn_rois_delta.": "rpn_head.deltas.",
    "bbox_head.bbox_score.": "bbox_head.cls_score.", "bbox_head.bbox_delta.": "bbox_head.bbox_pred.",
}

# Renames that compute part of our name: (PaddleDetection name pattern, builder of our name), first
# match wins. ``ctx['fpn_levels']`` is the number of FPN input levels of the model (its last one is res5).
_Rule = Tuple["re.Pattern[str]", Callable[["re.Match[str]", Dict[str, int]], str]]
_PPDET_RULES: List[_Rule] = [
    # ResNet blocks: 'res3b' is block 1 of stage 3, deep stages count 'b1', 'b2' ...
    (re.compile(r"^backbone\.res(\d)\.res\d([a-z])(\d*)\.(branch2[abc])\.(.+)$"),
     lambda m, c: f"backbone.res{m[1]}.{_block_index(m[2], m[3])}.{_BRANCH_TO_OURS[m[4]]}.{m[5]}"),
    # variant d nests the shortcut's conv+norm under 'conv' after an avg pool: short.conv.conv.weight
    (re.compile(r"^backbone\.res(\d)\.res\d([a-z])(\d*)\.short\.(?:conv\.)?((?:conv|norm)\..+)$"),
     lambda m, c: f"backbone.res{m[1]}.{_block_index(m[2], m[3])}.shortcut.{m[4]}"),
    # FPN laterals 'fpn_inner_res<N>_sum' (the top one '..._lateral') and outputs 'fpn_res<N>_sum', N = 3..5
    (re.compile(r"^neck\.fpn_(inner_)?res(\d)_sum(?:_lateral)?\.(.+)$"),
     lambda m, c: f"neck.{'lateral' if m[1] else 'output'}_convs.{int(m[2]) - 6 + c['fpn_levels']}.{m[3]}"),
    # FPN extra levels: fpn_6 (P6), fpn_7 (P7)
    (re.compile(r"^neck\.fpn_(\d+)\.(.+)$"), lambda m, c: f"neck.extra_convs.{int(m[1]) - 6}.{m[2]}"),
]


# --------------------------------------------------------------------------- key styles and conversion

def detect_key_style(keys: Iterable[str]) -> str:
    """'ppdet' (full PaddleDetection model), 'ppdet_backbone' (its ImageNet backbone file) or 'ours'."""
    keys = list(keys)
    if not any(_PPDET_MARKER.search(k) for k in keys):
        return "ours"
    if any(k.startswith(("backbone.", "neck.", "head.")) for k in keys):
        return "ppdet"
    return "ppdet_backbone"


def _fpn_levels(model_keys: Iterable[str]) -> int:
    levels = {m[1] for m in (re.match(r"^(?:.*\.)?lateral_convs\.(\d+)\.", k) for k in model_keys) if m}
    return len(levels) if levels else 3


def convert_ppdet_state_dict(state: Dict[str, Any], model_keys: Iterable[str]) -> Dict[str, Any]:
    """Rename a PaddleDetection state dict (full model or ImageNet backbone) to our parameter names.

    ``model_keys`` (the target model's state-dict names) give the context the names need: how many FPN
    input levels there are, and whether the model is a bare backbone (no ``backbone.`` prefix). Names
    of our own style and names no rule knows are kept as they are. Values are not touched.
    """
    model_keys = list(model_keys)
    style = detect_key_style(state)
    if style == "ours":
        return dict(state)
    ctx = {"fpn_levels": _fpn_levels(model_keys)}
    prefix = "backbone." if style == "ppdet_backbone" else ""
    out: Dict[str, Any] = {}
    for key, value in state.items():
        new_key = _rename(prefix + key, ctx)
        if new_key in out:
            raise ValueError(f"two PaddleDetection keys map to '{new_key}' (second: '{key}'); the file mixes "
                             f"naming schemes and cannot be converted")
        out[new_key] = value
    return _align_backbone_prefix(out, model_keys)


def _rename(key: str, ctx: Dict[str, int]) -> str:
    for prefix, ours in _PREFIX_RENAMES.items():
        if key.startswith(prefix):
            return ours + key[len(prefix):]
    for pattern, build in _PPDET_RULES:
        m = pattern.match(key)
        if m:
            return build(m, ctx)
    return key


def _align_backbone_prefix(state: Dict[str, Any], model_keys: List[str]) -> Dict[str, Any]:
    """A bare backbone model has no ``backbone.`` prefix: drop it from the converted names."""
    if any(k.startswith("backbone.") for k in model_keys):
        return state
    return {k[len("backbone."):] if k.startswith("backbone.") else k: v for k, v in state.items()}
