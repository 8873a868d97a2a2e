"""Shared test fixtures: a tiny COCO dataset with known boxes (``tiny_coco``) and a json writer;
tiny RetinaNet / Faster R-CNN configs; PaddleDetection's parameter tables (``tests/data``); the
one place that finds PaddleDetection's own config files (:func:`ppdet_config`); and the one way a test
runs a tool (:func:`run_tool`, :func:`tool_env`), loads a script by path (:func:`load_script`) and
lists a file's imports (:func:`module_imports`).

``tiny_coco`` layout (all under a tmp dir)::

    images/img_{id}.png            grey background, each box drawn as a filled colour rectangle
    annotations/instances.json     categories 12, 3, 7 (listed out of order) named c12, c3, c7

    image 1: 96x128 (h x w)  cat 3 [10,20,40,60], cat 12 [50,10,90,40]
    image 2: 128x64          cat 7 [5,5,25,25], cat 12 [50,100,80,140] (clipped to [50,100,64,128]),
                             crowd cat 3 [30,60,50,90]
    image 3: 64x64           no annotations (empty image)
    image 5: 80x100          cat 7 [20,30,60,50]; plus a zero-width box and a box fully outside
                             the image (both dropped: 2 dropped boxes in total)
"""

from __future__ import annotations

import ast
import importlib.util
import json
import logging
import os
import subprocess
import sys
from types import ModuleType, SimpleNamespace
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import pytest

# (image id, h, w, [(category id, xywh, iscrowd), ...])
_TINY_IMAGES = [
    (1, 96, 128, [(3, [10, 20, 30, 40], 0), (12, [50, 10, 40, 30], 0)]),
    (2, 128, 64, [(7, [5, 5, 20, 20], 0), (12, [50, 100, 30, 40], 0), (3, [30, 60, 20, 30], 1)]),
    (3, 64, 64, []),
    (5, 80, 100, [(7, [10, 10, 0, 5], 0), (3, [200, 200, 10, 10], 0), (7, [20, 30, 40, 20], 0)]),
]
# Non-contiguous ids listed out of order: the dataset must sort them (3 -> 0, 7 -> 1, 12 -> 2).
TINY_CATEGORIES = [{"id": 12, "name": "c12"}, {"id": 3, "name": "c3"}, {"id": 7, "name": "c7"}]
# What COCODataSet should load: non-crowd boxes after clipping, as (category id, xyxy).
TINY_EXPECTED = {
    1: [(3, [10, 20, 40, 60]), (12, [50, 10, 90, 40])],
    2: [(7, [5, 5, 25, 25]), (12, [50, 100, 64, 128])],
    3: [],
    5: [(7, [20, 30, 60, 50])],
}
TINY_CROWD = {2: [(3, [30, 60, 50, 90])]}
TINY_DROPPED = 2


def write_image(path: str, h: int, w: int, boxes_xywh: Sequence[Sequence[float]] = (), seed: int = 0) -> None:
    """A grey PNG with each box filled in its own colour (so flips can be checked on pixels)."""
    rng = np.random.RandomState(seed)
    image = np.full((h, w, 3), 128, np.uint8)
    for x, y, bw, bh in boxes_xywh:
        colour = [int(c) for c in rng.randint(0, 256, 3)]
        x1, y1 = int(max(x, 0)), int(max(y, 0))
        x2, y2 = int(min(x + bw, w)), int(min(y + bh, h))
        if x2 > x1 and y2 > y1:
            image[y1:y2, x1:x2] = colour
    os.makedirs(os.path.dirname(path), exist_ok=True)
    cv2.imwrite(path, image)


def write_coco_json(path: str, images: List[dict], annotations: List[dict], categories: List[dict]) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    return path


