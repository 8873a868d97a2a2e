"""Synthetic COCO-format dataset of coloured shapes: the embedded demo data.

Each image has 1-5 filled shapes (the shape alone decides the class) on a smooth,
noisy background. Boxes are computed from the visible pixels of each shape, so
they are tight even where a shape is cut by the border or partly covered by
another. The output is a regular COCO layout::

    <output>/images/train/000001.png ...   <output>/images/val/...
    <output>/annotations/instances_train.json, instances_val.json
    <output>/.complete                     written last; holds the generation parameters

:func:`ensure_demo_dataset` skips the work when the marker matches the
parameters and regenerates a half-written or differently-parameterised set.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np

__all__ = ["CATEGORIES", "ensure_demo_dataset", "generate_split", "render_image", "is_complete"]

logger = logging.getLogger(__name__)

CATEGORIES = [
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 2, "name": "rectangle", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
]
MARKER = ".complete"
SPLITS = ("train", "val")
MIN_SIDE = 12            # smallest shape extent in px, before border clipping
MIN_VISIBLE = 0.6        # share of a shape that must stay visible (border and occlusion)
MIN_CONTRAST = 120       # L1 distance (0..765) between a shape's colour and what is under/around it
NOISE_SIGMA = 8.0        # per-pixel Gaussian noise, moderate so that the shapes stay learnable


# ----------------------------------------------------------------------------- drawing

def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth random colour field plus a faint texture of lines: float32 [size,size,3]."""
    grid = rng.uniform(40, 215, (4, 4, 3)).astype(np.float32)
    bg = cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)
    for _ in range(int(rng.integers(2, 6))):
        p1 = tuple(int(v) for v in rng.integers(0, size, 2))
        p2 = tuple(int(v) for v in rng.integers(0, size, 2))
        shade = float(rng.uniform(-25, 25))
        layer = np.zeros((size, size), np.float32)
        cv2.line(layer, p1, p2, 1.0, int(rng.integers(1, 3)))
        bg += layer[:, :, None] * shade
    return np.clip(bg, 0, 255)


def _shape_mask(rng: np.random.Generator, cat_id: int, size: int) -> np.ndarray:
    """Mask of one shape on a canvas padded by ``size`` on each side (so shapes may leave the image)."""
    canvas = np.zeros((3 * size, 3 * size), np.uint8)
    extent = float(np.exp(rng.uniform(np.log(MIN_SIDE), np.log(size / 2))))
    # Centres reach slightly past the border so some shapes are cut by it.
    cx, cy = rng.uniform(-0.15 * extent, size + 0.15 * extent, 2) + size
    if cat_id == 1:
        cv2.circle(canvas, (int(round(cx)), int(round(cy))), max(3, int(round(extent / 2))), 1, -1)
    elif cat_id == 2:
        aspect = rng.uniform(0.45, 1.0)
        w, h = (extent, extent * aspect) if rng.random() < 0.5 else (extent * aspect, extent)
        x1, y1 = int(round(cx - w / 2)), int(round(cy - h / 2))
        cv2.rectangle(canvas, (x1, y1), (x1 + max(4, int(round(w))) - 1, y1 + max(4, int(round(h))) - 1), 1, -1)
    else:
        radius = extent / np.sqrt(3.0)  # side length = extent
        angle = rng.uniform(0, 2 * np.pi)
        pts = [(cx + radius * np.cos(angle + k * 2 * np.pi / 3), cy + radius * np.sin(angle + k * 2 * np.pi / 3))
               for k in range(3)]
        cv2.fillPoly(canvas, [np.round(np.array(pts)).astype(np.int32)], 1)
    return canvas


def _pick_colour(rng: np.random.Generator, avoid: List[np.ndarray]) -> Optional[np.ndarray]:
    for _ in range(30):
        colour = rng.uniform(0, 255, 3)
        if all(np.abs(colour - a).sum() >= MIN_CONTRAST for a in avoid):
            return colour
    return None


def _try_place(rng, cat_id: int, size: int, idmap: np.ndarray, full_areas: List[int],
               bg: np.ndarray, colours: List[np.ndarray]) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """One placement attempt: the visible mask and colour, or None if the shape would be
    mostly off the image, would hide too much of an earlier shape, or has no contrasting colour."""
    canvas = _shape_mask(rng, cat_id, size)
    total = int(canvas.sum())
    mask = canvas[size:2 * size, size:2 * size].astype(bool)
    if total == 0 or mask.sum() < MIN_VISIBLE * total:
        return None
    ys, xs = np.nonzero(mask)
    if xs.max() - xs.min() + 1 < 6 or ys.max() - ys.min() + 1 < 6:
        return None
    covered = idmap[mask]
    for k, full in enumerate(full_areas):
        still = int((idmap == k).sum()) - int((covered == k).sum())
        if still < MIN_VISIBLE * full:
            return None
    touched = [colours[k] for k in np.unique(covered) if k >= 0]
    colour = _pick_colour(rng, touched + [bg[mask].mean(axis=0)])
    return None if colour is None else (mask, colour)


