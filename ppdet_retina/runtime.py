"""Paddle Inference runtime for an exported detector: the one place that configures and runs it.

Used by ``tools/deploy.py`` (loaded by file path, so that script runs without the package),
``tools/eval.py --exported`` (:mod:`ppdet_retina.inference.exported_eval`), the default engine of
eval / infer / training's evaluation (:mod:`ppdet_retina.inference.engines`) and the export
checks (:mod:`ppdet_retina.export.paddle_inference`, :mod:`ppdet_retina.export.onnx`). It therefore imports
nothing of the package: only paddle, numpy, OpenCV and PyYAML.

What lives here:

* ``infer_cfg.yml`` reading and the replay of its ``Preprocess`` list (Resize, NormalizeImage,
  Permute, PadStride) exactly as the package's readers prepare images;
* :func:`create_predictor`: ``paddle.inference.Config`` with oneDNN (optionally bf16) on CPU, GPU
  or TensorRT, plus the Paddle workarounds an export needs;
* :func:`run`: feed by input name, run, fetch every output; :func:`split_detections` per image;
* what the package and deploy.py both need and must agree on: :func:`resize_scale`, the truncated-file
  check :func:`image_bytes_complete`, :func:`draw_detections` and :func:`parse_bool`.
"""

from __future__ import annotations

import colorsys
import os
from typing import Any, Dict, Iterator, List, Optional, Sequence, Set, Tuple

import cv2
import numpy as np
import yaml

__all__ = [
    "MODEL_PREFIX", "MODEL_FILE", "PARAMS_FILE", "INFER_CFG", "PredictorError",
    "read_infer_cfg", "model_files", "resize_scale", "Resize", "NormalizeImage", "Permute", "PadStride",
    "build_preprocess", "preprocess", "stack_batch", "cpu_has_flag", "cpu_supports_bf16", "graph_has_interp",
    "create_predictor", "run", "split_detections", "unique_output_path", "image_bytes_complete", "jpeg_segments",
    "class_color", "draw_detections", "parse_bool",
]

MODEL_PREFIX = "model"
MODEL_FILE = MODEL_PREFIX + ".json"
PARAMS_FILE = MODEL_PREFIX + ".pdiparams"
INFER_CFG = "infer_cfg.yml"
_INTERPS = (cv2.INTER_NEAREST, cv2.INTER_LINEAR, cv2.INTER_CUBIC, cv2.INTER_AREA, cv2.INTER_LANCZOS4)


class PredictorError(ValueError):
    """An export or runtime setting that cannot be used, with the reason and the fix."""


class ExportNotFound(PredictorError, FileNotFoundError):
    """A file of the export folder is missing."""


# --------------------------------------------------------------------------- the export folder

def read_infer_cfg(model_dir: str) -> Dict[str, Any]:
    """``model_dir/infer_cfg.yml`` as a dict; ExportNotFound naming the file when it is missing."""
    path = os.path.join(model_dir, INFER_CFG)
    if not os.path.isfile(path):
        raise ExportNotFound(f"'{path}' not found: the model folder must be one written by "
                             f"tools/export_model.py (model.json, model.pdiparams, infer_cfg.yml)")
    with open(path, "r", encoding="utf-8") as f:
        return yaml.safe_load(f) or {}


def model_files(model_dir: str) -> Tuple[str, str]:
    """(graph file, parameters file) of the export in ``model_dir``, checked to exist."""
    files = (os.path.join(model_dir, MODEL_FILE), os.path.join(model_dir, PARAMS_FILE))
    for path in files:
        if not os.path.isfile(path):
            raise ExportNotFound(f"'{path}' not found: the model folder must be one written by "
                                 f"tools/export_model.py")
    return files


# --------------------------------------------------------------------------- preprocessing replay

def resize_scale(h: int, w: int, target_size: Sequence[int], keep_ratio: bool) -> Tuple[float, float]:
    """(scale_y, scale_x) that PaddleDetection's Resize applies to an h x w image.

    keep_ratio: one scale = min(short_target / short_side, long_target / long_side),
    so the short side reaches the short target unless the long side would pass
    the long target. Otherwise target_size is (h, w) and each axis is scaled to it.
    """
    if keep_ratio:
        scale = min(min(target_size) / min(h, w), max(target_size) / max(h, w))
        return scale, scale
    return target_size[0] / h, target_size[1] / w


