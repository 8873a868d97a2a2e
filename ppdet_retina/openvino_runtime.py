"""OpenVINO runtime for a detector's ONNX candidates graph, and the NMS applied after it.

Used by the ``openvino`` engine of eval / infer / training's evaluation
(:mod:`ppdet_retina.inference.openvino_engine`), by ``tools/deploy.py --engine openvino`` (loaded by
file path, so it imports nothing of the package: only numpy, openvino when a model is compiled, and
paddle when it is installed, for its NMS op) and by the ONNX export check (:func:`multiclass_nms`).

The ONNX graph stops before the NMS (``boxes`` [B, M, 4], ``scores`` [B, C, M]: paddle2onnx's NMS
conversion gave wrong rows for classes above 0). After it runs Paddle's own ``multiclass_nms3`` op
when paddle is importable (:func:`paddle_multiclass_nms`: the very op Paddle Inference's graph ends
with, so the rows are Paddle's by construction, and 10x faster than NumPy when many boxes pass the
score threshold), else :func:`multiclass_nms`, the same rules in NumPy.

Input shapes: one graph compiled for dynamic shapes serves every image. Graphs compiled per input
shape were tried: alternated in one process they were no faster (R50-FPN at 800 x 1216 on 2 cores:
fp32 2.71 against 2.77 s, bf16 0.870 against 0.876 s; an earlier "30% faster" came from unalternated
runs on a drifting host), their bf16 lost 0.01 mAP, and with OpenVINO 2026.4.1 and paddle 3.3.1 in one
process they corrupted the heap of the test suite's process; so they are not used.

Precision: OpenVINO's CPU plugin runs in bf16 by default on CPUs with AMX, so fp32 is asked for
explicitly (``INFERENCE_PRECISION_HINT: f32``); ``bf16=True`` asks for bf16 (AMX tiles where the
CPU has amx_bf16, else avx512_bf16 dot products).
"""

from __future__ import annotations

import importlib.util
from typing import Any, Callable, List, Mapping, Tuple

import numpy as np

__all__ = ["INSTALL_HINT", "openvino_installed", "compile_onnx", "OpenVinoCandidates",
           "multiclass_nms", "paddle_multiclass_nms", "nms_function", "best_first_nms"]

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
    """A candidates graph on OpenVINO plus its NMS: ``detect(feeds)`` -> (bbox [K, 6], bbox_num [B]).

    ``feeds`` holds ``image`` [B, 3, H, W], ``im_shape`` [B, 2] and ``scale_factor`` [B, 2]
    (float32 arrays); ``nms`` is infer_cfg.yml's ``onnx.nms`` entry (:func:`multiclass_nms`'s
    keyword arguments). Rows are (class, score, x1, y1, x2, y2) in original pixels. The NMS is
    Paddle's op when paddle is importable (:func:`nms_function`).
    """

    def __init__(self, onnx_file: str, nms: Mapping[str, Any], bf16: bool = False, threads: int = 1):
        self.compiled = compile_onnx(onnx_file, bf16=bf16, threads=threads)
        self.request = self.compiled.create_infer_request()
        self.input_names = [port.get_any_name() for port in self.compiled.inputs]
        self.nms = dict(nms)
        self.bf16 = bool(bf16)
        self.nms_backend, self._nms = nms_function()

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
        return best_first_nms(self._nms, boxes, scores, self.nms)


# --------------------------------------------------------------------------- NMS for runtimes

NmsFunction = Callable[..., Tuple[np.ndarray, np.ndarray]]


def nms_function() -> Tuple[str, NmsFunction]:
    """("paddle", :func:`paddle_multiclass_nms`) when paddle is importable, else ("numpy",
    :func:`multiclass_nms`): the same rules, Paddle's op being the faster (190 ms against 2.3 s for
    R50-FPN with 160 000 boxes over the score threshold)."""
    if importlib.util.find_spec("paddle") is not None:
        return "paddle", paddle_multiclass_nms
    return "numpy", multiclass_nms


