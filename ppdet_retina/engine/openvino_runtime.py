"""OpenVINO runtime for a detector's ONNX candidates graph, and the NumPy NMS applied after it.

Used by the ``openvino`` engine of eval / infer / training's evaluation
(:mod:`ppdet_retina.engine.openvino_engine`), by ``tools/deploy.py --engine openvino`` (loaded by
file path, so it imports nothing of the package: only numpy, and openvino when a model is
compiled) and by the ONNX export check (:func:`multiclass_nms`).

The ONNX graph stops before the NMS (``boxes`` [B, M, 4], ``scores`` [B, C, M]: paddle2onnx's NMS
conversion gave wrong rows for classes above 0); :func:`multiclass_nms` is Paddle's
``multiclass_nms3`` in NumPy, so OpenVINO plus this NMS gives the detections Paddle gives.

Precision: OpenVINO's CPU plugin runs in bf16 by default on CPUs with AMX, so fp32 is asked for
explicitly (``INFERENCE_PRECISION_HINT: f32``); ``bf16=True`` asks for bf16 (AMX tiles where the
CPU has amx_bf16, else avx512_bf16 dot products).
"""

from __future__ import annotations

import importlib.util
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

__all__ = ["INSTALL_HINT", "openvino_installed", "compile_onnx", "OpenVinoCandidates", "multiclass_nms"]

INSTALL_HINT = "pip install openvino (or pip install -e .[openvino])"


def openvino_installed() -> bool:
    """True when the ``openvino`` package can be imported."""
    return importlib.util.find_spec("openvino") is not None


def compile_onnx(onnx_file: str, bf16: bool = False, threads: int = 1) -> Any:
    """An OpenVINO CPU ``CompiledModel`` of ``onnx_file`` (dynamic input shapes stay dynamic).

    ``bf16`` False forces f32 arithmetic (OpenVINO would pick bf16 itself on AMX CPUs); True asks
    for bf16. ``threads`` is OpenVINO's thread count; one stream, tuned for latency.
    """
    try:
        import openvino as ov
    except ImportError:
        raise ImportError(f"the openvino engine needs OpenVINO: {INSTALL_HINT}") from None
    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32", "INFERENCE_NUM_THREADS": max(1, int(threads)),
              "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
    return core.compile_model(core.read_model(onnx_file), "CPU", config)


