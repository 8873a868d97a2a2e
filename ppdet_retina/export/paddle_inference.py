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

import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import paddle.nn as nn
import yaml

from ppdet_retina.core.workspace import ConfigError, create
from ppdet_retina.export import onnx as onnx_export
from ppdet_retina.export.trace import (EXPORT_MODES, INPUT_NAMES, MODEL_PREFIX, DeployModel, export_mode, input_spec,
                                       mode_fields, trace)
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
]

logger = setup_logger("ppdet_retina")



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
        trace(deploy, prefix, input_spec(1, height, width))
        info["use_dynamic_shape"] = False
        info["input_size"] = [height, width]
    else:
        trace(deploy, prefix, input_spec())
    infer_cfg = os.path.join(save_dir, "infer_cfg.yml")
    _write_yaml(infer_cfg, info)
    if onnx:
        size = list(onnx_input_size) if onnx_input_size else onnx_export.default_onnx_size(info["Preprocess"])
        feeds = onnx_export.sample_feeds(cfg, *size) if check_onnx else None
        info["onnx"] = onnx_export.export_onnx(
            deploy, save_dir, size, onnx_export.ONNX_OPSET if onnx_opset is None else onnx_opset,
            check=check_onnx, feeds=feeds, paddle_dir=None if fixed_input_size else save_dir)
        _write_yaml(infer_cfg, info)
    logger.info(f"export: {info['arch']} ({mode} outputs: {', '.join(info['outputs'])}) "
                f"written to {save_dir}")
    return save_dir