def best_first_nms(nms: NmsFunction, boxes: np.ndarray, scores: np.ndarray, settings: Mapping[str, Any],
                   factor: int = 4) -> Tuple[np.ndarray, np.ndarray]:
    """``nms(boxes, scores, **settings)``'s detections, computed on the best (box, class) pairs first.

    The greedy NMS keeps or drops a pair by the pairs of its class scored above it, so running it on
    only the pairs scoring at least T keeps exactly the pairs above T it would keep on all of them.
    When that already gives ``keep_top_k`` rows, the pairs below T cannot enter the result (ties at
    the cut excepted, where the order is arbitrary anyway). T is the ``factor * keep_top_k``-th best
    score of the image; an image that keeps fewer rows is run again on all its pairs. With a
    random-init R50-FPN (160 000 pairs over 0.05) this cut the NMS from 250 to 40 ms, same rows.
    """
    keep_top_k = int(settings.get("keep_top_k", 100))
    threshold = np.float32(settings.get("score_threshold", 0.05))
    background = int(settings.get("background_label", -1))
    if keep_top_k <= 0 or scores.ndim != 3:
        return nms(boxes, scores, **settings)
    scores = np.asarray(scores, np.float32)
    considered = scores if background < 0 else np.delete(scores, background, axis=1)
    flat = considered.reshape(len(scores), -1)
    count = factor * keep_top_k
    if flat.shape[1] <= count:
        return nms(boxes, scores, **settings)
    cuts = np.partition(flat, flat.shape[1] - count, axis=1)[:, flat.shape[1] - count]
    cut_images = cuts > threshold
    if not cut_images.any():
        return nms(boxes, scores, **settings)
    # Pairs below the cut get the score threshold itself: the NMS takes only scores above it.
    best = np.where(scores >= np.where(cut_images, cuts, threshold)[:, None, None], scores, threshold)
    bbox, bbox_num = nms(boxes, best, **settings)
    if np.all(bbox_num[cut_images] >= keep_top_k):
        return bbox, bbox_num
    return nms(boxes, scores, **settings)


def paddle_multiclass_nms(boxes: np.ndarray, scores: np.ndarray, score_threshold: float = 0.05,
                          nms_top_k: int = -1, keep_top_k: int = 100, nms_threshold: float = 0.5,
                          normalized: bool = True, nms_eta: float = 1.0,
                          background_label: int = -1) -> Tuple[np.ndarray, np.ndarray]:
    """:func:`multiclass_nms` run by Paddle's ``multiclass_nms3`` op (the op Paddle Inference's exported
    graph ends with): same arguments, same returns."""
    import paddle

    with paddle.no_grad():
        out, _, bbox_num = paddle._C_ops.multiclass_nms3(
            paddle.to_tensor(np.asarray(boxes, np.float32)), paddle.to_tensor(np.asarray(scores, np.float32)),
            None, float(score_threshold), int(nms_top_k), int(keep_top_k), float(nms_threshold), bool(normalized),
            float(nms_eta), int(background_label))
    counts = bbox_num.numpy().astype(np.int32).reshape(-1)
    bbox = out.numpy().astype(np.float32).reshape(-1, 6) if int(counts.sum()) else np.zeros((0, 6), np.float32)
    return bbox, counts


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
        kept_cls, kept_idx = [], []  # per class with a kept box: its class and kept indices
        # Only classes with a score above the threshold can keep a box (80 classes, few of them present).
        for cls in np.where((image_scores > score_threshold).any(axis=1))[0]:
            if cls == background_label:
                continue
            keep = _nms_one_class(image_boxes, image_scores[cls], score_threshold, nms_top_k, nms_threshold,
                                  normalized, nms_eta)
            kept_cls.append(np.full(len(keep), cls, np.int64))
            kept_idx.append(np.asarray(keep, np.int64))
        cls_of = np.concatenate(kept_cls) if kept_cls else np.zeros(0, np.int64)
        idx_of = np.concatenate(kept_idx) if kept_idx else np.zeros(0, np.int64)
        score_of = image_scores[cls_of, idx_of]
        if keep_top_k > -1 and len(cls_of) > keep_top_k:
            best = np.argsort(-score_of, kind="stable")[:keep_top_k]
            # Back to class order, then decreasing score (stable: ties keep the order above).
            best = best[np.lexsort((-score_of[best], cls_of[best]))]
            cls_of, idx_of, score_of = cls_of[best], idx_of[best], score_of[best]
        rows.append(np.concatenate([cls_of[:, None].astype(np.float32), score_of[:, None],
                                    image_boxes[idx_of]], axis=1))
        counts.append(len(cls_of))
    bbox = np.concatenate(rows, axis=0).astype(np.float32) if rows else np.zeros((0, 6), np.float32)
    return bbox.reshape(-1, 6), np.asarray(counts, np.int32)


