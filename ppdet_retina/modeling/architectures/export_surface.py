"""What an architecture tells the exporter: its graph outputs per export mode, its NMS, its raw-output decoding.

The exporter (:mod:`ppdet_retina.export.paddle_inference`) traces ``model.export_outputs(inputs, mode)``
and writes ``infer_cfg.yml`` from ``export_output_names``, ``nms_settings`` and
``decode_settings``; it never looks inside a head.

Export modes (``infer_cfg.yml``'s ``export_mode``; :func:`ppdet_retina.export.paddle_inference.export_mode`
maps PaddleDetection's ``export.post_process/nms/benchmark`` keys onto them):

* ``detect``: ``bbox`` [K, 6] (class, score, x1, y1, x2, y2 in original pixels) and ``bbox_num``
  [B] int32, as the model's eval forward;
* ``candidates``: ``boxes`` [B, M, 4] (original pixels) and ``scores`` [B, C, M], what the NMS
  would see; a runtime applies the NMS of ``nms_settings()``;
* ``raw``: the head outputs as they leave the convs; a runtime decodes them with
  ``decode_settings()``.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import paddle

from ppdet_retina.core.workspace import ConfigError

__all__ = ["EXPORT_MODES", "Exportable", "nms_as_dict"]

EXPORT_MODES = ("detect", "candidates", "raw")


def nms_as_dict(nms: Any) -> Dict[str, Any]:
    """A MultiClassNMS's settings as plain values (the NMS a runtime applies to candidates)."""
    return {"score_threshold": float(nms.score_threshold), "nms_top_k": int(nms.nms_top_k),
            "keep_top_k": int(nms.keep_top_k), "nms_threshold": float(nms.nms_threshold),
            "normalized": bool(nms.normalized), "nms_eta": float(nms.nms_eta),
            "background_label": int(nms.background_label)}


class Exportable:
    """Mixin of an exportable architecture. The default covers ``detect`` (the eval forward).

    A subclass that supports more modes lists them in ``export_modes`` and extends
    :meth:`export_outputs` / :meth:`export_output_names`; it always writes :meth:`nms_settings`.
    """

    export_modes: Tuple[str, ...] = ("detect",)

    def check_export_mode(self, mode: str) -> None:
        """ConfigError naming the config keys when ``mode`` is unknown or not supported here."""
        if mode not in EXPORT_MODES:
            raise ConfigError(f"export mode must be one of {list(EXPORT_MODES)}, got '{mode}'")
        if mode not in self.export_modes:
            raise ConfigError(
                f"{type(self).__name__} exports only {list(self.export_modes)}, not '{mode}' (that needs a "
                f"one-stage detector such as RetinaNet); set export.post_process: true, export.nms: true "
                f"and export.benchmark: false")

    def export_outputs(self, inputs: Dict[str, paddle.Tensor], mode: str) -> Tuple[paddle.Tensor, ...]:
        """The graph outputs for ``inputs`` (image, im_shape, scale_factor) in ``mode``, in
        :meth:`export_output_names` order."""
        self.check_export_mode(mode)
        out = self(inputs)
        return out["bbox"], out["bbox_num"]

    def export_output_names(self, mode: str) -> List[str]:
        """Names of :meth:`export_outputs` in graph order (written to infer_cfg.yml)."""
        self.check_export_mode(mode)
        return ["bbox", "bbox_num"]

    def nms_settings(self) -> Dict[str, Any]:
        """The NMS the model applies (and a runtime must apply to ``candidates``)."""
        raise NotImplementedError(f"{type(self).__name__} must implement nms_settings()")

    def decode_settings(self) -> Optional[Dict[str, Any]]:
        """What a runtime needs to decode ``raw`` outputs; None when the model has no raw export."""
        return None
