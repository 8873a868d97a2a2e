"""Write PaddleDetection's detections on a photograph, from the image file on, as a test fixture (dev only).

Run it with the python of a venv that has PaddleDetection 2.6 (``import ppdet``), never ours, giving
PaddleDetection's own config file:

    /tmp/ppdet_venv/bin/python tools/dev/ppdet_file_reference.py --arch retinanet \\
        --config PaddleDetection/configs/retinanet/retinanet_r50_fpn_1x_coco.yml
    /tmp/ppdet_venv/bin/python tools/dev/ppdet_file_reference.py --arch faster_rcnn \\
        --config PaddleDetection/configs/faster_rcnn/faster_rcnn_r50_fpn_1x_coco.yml

Everything between the file and the detections is PaddleDetection's: its ``ImageFolder`` and
``TestReader`` as the config has them (Decode, Resize 800x1333 keep_ratio, NormalizeImage,
Permute, PadBatch), the model in eval mode with its post-processing, ``get_categories`` for the
labels (no annotation file, so the COCO default set) and ``get_infer_results`` for the COCO rows
that its ``tools/infer.py --save_results`` writes. The model is the published structure narrowed
as in ``ppdet_reference.py`` (same overrides), with weights drawn from a seed per PaddleDetection
parameter name (:func:`state_dict`), so ``tests/test_parity_from_file.py`` rebuilds them without a
weight file. Output: ``tests/data/ppdet_file_reference_<arch>.json``.

The photograph, ``tests/data/parity_photo.jpg`` (480x640, so the resize scale 5/3 gives a
fractional 1066.67 px width), was made once by :func:`make_photo` (``--make-photo PATH``):
sky and ground gradients, fractal texture, shaded shapes, blur, sensor noise, JPEG. The committed
file is the reference; a JPEG codec elsewhere may encode the same array differently.

The module's top level needs only numpy and cv2: the test imports it for :func:`state_dict`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from typing import Any, Dict, List, Sequence

import cv2
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
PHOTO = os.path.join(REPO, "tests", "data", "parity_photo.jpg")
PHOTO_SHAPE = (480, 640)
SAMPLES = 512  # preprocessed-image positions recorded, to check the preprocessing on its own


# The seeded weights, batches and overrides come from the sibling script.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ppdet_reference as ref  # noqa: E402
OVERRIDES = {"retinanet": ref.RETINANET_OVERRIDES, "faster_rcnn": ref.FASTER_RCNN_OVERRIDES}


# Classifier biases moved for this photograph, whose large flat regions excite the seeded classifiers
# more evenly than ppdet_reference's noise batch: without the shift every anchor / RoI would pass the
# 0.05 score threshold and the 100-detection cap would cut among near-equal scores. With it there are
# 76 detections per model, all at least 1e-4 above the threshold. (parameter, class index or None for
# all, shift)
BIAS_SHIFTS = {
    "retinanet": [("head.retina_cls.bias", None, -1.0)],
    "faster_rcnn": [("bbox_head.bbox_score.bias", 80, 4.9)],  # background (last of 81) further ahead
}


def state_dict(names: Sequence[str], shapes: Sequence[Sequence[int]], seed: int,
               arch: str) -> Dict[str, np.ndarray]:
    """The seeded weights by PaddleDetection name (``ppdet_reference.param_value``), biases shifted
    by :data:`BIAS_SHIFTS`."""
    state = ref.make_state_dict(names, shapes, seed)
    for name, index, shift in BIAS_SHIFTS[arch]:
        value = state[name].copy()
        if index is None:
            value += np.float32(shift)
        else:
            value[index] += np.float32(shift)
        state[name] = value
    return state


def fixture_path(arch: str) -> str:
    return os.path.join(REPO, "tests", "data", f"ppdet_file_reference_{arch}.json")


# --------------------------------------------------------------------------- the photograph

def _fractal(rng: np.random.Generator, h: int, w: int, octaves: int = 5) -> np.ndarray:
    """Sum of upsampled noise at halving cell sizes: the 1/f-like spectrum of natural scenes."""
    out = np.zeros((h, w), np.float32)
    for k in range(octaves):
        cells = 4 * 2 ** k
        small = rng.standard_normal((cells * h // w + 2, cells + 2)).astype(np.float32)
        out += cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC) / (1.6 ** k)
    return out / np.abs(out).max()


def make_photo(path: str, seed: int = 7) -> None:
    """Write a 480x640 JPEG with natural-image statistics (see the module docstring)."""
    rng = np.random.default_rng(seed)
    h, w = PHOTO_SHAPE
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    horizon = 0.45 * h + 18 * np.sin(xx / 90.0) + 10 * np.sin(xx / 23.0 + 1.0)
    sky = np.stack([255 - 0.25 * yy, 220 - 0.15 * yy, 170 - 0.1 * yy], -1)  # BGR: blue fading to haze
    clouds = np.clip(_fractal(rng, h, w), 0, 1)[..., None] * 90
    ground = np.stack([60 + 0.05 * yy, 110 + 0.04 * yy, 90 + 0.12 * yy], -1)
    grass = _fractal(rng, h, w, 6)[..., None] * np.array([25, 45, 35], np.float32)
    image = np.where((yy < horizon)[..., None], sky + clouds, ground + grass).astype(np.float32)
    for _ in range(14):  # shaded objects: ellipses, boxes and triangles at several scales
        color = rng.uniform(20, 235, 3)
        cx, cy = rng.uniform(0, w), rng.uniform(0.2 * h, h)
        size = rng.uniform(15, 110)
        shade = 1.0 + 0.35 * ((xx - cx) / (size + 1)).clip(-1, 1)
        mask = np.zeros((h, w), np.uint8)
        kind = rng.integers(3)
        if kind == 0:
            cv2.ellipse(mask, (int(cx), int(cy)), (int(size), int(size * rng.uniform(0.4, 1.2))),
                        float(rng.uniform(0, 180)), 0, 360, 255, -1, cv2.LINE_AA)
        elif kind == 1:
            cv2.rectangle(mask, (int(cx - size), int(cy - size * 0.7)), (int(cx + size), int(cy + size)), 255, -1)
        else:
            pts = np.array([[cx, cy - size], [cx - size, cy + size * 0.8], [cx + size, cy + size * 0.8]], np.int32)
            cv2.fillPoly(mask, [pts], 255, cv2.LINE_AA)
        alpha = (mask.astype(np.float32) / 255.0)[..., None]
        texture = 1.0 + 0.15 * _fractal(rng, h, w, 4)[..., None]
        image = image * (1 - alpha) + (color * shade[..., None] * texture) * alpha
    for _ in range(6):  # thin dark branches / wires
        p1 = (int(rng.uniform(0, w)), int(rng.uniform(0, h)))
        p2 = (int(rng.uniform(0, w)), int(rng.uniform(0, h)))
        cv2.line(image, p1, p2, tuple(float(v) for v in rng.uniform(10, 60, 3)), int(rng.integers(1, 4)), cv2.LINE_AA)
    image = cv2.GaussianBlur(image, (0, 0), 0.8)
    image += rng.normal(0, 2.5, image.shape).astype(np.float32)  # sensor noise
    out = np.clip(image, 0, 255).astype(np.uint8)
    ok = cv2.imwrite(path, out, [cv2.IMWRITE_JPEG_QUALITY, 88])
    if not ok:
        raise SystemExit(f"cannot write {path}")


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def sample_positions(size: int, seed: int) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).choice(size, size=min(SAMPLES, size), replace=False))


# --------------------------------------------------------------------------- reference run (ppdet)

def run(args: argparse.Namespace) -> Dict[str, Any]:
    import paddle
    from ppdet.core.workspace import create, load_config, merge_config
    from ppdet.data.source.category import get_categories
    from ppdet.metrics.coco_utils import get_infer_results

    paddle.set_device("cpu")
    if args.arch == "faster_rcnn":
        ref._patch_ppdet_rpn_concat()
        ref._patch_tensor_index()
    cfg = load_config(args.config)
    merge_config(OVERRIDES[args.arch])
    model = create(cfg.architecture)
    names = list(model.state_dict().keys())
    shapes = [list(model.state_dict()[n].shape) for n in names]
    state = state_dict(names, shapes, args.seed, args.arch)
    ref.load_seeded(model, state)
    model.eval()

    dataset = create("TestDataset")()
    dataset.set_images([args.image])
    loader = create("TestReader")(dataset, 0)
    anno_file = dataset.get_anno()
    clsid2catid, catid2name = get_categories(cfg.metric, anno_file=anno_file)

    batch = next(iter(loader))
    with paddle.no_grad():
        outs = model(batch)
    outs = {k: v.numpy() for k, v in outs.items() if hasattr(v, "numpy")}
    outs["im_id"] = batch["im_id"].numpy()
    results = get_infer_results(outs, clsid2catid)["bbox"]
    image = batch["image"].numpy()
    positions = sample_positions(image.size, args.seed)
    return {
        "ppdet_version": getattr(sys.modules["ppdet"], "__version__", "unknown"),
        "arch": args.arch,
        "config": os.path.basename(args.config),
        "overrides": OVERRIDES[args.arch],
        "seed": args.seed,
        "bias_shifts": BIAS_SHIFTS[args.arch],
        "photo": os.path.basename(args.image),
        "photo_sha256": file_sha256(args.image),
        "param_names": names,
        "param_shapes": shapes,
        "param_abs_sum": float(sum(np.abs(v.astype(np.float64)).sum() for v in state.values())),
        "anno_file": anno_file,
        "labels": {"clsid2catid": {str(k): int(v) for k, v in clsid2catid.items()},
                   "names": [str(catid2name[clsid2catid[i]]) for i in range(len(clsid2catid))]},
        "input": {"image_shape": list(image.shape), "im_shape": batch["im_shape"].numpy().tolist(),
                  "scale_factor": batch["scale_factor"].numpy().tolist(),
                  "sample_positions": positions.tolist(),
                  "sample_values": image.reshape(-1)[positions].astype(float).tolist(),
                  "abs_mean": float(np.abs(image.astype(np.float64)).mean())},
        "bbox": outs["bbox"].astype(float).tolist(),
        "bbox_num": outs["bbox_num"].astype(int).tolist(),
        "results": [{"category_id": int(r["category_id"]), "bbox": [float(v) for v in r["bbox"]],
                     "score": float(r["score"])} for r in results],
    }


def main(argv: List[str] | None = None) -> None:
    os.environ.setdefault("GLOG_minloglevel", "2")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=sorted(OVERRIDES), default="retinanet")
    p.add_argument("--config", help="PaddleDetection's config file for --arch (its own text, unchanged)")
    p.add_argument("--image", default=PHOTO)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="default: tests/data/ppdet_file_reference_<arch>.json")
    p.add_argument("--make-photo", metavar="PATH", default=None, help="write the photograph and exit")
    args = p.parse_args(argv)
    if args.make_photo:
        make_photo(args.make_photo)
        print(f"wrote {args.make_photo} ({os.path.getsize(args.make_photo) / 1024:.0f} KB)")
        return
    if not args.config:
        p.error("--config PaddleDetection/configs/<arch>/..._coco.yml is needed")
    try:
        import ppdet  # noqa: F401
    except ImportError:
        sys.exit("ppdet_file_reference.py needs PaddleDetection: run it with the python of the ppdet venv")
    out = run(args)
    path = args.out or fixture_path(args.arch)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(out, f, separators=(",", ":"))
    scores = sorted((r["score"] for r in out["results"]), reverse=True)
    gaps = np.diff(scores) if len(scores) > 1 else np.array([0.0])
    print(f"wrote {path} ({os.path.getsize(path) / 1024:.0f} KB): {len(out['results'])} detections "
          f"(bbox_num {out['bbox_num']}), scores {scores[0] if scores else None} .. {scores[-1] if scores else None}, "
          f"smallest score gap {float(np.abs(gaps).min()):.2e}, im_shape {out['input']['im_shape']}")


if __name__ == "__main__":
    main()
