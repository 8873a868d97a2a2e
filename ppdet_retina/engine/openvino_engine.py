"""The ``openvino`` engine of eval / infer / training's evaluation: the model's ONNX candidates graph
on OpenVINO, then Paddle's NMS in NumPy.

On CPUs with AMX (amx_bf16) OpenVINO's bf16 runs the R50-FPN RetinaNet forward several times
faster than Paddle Inference's oneDNN bf16, and its fp32 gives ONNX Runtime's detections; numbers
in docs/DESIGN.md ("Performance notes") and ``tools/benchmark.py``.

The graph is the model traced in ``candidates`` mode with dynamic batch and image size (so every
image runs at its own padded size, as on Paddle Inference), converted with paddle2onnx and
repaired as :func:`ppdet_retina.engine.onnx.convert` does; OpenVINO reads the ONNX file.
OpenVINO's Paddle frontend is not used: it reads only the old ``.pdmodel`` programs, not the PIR
``.json`` Paddle 3 saves. The NMS (:func:`ppdet_retina.engine.openvino_runtime.multiclass_nms`)
follows ``multiclass_nms3``'s rules. Only architectures with a ``candidates`` export (RetinaNet)
can run here; Faster R-CNN's NMS sits between its two stages.

The ONNX file is cached like the Paddle Inference export (:func:`ppdet_retina.engine.fast_engine.
cached_export`): a folder named by the weights' sha256 and an ``-onnx`` suffix in the same cache,
pruned with it. Training's evaluations trace into a temporary folder removed once OpenVINO has
compiled the model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from typing import Any, Dict, Optional, Tuple

import numpy as np
import paddle

from ppdet_retina.core.workspace import ConfigError
from ppdet_retina.engine import openvino_runtime as ovrt
from ppdet_retina.utils.logger import setup_logger

__all__ = ["ONNX_SUFFIX", "supports", "check_available", "trace_onnx", "cached_onnx", "OpenVinoModel",
           "openvino_runner"]

logger = setup_logger("ppdet_retina")

ONNX_SUFFIX = "-onnx"
_ONNX = "model.onnx"
_NMS = "nms.json"


def supports(model: paddle.nn.Layer) -> bool:
    """True when ``model`` exports ``candidates`` (boxes and scores before its NMS)."""
    return "candidates" in tuple(getattr(model, "export_modes", ()))


def check_available(architecture: str, model: Optional[paddle.nn.Layer] = None) -> None:
    """ConfigError when the openvino engine cannot run here: OpenVINO or paddle2onnx missing, or an
    architecture without a candidates export."""
    if not ovrt.openvino_installed():
        raise ConfigError(f"--engine openvino needs OpenVINO: {ovrt.INSTALL_HINT}")
    try:
        import onnx  # noqa: F401
        import paddle2onnx  # noqa: F401
    except ImportError:
        raise ConfigError("--engine openvino converts the model with paddle2onnx: pip install paddle2onnx==2.1.0 "
                          "onnx") from None
    if model is not None and not supports(model):
        raise ConfigError(f"--engine openvino runs RetinaNet-style models whose NMS comes last; {architecture} "
                          f"applies its NMS between stages (use --engine paddle_inference)")


def trace_onnx(model: paddle.nn.Layer, folder: str) -> float:
    """Write ``folder/model.onnx`` (candidates, dynamic shapes) and ``nms.json``; returns the seconds."""
    from ppdet_retina.engine.export import DeployModel, _trace_and_save, input_spec
    from ppdet_retina.engine.onnx import ONNX_OPSET, convert

    tic = time.perf_counter()
    was_training = model.training
    deploy = DeployModel(model, "candidates")
    tmp = tempfile.mkdtemp(prefix="ppdet_retina_ov_trace_")
    try:
        prefix = os.path.join(tmp, "model")
        _trace_and_save(deploy, prefix, input_spec())
        convert(prefix, os.path.join(folder, _ONNX), ONNX_OPSET, deploy.output_names())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if was_training:
            model.train()
    with open(os.path.join(folder, _NMS), "w", encoding="utf-8") as f:
        json.dump(model.nms_settings(), f)
    return time.perf_counter() - tic


def cached_onnx(model: paddle.nn.Layer, cfg: Dict[str, Any], root: Optional[str] = None) -> Tuple[str, float]:
    """(folder with model.onnx + nms.json, trace seconds: 0.0 when cached) for ``model``'s weights."""
    from ppdet_retina.engine import fast_engine as fe

    root = root or fe.cache_root()
    key = fe.weights_key(model, cfg)
    folder = os.path.join(root, key[:32] + ONNX_SUFFIX)
    if os.path.isfile(os.path.join(folder, fe._META)):
        os.utime(folder)
        return folder, 0.0
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tracing-", dir=root)
    try:
        seconds = trace_onnx(model, tmp)
        with open(os.path.join(tmp, fe._META), "w", encoding="utf-8") as f:
            json.dump({"key": key, "architecture": cfg.get("architecture"), "trace_s": round(seconds, 3),
                       "paddle": paddle.__version__, "format": "onnx candidates",
                       "weights": str(cfg.get("weights") or "")}, f)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process stored the same export first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fe._prune(root, keep=folder)
    return folder, seconds


