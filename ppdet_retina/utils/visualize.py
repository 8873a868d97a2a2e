"""Drawing detections on images with OpenCV."""

from __future__ import annotations

import colorsys
from typing import Optional, Sequence, Tuple

import cv2
import numpy as np

__all__ = ["class_color", "draw_detections"]


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

