"""The ``openvino`` engine of eval / infer / training's evaluation: the model's ONNX candidates graph
on OpenVINO, then Paddle's own ``multiclass_nms3`` op on its candidates.

On a 2-core Sapphire Rapids CPU (AMX) the R50-FPN RetinaNet at 800 x 1216 ran 0-25% faster than
on Paddle Inference in fp32 and 1.2-1.9x as fast in bf16; which engine is faster is still
measured per machine and model (:func:`auto_choice`), and the figures are in docs/benchmarks.md
(``tools/bench_isolated.py``).

The graph is the model traced in ``candidates`` mode with dynamic batch and image size (so every
image runs at its own padded size, as on Paddle Inference), converted with paddle2onnx and
repaired as :func:`ppdet_retina.export.onnx.convert` does; OpenVINO reads the ONNX file.
OpenVINO's Paddle frontend is not used: it reads only the old ``.pdmodel`` programs, not the PIR
``.json`` Paddle 3 saves. The NMS is the op Paddle Inference's graph ends with
(:func:`ppdet_retina.openvino_runtime.paddle_multiclass_nms`, run on the best-scored pairs first:
:func:`ppdet_retina.openvino_runtime.best_first_nms`), so the rows are Paddle's. Only
architectures with a ``candidates`` export (RetinaNet) can run here; Faster R-CNN's NMS sits between its two stages.

The ONNX file is cached like the Paddle Inference export (:func:`ppdet_retina.inference.export_cache.
cached_folder`): a folder named by the weights' sha256 and an ``-onnx`` suffix in the same cache,
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
from ppdet_retina import openvino_runtime as ovrt
from ppdet_retina.inference.export_cache import (cache_root, cached_folder, code_key, config_key, export_folder,
                                                 weights_key)
from ppdet_retina.utils.logger import setup_logger

__all__ = ["ONNX_SUFFIX", "supports", "check_available", "trace_onnx", "cached_onnx", "OpenVinoModel",
           "openvino_runner"]

logger = setup_logger("ppdet_retina")

ONNX_SUFFIX = "-onnx"
_ONNX = "model.onnx"
_NMS = "nms.json"
_ONNX_META = {"format": "onnx candidates"}


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
    from ppdet_retina.export.trace import DeployModel, input_spec, trace
    from ppdet_retina.export.onnx import ONNX_OPSET, convert

    tic = time.perf_counter()
    was_training = model.training
    deploy = DeployModel(model, "candidates")
    tmp = tempfile.mkdtemp(prefix="ppdet_retina_ov_trace_")
    try:
        prefix = os.path.join(tmp, "model")
        trace(deploy, prefix, input_spec())
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
    return cached_folder(model, cfg, lambda folder: trace_onnx(model, folder), suffix=ONNX_SUFFIX,
                         meta=_ONNX_META, root=root)


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
    with export_folder(model, cfg, lambda folder: trace_onnx(model, folder), cache, suffix=ONNX_SUFFIX,
                       meta=_ONNX_META) as (folder, seconds):
        with open(os.path.join(folder, _NMS), "r", encoding="utf-8") as f:
            nms = json.load(f)
        tic = time.perf_counter()
        detector = ovrt.OpenVinoCandidates(os.path.join(folder, _ONNX), nms, bf16=bf16, threads=threads)
        compile_s = time.perf_counter() - tic
    description = f"OpenVINO ({'bf16' if bf16 else 'fp32'}, {threads} thread(s)) + {detector.nms_backend} NMS"
    if seconds:
        traced = f"traced {architecture} to ONNX in {seconds:.2f} s, " + (f"cached in {folder}" if cache
                                                                          else "for this evaluation")
    else:
        traced = f"ONNX export of these weights reused from {folder} (no trace)"
    logger.info(f"engine: {description} ({why}); {traced}; compiled in {compile_s:.2f} s")
    runner = OpenVinoModel(detector, description)
    runner.trace_s = seconds + compile_s
    return runner


# --------------------------------------------------------------------------- auto: the measured choice

CHOICE_FILE = "engine_choice.json"
# The engines ``auto`` may pick from on CPU (comma-separated); ``paddle_inference`` alone skips the
# measurement (the test suite does, except where it tests the choice).
AUTO_ENGINES_ENV = "PPDET_RETINA_AUTO_ENGINES"
# CPU features that decide which engine is faster (AMX makes OpenVINO's bf16 several times faster).
_SPEED_FLAGS = ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def machine_key(threads: int, bf16: bool) -> str:
    """What the measured choice depends on besides the model: CPU model and features, threads,
    precision, both runtimes' versions and this package's source (a release with a faster engine
    measures again)."""
    from ppdet_retina import runtime as rt

    name = "unknown CPU"
    try:
        with open("/proc/cpuinfo", "r", encoding="utf-8", errors="ignore") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
    except OSError:
        pass
    flags = "+".join(flag for flag in _SPEED_FLAGS if rt.cpu_has_flag(flag))
    try:
        import openvino

        ov_version = openvino.__version__.split("-")[0]
    except ImportError:
        ov_version = "none"
    return f"{name} [{flags}] threads={threads} {'bf16' if bf16 else 'fp32'} paddle={paddle.__version__} " \
           f"openvino={ov_version} code={code_key()}"


def _measure_input(cfg: Dict[str, Any]) -> Dict[str, np.ndarray]:
    """One seeded random image (normalised-looking noise) of the evaluation's padded size. Not a
    constant image: that scores every interior anchor the same, and the NMS's choice among exact
    ties is arbitrary."""
    from ppdet_retina.export.paddle_inference import preprocess_entries
    from ppdet_retina.export.onnx import default_onnx_size, random_feeds

    try:
        height, width = default_onnx_size(preprocess_entries(cfg, "EvalReader"))
    except Exception:  # noqa: BLE001 - an unusual reader: any representative size will do
        height, width = 512, 512
    return random_feeds(height, width)


def _median_ms(runner: Any, feeds: Dict[str, np.ndarray], runs: int) -> Tuple[float, list]:
    times = []
    for _ in range(runs):
        tic = time.perf_counter()
        runner(feeds)
        times.append((time.perf_counter() - tic) * 1000.0)
    return float(np.median(times)), times


def measure_engines(paddle_runner: Any, ov_runner: OpenVinoModel, feeds: Dict[str, np.ndarray],
                    bf16: bool, runs: int = 3, nms: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Both engines on ``feeds``, alternated after one warm-up run each: median ms, and whether
    OpenVINO's detections equal Paddle Inference's (fp32: the ONNX check's tolerances, rows tied at
    the model's score threshold or at its ``keep_top_k`` cut accepted (``nms``: the model's NMS
    settings); bf16: both are compared with fp32 by the tests, so only the run is checked)."""
    from ppdet_retina.export.onnx import OnnxCheckError, compare_detections

    expected, got = paddle_runner(feeds), ov_runner(feeds)
    exact, note = True, "same detections"
    if not bf16:
        nms = nms or {}
        try:
            compare_detections((expected["bbox"].numpy(), expected["bbox_num"].numpy()),
                               (got["bbox"].numpy(), got["bbox_num"].numpy()), where="auto engine check",
                               score_threshold=float(nms.get("score_threshold", 0.0)),
                               keep_top_k=int(nms.get("keep_top_k", -1)))
        except OnnxCheckError as err:
            exact, note = False, str(err)
    times: Dict[str, list] = {"paddle_inference": [], "openvino": []}
    for _ in range(runs):
        for name, runner in (("paddle_inference", paddle_runner), ("openvino", ov_runner)):
            times[name].append(_median_ms(runner, feeds, 1)[0])
    medians = {name: round(float(np.median(t)), 1) for name, t in times.items()}
    engine = "openvino" if exact and medians["openvino"] < medians["paddle_inference"] else "paddle_inference"
    return {"engine": engine, "ms": medians, "exact": exact, "note": note[:300],
            "input": list(feeds["image"].shape)}