class Resize:
    """Resize to ``target_size`` as the training reader (and PaddleDetection) does.

    The pixels go through ``cv2.resize`` at the nominal scale (fx/fy; OpenCV rounds the output
    size), ``im_shape`` is the unrounded (h * sy, w * sx) and ``scale_factor`` (sy, sx): the
    exported model's weights expect exactly these inputs.
    """

    def __init__(self, target_size: Sequence[int], keep_ratio: bool = True, interp: int = 1):
        self.target_size = [int(s) for s in target_size]
        self.keep_ratio = bool(keep_ratio)
        if interp not in _INTERPS:
            raise PredictorError(f"infer_cfg.yml: Resize.interp {interp!r} is not a cv2 flag 0..4")
        self.interp = int(interp)

    def __call__(self, image: np.ndarray, info: Dict[str, np.ndarray]) -> np.ndarray:
        h, w = image.shape[:2]
        sy, sx = resize_scale(h, w, self.target_size, self.keep_ratio)
        resized = (h * sy, w * sx) if self.keep_ratio else (float(self.target_size[0]), float(self.target_size[1]))
        if round(resized[0]) < 1 or round(resized[1]) < 1:
            raise PredictorError(f"a {h}x{w} (h x w) image resized by ({sy:.4g}, {sx:.4g}) leaves no pixel on "
                                 f"one side; leave it out")
        image = cv2.resize(image, None, None, fx=sx, fy=sy, interpolation=self.interp)
        info["im_shape"] = np.array(resized, np.float32)
        prev = info["scale_factor"]
        info["scale_factor"] = np.array([prev[0] * sy, prev[1] * sx], np.float32)
        return image


class NormalizeImage:
    """((image / 255 if is_scale) - mean) / std per RGB channel, as float32."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], is_scale: bool = True,
                 norm_type: str = "mean_std"):
        scale = np.full(3, 1.0 / 255.0 if is_scale else 1.0, np.float32)
        offset = np.zeros(3, np.float32)
        if norm_type == "mean_std":
            scale /= np.asarray(std, np.float32)
            offset = -np.asarray(mean, np.float32) / np.asarray(std, np.float32)
        self.scale, self.offset = scale, offset

    def __call__(self, image: np.ndarray, info: Dict[str, np.ndarray]) -> np.ndarray:
        image = image.astype(np.float32)
        image *= self.scale
        image += self.offset
        return image


class Permute:
    """HWC -> CHW."""

    def __call__(self, image: np.ndarray, info: Dict[str, np.ndarray]) -> np.ndarray:
        return np.ascontiguousarray(image.transpose(2, 0, 1))


class PadStride:
    """Remembers the stride; padding happens per batch in :func:`stack_batch`."""

    def __init__(self, stride: int = 0):
        self.stride = int(stride)

    def __call__(self, image: np.ndarray, info: Dict[str, np.ndarray]) -> np.ndarray:
        return image


_OPS = {"Resize": Resize, "NormalizeImage": NormalizeImage, "Permute": Permute, "PadStride": PadStride}


def build_preprocess(entries: Sequence[Dict[str, Any]]) -> List[Any]:
    """Ops from infer_cfg.yml's ``Preprocess`` list."""
    ops = []
    for i, entry in enumerate(entries or []):
        params = dict(entry)
        kind = params.pop("type", None)
        if kind not in _OPS:
            raise PredictorError(f"infer_cfg.yml: Preprocess[{i}] type {kind!r} is not supported "
                                 f"(supported: {', '.join(_OPS)}); re-export with a plain TestReader")
        ops.append(_OPS[kind](**params))
    return ops


def preprocess(image: np.ndarray, ops: Sequence[Any]) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
    """Run ``ops`` on one RGB image; returns CHW float32 and its im_shape / scale_factor."""
    h, w = image.shape[:2]
    info = {"im_shape": np.array([h, w], np.float32), "scale_factor": np.ones(2, np.float32)}
    for op in ops:
        image = op(image, info)
    return image, info


def stack_batch(images: Sequence[np.ndarray], infos: Sequence[Dict[str, np.ndarray]],
                stride: int, fixed_size: Optional[Sequence[int]] = None) -> Dict[str, np.ndarray]:
    """Zero-pad CHW images bottom/right to one size and stack the feeds.

    The size is the batch's largest rounded up to ``stride``, or ``fixed_size`` (H, W) for an
    export traced at one size.
    """
    max_h = max(im.shape[1] for im in images)
    max_w = max(im.shape[2] for im in images)
    if fixed_size:
        if max_h > fixed_size[0] or max_w > fixed_size[1]:
            raise PredictorError(f"a preprocessed image is {max_h}x{max_w} but the model was exported for a "
                                 f"fixed {fixed_size[0]}x{fixed_size[1]} input; re-export with a larger "
                                 f"--fixed_input_size")
        max_h, max_w = int(fixed_size[0]), int(fixed_size[1])
    elif stride > 0:
        max_h, max_w = int(np.ceil(max_h / stride) * stride), int(np.ceil(max_w / stride) * stride)
    batch = np.zeros((len(images), 3, max_h, max_w), np.float32)
    for i, im in enumerate(images):
        batch[i, :, :im.shape[1], :im.shape[2]] = im
    return {"image": batch,
            "im_shape": np.stack([i["im_shape"] for i in infos]).astype(np.float32),
            "scale_factor": np.stack([i["scale_factor"] for i in infos]).astype(np.float32)}