class OpenVinoModel:
    """The OpenVINO engine with the dygraph model's call contract (as fast_engine.PredictorModel):
    ``runner(batch)`` -> ``{'bbox': [K, 6], 'bbox_num': [B]}`` tensors."""

    def __init__(self, detector: ovrt.OpenVinoCandidates, description: str):
        self.detector = detector
        self.description = description
        self.trace_s = 0.0

    def __call__(self, batch: Dict[str, Any]) -> Dict[str, paddle.Tensor]:
        feeds = {k: np.asarray(batch[k].numpy() if hasattr(batch[k], "numpy") else batch[k], np.float32)
                 for k in ("image", "im_shape", "scale_factor")}
        bbox, bbox_num = self.detector.detect(feeds)
        return {"bbox": paddle.to_tensor(bbox), "bbox_num": paddle.to_tensor(bbox_num)}

    def eval(self) -> "OpenVinoModel":
        return self

    def train(self) -> "OpenVinoModel":
        return self


def openvino_runner(model: paddle.nn.Layer, cfg: Dict[str, Any], bf16: bool = False, threads: int = 1,
                    cache: bool = True, why: str = "--engine openvino") -> OpenVinoModel:
    """An :class:`OpenVinoModel` for ``model``'s weights (cached export unless ``cache`` is False)."""
    architecture = str(cfg.get("architecture", type(model).__name__))
    check_available(architecture, model)
    model.eval()
    tmp = None if cache else tempfile.mkdtemp(prefix="ppdet_retina_eval_onnx_")
    try:
        if cache:
            folder, seconds = cached_onnx(model, cfg)
        else:
            folder, seconds = tmp, trace_onnx(model, tmp)
        with open(os.path.join(folder, _NMS), "r", encoding="utf-8") as f:
            nms = json.load(f)
        tic = time.perf_counter()
        detector = ovrt.OpenVinoCandidates(os.path.join(folder, _ONNX), nms, bf16=bf16, threads=threads)
        compile_s = time.perf_counter() - tic
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)  # the compiled model holds the weights
    description = f"OpenVINO ({'bf16' if bf16 else 'fp32'}, {threads} thread(s)) + NumPy NMS"
    if seconds:
        traced = f"traced {architecture} to ONNX in {seconds:.2f} s, " + (f"cached in {folder}" if cache
                                                                          else "for this evaluation")
    else:
        traced = f"ONNX export of these weights reused from {folder} (no trace)"
    logger.info(f"engine: {description} ({why}); {traced}; compiled in {compile_s:.2f} s")
    runner = OpenVinoModel(detector, description)
    runner.trace_s = seconds + compile_s
    return runner
