"""Faster R-CNN's post-processing: decode the RoI head's class-specific deltas, NMS, back to original pixels.

The RoI head's output layout is described in ``bbox_head.py``: probabilities [R, C+1] with background
last, deltas [R, 4C] with class c at columns 4c..4c+3.
"""

from __future__ import annotations

from typing import Any, Sequence, Tuple

import paddle

from ppdet_retina.core.workspace import ConfigError, build_component, register
from ppdet_retina.modeling.box_ops import clip_boxes, delta2bbox, image_index, xyxy_scale

__all__ = ["RCNNBox", "BBoxPostProcess", "rescale_to_original"]

_EXPORT_ONNX_WHY = "PaddleDetection's ONNX export switch; export/onnx.py converts the one exported graph"


@register
class RCNNBox:
    """Decode class-specific deltas of the RoI head into boxes in resized-image pixels.

    boxes = delta2bbox(deltas / prior_box_var, roi) per class, clipped to the resized
    image (im_shape). They stay in the resized frame: PaddleDetection runs the NMS there and
    rescales afterwards (:class:`BBoxPostProcess`). The background score column is dropped.

    Config keys: prior_box_var ([10, 10, 5, 5]; must equal BBoxHead.bbox_weight),
    num_classes (shared); code_type and box_normalized are checked (only centre-size decoding
    in pixels exists); export_onnx is accepted and ignored (``__ignored__``).

    Call: ``decode((probs [R, C+1], deltas [R, 4C]), rois [R, 4], rois_num [B], im_shape [B, 2],
    scale_factor [B, 2])`` -> (boxes [R, C, 4], scores [R, C]); scale_factor is not read
    (kept for PaddleDetection's call signature).
    """

    # export_onnx stays shared so that a top-level key of that name is accepted too.
    __shared__ = ["num_classes", "export_onnx"]
    __ignored__ = {"export_onnx": _EXPORT_ONNX_WHY}

    def __init__(self, prior_box_var: Sequence[float] = (10.0, 10.0, 5.0, 5.0),
                 code_type: str = "decode_center_size", box_normalized: bool = False,
                 num_classes: int = 80):
        if code_type != "decode_center_size" or box_normalized:
            raise ConfigError("RCNNBox supports only code_type: decode_center_size with "
                              f"box_normalized: false, got {code_type!r}, {box_normalized!r}")
        self.prior_box_var = [float(v) for v in prior_box_var]
        self.num_classes = int(num_classes)

    def __call__(self, head_out: Tuple[paddle.Tensor, paddle.Tensor], rois: paddle.Tensor,
                 rois_num: paddle.Tensor, im_shape: paddle.Tensor,
                 scale_factor: paddle.Tensor) -> Tuple[paddle.Tensor, paddle.Tensor]:
        probs, deltas = head_out
        num_rois = deltas.shape[0]
        per_class = deltas.reshape([num_rois, -1, 4])
        boxes = delta2bbox(per_class, rois.unsqueeze(1), self.prior_box_var)  # [R, C, 4]
        roi_shape = paddle.gather(im_shape.astype(boxes.dtype), image_index(rois_num))  # [R, 2]
        return clip_boxes(boxes, roi_shape), probs[:, :-1]


@register
class BBoxPostProcess:
    """Decode the RoI head's output, run class-aware NMS per image, rescale to the original image.

    PaddleDetection's order, which its weights are judged with: decode and clip in the resized
    image, NMS there, then divide by scale_factor and clip to the original size (see
    :func:`rescale_to_original`). A row that the clipping leaves with no width or height
    keeps its place with class -1 (every consumer skips negative classes).

    Config keys: decode (RCNNBox), nms (MultiClassNMS), num_classes (shared);
    export_onnx / export_eb are accepted and ignored (``__ignored__``).

    Call: ``post(head_out, rois [R, 4], rois_num [B], im_shape [B, 2], scale_factor [B, 2])``
    -> (bbox [K, 6] rows (class, score, x1, y1, x2, y2) in original pixels, bbox_num [B] int32).
    """

    __shared__ = ["num_classes", "export_onnx", "export_eb"]
    __inject__ = ["decode", "nms"]
    __ignored__ = {"export_onnx": _EXPORT_ONNX_WHY,
                   "export_eb": "PaddleDetection's switch to keep empty-box rows in exports; the export mode decides"}

    def __init__(self, num_classes: int = 80, decode: Any = "RCNNBox", nms: Any = "MultiClassNMS"):
        self.num_classes = int(num_classes)
        self.decode = build_component(decode, "RCNNBox", "BBoxPostProcess.decode",
                                      shared={"num_classes": num_classes})
        self.nms = build_component(nms, "MultiClassNMS", "BBoxPostProcess.nms")

    def __call__(self, head_out: Tuple[paddle.Tensor, paddle.Tensor], rois: paddle.Tensor,
                 rois_num: paddle.Tensor, im_shape: paddle.Tensor,
                 scale_factor: paddle.Tensor) -> Tuple[paddle.Tensor, paddle.Tensor]:
        boxes, scores = self.decode(head_out, rois, rois_num, im_shape, scale_factor)
        bbox, bbox_num = self.nms(boxes, scores, rois_num.astype("int32"))
        return rescale_to_original(bbox, bbox_num, im_shape, scale_factor), bbox_num


def rescale_to_original(bbox: paddle.Tensor, bbox_num: paddle.Tensor, im_shape: paddle.Tensor,
                        scale_factor: paddle.Tensor) -> paddle.Tensor:
    """NMS rows [K, 6] in resized pixels -> original pixels, clipped; emptied rows get class -1.

    Boxes are divided by (sx, sy, sx, sy) and clipped to the original size, taken as
    floor(im_shape / scale_factor + 0.5) (whole pixels, as PaddleDetection). A box that
    ends up with zero width or height (it lay beyond the original border) is marked class -1
    in place, so ``bbox_num`` still counts it, as in PaddleDetection's output.
    """
    if bbox.shape[0] == 0:
        return bbox
    image_idx = image_index(bbox_num)
    original = paddle.floor(im_shape.astype(bbox.dtype) / scale_factor.astype(bbox.dtype) + 0.5)  # [B, 2]
    limits = paddle.gather(original, image_idx)  # [K, 2] as (h, w)
    scale_xyxy = paddle.gather(xyxy_scale(scale_factor, bbox.dtype), image_idx)  # [K, 4] as (sx, sy, sx, sy)
    boxes = clip_boxes(bbox[:, 2:] / scale_xyxy, limits)
    kept = paddle.logical_and(boxes[:, 2:3] > boxes[:, 0:1], boxes[:, 3:4] > boxes[:, 1:2])
    labels = paddle.where(kept, bbox[:, 0:1], paddle.full_like(bbox[:, 0:1], -1.0))
    return paddle.concat([labels, bbox[:, 1:2], boxes], axis=1)