def _nms_one_class(boxes: np.ndarray, scores: np.ndarray, score_threshold: float, top_k: int,
                   iou_threshold: float, normalized: bool, eta: float) -> List[int]:
    candidates = np.where(scores > score_threshold)[0]
    order = candidates[np.argsort(-scores[candidates], kind="stable")]
    if top_k > -1:
        order = order[:top_k]
    extra = np.float32(0.0 if normalized else 1.0)
    x1, y1, x2, y2 = (boxes[order, j] for j in range(4))
    area = np.where((x2 < x1) | (y2 < y1), np.float32(0.0), (x2 - x1 + extra) * (y2 - y1 + extra))
    if eta < 1.0:
        return _nms_adaptive(order, x1, y1, x2, y2, area, extra, float(iou_threshold), eta)
    # A fixed threshold: each kept box removes the later candidates it overlaps, one vector
    # operation per kept box (the same float32 arithmetic as checking each candidate against the
    # kept boxes, so the same boxes survive).
    alive = np.ones(len(order), bool)
    keep: List[int] = []
    for pos in range(len(order)):
        if not alive[pos]:
            continue
        keep.append(int(order[pos]))
        rest = slice(pos + 1, len(order))
        iou = _iou_one_to_many(pos, rest, x1, y1, x2, y2, area, extra)
        alive[rest] &= ~(iou > float(iou_threshold))
    return keep


def _iou_one_to_many(k: int, rest: slice, x1: np.ndarray, y1: np.ndarray, x2: np.ndarray, y2: np.ndarray,
                     area: np.ndarray, extra: np.float32) -> np.ndarray:
    """IoU of box ``k`` with the boxes ``rest``, as Paddle's NMS computes it (0 for boxes apart)."""
    apart = (x1[k] > x2[rest]) | (x2[k] < x1[rest]) | (y1[k] > y2[rest]) | (y2[k] < y1[rest])
    inter = (np.minimum(x2[k], x2[rest]) - np.maximum(x1[k], x1[rest]) + extra) * \
            (np.minimum(y2[k], y2[rest]) - np.maximum(y1[k], y1[rest]) + extra)
    return np.where(apart, np.float32(0.0), inter / (area[k] + area[rest] - inter))


def _nms_adaptive(order: np.ndarray, x1: np.ndarray, y1: np.ndarray, x2: np.ndarray, y2: np.ndarray,
                  area: np.ndarray, extra: np.float32, threshold: float, eta: float) -> List[int]:
    """``nms_eta`` < 1: the threshold a candidate meets is the one current when it is examined, so
    each candidate is checked against every kept box in turn."""
    kept: List[int] = []
    for pos in range(len(order)):
        if kept:
            k = np.asarray(kept)
            apart = (x1[k] > x2[pos]) | (x2[k] < x1[pos]) | (y1[k] > y2[pos]) | (y2[k] < y1[pos])
            inter = (np.minimum(x2[k], x2[pos]) - np.maximum(x1[k], x1[pos]) + extra) * \
                    (np.minimum(y2[k], y2[pos]) - np.maximum(y1[k], y1[pos]) + extra)
            iou = np.where(apart, np.float32(0.0), inter / (area[k] + area[pos] - inter))
            if (iou > threshold).any():
                continue
        kept.append(pos)
        if threshold > 0.5:
            threshold *= eta
    return [int(order[p]) for p in kept]
