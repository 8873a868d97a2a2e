#!/usr/bin/env python
"""Run an exported detector with Paddle Inference or OpenVINO (PaddleDetection's deploy/python/infer.py flags).

Needs only paddle, opencv-python, numpy and PyYAML, and the package's predictor runtime
``ppdet_retina/runtime.py`` (read by file path: from the checkout, or copied next to this
file). To deploy without the package, copy both files next to an export and run

    python deploy.py --model_dir output_inference/retinanet_r50_fpn_1x --image_dir demo/ \\
        --output_dir out --save_results --run_benchmark
    python deploy.py --model_dir ... --image_file a.jpg --enable_mkldnn_bfloat16   # CPUs with avx512_bf16
    python deploy.py --model_dir ... --image_file a.jpg --engine openvino [--enable_mkldnn_bfloat16]

``--engine openvino`` runs the export's model.onnx (tools/export_model.py --onnx; fixed input size,
every image padded to it) on OpenVINO, then the NMS infer_cfg.yml records (Paddle's multiclass_nms3
op, or its rules in NumPy without paddle); it needs ``pip install openvino`` and
``ppdet_retina/openvino_runtime.py`` next to this file (or the checkout). With it, --enable_mkldnn_bfloat16 asks OpenVINO for bf16 (AMX where the CPU has it).

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
import importlib.util
import json
import os
import sys
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import cv2
import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
_RUNTIME_FILE = "runtime.py"
_OPENVINO_FILE = "openvino_runtime.py"


def load_runtime(file_name: str = _RUNTIME_FILE, name: str = "ppdet_retina_predictor_runtime") -> Any:
    """A runtime file of the package (ppdet_retina/runtime.py, or openvino_runtime.py), loaded by file
    path: next to this script in a copied deployment, else from the checkout this script belongs to.
    Only that one file is read, so the rest of the package is never needed."""
    here = os.path.dirname(os.path.abspath(__file__))
    if name in sys.modules:
        return sys.modules[name]
    for path in (os.path.join(here, file_name),
                 os.path.join(here, os.pardir, "ppdet_retina", file_name)):
        if os.path.isfile(path):
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            sys.modules[name] = module
            return module
    raise SystemExit(f"error: deploy.py needs {file_name} (ppdet_retina/{file_name} of the "
                     f"package) next to it; copy that file beside deploy.py")


rt = load_runtime()
# The runtime's errors are deploy's user errors (printed as one line).
DeployError = rt.PredictorError
cpu_has_flag = rt.cpu_has_flag
split_detections = rt.split_detections


class UnreadableImage(DeployError):
    """One input image cannot be used (missing, truncated, corrupt); the run skips it."""


def read_image_bgr(path: str) -> np.ndarray:
    """uint8 BGR [H, W, 3], turned by its EXIF orientation as viewers (and the training reader's
    Decode without annotations) show it; UnreadableImage naming ``path`` otherwise."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise UnreadableImage(f"cannot read image '{path}' ({err.strerror or err})") from None
    if not rt.image_bytes_complete(data):
        raise UnreadableImage(f"image '{path}' is truncated (its end marker is missing)")
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise UnreadableImage(f"cannot decode image '{path}' (corrupt or not an image)")
    return image


def read_image(path: str) -> np.ndarray:
    """uint8 RGB [H, W, 3] (the training reader's Decode)."""
    return cv2.cvtColor(read_image_bgr(path), cv2.COLOR_BGR2RGB)


# --------------------------------------------------------------------------- predictor

def check_flags(args: argparse.Namespace) -> None:
    """Refuse flag combinations that cannot run here, with the reason and the fix."""
    if args.device == "cpu" and args.run_mode != "paddle":
        raise DeployError(f"--run_mode {args.run_mode} needs TensorRT on a GPU; use --device gpu or "
                          f"--run_mode paddle on CPU")
    if args.engine == "openvino" and (args.device != "cpu" or args.run_mode != "paddle"):
        raise DeployError("--engine openvino runs on the CPU: use --device cpu --run_mode paddle")
    if args.enable_mkldnn_bfloat16:
        if args.device != "cpu" or not (args.enable_mkldnn or args.engine == "openvino"):
            raise DeployError("--enable_mkldnn_bfloat16 is a CPU oneDNN mode: use it with --device cpu "
                              "and --enable_mkldnn True")
        if not cpu_has_flag("avx512_bf16"):
            raise DeployError("--enable_mkldnn_bfloat16: this CPU lacks the avx512_bf16 instructions "
                              "(not in /proc/cpuinfo flags), so bf16 would be emulated and slower than "
                              "fp32; run without --enable_mkldnn_bfloat16")


# --------------------------------------------------------------------------- results

