"""The engine evaluation and prediction run on: the dygraph model, or its export on Paddle Inference.

On a CPU, Paddle Inference with oneDNN runs the exported RetinaNet / Faster R-CNN forward
faster than dygraph, more so in bf16 (CPUs with avx512_bf16), with the same detections
(measurements: docs/DESIGN.md, "Performance notes"; ``tools/benchmark.py`` measures a machine). So ``tools/eval.py``, ``tools/infer.py`` and training's ``--eval`` use it by default:

* ``auto`` (default): Paddle Inference on CPU for the shipped architectures (RetinaNet,
  FasterRCNN), or OpenVINO when it is installed, the model exports candidates (RetinaNet) and it
  was measured faster with the same detections on this machine (measured once per machine and
  model config, :func:`ppdet_retina.inference.openvino_engine.auto_choice`); dygraph on GPU and for
  other architectures, with one log line saying why.
* ``paddle_inference``: always (on GPU too); an export failure is an error.
* ``openvino``: the ONNX candidates graph on OpenVINO + Paddle's NMS op (RetinaNet; needs
  ``pip install openvino``; :mod:`ppdet_retina.inference.openvino_engine`).
* ``dygraph``: the model itself.

The export is traced once per weights and kept in the export cache
(:mod:`ppdet_retina.inference.export_cache`), so a second evaluation of the same weights loads it
without tracing. Training's evaluations
see new weights every time; they trace into a temporary folder that is removed once the predictor
holds the weights (:class:`EngineChooser` measures whether that pays).
"""

from __future__ import annotations

import os
import time
from typing import Any, Dict, Optional, Tuple

import numpy as np
import paddle

from ppdet_retina.core.workspace import ConfigError
from ppdet_retina.core import env
from ppdet_retina import runtime as rt
from ppdet_retina.inference.export_cache import CACHE_ENV, cache_root, cached_folder, export_folder, weights_key  # noqa: F401
from ppdet_retina.utils.logger import setup_logger

__all__ = ["ENGINES", "SHIPPED_ARCHITECTURES", "PredictorModel", "EngineChooser", "add_engine_args", "choose_engine",
           "cached_export", "inference_runner"]

logger = setup_logger("ppdet_retina")

ENGINES = ("auto", "paddle_inference", "openvino", "dygraph")
SHIPPED_ARCHITECTURES = ("RetinaNet", "FasterRCNN")

class PredictorModel:
    """An exported detector on Paddle Inference with the dygraph model's call contract.

    ``runner(batch)`` takes a reader batch (``image`` [B, 3, H, W], ``im_shape`` [B, 2],
    ``scale_factor`` [B, 2], tensors or arrays) and returns ``{'bbox': [K, 6], 'bbox_num': [B]}``
    tensors as the model in eval mode does, so evaluation and prediction loops run either.
    """

    def __init__(self, predictor: Any, description: str):
        self.predictor = predictor
        self.description = description
        self.trace_s = 0.0  # what tracing this export cost (0.0: loaded from the cache)

    def __call__(self, batch: Dict[str, Any]) -> Dict[str, paddle.Tensor]:
        feeds = {k: np.asarray(batch[k].numpy() if hasattr(batch[k], "numpy") else batch[k], np.float32)
                 for k in ("image", "im_shape", "scale_factor")}
        bbox, bbox_num = rt.run(self.predictor, feeds)[:2]
        env.restore_cpu_threads()  # the run leaves MKL at one thread, which would slow training after it
        return {"bbox": paddle.to_tensor(bbox), "bbox_num": paddle.to_tensor(bbox_num)}

    def eval(self) -> "PredictorModel":
        return self

    def train(self) -> "PredictorModel":
        return self


def add_engine_args(parser: Any, training: bool = False) -> None:
    """``--engine`` and ``--bf16`` of tools/eval.py, tools/infer.py and (for --eval) tools/train.py."""
    if training:
        what, traced = "training's --eval evaluations", "each evaluation traces the new weights, and auto " \
            "switches to dygraph when that costs more than it saves"
    else:
        what, traced = "the model", "the export is traced once per weights and cached"
    parser.add_argument("--engine", choices=ENGINES, default="auto",
                        help=f"what runs {what}: auto (default) = Paddle Inference with oneDNN on CPU for "
                             f"RetinaNet and FasterRCNN (~2x faster than dygraph, same detections; {traced}), "
                             f"dygraph elsewhere; paddle_inference; openvino (RetinaNet's ONNX graph on OpenVINO + "
                             f"Paddle's NMS, pip install openvino); dygraph (the model itself)")
    parser.add_argument("--bf16", action="store_true",
                        help="bfloat16 arithmetic: Paddle Inference's oneDNN bf16 kernels, or OpenVINO's bf16 "
                             "(AMX where the CPU has it); CPUs with avx512_bf16 only; scores differ from fp32 "
                             "by ~1e-2")


