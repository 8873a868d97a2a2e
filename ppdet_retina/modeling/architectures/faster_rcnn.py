"""Faster R-CNN: backbone (-> FPN) -> RPN proposals -> RoI box head, a two-stage detector."""

from __future__ import annotations

from typing import Any, Dict, Optional

import paddle
import paddle.nn as nn

from ppdet_retina.core.workspace import create, register
from ppdet_retina.modeling.architectures.export_surface import Exportable, nms_as_dict
from ppdet_retina.modeling.architectures.stages import attach_stages, build_backbone_and_neck

__all__ = ["FasterRCNN"]


@register
class FasterRCNN(nn.Layer, Exportable):
    """Faster R-CNN (Ren et al. 2015), with FPN (Lin et al. 2017) when a neck is given.

    Config keys: ``backbone`` (ResNet, VGG), ``neck`` (FPN or null), ``rpn_head`` (RPNHead),
    ``bbox_head`` (BBoxHead), ``bbox_post_process`` (BBoxPostProcess). ``from_config`` builds
    backbone -> neck (input_shape = backbone.out_shape) -> rpn_head and bbox_head
    (input_shape = neck or backbone out_shape).

    forward(inputs: dict), keys as in docs/DESIGN.md: ``image`` [B, 3, H, W], ``im_shape``
    [B, 2]; training also ``gt_bbox`` [B, G, 4], ``gt_class`` [B, G, 1], optional
    ``pad_gt_mask`` / ``is_crowd`` [B, G, 1]; eval also ``scale_factor`` [B, 2].
    Returns in training {'loss', 'loss_rpn_cls', 'loss_rpn_reg', 'loss_bbox_cls',
    'loss_bbox_reg'} (loss = their sum); in eval {'bbox': [K, 6] (class, score, x1, y1,
    x2, y2) in original-image pixels, 'bbox_num': [B] int32}.

    Exports (export_surface.py) ``detect`` only: its NMS inputs are a box per class per RoI
    grouped by image, not the [B, M, 4] / [B, C, M] candidates a runtime NMS takes.
    """

    __inject__ = ["bbox_post_process"]

    def __init__(self, backbone: Any, rpn_head: Any, bbox_head: Any, bbox_post_process: Any = "BBoxPostProcess",
                 neck: Optional[Any] = None):
        super().__init__()
        attach_stages(self, ("neck",), backbone=backbone, neck=neck, rpn_head=rpn_head, bbox_head=bbox_head)
        self.bbox_post_process = bbox_post_process

    @classmethod
    def from_config(cls, cfg: dict, **kwargs: Any) -> dict:
        """Build the stages in order, each with the previous stage's ``out_shape``."""
        backbone, neck, out_shape = build_backbone_and_neck(
            "FasterRCNN", cfg, ("backbone", "rpn_head", "bbox_head"),
            "backbone: ResNet, neck: FPN, rpn_head: RPNHead, bbox_head: BBoxHead")
        return {"backbone": backbone, "neck": neck,
                "rpn_head": create(cfg["rpn_head"], input_shape=out_shape),
                "bbox_head": create(cfg["bbox_head"], input_shape=out_shape)}

    def forward(self, inputs: Dict[str, paddle.Tensor]) -> Dict[str, paddle.Tensor]:
        if not isinstance(inputs, dict) or "image" not in inputs or "im_shape" not in inputs:
            raise ValueError("FasterRCNN.forward expects the batch dict with 'image' [B,3,H,W] and "
                             "'im_shape' [B,2] (the reader's Resize/PadBatch provide them)")
        feats = self.backbone(inputs)
        if self.neck is not None:
            feats = self.neck(feats)
        rois, rois_valid, rpn_losses = self.rpn_head(feats, inputs)
        if self.training:
            losses = dict(rpn_losses)
            losses.update(self.bbox_head(feats, rois, rois_valid, inputs))
            losses["loss"] = paddle.add_n([losses[k] for k in
                                           ("loss_rpn_cls", "loss_rpn_reg", "loss_bbox_cls", "loss_bbox_reg")])
            return losses
        if inputs.get("scale_factor") is None:
            raise ValueError("FasterRCNN eval needs 'scale_factor' [B,2] in the batch")
        head_out, (flat_rois, rois_num) = self.bbox_head(feats, rois, rois_valid)
        bbox, bbox_num = self.bbox_post_process(head_out, flat_rois, rois_num, inputs["im_shape"],
                                                inputs["scale_factor"])
        return {"bbox": bbox, "bbox_num": bbox_num}

    def nms_settings(self) -> Dict[str, Any]:
        """The second stage's NMS (applied inside every export)."""
        return nms_as_dict(self.bbox_post_process.nms)