def coco_results(rows: np.ndarray, image_id: int, file_name: str, catids: Sequence[int]) -> List[dict]:
    """COCO result dicts (xywh) for one image; classes map to ``catids`` when the export has them."""
    results = []
    for cls, score, x1, y1, x2, y2 in rows:
        cls = int(cls)
        results.append({"image_id": int(image_id), "file_name": file_name,
                        "category_id": int(catids[cls]) if cls < len(catids) else cls,
                        "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)], "score": float(score)})
    return results


# --------------------------------------------------------------------------- detector

class Detector:
    """Preprocess -> predictor -> per-image detections for one export folder."""

    def __init__(self, model_dir: str, device: str = "cpu", run_mode: str = "paddle", cpu_threads: int = 1,
                 enable_mkldnn: bool = True, enable_bf16: bool = False, batch_size: int = 1, engine: str = "paddle"):
        cfg_path = os.path.join(model_dir, rt.INFER_CFG)
        self.cfg = rt.read_infer_cfg(model_dir)
        if not self.cfg.get("nms_inside", True):
            raise DeployError(f"{cfg_path}: this export has outputs {self.cfg.get('outputs')} without NMS "
                              f"(export.post_process/nms false or benchmark true); deploy.py needs boxes. "
                              f"Re-export with export.post_process=true export.nms=true")
        self.ops = rt.build_preprocess(self.cfg.get("Preprocess", []))
        self.stride = next((op.stride for op in self.ops if isinstance(op, rt.PadStride)), 0)
        self.fixed_size = None if self.cfg.get("use_dynamic_shape", True) else self.cfg.get("input_size")
        if self.fixed_size and batch_size != 1:
            raise DeployError(f"{cfg_path}: the model was exported for one image of a fixed size; use --batch_size 1")
        self.labels = list(self.cfg.get("label_list") or [])
        self.catids = list(self.cfg.get("catid_list") or [])
        self.openvino = None
        if engine == "openvino":
            self.openvino = self._openvino(model_dir, cfg_path, enable_bf16, cpu_threads, batch_size)
            self.times = {"preprocess": 0.0, "inference": 0.0, "postprocess": 0.0}
            return
        trt = {"trt_fp32": "fp32", "trt_fp16": "fp16"}.get(run_mode)
        self.predictor = rt.create_predictor(*rt.model_files(model_dir), device=device, cpu_threads=cpu_threads,
                                             mkldnn=enable_mkldnn, bf16=enable_bf16, trt_precision=trt,
                                             batch_size=batch_size,
                                             min_subgraph_size=int(self.cfg.get("min_subgraph_size", 3)))
        self.times = {"preprocess": 0.0, "inference": 0.0, "postprocess": 0.0}

    def _openvino(self, model_dir: str, cfg_path: str, bf16: bool, threads: int, batch_size: int) -> Any:
        """The export's model.onnx on OpenVINO with its NMS; the images are padded to its input size."""
        entry = self.cfg.get("onnx")
        if not entry or "nms" not in entry:
            raise DeployError(f"{cfg_path} records no ONNX model with an NMS to apply: --engine openvino needs an "
                              f"export made with tools/export_model.py --onnx (RetinaNet)")
        onnx_file = os.path.join(model_dir, entry.get("file", "model.onnx"))
        if not os.path.isfile(onnx_file):
            raise DeployError(f"'{onnx_file}' not found: re-export with tools/export_model.py --onnx")
        if batch_size != 1:
            raise DeployError(f"{onnx_file} takes one image of a fixed size; use --batch_size 1")
        self.fixed_size = [int(v) for v in entry["input_size"]]
        ovrt = load_runtime(_OPENVINO_FILE, "ppdet_retina_openvino_runtime")
        if not ovrt.openvino_installed():
            raise DeployError(f"--engine openvino needs OpenVINO: {ovrt.INSTALL_HINT}")
        return ovrt.OpenVinoCandidates(onnx_file, entry["nms"], bf16=bf16, threads=threads)

    def predict(self, images_rgb: Sequence[np.ndarray]) -> List[np.ndarray]:
        """Detections [n_i, 6] (class, score, x1, y1, x2, y2 in original pixels) per image."""
        tic = time.perf_counter()
        done = [rt.preprocess(im, self.ops) for im in images_rgb]
        feeds = rt.stack_batch([d[0] for d in done], [d[1] for d in done], self.stride, self.fixed_size)
        toc = time.perf_counter()
        if self.openvino is not None:
            bbox, bbox_num = self.openvino.detect(feeds)
        else:
            bbox, bbox_num = rt.run(self.predictor, feeds)[:2]
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
    return {"device": args.device, "engine": args.engine, "run_mode": args.run_mode, "cpu_threads": args.cpu_threads,
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
                        args.enable_mkldnn_bfloat16, args.batch_size, args.engine)
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
            path = rt.unique_output_path(args.output_dir, f, used)
            if not cv2.imwrite(path, rt.draw_detections(bgr, dets, detector.labels, args.threshold)):
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
    """PaddleDetection spells booleans ``--enable_mkldnn True`` (the runtime's parse_bool words)."""
    try:
        return rt.parse_bool(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", required=True, help="folder with model.json, model.pdiparams, infer_cfg.yml")
    parser.add_argument("--image_file", default=None, help="one image")
    parser.add_argument("--image_dir", default=None, help="a folder of images")
    parser.add_argument("--batch_size", type=int, default=1, help="images per predictor run")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--engine", choices=("paddle", "openvino"), default="paddle",
                        help="paddle = Paddle Inference on model.json; openvino = model.onnx (export --onnx) on "
                             "OpenVINO + the recorded NMS (CPU; pip install openvino)")
    parser.add_argument("--run_mode", choices=("paddle", "trt_fp32", "trt_fp16"), default="paddle",
                        help="paddle = native/oneDNN kernels; trt_* = TensorRT (GPU only)")
    parser.add_argument("--cpu_threads", type=int, default=1, help="math-library threads on CPU")
    parser.add_argument("--enable_mkldnn", type=_bool, nargs="?", const=True, default=True,
                        help="oneDNN kernels on CPU (default True; pass False to use the plain kernels)")
    parser.add_argument("--enable_mkldnn_bfloat16", type=_bool, nargs="?", const=True, default=False,
                        help="bf16 oneDNN kernels, or OpenVINO bf16 with --engine openvino (CPUs with "
                             "avx512_bf16 only)")
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