def choose_engine(requested: str, device: str, architecture: str, bf16: bool = False) -> Tuple[str, str]:
    """(``paddle_inference``, ``openvino`` or ``dygraph``, why) for ``requested`` engine on ``device``.

    ConfigError for an unknown engine, for ``bf16`` without Paddle Inference on a CPU, and for
    ``bf16`` on a CPU without avx512_bf16 (emulated bf16 is slower than fp32).
    """
    if requested not in ENGINES:
        raise ConfigError(f"--engine {requested!r}: choose one of {', '.join(ENGINES)}")
    on_gpu = str(device).startswith("gpu")
    if bf16:
        if requested == "dygraph" or on_gpu:
            raise ConfigError("--bf16 runs bfloat16 kernels of Paddle Inference or OpenVINO on a CPU; use it "
                              "with --engine paddle_inference, openvino (or auto) on a CPU")
        if not rt.cpu_supports_bf16():
            raise ConfigError("--bf16 needs a CPU with avx512_bf16 (absent from /proc/cpuinfo flags): bf16 "
                              "would be emulated and slower than fp32; run without --bf16")
    if requested == "dygraph":
        return "dygraph", "--engine dygraph"
    if requested == "paddle_inference":
        return "paddle_inference", "--engine paddle_inference"
    if requested == "openvino":
        if on_gpu:
            raise ConfigError("--engine openvino runs on the CPU; use it with use_gpu=false")
        from ppdet_retina.inference import openvino_engine

        openvino_engine.check_available(architecture)
        return "openvino", "--engine openvino"
    if on_gpu:
        return "dygraph", "on GPU the default engine is dygraph (Paddle Inference is not measured faster there)"
    if architecture not in SHIPPED_ARCHITECTURES:
        return "dygraph", f"{architecture} is not one of {', '.join(SHIPPED_ARCHITECTURES)}, whose exports " \
                          f"are tested equal to dygraph; --engine paddle_inference to try"
    return "paddle_inference", "default on CPU"


def _trace(model: paddle.nn.Layer, folder: str) -> float:
    """Trace ``model`` (detections with NMS, dynamic shapes) into ``folder``; returns the seconds it took."""
    from ppdet_retina.export.trace import DeployModel, input_spec, trace

    tic = time.perf_counter()
    was_training = model.training
    try:
        trace(DeployModel(model, "detect"), os.path.join(folder, rt.MODEL_PREFIX), input_spec())
    finally:
        if was_training:
            model.train()
    return time.perf_counter() - tic


def cached_export(model: paddle.nn.Layer, cfg: Dict[str, Any], root: Optional[str] = None) -> Tuple[str, float]:
    """(export folder, trace seconds: 0.0 when it came from the cache) for ``model``'s weights
    (:func:`ppdet_retina.inference.export_cache.cached_folder`)."""
    return cached_folder(model, cfg, lambda folder: _trace(model, folder), root=root)


def _describe(device: str, bf16: bool, threads: int) -> str:
    if str(device).startswith("gpu"):
        return "Paddle Inference (GPU)"
    return f"Paddle Inference (oneDNN {'bf16' if bf16 else 'fp32'}, {threads} thread(s))"


