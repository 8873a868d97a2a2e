"""Tracing a detector for deployment: the graph's inputs and outputs, one export mode, one traced file.

Every export goes through here: the Paddle Inference files (:mod:`ppdet_retina.export.paddle_inference`),
the ONNX conversion (:mod:`ppdet_retina.export.onnx`) and the cached export the default engine runs
(:mod:`ppdet_retina.inference.engines`).

Graph inputs (dynamic batch, height and width unless a fixed size is asked for)::

    image        float32 [B, 3, H, W]  normalised, padded to a multiple of the stride
    im_shape     float32 [B, 2]        (h, w) of the resized image before padding
    scale_factor float32 [B, 2]        (scale_y, scale_x) = resized / original
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from typing import Any, Dict, List, Optional, Sequence, Tuple

import paddle
import paddle.nn as nn

from ppdet_retina.core.workspace import ConfigError
from ppdet_retina.modeling.architectures.export_surface import EXPORT_MODES, Exportable
from ppdet_retina.runtime import MODEL_PREFIX

__all__ = ["MODEL_PREFIX", "EXPORT_MODES", "INPUT_NAMES", "DeployModel", "export_mode", "mode_fields", "input_spec",
           "trace"]

INPUT_NAMES = ("image", "im_shape", "scale_factor")
# The config's ``export`` section: the keys that choose the export mode (read by export_mode only)...
EXPORT_KEYS = ("post_process", "nms", "benchmark")
# ...and PaddleDetection's keys accepted so its configs load, which change nothing here.
EXPORT_IGNORED = {
    "fuse_conv_bn": "Paddle Inference folds BatchNorm into the convolutions itself when it loads the graph "
                    "(conv2d_bn_fuse_pass), so the exported files need no folding",
    "fuse_normalize": "PaddleDetection moves NormalizeImage into the graph; here infer_cfg.yml's Preprocess "
                      "lists it and every runtime applies it",
}


# --------------------------------------------------------------------------- the traced module

class DeployModel(nn.Layer):
    """Wrap a detector so that its graph takes three tensors and returns a flat tuple.

    What the tuple holds in ``mode`` (one of EXPORT_MODES) is the model's answer
    (``export_outputs``, ``export_output_names``); the model must be :class:`Exportable`.
    """

    def __init__(self, model: nn.Layer, mode: str = "detect"):
        super().__init__()
        if not isinstance(model, Exportable):
            raise ConfigError(f"{type(model).__name__} does not say what it exports: an exportable "
                              f"architecture derives from ppdet_retina.modeling.architectures.export_surface"
                              f".Exportable")
        model.check_export_mode(mode)
        self.model = model
        self.mode = mode

    def forward(self, image: paddle.Tensor, im_shape: paddle.Tensor,
                scale_factor: paddle.Tensor) -> Tuple[paddle.Tensor, ...]:
        inputs = {"image": image, "im_shape": im_shape, "scale_factor": scale_factor}
        outs = tuple(self.model.export_outputs(inputs, self.mode))
        return outs[:-1] + (_tie_inputs(outs[-1], im_shape, scale_factor),)

    def output_names(self) -> List[str]:
        """Names of the outputs in graph order (written to infer_cfg.yml)."""
        return self.model.export_output_names(self.mode)


def _tie_inputs(out: paddle.Tensor, im_shape: paddle.Tensor, scale_factor: paddle.Tensor) -> paddle.Tensor:
    """``out`` plus an exact zero computed from every input.

    Paddle refuses to save a graph with an input nothing reads, and RetinaNet never reads
    ``im_shape`` (raw outputs read neither it nor ``scale_factor``). Tying them in keeps
    one input contract (image, im_shape, scale_factor) for every export and runtime.
    DeployModel ties the last output.
    """
    # One element of each suffices; a full reduction (sum) would need ONNX opset 13.
    zero = (im_shape[0, 0] + scale_factor[0, 0]) * 0.0
    return out + zero.astype(out.dtype)


def export_mode(cfg: dict, raw_outputs: Optional[bool] = None) -> str:
    """The config's ``export`` section as one of EXPORT_MODES; the only reader of its mode keys.

    PaddleDetection's keys: ``benchmark: true`` or ``post_process: false`` -> ``raw``;
    ``nms: false`` -> ``candidates``; otherwise ``detect``. ``raw_outputs`` (a command-line
    flag) wins over ``post_process`` when given.
    """
    section = dict(cfg.get("export") or {})
    unknown = set(section) - set(EXPORT_KEYS) - set(EXPORT_IGNORED)
    if unknown:
        raise ConfigError(f"export: unknown key(s) {sorted(unknown)}; valid keys: {', '.join(EXPORT_KEYS)} "
                          f"(accepted and ignored: {', '.join(EXPORT_IGNORED)})")
    post_process = bool(section.get("post_process", True))
    if raw_outputs is not None:
        post_process = not raw_outputs
    if bool(section.get("benchmark", False)) or not post_process:
        return "raw"
    return "detect" if bool(section.get("nms", True)) else "candidates"


def mode_fields(mode: str) -> Dict[str, Any]:
    """infer_cfg.yml's fields for an export mode: ``export_mode`` and those derived from it.

    ``post_process`` (the graph decodes boxes) and ``nms_inside`` (the graph ends with the NMS)
    are what runtimes reading older exports look at; they never disagree with ``export_mode``.
    """
    if mode not in EXPORT_MODES:
        raise ValueError(f"export mode must be one of {list(EXPORT_MODES)}, got '{mode}'")
    return {"export_mode": mode, "post_process": mode != "raw", "nms_inside": mode == "detect"}


def input_spec(batch: Optional[int] = None, height: Optional[int] = None,
               width: Optional[int] = None) -> List[paddle.static.InputSpec]:
    """InputSpecs of INPUT_NAMES (image, im_shape, scale_factor); ``None`` dimensions stay dynamic."""
    shapes = ([batch, 3, height, width], [batch, 2], [batch, 2])
    return [paddle.static.InputSpec(shape, "float32", name=name) for shape, name in zip(shapes, INPUT_NAMES)]


def trace(deploy: DeployModel, prefix: str, spec: List[paddle.static.InputSpec]) -> None:
    """Trace ``deploy`` and write ``prefix.json`` + ``prefix.pdiparams``."""
    deploy.eval()
    with _without_stderr_lines(_KNOWN_TRACE_NOISE):
        static = paddle.jit.to_static(deploy, input_spec=spec, full_graph=True)
        paddle.jit.save(static, prefix)


# Paddle 3.3 logs this glog warning the first time a traced `a + b` passes its (empty) `out=`
# argument on; it concerns Paddle's own tensor API, not the model.
_KNOWN_TRACE_NOISE = ("Paddle static graph(PIR) not support input out tensor",)


@contextlib.contextmanager
def _without_stderr_lines(needles: Sequence[str]):
    """Pass everything written to the stderr file descriptor through, except lines holding a needle.

    glog writes from C++ straight to fd 2, so neither the ``warnings`` module nor logging can
    filter it; the block's stderr goes to a temporary file and is copied back after it.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = captured.read().decode("utf-8", errors="replace")
            kept = [line for line in text.splitlines(keepends=True) if not any(n in line for n in needles)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()