class OpenVinoCandidates:
    """A compiled candidates graph plus its NMS: ``detect(feeds)`` -> (bbox [K, 6], bbox_num [B]).

    ``feeds`` holds ``image`` [B, 3, H, W], ``im_shape`` [B, 2] and ``scale_factor`` [B, 2]
    (float32 arrays); ``nms`` is infer_cfg.yml's ``onnx.nms`` entry (:func:`multiclass_nms`'s
    keyword arguments). Rows are (class, score, x1, y1, x2, y2) in original pixels.
    """

    def __init__(self, onnx_file: str, nms: Mapping[str, Any], bf16: bool = False, threads: int = 1):
        self.compiled = compile_onnx(onnx_file, bf16=bf16, threads=threads)
        self.request = self.compiled.create_infer_request()
        self.input_names = [port.get_any_name() for port in self.compiled.inputs]
        self.nms = dict(nms)
        self.bf16 = bool(bf16)

    def candidates(self, feeds: Mapping[str, np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
        """The graph's (boxes [B, M, 4], scores [B, C, M]) for ``feeds``."""
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise KeyError(f"the ONNX model needs inputs {missing}; got {sorted(feeds)}")
        inputs = {n: np.ascontiguousarray(feeds[n], np.float32) for n in self.input_names}
        result = self.request.infer(inputs)
        boxes, scores = (np.asarray(result[port]) for port in self.compiled.outputs[:2])
        return boxes, scores

    def detect(self, feeds: Mapping[str, np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
        """(bbox [K, 6] float32, bbox_num [B] int32) after the NMS."""
        boxes, scores = self.candidates(feeds)
        return multiclass_nms(boxes, scores, **self.nms)


# --------------------------------------------------------------------------- NMS for runtimes

def multiclass_nms(boxes: np.ndarray, scores: np.ndarray, score_threshold: float = 0.05, nms_top_k: int = -1,
                   keep_top_k: int = 100, nms_threshold: float = 0.5, normalized: bool = True,
                   nms_eta: float = 1.0, background_label: int = -1) -> Tuple[np.ndarray, np.ndarray]:
    """Class-wise greedy NMS on candidates, with the rules of Paddle's ``multiclass_nms3``.

    ``boxes`` [B, M, 4] (x1, y1, x2, y2) and ``scores`` [B, C, M], as the ONNX graph outputs them;
    the keyword arguments are ``infer_cfg.yml``'s ``onnx.nms`` entry. Per image and class: scores
    above ``score_threshold``, the best ``nms_top_k`` (-1: all) in decreasing score, each kept
    unless its IoU with a kept box exceeds the threshold (``nms_eta`` < 1 lowers the threshold
    after each kept box while it is above 0.5; ``normalized`` False adds 1 to widths and heights);
    then the best ``keep_top_k`` (-1: all) of the image over all classes. Returns ``bbox`` [K, 6]
    float32 rows (class, score, x1, y1, x2, y2) grouped by image, then by class, then by decreasing
    score, and ``bbox_num`` [B] int32.
    """
    boxes = np.asarray(boxes, np.float32)
    scores = np.asarray(scores, np.float32)
    if boxes.ndim != 3 or scores.ndim != 3 or boxes.shape[2] != 4 or scores.shape[2] != boxes.shape[1] \
            or scores.shape[0] != boxes.shape[0]:
        raise ValueError(f"multiclass_nms expects boxes [B, M, 4] and scores [B, C, M]; got {list(boxes.shape)} "
                         f"and {list(scores.shape)}")
    rows, counts = [], []
    for image_boxes, image_scores in zip(boxes, scores):
        kept = []  # (class, index) per kept box
        # Only classes with a score above the threshold can keep a box (80 classes, few of them present).
        for cls in np.where((image_scores > score_threshold).any(axis=1))[0]:
            if cls == background_label:
                continue
            keep = _nms_one_class(image_boxes, image_scores[cls], score_threshold, nms_top_k, nms_threshold,
                                  normalized, nms_eta)
            kept.extend((int(cls), int(i)) for i in keep)
        if keep_top_k > -1 and len(kept) > keep_top_k:
            order = np.argsort([-image_scores[c, i] for c, i in kept], kind="stable")[:keep_top_k]
            kept = sorted((kept[k] for k in order), key=lambda ci: (ci[0], -image_scores[ci[0], ci[1]]))
        for cls, i in kept:
            rows.append([cls, image_scores[cls, i], *image_boxes[i]])
        counts.append(len(kept))
    bbox = np.asarray(rows, np.float32).reshape(-1, 6)
    return bbox, np.asarray(counts, np.int32)


def _nms_one_class(boxes: np.ndarray, scores: np.ndarray, score_threshold: float, top_k: int,
                   iou_threshold: float, normalized: bool, eta: float) -> List[int]:
    candidates = np.where(scores > score_threshold)[0]
    order = candidates[np.argsort(-scores[candidates], kind="stable")]
    if top_k > -1:
        order = order[:top_k]
    extra = np.float32(0.0 if normalized else 1.0)
    x1, y1, x2, y2 = (boxes[:, j] for j in range(4))
    area = np.where((x2 < x1) | (y2 < y1), np.float32(0.0), (x2 - x1 + extra) * (y2 - y1 + extra))
    keep: List[int] = []
    threshold = float(iou_threshold)
    for i in order:
        if keep:
            k = np.asarray(keep)
            apart = (x1[k] > x2[i]) | (x2[k] < x1[i]) | (y1[k] > y2[i]) | (y2[k] < y1[i])
            inter = (np.minimum(x2[k], x2[i]) - np.maximum(x1[k], x1[i]) + extra) * \
                    (np.minimum(y2[k], y2[i]) - np.maximum(y1[k], y1[i]) + extra)
            iou = np.where(apart, np.float32(0.0), inter / (area[k] + area[i] - inter))
            if (iou > threshold).any():
                continue
        keep.append(int(i))
        if eta < 1.0 and threshold > 0.5:
            threshold *= eta
    return keep