def render_image(rng: np.random.Generator, size: int,
                 noise_sigma: float = NOISE_SIGMA) -> Tuple[np.ndarray, List[Dict]]:
    """Draw one image. Returns (uint8 [size,size,3] RGB, [{category_id, bbox xywh, area}, ...])."""
    bg = _background(rng, size)
    image = bg.copy()
    idmap = np.full((size, size), -1, np.int32)
    cats, full_areas, colours = [], [], []
    for _ in range(int(rng.integers(1, 6))):
        cat_id = int(rng.integers(1, len(CATEGORIES) + 1))
        for _attempt in range(20):
            placed = _try_place(rng, cat_id, size, idmap, full_areas, bg, colours)
            if placed is not None:
                break
        if placed is None:
            continue
        mask, colour = placed
        idmap[mask] = len(cats)
        image[mask] = colour
        cats.append(cat_id)
        full_areas.append(int(mask.sum()))
        colours.append(colour)
    if noise_sigma > 0:
        image += rng.normal(0.0, noise_sigma, image.shape)
    image = np.clip(np.round(image), 0, 255).astype(np.uint8)
    return image, _boxes_from_idmap(idmap, cats)


def _boxes_from_idmap(idmap: np.ndarray, cats: List[int]) -> List[Dict]:
    """Tight xywh boxes around each instance's visible pixels (pixel k spans [k, k+1))."""
    anns = []
    for k, cat_id in enumerate(cats):
        ys, xs = np.nonzero(idmap == k)
        x1, y1, x2, y2 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        anns.append({"category_id": cat_id, "bbox": [x1, y1, x2 - x1, y2 - y1], "area": int(len(xs))})
    return anns


# ----------------------------------------------------------------------------- dataset

def generate_split(output: str, split: str, num_images: int, size: int, seed: int) -> str:
    """Write ``images/<split>/*.png`` and ``annotations/instances_<split>.json``; returns the json path."""
    # Each split has its own stream, so the val set does not change with num_train.
    rng = np.random.default_rng([int(seed), SPLITS.index(split) if split in SPLITS else len(split)])
    image_dir = os.path.join(output, "images", split)
    os.makedirs(image_dir, exist_ok=True)
    images, annotations = [], []
    for img_id in range(1, num_images + 1):
        image, anns = render_image(rng, size)
        name = f"{img_id:06d}.png"
        cv2.imwrite(os.path.join(image_dir, name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        images.append({"id": img_id, "file_name": name, "height": size, "width": size})
        for ann in anns:
            ann.update({"id": len(annotations) + 1, "image_id": img_id, "iscrowd": 0, "segmentation": []})
            annotations.append(ann)
    data = {"info": {"description": f"synthetic shapes ({split}), seed {seed}"}, "licenses": [],
            "images": images, "annotations": annotations, "categories": CATEGORIES}
    anno_file = os.path.join(output, "annotations", f"instances_{split}.json")
    _write_json(anno_file, data)
    return anno_file


def _write_json(path: str, data: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def _params(num_train: int, num_val: int, size: int, seed: int) -> dict:
    return {"num_train": int(num_train), "num_val": int(num_val), "size": int(size), "seed": int(seed),
            "version": 1}


def is_complete(path: str, **params) -> bool:
    """True when ``path`` holds a finished dataset made with these parameters."""
    marker = os.path.join(path, MARKER)
    if not os.path.isfile(marker):
        return False
    try:
        with open(marker, "r", encoding="utf-8") as f:
            return json.load(f) == _params(**params)
    except (OSError, json.JSONDecodeError):
        return False


def _remove_outputs(path: str) -> None:
    """Delete only what this generator writes, never other files in ``path``."""
    for split in SPLITS:
        shutil.rmtree(os.path.join(path, "images", split), ignore_errors=True)
        anno = os.path.join(path, "annotations", f"instances_{split}.json")
        if os.path.exists(anno):
            os.remove(anno)
    marker = os.path.join(path, MARKER)
    if os.path.exists(marker):
        os.remove(marker)


def ensure_demo_dataset(path: str = "dataset/shapes", num_train: int = 1200, num_val: int = 100,
                        size: int = 128, seed: int = 0, force: bool = False) -> str:
    """Make sure ``path`` holds the shapes dataset for these parameters; returns ``path``.

    Deterministic for a seed. Skips all work when the marker says the dataset is
    complete with the same parameters; otherwise (missing, half written, other
    parameters, or ``force``) regenerates it.
    """
    if num_train < 1 or num_val < 1 or size < 32:
        raise ValueError(f"need num_train >= 1, num_val >= 1 and size >= 32 "
                         f"(got {num_train}, {num_val}, {size})")
    params = dict(num_train=num_train, num_val=num_val, size=size, seed=seed)
    if not force and is_complete(path, **params):
        return path
    logger.info("writing the synthetic shapes dataset to %s (%s)", path, params)
    _remove_outputs(path)
    generate_split(path, "train", num_train, size, seed)
    generate_split(path, "val", num_val, size, seed)
    _write_json(os.path.join(path, MARKER), _params(**params))
    return path