def make_coco(root: str, spec=_TINY_IMAGES, categories=TINY_CATEGORIES, image_dir: str = "images",
              anno_path: str = "annotations/instances.json") -> SimpleNamespace:
    """Write images and a COCO json for ``spec`` = [(id, h, w, [(cat, xywh, crowd), ...]), ...]."""
    images, annotations, ann_id = [], [], 100
    for img_id, h, w, anns in spec:
        name = f"img_{img_id}.png"
        write_image(os.path.join(root, image_dir, name), h, w, [a[1] for a in anns], seed=img_id)
        images.append({"id": img_id, "file_name": name, "height": h, "width": w})
        for cat, xywh, crowd in anns:
            annotations.append({"id": ann_id, "image_id": img_id, "category_id": cat, "bbox": list(xywh),
                                "area": float(xywh[2] * xywh[3]), "iscrowd": crowd, "segmentation": []})
            ann_id += 1
    anno_file = write_coco_json(os.path.join(root, anno_path), images, annotations, categories)
    return SimpleNamespace(dataset_dir=root, image_dir=image_dir, anno_path=anno_path,
                           anno_file=anno_file, image_root=os.path.join(root, image_dir),
                           images={i[0]: (i[1], i[2]) for i in spec})


@pytest.fixture(autouse=True)
def _dygraph_threads_as_found():
    """Each test starts at the CPU thread count the process began with. Training and the engines set
    it (core/env.py; the engines restore it after every Paddle Inference run), and a count left over
    from an earlier test changes float summation order, hence the trajectories of the tests that train."""
    import paddle

    from ppdet_retina.core import env

    saved = env._DYGRAPH_THREADS
    yield
    env._DYGRAPH_THREADS = saved
    paddle.base.core.set_num_threads(saved or 1)  # 1: what `import paddle` leaves (OMP_NUM_THREADS=1)


@pytest.fixture(scope="session", autouse=True)
def _export_cache_in_tmp(tmp_path_factory):
    """eval / infer trace their Paddle Inference export into a cache (inference/engines.py); tests and
    the tools they start keep it out of the user's ~/.cache."""
    previous = os.environ.get("PPDET_RETINA_EXPORT_CACHE")
    os.environ["PPDET_RETINA_EXPORT_CACHE"] = str(tmp_path_factory.mktemp("export_cache"))
    yield
    if previous is None:
        os.environ.pop("PPDET_RETINA_EXPORT_CACHE", None)
    else:
        os.environ["PPDET_RETINA_EXPORT_CACHE"] = previous


@pytest.fixture
def messages(caplog):
    """Log records of the package logger (which does not propagate to the root logger)."""
    logger = logging.getLogger("ppdet_retina")
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)


@pytest.fixture
def tiny_coco(tmp_path) -> SimpleNamespace:
    """A tiny COCO dataset; see the module docstring.

    Attributes: dataset_dir, image_dir, anno_path (relative to dataset_dir),
    anno_file and image_root (absolute), images {id: (h, w)}, expected
    {id: [(category id, xyxy)]} (non-crowd, clipped), crowd {id: [(cat, xyxy)]},
    dropped (boxes dropped when loading), categories (the json's list),
    catid2clsid {3: 0, 7: 1, 12: 2}.
    """
    ns = make_coco(str(tmp_path / "tiny_coco"))
    ns.expected = TINY_EXPECTED
    ns.crowd = TINY_CROWD
    ns.dropped = TINY_DROPPED
    ns.categories = TINY_CATEGORIES
    ns.catid2clsid = {3: 0, 7: 1, 12: 2}
    return ns


# --------------------------------------------------------------------------- repository files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_DIR = os.path.join(REPO, "tests", "data")
RETINANET_CONFIG = os.path.join(REPO, "configs", "retinanet", "retinanet_r50_fpn_1x.yml")
FASTER_RCNN_BASE = os.path.join(REPO, "configs", "faster_rcnn", "_base_", "faster_rcnn_r50_fpn.yml")
PACKAGE = "ppdet_retina"