def auto_choice(paddle_runner: Any, model: paddle.nn.Layer, cfg: Dict[str, Any], bf16: bool, threads: int,
                cache: bool) -> Any:
    """``auto`` on CPU: Paddle Inference's runner, or OpenVINO's when it was measured faster on this
    machine for this model and gives the same detections. Measured once per machine and model
    config (``engine_choice.json`` in the export cache; a difference in detections is recorded for
    those weights only); the log says which engine runs and why."""
    allowed = os.environ.get(AUTO_ENGINES_ENV, "paddle_inference,openvino").replace(" ", "").split(",")
    if "openvino" not in allowed or not supports(model) or not ovrt.openvino_installed():
        return paddle_runner
    try:
        import onnx  # noqa: F401
        import paddle2onnx  # noqa: F401
    except ImportError:
        return paddle_runner
    path = os.path.join(cache_root(), CHOICE_FILE)
    key = f"{cfg.get('architecture')} {config_key(cfg)} | {machine_key(threads, bf16)}"
    choices: Dict[str, Any] = {}
    if os.path.isfile(path):
        try:
            with open(path, "r", encoding="utf-8") as f:
                choices = json.load(f)
        except (OSError, ValueError):
            choices = {}
    # A verdict "not the same detections" belongs to these weights (saturated or tied scores of
    # untrained weights differ in any two runtimes); speed with the same detections to the config.
    weights_entry = f"{key} | weights {weights_key(model, cfg)[:16]}"
    entry = choices.get(weights_entry) or choices.get(key)
    ov_runner = None
    if entry is None:
        logger.info("engine: auto measures Paddle Inference and OpenVINO once for this model on this machine")
        try:
            ov_runner = openvino_runner(model, cfg, bf16=bf16, threads=threads, cache=cache,
                                        why="auto: measuring")
            entry = measure_engines(paddle_runner, ov_runner, _measure_input(cfg), bf16, nms=model.nms_settings())
        except Exception as err:  # noqa: BLE001 - OpenVINO is an option; Paddle Inference stays
            logger.warning(f"engine: auto keeps Paddle Inference (the OpenVINO engine failed: "
                           f"{type(err).__name__}: {str(err).splitlines()[-1] if str(err) else ''})")
            entry = {"engine": "paddle_inference", "ms": {}, "exact": False, "note": f"failed: {err}"[:300]}
        choices[key if entry["exact"] else weights_entry] = entry
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + f".{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(choices, f, indent=1)
        os.replace(tmp, path)
    ms = entry.get("ms", {})
    measured = ", ".join(f"{name} {value:.0f} ms" for name, value in ms.items()) or "not measured"
    if entry["engine"] != "openvino":
        why = "" if entry.get("exact", True) else f"; OpenVINO differs: {entry.get('note')}"
        logger.info(f"engine: auto runs Paddle Inference ({measured} per image here{why}; {path})")
        return paddle_runner
    if ov_runner is None:
        ov_runner = openvino_runner(model, cfg, bf16=bf16, threads=threads, cache=cache,
                                    why="auto: measured fastest here")
    logger.info(f"engine: auto runs {ov_runner.description}: measured fastest on this machine with the same "
                f"detections ({measured} per image, input {entry.get('input')}; {path}); --engine "
                f"paddle_inference to keep Paddle Inference")
    ov_runner.trace_s += float(getattr(paddle_runner, "trace_s", 0.0))
    return ov_runner
