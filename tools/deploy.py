#!/usr/bin/env python
"""Run an exported detector with Paddle Inference (PaddleDetection's deploy/python/infer.py flags).

Needs only paddle, opencv-python, numpy and PyYAML: copy this file next to an export and run

    python deploy.py --model_dir output_inference/retinanet_r50_fpn_1x --image_dir demo/ \\
        --output_dir out --save_results --run_benchmark
    python deploy.py --model_dir ... --image_file a.jpg --enable_mkldnn_bfloat16   # CPUs with avx512_bf16

``--model_dir`` holds model.json + model.pdiparams + infer_cfg.yml (tools/export_model.py).
Outputs in ``--output_dir``: each image with its boxes drawn (score >= --threshold),
``bbox.json`` with ``--save_results`` (COCO results: image_id = index of the image in the run,
file_name, category_id = the dataset's category id when the export knows it, bbox xywh, score;
every detection the model returned, not only those above the threshold), and
``benchmark.json`` with ``--run_benchmark`` (milliseconds per image of preprocess /
inference / postprocess and images per second).

Images are read one batch at a time and each picture is written when its batch is done.
A file that cannot be read (missing, truncated, corrupt) is skipped with a warning naming
it, and the run exits with status 1 at the end; hidden files (``._x.jpg``) and names without
an image extension in ``--image_dir`` are not listed at all.
"""

from __future__ import annotations

import argparse
import ast
import colorsys
import json
import os
import sys
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import yaml

MODEL_FILE = "model.json"
PARAMS_FILE = "model.pdiparams"
INFER_CFG = "infer_cfg.yml"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
_INTERPS = (cv2.INTER_NEAREST, cv2.INTER_LINEAR, cv2.INTER_CUBIC, cv2.INTER_AREA, cv2.INTER_LANCZOS4)


class DeployError(ValueError):
    """A user mistake (bad flag, missing file, unsupported export); printed as one line."""


# --------------------------------------------------------------------------- preprocessing

def resize_scale(h: int, w: int, target_size: Sequence[int], keep_ratio: bool) -> Tuple[float, float]:
    """(scale_y, scale_x) of the training package's Resize: keep_ratio fits [short, long] targets."""
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
            raise DeployError(f"infer_cfg.yml: Resize.interp {interp!r} is not a cv2 flag 0..4")
        self.interp = int(interp)

    def __call__(self, image: np.ndarray, info: Dict[str, np.ndarray]) -> np.ndarray:
        h, w = image.shape[:2]
        sy, sx = resize_scale(h, w, self.target_size, self.keep_ratio)
        resized = (h * sy, w * sx) if self.keep_ratio else (float(self.target_size[0]), float(self.target_size[1]))
        if round(resized[0]) < 1 or round(resized[1]) < 1:
            raise DeployError(f"a {h}x{w} (h x w) image resized by ({sy:.4g}, {sx:.4g}) leaves no pixel on one "
                              f"side; leave it out")
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
            raise DeployError(f"infer_cfg.yml: Preprocess[{i}] type {kind!r} is not supported "
                              f"(supported: {', '.join(_OPS)}); re-export with a plain TestReader")
        ops.append(_OPS[kind](**params))
    return ops


class UnreadableImage(DeployError):
    """One input image cannot be used (missing, truncated, corrupt); the run skips it."""


def bytes_complete(data: bytes) -> bool:
    """False for a truncated JPEG (no end marker after its first scan) or PNG (no IEND chunk), which
    some OpenCV builds decode half grey. The package's ppdet_retina.data.transforms does the same
    check; it is repeated here so that this file runs on its own."""
    if data[:3] == b"\xff\xd8\xff":
        pos = 2
        while pos + 4 <= len(data) and data[pos] == 0xFF:  # header segments up to the scan
            if data[pos + 1] == 0xFF:
                pos += 1
            elif data[pos + 1] == 0xDA:
                return data.find(b"\xff\xd9", pos) != -1
            else:
                pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
        return True
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return data.rfind(b"IEND") != -1
    return True