def tool_env(extra_env: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The environment the tools a test starts run in: this process's, with Paddle's C++ logs and
    UserWarnings quietened, plus ``extra_env``."""
    env = dict(os.environ, GLOG_minloglevel="2", PYTHONWARNINGS="ignore::UserWarning")
    env.update(extra_env or {})
    return env


def run_tool(name_or_path: str, *args: str, timeout: float = 120, extra_env: Optional[Dict[str, str]] = None
             ) -> "subprocess.CompletedProcess[str]":
    """Run a script (a name under tools/, or a path) with ``args`` from the repository root, as a user
    runs it, under :func:`tool_env`; returns the finished process with its output captured as text."""
    path = name_or_path if os.path.isabs(name_or_path) else os.path.join(REPO, "tools", name_or_path)
    return subprocess.run([sys.executable, path, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, env=tool_env(extra_env))


def load_script(rel_path: str, name: str) -> ModuleType:
    """Import the script at ``rel_path`` (relative to the repository root) as a module called ``name``."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, rel_path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def module_imports(path: str, root: Optional[str] = None) -> List[Tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``, relative ones resolved against the
    file's place under ``root`` (default: the repository)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    # A relative import of level n drops the module's last n name parts (for __init__, the package's own).
    here = os.path.relpath(path, root or REPO)[:-3].replace(os.sep, ".").split(".")
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[:-node.level]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            # `from ppdet_retina import engine` imports the sub-package itself.
            if module == PACKAGE:
                found.extend((node.lineno, f"{PACKAGE}.{alias.name}") for alias in node.names)
    return found


def launch_two_ranks(log_dir: str, script_args: Sequence[str], timeout: float = 85,
                     extra_env: Optional[Dict[str, str]] = None
                     ) -> Tuple["subprocess.CompletedProcess[str]", Dict[int, str]]:
    """Run a script (``script_args``: its path and arguments) in two CPU processes under
    paddle.distributed.launch from the repository root; returns the finished launcher and each rank's
    worker log that exists."""
    env = tool_env(extra_env)
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--log_level", "WARNING", "--log_dir", log_dir,
           "--nproc_per_node", "2", *script_args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)
    logs = {}
    for rank in (0, 1):
        path = os.path.join(log_dir, f"workerlog.{rank}")
        if os.path.exists(path):
            with open(path) as f:
                logs[rank] = f.read()
    return proc, logs


def read_param_table(arch: str) -> Dict[str, List[int]]:
    """PaddleDetection's R50-FPN state dict for ``arch`` ('retinanet' or 'faster_rcnn'): {name: shape}.

    The tables live in tests/data and are written by tools/dev/ppdet_param_table.py, in
    PaddleDetection's order (one ``name<TAB>[shape]<TAB>dtype`` line per entry).
    """
    rows = {}
    with open(os.path.join(DATA_DIR, f"ppdet_{arch}_r50_fpn_params.tsv"), encoding="utf-8") as f:
        for line in f:
            name, shape, _ = line.rstrip("\n").split("\t")
            rows[name] = [int(d) for d in shape.strip("[]").split(",") if d.strip()]
    return rows


# --------------------------------------------------------------------------- PaddleDetection's own configs

# Not part of this repository. The default is where a development checkout keeps them beside the clone.
PPDET_CONFIGS_ENV = "PPDET_CONFIGS"
_PPDET_CONFIGS_DEFAULT = os.path.join(os.path.dirname(REPO), "shared", "reference", "ppdet_configs")


def _ppdet_configs_root() -> str:
    return os.environ.get(PPDET_CONFIGS_ENV) or _PPDET_CONFIGS_DEFAULT


def ppdet_configs_dir() -> Optional[str]:
    """PaddleDetection's ``configs/`` folder: ``$PPDET_CONFIGS``, else ../shared/reference/ppdet_configs
    beside the clone; None when that folder does not exist."""
    root = _ppdet_configs_root()
    return root if os.path.isdir(root) else None


def ppdet_configs_missing_reason(what: str = "PaddleDetection's config files") -> str:
    return (f"{what} not found (looked in {_ppdet_configs_root()}): set {PPDET_CONFIGS_ENV} to a "
            f"PaddleDetection checkout's configs/ folder (git clone -b release/2.6 "
            f"https://github.com/PaddlePaddle/PaddleDetection) to run this check")


def ppdet_config(relative: str) -> str:
    """Path of PaddleDetection's ``configs/<relative>``; skips the calling test when it is not there."""
    root = ppdet_configs_dir()
    path = os.path.join(root, relative) if root else None
    if path is None or not os.path.isfile(path):
        pytest.skip(ppdet_configs_missing_reason(f"PaddleDetection's configs/{relative}"))
    return path


# --------------------------------------------------------------------------- tiny model configs

_TINY_RETINANET = """
_BASE_: ['{base}']
use_gpu: false
num_classes: 3
epoch: {epoch}
log_iter: 1
snapshot_epoch: 1
save_dir: {save_dir}
worker_num: 0
pretrain_weights: ''
ResNet: {{depth: 18, width_mult: 0.125, freeze_at: -1, freeze_norm: false, return_idx: [1, 2, 3]}}
FPN: {{out_channel: 16}}
RetinaHead:
  conv_feat: {{name: RetinaFeat, feat_in: 16, feat_out: 16, num_convs: 1}}
LearningRate:
  base_lr: {base_lr}
  schedulers:
  - !PiecewiseDecay {{gamma: 0.1, milestones: [1]}}
  - !LinearWarmup {{start_factor: 0.5, steps: 2}}
TrainDataset: {{name: COCODataSet, dataset_dir: {root}, image_dir: {image_dir}, anno_path: {anno}}}
EvalDataset: {{name: COCODataSet, dataset_dir: {root}, image_dir: {image_dir}, anno_path: {anno}, allow_empty: true}}
TestDataset: {{name: ImageFolder, dataset_dir: {root}, anno_path: {anno}}}
TrainReader:
  sample_transforms: &ops
  - Decode: {{}}
  - Resize: {{target_size: [64, 64], keep_ratio: false}}
  - NormalizeImage: {{is_scale: true, mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}}
  - Permute: {{}}
  batch_transforms: [PadBatch: {{pad_to_stride: 32}}]
  batch_size: {batch_size}
  shuffle: false
EvalReader: {{sample_transforms: *ops, batch_transforms: [PadBatch: {{pad_to_stride: 32}}], batch_size: 2}}
TestReader: {{sample_transforms: *ops, batch_transforms: [PadBatch: {{pad_to_stride: 32}}], batch_size: 1}}
"""


def write_tiny_config(tmp_path, coco, epoch=2, base_lr=0.01, batch_size=2, name="tiny_retina.yml") -> str:
    """A tiny RetinaNet config over the ``tiny_coco`` fixture (64x64 images, 1/8-width ResNet-18)."""
    path = os.path.join(str(tmp_path), name)
    with open(path, "w") as f:
        f.write(_TINY_RETINANET.format(base=RETINANET_CONFIG, epoch=epoch,
                                       save_dir=os.path.join(str(tmp_path), "output"), base_lr=base_lr,
                                       root=coco.dataset_dir, image_dir=coco.image_dir, anno=coco.anno_path,
                                       batch_size=batch_size))
    return path


def tiny_faster_rcnn_config(tmp_path, extra: str = ""):
    """Our Faster R-CNN R50-FPN base narrowed to a 1/8-width ResNet-18, loaded (returns the config)."""
    from ppdet_retina.core.workspace import load_config

    path = tmp_path / "tiny_faster_rcnn.yml"
    path.write_text(f"""
_BASE_: ['{FASTER_RCNN_BASE}']
num_classes: 3
ResNet: {{depth: 18, width_mult: 0.125, freeze_at: -1, freeze_norm: false}}
FPN: {{out_channel: 32}}
RPNHead:
  anchor_generator: {{anchor_sizes: [[8], [16], [32], [64], [128]]}}
  rpn_target_assign: {{batch_size_per_im: 64, use_random: false}}
  train_proposal: {{pre_nms_top_n: 1000, post_nms_top_n: 1000}}
  test_proposal: {{pre_nms_top_n: 100, post_nms_top_n: 100}}
BBoxAssigner: {{batch_size_per_im: 64, use_random: false}}
TwoFCHead: {{out_channel: 64}}
{extra}
""")
    return load_config(str(path))


# --------------------------------------------------------------------------- ground truth from the model itself

TINY_CATIDS = sorted(c["id"] for c in TINY_CATEGORIES)  # class index -> category id (ascending ids)


def model_detections(model, cfg) -> Dict[int, np.ndarray]:
    """{image id: [K, 6] rows (class, score, x1, y1, x2, y2)} of the dygraph model over the config's EvalDataset."""
    import paddle

    from ppdet_retina.core.workspace import create

    dataset = create("EvalDataset", cfg)
    out = {}
    model.eval()
    with paddle.no_grad():
        for batch in create("EvalReader", cfg)(dataset, 0):
            result = model(batch)
            bbox, counts = result["bbox"].numpy().reshape(-1, 6), result["bbox_num"].numpy()
            start = 0
            for im_id, count in zip(batch["im_id"].numpy().reshape(-1), counts):
                out[int(im_id)] = bbox[start:start + count]
                start += int(count)
    return out


def detections_from_bbox_json(path: str, catids: Sequence[int] = TINY_CATIDS) -> Dict[int, np.ndarray]:
    """The rows of :func:`model_detections` read back from an evaluation's COCO results file (bbox.json)."""
    with open(path) as f:
        results = json.load(f)
    out: Dict[int, list] = {}
    for r in results:
        x, y, w, h = r["bbox"]
        out.setdefault(int(r["image_id"]), []).append([catids.index(r["category_id"]), r["score"], x, y, x + w, y + h])
    return {im_id: np.asarray(rows, np.float64) for im_id, rows in out.items()}


def write_derived_ground_truth(coco, detections: Dict[int, np.ndarray], name: str = "derived.json",
                               per_image: int = 3, min_boxes: int = 8, max_shift: float = 6.0) -> str:
    """Write a COCO json (beside ``coco``'s) whose boxes are each image's ``per_image`` best detections, each
    moved by 1 to ``max_shift`` px in x and y; returns its path relative to the dataset folder.

    Evaluated against it, the model's mAP is far from 0 and 1 and moves with any change of boxes or
    scores, so two runtimes agreeing on it means something (random ground truth gives a mAP near 0,
    where everything agrees)."""
    rng = np.random.default_rng(7)
    with open(coco.anno_file) as f:
        source = json.load(f)
    anns, ann_id = [], 1
    for im_id, rows in sorted(detections.items()):
        for cls, score, x1, y1, x2, y2 in rows[np.argsort(-rows[:, 1], kind="stable")][:per_image]:
            dx, dy = rng.uniform(1, max_shift, size=2) * rng.choice([-1, 1], size=2)
            box = [float(x1 + dx), float(y1 + dy), float(x2 - x1), float(y2 - y1)]
            anns.append({"id": ann_id, "image_id": im_id, "category_id": TINY_CATIDS[int(cls)], "bbox": box,
                         "area": box[2] * box[3], "iscrowd": 0, "segmentation": []})
            ann_id += 1
    assert len(anns) >= min_boxes, anns  # every image contributes
    path = os.path.join(coco.dataset_dir, "annotations", name)
    with open(path, "w") as f:
        json.dump({"images": source["images"], "annotations": anns, "categories": TINY_CATEGORIES}, f)
    return os.path.join("annotations", name)


def derive_ground_truth(model, cfg, coco, name: str = "derived.json") -> str:
    """:func:`write_derived_ground_truth` from the dygraph model's detections over the config's EvalDataset."""
    return write_derived_ground_truth(coco, model_detections(model, cfg), name)


# The suite pins ``auto`` to Paddle Inference: measuring OpenVINO against it in every fresh export
# cache would add a trace and timed runs to many tests; tests/test_openvino_engine.py tests the choice.
os.environ.setdefault("PPDET_RETINA_AUTO_ENGINES", "paddle_inference")


@pytest.fixture(scope="module")
def export_cache(tmp_path_factory):
    """A fresh export cache (``PPDET_RETINA_EXPORT_CACHE``) shared by one test module's engine tests."""
    from ppdet_retina.inference.export_cache import CACHE_ENV

    cache = tmp_path_factory.mktemp("export_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(cache))
        yield cache
