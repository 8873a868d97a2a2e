"""Prediction on image files: drawn pictures and ``bbox.json`` (tools/infer.py)."""

from __future__ import annotations

import copy
import json
import os
from typing import Dict, List, Sequence

import cv2
import numpy as np
import paddle

from ppdet_retina.core.workspace import create
from ppdet_retina.data.transforms import decode_image
from ppdet_retina.inference.session import ModelSession
from ppdet_retina.metrics.coco import detections_to_coco
from ppdet_retina.runtime import draw_detections, split_detections, unique_output_path
from ppdet_retina.utils.logger import setup_logger

__all__ = ["Predictor", "write_picture"]

logger = setup_logger("ppdet_retina")


class Predictor(ModelSession):
    """``cfg``'s model with loaded weights, run on images given to :meth:`predict`.

    Reads ``TestDataset`` (its ``anno_path`` gives label names, category ids and image ids) and
    ``TestReader`` besides the model sections.
    """

    def __init__(self, cfg: dict, engine: str = "auto", bf16: bool = False):
        super().__init__(cfg, "TestDataset", engine, bf16, check_classes=False)

    def predict(self, images: Sequence[str] | str, draw_threshold: float = 0.5, output_dir: str = "output",
                save_results: bool = False, save_threshold: float = 0.0, visualize: bool = True) -> List[dict]:
        """Detect on ``images`` (files / folders / a list of files); with ``visualize`` write drawn
        images to ``output_dir``.

        Returns one dict per image: ``im_file``, ``im_id`` and ``bbox`` [N, 6]
        (class, score, x1, y1, x2, y2 in original pixels). With ``save_results``
        also writes ``output_dir/bbox.json``: COCO results (xywh, original
        category ids) with each image's ``file_name``, for the detections scoring at
        least ``save_threshold``; ``image_id`` is the id ``TestDataset.anno_path``
        gives the file (see ImageFolder).

        Each picture is written as soon as its batch is done. A file that cannot be
        read is skipped with a warning naming it, and once every other image is
        written a ValueError lists the skipped ones (tools/infer.py exits non-zero).
        A picture that cannot be written is an error at once.
        """
        dataset = copy.copy(self.dataset)
        dataset.set_images(images)
        loader = create("TestReader", self.cfg)(dataset, 0)
        imid2path = dataset.get_imid2path()
        labels = dataset.get_label_list() if hasattr(dataset, "get_label_list") else []
        os.makedirs(output_dir, exist_ok=True)
        runner = self.runner()
        results, coco, used = [], [], set()
        catmap = getattr(dataset, "clsid2catid", None) or {}
        # The orientation Decode chose for files the json lists (its recorded size).
        anno_hw = {r["im_id"]: r.get("anno_hw") for r in getattr(dataset, "roidbs", [])}
        with paddle.no_grad():
            for batch in loader:
                outputs = runner(batch)
                for res in _split_per_image(batch, outputs, imid2path):
                    kept = sum(1 for r in res["bbox"] if r[1] >= draw_threshold and r[0] >= 0)
                    if visualize:
                        # The picture as Decode gave it to the model, in BGR.
                        image = decode_image(res["im_file"], anno_hw.get(res["im_id"]), strict=False)[:, :, ::-1]
                        drawn = draw_detections(image, res["bbox"], labels, threshold=draw_threshold)
                        out_path = unique_output_path(output_dir, res["im_file"], used)
                        write_picture(out_path, drawn)
                        logger.info(f"{res['im_file']}: {kept} detection(s) >= {draw_threshold} -> {out_path}")
                    else:
                        logger.info(f"{res['im_file']}: {kept} detection(s) >= {draw_threshold}")
                    if save_results:
                        rows = res["bbox"][res["bbox"][:, 1] >= save_threshold]
                        mapping = catmap or _identity_map(rows)
                        for det in detections_to_coco(rows, [len(rows)], [res["im_id"]], mapping):
                            det["file_name"] = os.path.basename(res["im_file"])
                            coco.append(det)
                    results.append(res)
        if save_results:
            path = os.path.join(output_dir, "bbox.json")
            with open(path, "w", encoding="utf-8") as f:
                json.dump(coco, f)
            logger.info(f"{len(coco)} detections saved to {path}")
        _raise_if_skipped(loader.bad_images, len(results), output_dir)
        return results


def _split_per_image(batch: dict, outputs: dict, imid2path: Dict[int, str]) -> List[dict]:
    im_ids = batch["im_id"].numpy().reshape(-1)
    per_image = split_detections(outputs["bbox"].numpy(), outputs["bbox_num"].numpy())
    return [{"im_id": int(im_id), "im_file": imid2path[int(im_id)], "bbox": rows}
            for im_id, rows in zip(im_ids, per_image)]


def _identity_map(rows: np.ndarray) -> Dict[int, int]:
    """Without label information a class index stands for its own category id."""
    return {int(c): int(c) for c in np.asarray(rows).reshape(-1, 6)[:, 0] if c >= 0}


def write_picture(path: str, image_bgr: np.ndarray) -> None:
    """Encode and write ``image_bgr``; ValueError naming ``path`` when that fails (full disk, no
    permission), since cv2.imwrite only returns False."""
    ok, data = cv2.imencode(os.path.splitext(path)[1] or ".jpg", np.ascontiguousarray(image_bgr))
    if not ok:
        raise ValueError(f"cannot encode the picture for {path}")
    try:
        with open(path, "wb") as f:
            f.write(data.tobytes())
    except OSError as err:
        raise ValueError(f"cannot write {path}: {err.strerror or err}; check the free space and "
                         f"permissions of the output folder") from None


def _raise_if_skipped(bad: List[dict], done: int, output_dir: str) -> None:
    if not bad:
        return
    shown = "; ".join(f"{r['im_file']}: {r['reason']}" for r in bad[:5])
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    raise ValueError(f"{len(bad)} image(s) could not be read and were skipped ({done} written to "
                     f"{output_dir}): {shown}{more}")
