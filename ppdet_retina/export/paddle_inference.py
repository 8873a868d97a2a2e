"""Export a trained detector for deployment: Paddle inference files and ``infer_cfg.yml``.

Layout written by :func:`export_model` under ``<output_dir>/<config name>/``::

    model.json + model.pdiparams   the traced graph (PIR) and its weights
    infer_cfg.yml                  everything a runtime needs besides the graph (see below)
    model.onnx                     only with ``onnx=True``: fixed input size, boxes + scores before the
                                   NMS (converted and checked by :mod:`ppdet_retina.export.onnx`)

Graph inputs (dynamic batch, height and width)::

    image        float32 [B, 3, H, W]  normalised, padded to a multiple of the stride
    im_shape     float32 [B, 2]        (h, w) of the resized image before padding
    scale_factor float32 [B, 2]        (scale_y, scale_x) = resized / original

Graph outputs, by export mode (:func:`export_mode` reads it from the config's ``export`` keys;
the model says what each mode returns, see
:mod:`ppdet_retina.modeling.architectures.export_surface`):

* ``detect`` (default; ``post_process: true``): ``bbox`` [N, 6] float32 (class, score, x1, y1,
  x2, y2 in original pixels) and ``bbox_num`` [B] int32, as the dygraph model in eval mode.
* ``candidates`` (``post_process: true, nms: false``): ``boxes`` [B, M, 4] in original pixels
  and ``scores`` [B, C, M]: what the NMS would see (one-stage detectors).
* ``raw`` (``post_process: false`` or ``benchmark: true``): the raw head outputs, per FPN level
  ``cls_logits_<l>`` [B, A*C, h_l, w_l], then per level ``bbox_deltas_<l>`` [B, A*4, h_l, w_l]
  (one-stage detectors), for runtimes that decode themselves.

``infer_cfg.yml`` follows PaddleDetection's deploy format (``mode``, ``arch``,
``draw_threshold``, ``Preprocess`` with ``Resize``/``NormalizeImage``/``Permute``/``PadStride``,
``label_list``, and ``NMS`` when the NMS is left to the runtime) and adds ``export_mode``, the
fields derived from it (:func:`mode_fields`), ``catid_list`` (COCO category id of each class),
``inputs``/``outputs`` (names in graph order) and, for raw outputs, ``anchors``: the settings a
runtime needs to decode them.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from typing import Any, Dict, List, Optional, Sequence, Tuple

import paddle
import paddle.nn as nn
import yaml

from ppdet_retina.core.workspace import ConfigError, create
from ppdet_retina import runtime as predictor
from ppdet_retina.modeling.architectures.export_surface import EXPORT_MODES, Exportable
from ppdet_retina.utils.logger import setup_logger

__all__ = [
    "MODEL_PREFIX",
    "EXPORT_MODES",
    "DeployModel",
    "export_mode",
    "mode_fields",
    "input_spec",
    "build_infer_cfg",
    "preprocess_entries",
    "label_info",
    "export_model",
    "load_exported",
    "run_predictor",
]

logger = setup_logger("ppdet_retina")

MODEL_PREFIX = predictor.MODEL_PREFIX
INPUT_NAMES = ("image", "im_shape", "scale_factor")


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
    unknown = set(section) - {"post_process", "nms", "benchmark", "fuse_conv_bn", "fuse_normalize"}
    if unknown:
        raise ConfigError(f"export: unknown key(s) {sorted(unknown)}; valid keys: post_process, nms, "
                          f"benchmark, fuse_conv_bn")
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


def _trace_and_save(deploy: DeployModel, prefix: str, spec: List[paddle.static.InputSpec]) -> None:
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


# --------------------------------------------------------------------------- infer_cfg.yml

def preprocess_entries(cfg: dict, reader: str = "TestReader") -> List[Dict[str, Any]]:
    """The reader's preprocessing as PaddleDetection deploy entries (``type`` + parameters).

    Each sample and batch op describes itself (``deploy_entry``: Resize, NormalizeImage and
    Permute one to one, PadBatch as ``PadStride``, Decode implicit); random or training-only
    ops have no place in deployment and are refused.
    """
    section = cfg.get(reader)
    if not isinstance(section, dict):
        raise ConfigError(f"export needs the {reader} section (its sample_transforms give the preprocessing)")
    built = create({"name": reader, **{k: v for k, v in section.items() if k != "name"}}, cfg)
    entries: List[Dict[str, Any]] = []
    for key, ops in (("sample_transforms", built.sample_ops), ("batch_transforms", built.batch_ops)):
        for op in ops:
            entry = op.deploy_entry() if hasattr(op, "deploy_entry") else NotImplemented
            if entry is NotImplemented:
                raise ConfigError(f"{reader}.{key}: '{type(op).__name__}' cannot be exported for deployment "
                                  f"(supported: Decode, Resize, NormalizeImage, Permute, PadBatch); remove it "
                                  f"from {reader}")
            if entry is not None:
                entries.append(entry)
    return entries


def label_info(cfg: dict) -> Tuple[List[str], List[int]]:
    """(label names, category id per class) for ``infer_cfg.yml``, as inference labels pictures.

    From the test (else eval) dataset's annotation file, read through ImageFolder (class order
    = category ids ascending). Without a readable one, the default label set of the config's
    ``metric`` (COCO's 80 names and ids, VOC's 20), else the class indices, with a warning
    (:func:`ppdet_retina.data.labels.default_label_set`).
    """
    from ppdet_retina.data.coco import ImageFolder, _join
    from ppdet_retina.data.labels import default_label_set

    for key in ("TestDataset", "EvalDataset"):
        section = cfg.get(key)
        if not isinstance(section, dict) or not section.get("anno_path"):
            continue
        if os.path.isfile(_join(section.get("dataset_dir"), section["anno_path"])):
            folder = ImageFolder(dataset_dir=section.get("dataset_dir"), anno_path=section["anno_path"])
            names = folder.get_label_list()
            return names, [int(folder.clsid2catid[i]) for i in range(len(names))]
    num_classes = cfg.get("num_classes")
    labels = default_label_set(cfg.get("metric"), None if num_classes is None else int(num_classes))
    return labels.names, labels.catids


def build_infer_cfg(cfg: dict, deploy: DeployModel) -> Dict[str, Any]:
    """The content of ``infer_cfg.yml`` for ``cfg`` and the traced ``deploy`` module."""
    labels, catids = label_info(cfg)
    num_classes = cfg.get("num_classes")
    if labels and num_classes is not None and len(labels) != int(num_classes):
        logger.warning(f"export: the annotation file lists {len(labels)} categories but num_classes is "
                       f"{num_classes}; label_list is written as read")
    info: Dict[str, Any] = {
        "mode": "paddle",
        "arch": str(cfg.get("architecture", type(deploy.model).__name__)),
        "draw_threshold": float(cfg.get("draw_threshold", 0.5)),
        "metric": str(cfg.get("metric", "COCO")),
        "min_subgraph_size": 3,
        "use_dynamic_shape": True,
        "num_classes": None if num_classes is None else int(num_classes),
        **mode_fields(deploy.mode),
        "inputs": list(INPUT_NAMES),
        "outputs": deploy.output_names(),
        "Preprocess": preprocess_entries(cfg),
        "label_list": labels,
        "catid_list": catids,
    }
    if deploy.mode != "detect":
        info["NMS"] = deploy.model.nms_settings()  # PaddleDetection's key for an NMS left to the runtime
    if deploy.mode == "raw":
        info["anchors"] = deploy.model.decode_settings()
    return info


def _write_yaml(path: str, data: Dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(data, f, sort_keys=False, default_flow_style=None)


# --------------------------------------------------------------------------- export

def _load_model(cfg: dict, weights: Optional[str]) -> nn.Layer:
    from ppdet_retina.io import checkpoint

    if "architecture" not in cfg:
        raise ConfigError("config has no 'architecture' key (e.g. architecture: RetinaNet)")
    model = create(cfg["architecture"], cfg)
    if weights:
        checkpoint.load_weights(model, weights)
        logger.info(f"export: loaded weights from {weights}")
    else:
        logger.warning("export: no weights given (-o weights=...): exporting randomly initialised parameters")
    model.eval()
    return model


def export_model(cfg: dict, output_dir: str = "output_inference", weights: Optional[str] = None,
                 model: Optional[nn.Layer] = None, raw_outputs: Optional[bool] = None, onnx: bool = False,
                 onnx_input_size: Optional[Sequence[int]] = None, onnx_opset: Optional[int] = None,
                 check_onnx: bool = True, fixed_input_size: Optional[Sequence[int]] = None) -> str:
    """Export ``cfg``'s model to ``<output_dir>/<cfg filename>/``; returns that folder.

    Args:
        cfg: a loaded config (``load_config``).
        output_dir: parent folder of the export.
        weights: ``.pdparams`` file (or its prefix) to load; default ``cfg['weights']``.
        model: an already built (and loaded) model to export instead of building one.
        raw_outputs: True exports the raw head outputs, False forces post-processing;
            None follows ``cfg['export']``.
        onnx: also write ``model.onnx`` (needs paddle2onnx) at ``onnx_input_size`` (H, W).
        onnx_opset: ONNX opset to ask paddle2onnx for (>= 11, default 11); infer_cfg.yml records the
            file's own.
        check_onnx: compare the ONNX model with the Paddle graphs when onnxruntime is installed
            (:func:`ppdet_retina.export.onnx.check_onnx`); a difference raises OnnxCheckError.
        fixed_input_size: (H, W) to trace one image of exactly that padded size instead of dynamic
            shapes (for models whose code needs static sizes; runtimes pad every image to it).
    """
    mode = export_mode(cfg, raw_outputs)
    if model is None:
        model = _load_model(cfg, weights if weights is not None else cfg.get("weights"))
    model.eval()
    save_dir = os.path.join(output_dir, str(cfg.get("filename", "model")))
    os.makedirs(save_dir, exist_ok=True)
    deploy = DeployModel(model, mode)
    info = build_infer_cfg(cfg, deploy)
    prefix = os.path.join(save_dir, MODEL_PREFIX)
    if fixed_input_size:
        height, width = (int(v) for v in fixed_input_size)
        _trace_and_save(deploy, prefix, input_spec(1, height, width))
        info["use_dynamic_shape"] = False
        info["input_size"] = [height, width]
    else:
        _trace_and_save(deploy, prefix, input_spec())
    infer_cfg = os.path.join(save_dir, "infer_cfg.yml")
    _write_yaml(infer_cfg, info)
    if onnx:
        from ppdet_retina.export import onnx as onnx_export

        size = list(onnx_input_size) if onnx_input_size else onnx_export.default_onnx_size(info["Preprocess"])
        feeds = onnx_export.sample_feeds(cfg, *size) if check_onnx else None
        info["onnx"] = onnx_export.export_onnx(
            deploy, save_dir, size, onnx_export.ONNX_OPSET if onnx_opset is None else onnx_opset,
            check=check_onnx, feeds=feeds, paddle_dir=None if fixed_input_size else save_dir)
        _write_yaml(infer_cfg, info)
    logger.info(f"export: {info['arch']} ({mode} outputs: {', '.join(info['outputs'])}) "
                f"written to {save_dir}")
    return save_dir


# --------------------------------------------------------------------------- running an export
# The runtime lives in ppdet_retina.runtime (shared with tools/deploy.py); these names stay
# here for callers that run what they just exported.

run_predictor = predictor.run


def load_exported(model_file: str, params_file: str, use_mkldnn: bool = True, bf16: bool = False,
                  cpu_threads: int = 1, use_gpu: bool = False) -> Any:
    """A ``paddle.inference`` predictor for an exported model (CPU oneDNN by default); see
    :func:`ppdet_retina.runtime.create_predictor`."""
    return predictor.create_predictor(model_file, params_file, device="gpu" if use_gpu else "cpu",
                                      cpu_threads=cpu_threads, mkldnn=use_mkldnn, bf16=bf16)