def inference_runner(model: paddle.nn.Layer, cfg: Dict[str, Any], engine: str = "auto", bf16: bool = False,
                     device: str = "cpu", cache: bool = True, threads: Optional[int] = None) -> Any:
    """What evaluation / prediction should call on batches: ``model`` itself or a :class:`PredictorModel`.

    Args:
        model: the built detector with the weights to run (left in eval mode).
        cfg: its config (``architecture`` and the model sections enter the cache key).
        engine: ``auto``, ``paddle_inference`` or ``dygraph`` (see the module notes).
        bf16: oneDNN bfloat16 kernels (CPUs with avx512_bf16).
        device: ``cpu`` or ``gpu...`` (the Trainer's device).
        cache: keep the export in the cache (eval / infer); False traces into a temporary folder
            removed at once (training's evaluations, whose weights are new each time).
        threads: predictor math threads on CPU; default every core this process may use.

    Under ``auto`` a failed export falls back to dygraph with a warning; under
    ``paddle_inference`` it raises.
    """
    architecture = str(cfg.get("architecture", type(model).__name__))
    chosen, why = choose_engine(engine, device, architecture, bf16)
    model.eval()
    if chosen == "dygraph":
        logger.info(f"engine: dygraph ({why})")
        return model
    threads = env.cpu_threads_per_process() if threads is None else int(threads)
    if chosen == "openvino":
        from ppdet_retina.inference.openvino_engine import openvino_runner

        return openvino_runner(model, cfg, bf16=bf16, threads=threads, cache=cache, why=why)
    try:
        with export_folder(model, cfg, lambda folder: _trace(model, folder), cache) as (folder, seconds):
            predictor = rt.create_predictor(*rt.model_files(folder), device="gpu" if str(device).startswith("gpu")
                                            else "cpu", cpu_threads=threads, bf16=bf16)
    except Exception as err:  # noqa: BLE001 - auto falls back on any trace / load failure
        if engine == "paddle_inference":
            raise
        # Paddle's trace errors span many lines of transformed code; the last one names the problem.
        reason = next((ln.strip() for ln in reversed(str(err).splitlines()) if ln.strip()), "")
        logger.warning(f"engine: dygraph (the Paddle Inference export of {architecture} failed: "
                       f"{type(err).__name__}: {reason}; --engine dygraph skips the attempt)")
        return model
    description = _describe(device, bf16, threads)
    if seconds:
        where = f"cached in {folder}" if cache else "for this evaluation"
        logger.info(f"engine: {description} ({why}); traced {architecture} in {seconds:.2f} s, {where}; "
                    f"--engine dygraph to run the model itself")
    else:
        logger.info(f"engine: {description} ({why}); export of these weights reused from {folder} (no trace)")
    runner = PredictorModel(predictor, description)
    runner.trace_s = seconds
    if engine == "auto" and not str(device).startswith("gpu"):
        from ppdet_retina.inference.openvino_engine import auto_choice

        return auto_choice(runner, model, cfg, bf16, threads, cache)
    return runner


class EngineChooser:
    """The engine a Trainer's evaluate / predict run on, chosen again for every evaluation.

    Outside training the export is cached by weights (:func:`inference_runner`). Training's
    evaluations see new weights each time, so each traces afresh; whether that pays depends on
    the model and the size of the evaluation set. Under ``auto`` the first evaluation runs on
    Paddle Inference and records trace and evaluation time; when the trace cost more than the
    evaluation itself, the next evaluation runs dygraph to compare, and from then on the engine
    with the smaller measured total (trace included) is kept. Both give the same detections.
    """

    def __init__(self, engine: str = "auto", bf16: bool = False, device: str = "cpu", training: bool = False):
        self.engine, self.bf16, self.device, self.training = engine, bool(bf16), device, bool(training)
        self.totals: Dict[str, float] = {}  # engine -> seconds of its last evaluation (trace included)
        self._current: Optional[str] = None
        self._trace_s = 0.0
        self._eval_s = 0.0

    def check(self, architecture: str) -> None:
        """Refuse a bad engine / bf16 choice before any work (ConfigError)."""
        choose_engine(self.engine, self.device, architecture, self.bf16)

    def runner(self, model: paddle.nn.Layer, cfg: Dict[str, Any]) -> Any:
        """The callable to run batches through for this evaluation / prediction."""
        if self.training and self.engine == "auto" and self._training_choice() == "dygraph":
            model.eval()
            self._current = "dygraph"
            return model
        # "auto" keeps its rules here (dygraph on GPU and for other architectures, fallback on failure).
        runner = inference_runner(model, cfg, self.engine, self.bf16, self.device, cache=not self.training)
        self._current = "dygraph" if runner is model else \
            "openvino" if type(runner).__name__ == "OpenVinoModel" else "paddle_inference"
        self._trace_s = float(getattr(runner, "trace_s", 0.0))
        return runner

    def finished(self, eval_s: float) -> None:
        """Record how long the evaluation that used the last runner took (training's choice)."""
        if self._current is not None:
            self._eval_s = float(eval_s)
            self.totals[self._current] = eval_s + (self._trace_s if self._current == "paddle_inference" else 0.0)

    def _training_choice(self) -> str:
        pi, dy = self.totals.get("paddle_inference"), self.totals.get("dygraph")
        if pi is None:
            return "paddle_inference"
        if dy is None:
            if self._trace_s > self._eval_s:
                logger.info(f"engine: the trace ({self._trace_s:.2f} s) cost more than the evaluation on Paddle "
                            f"Inference ({self._eval_s:.2f} s); this evaluation runs dygraph to compare")
                return "dygraph"
            return "paddle_inference"
        choice = "paddle_inference" if pi <= dy else "dygraph"
        if choice != self._current:
            logger.info(f"engine: training's evaluations run {choice} from now on (last evaluation: "
                        f"{pi:.2f} s on Paddle Inference with its trace, {dy:.2f} s on dygraph)")
        return choice