def read_image_bgr(path: str) -> np.ndarray:
    """uint8 BGR [H, W, 3], turned by its EXIF orientation as viewers (and the training reader's
    Decode without annotations) show it; UnreadableImage naming ``path`` otherwise."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise UnreadableImage(f"cannot read image '{path}' ({err.strerror or err})") from None
    if not bytes_complete(data):
        raise UnreadableImage(f"image '{path}' is truncated (its end marker is missing)")
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise UnreadableImage(f"cannot decode image '{path}' (corrupt or not an image)")
    return image


def read_image(path: str) -> np.ndarray:
    """uint8 RGB [H, W, 3] (the training reader's Decode)."""
    return cv2.cvtColor(read_image_bgr(path), cv2.COLOR_BGR2RGB)


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
            raise DeployError(f"a preprocessed image is {max_h}x{max_w} but the model was exported for a fixed "
                              f"{fixed_size[0]}x{fixed_size[1]} input; re-export with a larger --fixed_input_size")
        max_h, max_w = int(fixed_size[0]), int(fixed_size[1])
    elif stride > 0:
        max_h, max_w = int(np.ceil(max_h / stride) * stride), int(np.ceil(max_w / stride) * stride)
    batch = np.zeros((len(images), 3, max_h, max_w), np.float32)
    for i, im in enumerate(images):
        batch[i, :, :im.shape[1], :im.shape[2]] = im
    return {"image": batch,
            "im_shape": np.stack([i["im_shape"] for i in infos]).astype(np.float32),
            "scale_factor": np.stack([i["scale_factor"] for i in infos]).astype(np.float32)}


# --------------------------------------------------------------------------- predictor

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


def graph_has_interp(model_file: str) -> bool:
    """True when the saved graph resizes feature maps (FPN upsampling)."""
    with open(model_file, "r", encoding="utf-8", errors="ignore") as f:
        return "_interp\"" in f.read()


def check_flags(args: argparse.Namespace) -> None:
    """Refuse flag combinations that cannot run here, with the reason and the fix."""
    if args.device == "cpu" and args.run_mode != "paddle":
        raise DeployError(f"--run_mode {args.run_mode} needs TensorRT on a GPU; use --device gpu or "
                          f"--run_mode paddle on CPU")
    if args.enable_mkldnn_bfloat16:
        if args.device != "cpu" or not args.enable_mkldnn:
            raise DeployError("--enable_mkldnn_bfloat16 is a CPU oneDNN mode: use it with --device cpu "
                              "and --enable_mkldnn True")
        if not cpu_has_flag("avx512_bf16"):
            raise DeployError("--enable_mkldnn_bfloat16: this CPU lacks the avx512_bf16 instructions "
                              "(not in /proc/cpuinfo flags), so bf16 would be emulated and slower than "
                              "fp32; run without --enable_mkldnn_bfloat16")


def create_predictor(model_dir: str, device: str = "cpu", run_mode: str = "paddle", cpu_threads: int = 1,
                     enable_mkldnn: bool = True, enable_bf16: bool = False, batch_size: int = 1,
                     min_subgraph_size: int = 3) -> Any:
    """A ``paddle.inference`` predictor for the export in ``model_dir``."""
    from paddle import inference

    model_file, params_file = os.path.join(model_dir, MODEL_FILE), os.path.join(model_dir, PARAMS_FILE)
    for path in (model_file, params_file):
        if not os.path.isfile(path):
            raise DeployError(f"'{path}' not found; --model_dir must be a folder written by "
                              f"tools/export_model.py")
    config = inference.Config(model_file, params_file)
    config.disable_glog_info()
    if device == "gpu":
        config.enable_use_gpu(200, 0)
        if run_mode in ("trt_fp32", "trt_fp16"):
            precision = inference.PrecisionType.Half if run_mode == "trt_fp16" else inference.PrecisionType.Float32
            config.enable_tensorrt_engine(workspace_size=1 << 30, max_batch_size=batch_size,
                                          min_subgraph_size=min_subgraph_size, precision_mode=precision,
                                          use_static=False, use_calib_mode=False)
    else:
        config.disable_gpu()
        config.set_cpu_math_library_num_threads(int(cpu_threads))
        if enable_mkldnn:
            config.enable_mkldnn()
            if enable_bf16:
                config.enable_mkldnn_bfloat16()
            if graph_has_interp(model_file):
                # Paddle 3.3.1 bug (Paddle issue #79749): a saved interp op cannot run as a
                # oneDNN kernel. Without the placement pass interp runs natively while the
                # oneDNN fuse passes still move every conv (+bias/relu/add) to oneDNN.
                config.delete_pass("onednn_placement_pass")
        else:
            config.disable_mkldnn()
    return inference.create_predictor(config)


def run(predictor: Any, feeds: Dict[str, np.ndarray]) -> List[np.ndarray]:
    """Feed by input name, run, return every output in graph order."""
    for name in predictor.get_input_names():
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


def class_color(class_id: int) -> Tuple[int, int, int]:
    """A stable BGR colour per class (golden-ratio hue steps)."""
    r, g, b = colorsys.hsv_to_rgb((int(class_id) * 0.618033988749895) % 1.0, 0.85, 0.95)
    return int(b * 255), int(g * 255), int(r * 255)


def draw(image_bgr: np.ndarray, rows: np.ndarray, labels: Sequence[str], threshold: float) -> np.ndarray:
    """A copy of the image with every row scoring >= ``threshold`` boxed and labelled."""
    canvas = image_bgr.copy()
    for cls, score, x1, y1, x2, y2 in rows:
        if score < threshold:
            continue
        color = class_color(int(cls))
        p1, p2 = (int(round(x1)), int(round(y1))), (int(round(x2)), int(round(y2)))
        cv2.rectangle(canvas, p1, p2, color, 2)
        name = labels[int(cls)] if 0 <= int(cls) < len(labels) else str(int(cls))
        cv2.putText(canvas, f"{name} {score:.2f}", (p1[0], max(p1[1] - 4, 10)), cv2.FONT_HERSHEY_SIMPLEX,
                    0.45, color, 1, cv2.LINE_AA)
    return canvas


def coco_results(rows: np.ndarray, image_id: int, file_name: str, catids: Sequence[int]) -> List[dict]:
    """COCO result dicts (xywh) for one image; classes map to ``catids`` when the export has them."""
    results = []
    for cls, score, x1, y1, x2, y2 in rows:
        cls = int(cls)
        results.append({"image_id": int(image_id), "file_name": file_name,
                        "category_id": int(catids[cls]) if cls < len(catids) else cls,
                        "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)], "score": float(score)})
    return results


def output_path(output_dir: str, image_file: str, used: set) -> str:
    """``output_dir/<input name>``; a second input of the same name gets ``_1``, ``_2`` ..."""
    stem, ext = os.path.splitext(os.path.basename(image_file))
    ext = ext if ext.lower() in (".jpg", ".jpeg", ".png", ".bmp") else ".jpg"
    path, n = os.path.join(output_dir, stem + ext), 1
    while path in used:
        path, n = os.path.join(output_dir, f"{stem}_{n}{ext}"), n + 1
    used.add(path)
    return path


# --------------------------------------------------------------------------- detector

class Detector:
    """Preprocess -> predictor -> per-image detections for one export folder."""

    def __init__(self, model_dir: str, device: str = "cpu", run_mode: str = "paddle", cpu_threads: int = 1,
                 enable_mkldnn: bool = True, enable_bf16: bool = False, batch_size: int = 1):
        cfg_path = os.path.join(model_dir, INFER_CFG)
        if not os.path.isfile(cfg_path):
            raise DeployError(f"'{cfg_path}' not found; --model_dir must be a folder written by "
                              f"tools/export_model.py")
        with open(cfg_path, "r", encoding="utf-8") as f:
            self.cfg = yaml.safe_load(f) or {}
        if not self.cfg.get("nms_inside", True):
            raise DeployError(f"{cfg_path}: this export has outputs {self.cfg.get('outputs')} without NMS "
                              f"(export.post_process/nms false or benchmark true); deploy.py needs boxes. "
                              f"Re-export with export.post_process=true export.nms=true")
        self.ops = build_preprocess(self.cfg.get("Preprocess", []))
        self.stride = next((op.stride for op in self.ops if isinstance(op, PadStride)), 0)
        self.fixed_size = None if self.cfg.get("use_dynamic_shape", True) else self.cfg.get("input_size")
        if self.fixed_size and batch_size != 1:
            raise DeployError(f"{cfg_path}: the model was exported for one image of a fixed size; use --batch_size 1")
        self.labels = list(self.cfg.get("label_list") or [])
        self.catids = list(self.cfg.get("catid_list") or [])
        self.predictor = create_predictor(model_dir, device, run_mode, cpu_threads, enable_mkldnn, enable_bf16,
                                          batch_size, int(self.cfg.get("min_subgraph_size", 3)))
        self.times = {"preprocess": 0.0, "inference": 0.0, "postprocess": 0.0}

    def predict(self, images_rgb: Sequence[np.ndarray]) -> List[np.ndarray]:
        """Detections [n_i, 6] (class, score, x1, y1, x2, y2 in original pixels) per image."""
        tic = time.perf_counter()
        done = [preprocess(im, self.ops) for im in images_rgb]
        feeds = stack_batch([d[0] for d in done], [d[1] for d in done], self.stride, self.fixed_size)
        toc = time.perf_counter()
        bbox, bbox_num = run(self.predictor, feeds)[:2]
        toc2 = time.perf_counter()
        rows = split_detections(bbox, bbox_num)
        end = time.perf_counter()
        self.times["preprocess"] += toc - tic
        self.times["inference"] += toc2 - toc
        self.times["postprocess"] += end - toc2
        return rows


def collect_images(image_file: Optional[str], image_dir: Optional[str]) -> List[str]:
    """The images named by --image_file and/or --image_dir (sorted; hidden files such as the
    ``._x.jpg`` macOS leaves and names without an image extension are left out quietly)."""
    files: List[str] = []
    if image_file:
        if not os.path.isfile(image_file):
            raise DeployError(f"--image_file '{image_file}' does not exist")
        files.append(image_file)
    if image_dir:
        if not os.path.isdir(image_dir):
            raise DeployError(f"--image_dir '{image_dir}' is not a folder")
        files.extend(os.path.join(image_dir, n) for n in sorted(os.listdir(image_dir))
                     if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith("."))
    if not files:
        raise DeployError("no images: pass --image_file <file> or --image_dir <folder with images>")
    return files


def image_batches(files: Sequence[str], batch_size: int,
                  failed: Optional[Dict[str, str]]) -> Iterator[List[Tuple[int, str, np.ndarray, np.ndarray]]]:
    """Batches of (index in ``files``, file, BGR image, RGB image), read one batch at a time.

    A file that cannot be read is skipped: its reason goes into ``failed`` with a warning on
    stderr naming it (nothing when ``failed`` is None, for repeated benchmark passes).
    """
    batch: List[Tuple[int, str, np.ndarray, np.ndarray]] = []
    for i, f in enumerate(files):
        try:
            bgr = read_image_bgr(f)
        except UnreadableImage as err:
            if failed is not None:
                failed[f] = str(err)
                print(f"warning: {err}; skipped", file=sys.stderr)
            continue
        batch.append((i, f, bgr, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)))
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def benchmark_report(times: Dict[str, float], num_images: int, args: argparse.Namespace) -> Dict[str, Any]:
    """Per-image milliseconds of each stage and images per second over the timed runs."""
    per = {k: 1000.0 * v / max(num_images, 1) for k, v in times.items()}
    total = sum(per.values())
    return {"device": args.device, "run_mode": args.run_mode, "cpu_threads": args.cpu_threads,
            "enable_mkldnn": bool(args.enable_mkldnn), "enable_mkldnn_bfloat16": bool(args.enable_mkldnn_bfloat16),
            "batch_size": args.batch_size, "images": num_images, "repeats": args.repeats,
            "preprocess_ms": round(per["preprocess"], 3), "inference_ms": round(per["inference"], 3),
            "postprocess_ms": round(per["postprocess"], 3), "total_ms": round(total, 3),
            "images_per_s": round(1000.0 / total, 3) if total > 0 else None}


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = build_parser().parse_args(argv)
    check_flags(args)
    files = collect_images(args.image_file, args.image_dir)
    detector = Detector(args.model_dir, args.device, args.run_mode, args.cpu_threads, args.enable_mkldnn,
                        args.enable_mkldnn_bfloat16, args.batch_size)
    os.makedirs(args.output_dir, exist_ok=True)
    if args.run_benchmark:
        # Untimed passes re-read the files, so only one batch is ever in memory.
        for batch in image_batches(files, args.batch_size, None):
            for _ in range(args.warmup):  # first runs include oneDNN kernel creation
                detector.predict([rgb for _, _, _, rgb in batch])
            break
        detector.times = dict.fromkeys(detector.times, 0.0)
        for _ in range(args.repeats - 1):
            for batch in image_batches(files, args.batch_size, None):
                detector.predict([rgb for _, _, _, rgb in batch])
    summary: Dict[str, Any] = {"images": len(files), "detections": {}, "failed": {}}
    used: set = set()
    coco: List[dict] = []
    for batch in image_batches(files, args.batch_size, summary["failed"]):
        rows = detector.predict([rgb for _, _, _, rgb in batch])
        # Written batch by batch, so an interrupted run keeps what it finished.
        for (i, f, bgr, _), dets in zip(batch, rows):
            path = output_path(args.output_dir, f, used)
            if not cv2.imwrite(path, draw(bgr, dets, detector.labels, args.threshold)):
                raise DeployError(f"cannot write {path}; check the free space and permissions of --output_dir")
            kept = int((dets[:, 1] >= args.threshold).sum())
            summary["detections"][f] = kept
            print(f"{f}: {kept} detection(s) >= {args.threshold} -> {path}")
            if args.save_results:
                coco.extend(coco_results(dets, i, os.path.basename(f), detector.catids))
    if args.save_results:
        path = os.path.join(args.output_dir, "bbox.json")
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(coco, fh)
        print(f"{len(coco)} detections saved to {path}")
    if args.run_benchmark:
        report = benchmark_report(detector.times, len(summary["detections"]) * args.repeats, args)
        with open(os.path.join(args.output_dir, "benchmark.json"), "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=2)
        print("benchmark: " + json.dumps(report))
        summary["benchmark"] = report
    return summary


def _bool(text: str) -> bool:
    """PaddleDetection spells booleans ``--enable_mkldnn True``; accept true/false/1/0 too."""
    lowered = str(text).strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    try:
        return bool(ast.literal_eval(text))
    except (ValueError, SyntaxError):
        raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", required=True, help="folder with model.json, model.pdiparams, infer_cfg.yml")
    parser.add_argument("--image_file", default=None, help="one image")
    parser.add_argument("--image_dir", default=None, help="a folder of images")
    parser.add_argument("--batch_size", type=int, default=1, help="images per predictor run")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--run_mode", choices=("paddle", "trt_fp32", "trt_fp16"), default="paddle",
                        help="paddle = native/oneDNN kernels; trt_* = TensorRT (GPU only)")
    parser.add_argument("--cpu_threads", type=int, default=1, help="math-library threads on CPU")
    parser.add_argument("--enable_mkldnn", type=_bool, nargs="?", const=True, default=True,
                        help="oneDNN kernels on CPU (default True; pass False to use the plain kernels)")
    parser.add_argument("--enable_mkldnn_bfloat16", type=_bool, nargs="?", const=True, default=False,
                        help="bf16 oneDNN kernels (CPUs with avx512_bf16 only)")
    parser.add_argument("--threshold", type=float, default=0.5, help="score threshold for drawing")
    parser.add_argument("--output_dir", default="output", help="where drawn images and JSON files go")
    parser.add_argument("--save_results", action="store_true", help="write bbox.json (COCO results)")
    parser.add_argument("--run_benchmark", action="store_true",
                        help="time preprocess / inference / postprocess per image (after --warmup runs)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before a benchmark")
    parser.add_argument("--repeats", type=int, default=1, help="timed passes over the images in a benchmark")
    return parser


if __name__ == "__main__":
    try:
        result = main()
    except DeployError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    if result["failed"]:
        print(f"error: {len(result['failed'])} of {result['images']} image(s) could not be read and were "
              f"skipped: {', '.join(result['failed'])}", file=sys.stderr)
        sys.exit(1)