# --------------------------------------------------------------------------- the predictor

def cpu_has_flag(flag: str, cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True when ``flag`` is among the CPU's feature flags (Linux /proc/cpuinfo)."""
    try:
        with open(cpuinfo, "r", encoding="utf-8", errors="ignore") as f:
            for line in f:
                if line.startswith("flags"):
                    return flag in line.split(":", 1)[1].split()
    except OSError:
        return False
    return False


def cpu_supports_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True when the CPU has native bf16 dot products (avx512_bf16); elsewhere bf16 is emulated and slow."""
    return cpu_has_flag("avx512_bf16", cpuinfo)


def graph_has_interp(model_file: str) -> bool:
    """True when the saved graph resizes feature maps (FPN upsampling: nearest/bilinear interp)."""
    with open(model_file, "r", encoding="utf-8", errors="ignore") as f:
        return "_interp\"" in f.read()


def create_predictor(model_file: str, params_file: str, device: str = "cpu", cpu_threads: int = 1,
                     mkldnn: bool = True, bf16: bool = False, trt_precision: Optional[str] = None,
                     batch_size: int = 1, min_subgraph_size: int = 3) -> Any:
    """A ``paddle.inference`` predictor for an exported graph.

    Args:
        model_file, params_file: the export's ``model.json`` and ``model.pdiparams``.
        device: ``cpu`` or ``gpu`` (GPU 0).
        cpu_threads: math-library threads on CPU.
        mkldnn: oneDNN kernels on CPU (several times faster than the plain ones for convolutions).
        bf16: oneDNN in bfloat16 (worth it only on CPUs with avx512_bf16; callers check).
        trt_precision: on GPU, ``fp32`` or ``fp16`` to run TensorRT subgraphs; None for none.
        batch_size, min_subgraph_size: TensorRT's maximum batch and smallest subgraph.
    """
    from paddle import inference

    for path in (model_file, params_file):
        if not os.path.isfile(path):
            raise ExportNotFound(f"exported model file '{path}' not found; run tools/export_model.py first")
    config = inference.Config(model_file, params_file)
    config.disable_glog_info()
    if device == "gpu":
        config.enable_use_gpu(256, 0)
        if trt_precision is not None:
            precision = inference.PrecisionType.Half if trt_precision == "fp16" else inference.PrecisionType.Float32
            config.enable_tensorrt_engine(workspace_size=1 << 30, max_batch_size=int(batch_size),
                                          min_subgraph_size=int(min_subgraph_size), precision_mode=precision,
                                          use_static=False, use_calib_mode=False)
        return inference.create_predictor(config)
    config.disable_gpu()
    config.set_cpu_math_library_num_threads(int(cpu_threads))
    if not mkldnn:
        config.disable_mkldnn()
        return inference.create_predictor(config)
    config.enable_mkldnn()
    if bf16:
        config.enable_mkldnn_bfloat16()
    if graph_has_interp(model_file):
        # Paddle 3.3.1 bug (Paddle issue #79749): a saved interp op's `scale` attribute cannot run
        # as a oneDNN kernel. Without the placement pass interp runs natively while the oneDNN
        # fuse passes still turn every conv (+bias, +relu, +add) into a oneDNN kernel.
        config.delete_pass("onednn_placement_pass")
    return inference.create_predictor(config)


def run(predictor: Any, feeds: Dict[str, np.ndarray]) -> List[np.ndarray]:
    """Feed ``feeds`` by input name, run, and return every output as numpy in graph order."""
    for name in predictor.get_input_names():
        if name not in feeds:
            raise KeyError(f"the exported model needs input '{name}'; got {sorted(feeds)}")
        handle = predictor.get_input_handle(name)
        handle.reshape(feeds[name].shape)
        handle.copy_from_cpu(np.ascontiguousarray(feeds[name]))
    predictor.run()
    return [predictor.get_output_handle(n).copy_to_cpu() for n in predictor.get_output_names()]


# --------------------------------------------------------------------------- results

def split_detections(bbox: np.ndarray, bbox_num: np.ndarray) -> List[np.ndarray]:
    """[N, 6] rows + per-image counts -> one [n_i, 6] array per image (padding rows dropped)."""
    bbox = np.asarray(bbox, np.float32).reshape(-1, 6)
    out, start = [], 0
    for count in np.asarray(bbox_num).reshape(-1).astype(np.int64):
        rows = bbox[start:start + count]
        out.append(rows[rows[:, 0] >= 0])
        start += count
    return out


def unique_output_path(output_dir: str, image_file: str, used: Set[str]) -> str:
    """``output_dir/<input name>``; a second input of the same name gets ``_1``, ``_2`` ... so that
    pictures of two folders' ``1.jpg`` do not overwrite each other. Adds the path to ``used``."""
    stem, ext = os.path.splitext(os.path.basename(image_file))
    ext = ext if ext.lower() in (".jpg", ".jpeg", ".png", ".bmp") else ".jpg"
    path, n = os.path.join(output_dir, stem + ext), 1
    while path in used:
        path, n = os.path.join(output_dir, f"{stem}_{n}{ext}"), n + 1
    used.add(path)
    return path


# --------------------------------------------------------------------------- image files

def image_bytes_complete(data: bytes) -> bool:
    """False for a JPEG without an end-of-image marker after its first scan, or a PNG without its
    IEND chunk: a truncated file, which some OpenCV builds decode half grey with only a warning.

    Other formats, and bytes too mangled to tell, count as complete (the decoder judges those).
    """
    if data[:3] == b"\xff\xd8\xff":
        scan = jpeg_scan_start(data)
        # Inside the entropy-coded data 0xFF is always followed by 0x00 or a restart marker, so
        # the first FF D9 after the scan starts is the real end (an EXIF thumbnail's comes before).
        return scan is None or data.find(b"\xff\xd9", scan) != -1
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return data.rfind(b"IEND") != -1
    return True


def jpeg_segments(data: bytes) -> Iterator[Tuple[int, int, int]]:
    """(marker, payload start, payload end) of each JPEG header segment, up to and including the
    first start-of-scan (0xDA, whose span is given as empty at its position)."""
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xDA:
            yield marker, pos, pos
            return
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        yield marker, pos + 4, pos + 2 + length
        pos += 2 + length


def jpeg_scan_start(data: bytes) -> Optional[int]:
    return next((start for marker, start, _ in jpeg_segments(data) if marker == 0xDA), None)


# --------------------------------------------------------------------------- drawing

def class_color(class_id: int) -> Tuple[int, int, int]:
    """A stable, well separated BGR colour per class (golden-ratio hue steps)."""
    hue = (int(class_id) * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return int(b * 255), int(g * 255), int(r * 255)


def _label_text(class_id: int, score: float, label_names: Optional[Sequence[str]]) -> str:
    name = label_names[class_id] if label_names and 0 <= class_id < len(label_names) else str(class_id)
    return f"{name} {score:.2f}"


def draw_detections(image: np.ndarray, detections: np.ndarray, label_names: Optional[Sequence[str]] = None,
                    threshold: float = 0.5, thickness: int = 2) -> np.ndarray:
    """Return a copy of ``image`` (H, W, 3 uint8 BGR) with boxes and ``name score`` labels.

    ``detections`` is [N, 6] (class, score, x1, y1, x2, y2) in the image's
    pixels; rows scoring below ``threshold`` or with a negative class are skipped.
    """
    canvas = np.ascontiguousarray(image.copy())
    rows = np.asarray(detections, dtype=np.float32).reshape(-1, 6)
    font_scale = max(0.35, min(canvas.shape[:2]) / 900.0)
    for cls, score, x1, y1, x2, y2 in rows:
        if score < threshold or cls < 0:
            continue
        color = class_color(int(cls))
        p1, p2 = (int(round(x1)), int(round(y1))), (int(round(x2)), int(round(y2)))
        cv2.rectangle(canvas, p1, p2, color, thickness)
        _put_label(canvas, _label_text(int(cls), float(score), label_names), p1, color, font_scale)
    return canvas


def _put_label(canvas: np.ndarray, text: str, corner: Tuple[int, int], color: Tuple[int, int, int],
               font_scale: float) -> None:
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)
    x, y = corner
    # Put the label above the box, or inside it when the box touches the top edge.
    top = y - th - base if y - th - base >= 0 else y
    cv2.rectangle(canvas, (x, top), (x + tw, top + th + base), color, -1)
    cv2.putText(canvas, text, (x, top + th), cv2.FONT_HERSHEY_SIMPLEX, font_scale, (255, 255, 255), 1,
                cv2.LINE_AA)


# --------------------------------------------------------------------------- text

_TRUE_WORDS = ("true", "t", "yes", "y", "on", "1")
_FALSE_WORDS = ("false", "f", "no", "n", "off", "0")


def parse_bool(text: Any) -> bool:
    """The one reading of a boolean written as text (flags, ``-o`` overrides, profiler options):
    true/t/yes/y/on/1 or false/f/no/n/off/0, any case; ValueError naming the text otherwise."""
    word = str(text).strip().lower()
    if word in _TRUE_WORDS:
        return True
    if word in _FALSE_WORDS:
        return False
    raise ValueError(f"expected a boolean (true/false, yes/no, on/off, 1/0), got {text!r}")
