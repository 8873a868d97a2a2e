"""RetinaNet: backbone -> FPN -> dense head (focal loss), one-stage detector."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import paddle
import paddle.nn as nn

from ppdet_retina.core.workspace import create, register
from ppdet_retina.modeling.architectures.export_surface import Exportable, nms_as_dict
from ppdet_retina.modeling.architectures.stages import attach_stages, build_backbone_and_neck

__all__ = ["RetinaNet"]


@register
class RetinaNet(nn.Layer, Exportable):
    """RetinaNet (Lin et al., "Focal Loss for Dense Object Detection", 2017).

    Config keys: ``backbone`` (e.g. ResNet), ``neck`` (e.g. FPN), ``head``
    (e.g. RetinaHead): component names or sections. ``from_config`` builds
    them in order, giving the neck ``input_shape=backbone.out_shape`` and the
    head ``input_shape=neck.out_shape``.

    forward(inputs: dict), keys as in docs/DESIGN.md:
        always ``image`` [B, 3, H, W] float32;
        training also ``gt_bbox`` [B, G, 4] (x1y1x2y2, resized pixels),
        ``gt_class`` [B, G, 1] int32 (0..C-1), ``pad_gt_mask`` [B, G, 1] and
        ``is_crowd`` [B, G, 1] (optional);
        eval also ``im_shape`` [B, 2] (h, w) and ``scale_factor`` [B, 2] (sy, sx).
    Returns in training ``{'loss', 'loss_cls', 'loss_reg'}`` (scalars,
    loss = loss_cls + loss_reg); in eval ``{'bbox': [K, 6] (class, score,
    x1, y1, x2, y2) in original-image pixels, 'bbox_num': [B] int32}``,
    image i owning the i-th block of ``bbox_num[i]`` rows.

    Exports (export_surface.py) ``detect``, ``candidates`` (the head's
    ``candidates``: boxes [B, M, 4], scores [B, C, M]) and ``raw``
    (``cls_logits_<l>`` [B, A*C, h_l, w_l] per level, then ``bbox_deltas_<l>`` [B, A*4, h_l, w_l]).
    """

    export_modes = ("detect", "candidates", "raw")

    def __init__(self, backbone: Any, neck: Any, head: Any):
        super().__init__()
        attach_stages(self, backbone=backbone, neck=neck, head=head)

    @classmethod
    def from_config(cls, cfg: dict, **kwargs: Any) -> dict:
        """Build backbone, neck and head, each with the previous stage's ``out_shape``."""
        backbone, neck, out_shape = build_backbone_and_neck(
            "RetinaNet", cfg, ("backbone", "neck", "head"), "backbone: ResNet, neck: FPN, head: RetinaHead")
        return {"backbone": backbone, "neck": neck, "head": create(cfg["head"], input_shape=out_shape)}

    def _head_outputs(self, inputs: Dict[str, paddle.Tensor]) -> Tuple[List[paddle.Tensor], List[paddle.Tensor]]:
        """backbone -> neck -> head: the per-level (cls_logits, bbox_deltas) lists."""
        return self.head(self.neck(self.backbone(inputs)))

    def forward(self, inputs: Dict[str, paddle.Tensor]) -> Dict[str, paddle.Tensor]:
        if not isinstance(inputs, dict) or "image" not in inputs:
            raise ValueError("RetinaNet.forward expects the batch dict with an 'image' [B,3,H,W] entry")
        head_outs = self._head_outputs(inputs)
        if self.training:
            losses = self.head.get_loss(head_outs, inputs)
            losses["loss"] = losses["loss_cls"] + losses["loss_reg"]
            return losses
        for key in ("im_shape", "scale_factor"):
            if inputs.get(key) is None:
                raise ValueError(f"RetinaNet eval needs '{key}' [B,2] in the batch (the eval reader's "
                                 f"Resize/PadBatch provide it)")
        bbox, bbox_num = self.head.post_process(head_outs, inputs["im_shape"], inputs["scale_factor"])
        return {"bbox": bbox, "bbox_num": bbox_num}

    # ------------------------------------------------------------------ export surface

    def candidates(self, inputs: Dict[str, paddle.Tensor]) -> Tuple[paddle.Tensor, paddle.Tensor]:
        """boxes [B, M, 4] in original pixels and scores [B, C, M] of a batch: what the NMS would see
        (the head's ``decode_candidates`` of this batch's head outputs)."""
        head_outs = self._head_outputs(inputs)
        return self.head.decode_candidates(head_outs, inputs["im_shape"], inputs["scale_factor"])

    def export_outputs(self, inputs: Dict[str, paddle.Tensor], mode: str) -> Tuple[paddle.Tensor, ...]:
        self.check_export_mode(mode)
        if mode == "detect":
            return super().export_outputs(inputs, mode)
        if mode == "candidates":
            return self.candidates(inputs)
        cls_logits, deltas = self._head_outputs(inputs)
        return tuple(cls_logits) + tuple(deltas)

    def export_output_names(self, mode: str) -> List[str]:
        self.check_export_mode(mode)
        if mode == "detect":
            return super().export_output_names(mode)
        if mode == "candidates":
            return ["boxes", "scores"]
        levels = len(self.neck.out_shape)
        return [f"cls_logits_{i}" for i in range(levels)] + [f"bbox_deltas_{i}" for i in range(levels)]

    def nms_settings(self) -> Dict[str, Any]:
        return nms_as_dict(self.head.nms)

    def decode_settings(self) -> Optional[Dict[str, Any]]:
        return self.head.decode_settings()
