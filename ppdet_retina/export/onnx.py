"""ONNX conversion of an export, and the check that the ONNX graph computes what Paddle's does.

:func:`export_onnx` re-traces the model for one image of a fixed size, converts it with
paddle2onnx (in a child process: paddle2onnx aborts the whole process on an op it cannot
convert), repairs what paddle2onnx 2.1.0 writes wrongly, names the outputs, and checks the
file with onnxruntime against the Paddle graph it came from. A mismatch raises
:class:`OnnxCheckError` with the numbers and leaves no ``model.onnx`` behind.

What the graph holds, by export mode:

* detection exports: ``boxes`` [1, M, 4] (x1, y1, x2, y2 in original pixels) and ``scores``
  [1, C, M], the candidates the model's NMS would see. The runtime applies class-wise NMS with
  the settings ``infer_cfg.yml`` records under ``onnx.nms``; :func:`multiclass_nms` is that NMS
  in NumPy (the same rules as Paddle's ``multiclass_nms3``), usable as is next to onnxruntime.
* raw exports: the head's logits and deltas per level, as the Paddle raw export.

The NMS stays outside the graph because paddle2onnx's NMS conversion gave wrong rows for
classes above 0.

paddle2onnx 2.1.0 reads the ``epsilon`` of Paddle's ``group_norm`` op (a float64 attribute in
the PIR program) as garbage: each converted GroupNorm (an ONNX ``InstanceNormalization``) got
an epsilon such as 1e-43, 1.0 or -4.7e13 that changed from run to run, so GroupNorm heads gave
NaN boxes or zero maps. :func:`repair_norm_epsilons` writes the program's values back.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ppdet_retina.core.workspace import ConfigError
# The NMS lives with the OpenVINO runtime, a file tools/deploy.py loads without the package.
from ppdet_retina.openvino_runtime import multiclass_nms
from ppdet_retina.utils.logger import setup_logger

__all__ = [
    "ONNX_OPSET",
    "MIN_ONNX_OPSET",
    "OnnxCheckError",
    "export_onnx",
    "convert",
    "repair_norm_epsilons",
    "rename_outputs",
    "describe",
    "drop_unused_constants",
    "default_onnx_size",
    "sample_feeds",
    "check_onnx",
    "compare_candidates",
    "compare_detections",
    "box_tolerance",
    "multiclass_nms",
    "ort_session",
]

logger = setup_logger("ppdet_retina")

ONNX_FILE = "model.onnx"
# The graph converts at opset 11 (TopK with a tensor k, GatherElements, Range); the file records
# the opset paddle2onnx actually wrote, which :func:`describe` reads back.
ONNX_OPSET = 11
MIN_ONNX_OPSET = 11
# Tolerances of the check: scores relative (plus a floor for scores near 0), boxes in pixels.
SCORE_RTOL = 1e-3
SCORE_ATOL = 1e-6
BOX_ATOL = 1e-2
BOX_RTOL = 2e-4  # of the box's larger side: a 1000 px box decoded from fp32 deltas may move by 0.1 px
# Paddle ops converted to ONNX InstanceNormalization, whose epsilon paddle2onnx misreads.
_NORM_OPS = ("group_norm", "instance_norm")


class OnnxCheckError(RuntimeError):
    """The ONNX graph's outputs differ from the Paddle graph's beyond the check's tolerances."""


# --------------------------------------------------------------------------- conversion

def export_onnx(deploy: Any, save_dir: str, input_size: Sequence[int], opset: int = ONNX_OPSET,
                check: bool = True, feeds: Optional[Sequence[Tuple[str, Dict[str, np.ndarray]]]] = None,
                paddle_dir: Optional[str] = None) -> Dict[str, Any]:
    """Write ``save_dir/model.onnx`` for one image of exactly ``input_size`` (H, W).

    Args:
        deploy: the export's ``DeployModel``; a detection export is converted without its NMS.
        save_dir: the export folder.
        input_size: padded (H, W) of the graph's single input image.
        opset: ONNX opset asked of paddle2onnx (>= 11); the file's own is recorded.
        check: run the file in onnxruntime (when installed) against the Paddle graph.
        feeds: (label, inputs) pairs to check on; default one random image.
        paddle_dir: the Paddle export of ``deploy`` (with NMS); its detections must equal the ONNX
            candidates after :func:`multiclass_nms`.

    Returns the ``onnx`` entry of infer_cfg.yml: file, input_size, batch, opset, inputs, outputs
    (read back from the file), export_mode with its derived fields (export.mode_fields), nms (the
    settings to apply) and check (the verdict).
    Raises OnnxCheckError when the check finds a difference.
    """
    from ppdet_retina.export.trace import MODEL_PREFIX, DeployModel, input_spec, mode_fields, trace

    if int(opset) < MIN_ONNX_OPSET:
        raise ConfigError(f"--onnx_opset {opset}: the graph's TopK, Range and GatherElements convert only "
                          f"from opset {MIN_ONNX_OPSET}; use {MIN_ONNX_OPSET} or higher")
    height, width = (int(s) for s in input_size)
    mode = "candidates" if deploy.mode == "detect" else deploy.mode
    onnx_deploy = DeployModel(deploy.model, mode)
    onnx_file = os.path.join(save_dir, ONNX_FILE)
    if os.path.exists(onnx_file):
        os.remove(onnx_file)  # a stale file must not outlive a failed conversion
    nms = deploy.model.nms_settings() if mode == "candidates" else None
    tmp = tempfile.mkdtemp(prefix="ppdet_retina_onnx_")
    try:
        prefix = os.path.join(tmp, MODEL_PREFIX)
        trace(onnx_deploy, prefix, input_spec(1, height, width))
        written = convert(prefix, onnx_file, opset, onnx_deploy.output_names())
        entry: Dict[str, Any] = {"file": ONNX_FILE, "input_size": [height, width], "batch": 1, **written,
                                 **mode_fields(mode)}
        if nms is not None:
            entry["nms"] = nms
        if check:
            detect_prefix = os.path.join(paddle_dir, MODEL_PREFIX) if paddle_dir and deploy.mode == "detect" \
                else None
            try:
                entry["check"] = check_onnx(onnx_file, prefix, feeds or [("random", random_feeds(height, width))],
                                            nms=nms, detect_prefix=detect_prefix)
            except OnnxCheckError:
                os.remove(onnx_file)
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    note = "" if written["opset"] == int(opset) else f" (asked for {opset}; paddle2onnx raised it)"
    logger.info(f"export: ONNX model (opset {written['opset']}{note}, input 1x3x{height}x{width}, outputs "
                f"{', '.join(written['outputs'])}) written to {onnx_file}")
    if check:
        logger.info(f"export: ONNX check {entry['check']}")
    return entry


def convert(paddle_prefix: str, onnx_file: str, opset: int, output_names: Sequence[str]) -> Dict[str, Any]:
    """paddle2onnx on ``paddle_prefix.json/.pdiparams`` -> ``onnx_file``, repaired and with named outputs.

    Returns what the written file says: ``opset``, ``inputs`` and ``outputs`` (:func:`describe`), read
    from the saved model still in memory rather than parsing the file again.
    """
    try:
        import onnx
    except ImportError:
        raise ConfigError("ONNX export needs paddle2onnx: pip install paddle2onnx==2.1.0") from None
    _run_paddle2onnx(paddle_prefix, onnx_file, opset)
    model = onnx.load(onnx_file)
    repair_norm_epsilons(model, _norm_epsilons(paddle_prefix + ".json"))
    rename_outputs(model, output_names)
    drop_unused_constants(model)
    onnx.checker.check_model(model)
    onnx.save(model, onnx_file)
    return _describe_model(model)


_CONVERT_SCRIPT = """
import sys
import paddle2onnx
model, params, out, opset = sys.argv[1:5]
# optimize_tool="None": the default ("polygraphy") tries to pip-install packages at run time.
paddle2onnx.export(model, params, save_file=out, opset_version=int(opset), auto_upgrade_opset=True,
                   verbose=False, enable_onnx_checker=True, optimize_tool="None")
"""


def _run_paddle2onnx(paddle_prefix: str, onnx_file: str, opset: int) -> None:
    """Run paddle2onnx in a child process; its log is shown only when it fails."""
    try:
        import paddle2onnx  # noqa: F401 - only to give the install hint here
    except ImportError:
        raise ConfigError("ONNX export needs paddle2onnx: pip install paddle2onnx==2.1.0") from None
    cmd = [sys.executable, "-c", _CONVERT_SCRIPT, paddle_prefix + ".json", paddle_prefix + ".pdiparams",
           onnx_file, str(int(opset))]
    env = dict(os.environ, GLOG_minloglevel=os.environ.get("GLOG_minloglevel", "2"))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not os.path.isfile(onnx_file):
        log = (proc.stdout + proc.stderr).strip().splitlines()
        raise RuntimeError(f"paddle2onnx could not convert the traced graph (exit code {proc.returncode}); "
                           f"its last lines:\n" + "\n".join(log[-15:]))


def _norm_epsilons(program_json: str) -> List[float]:
    """Epsilon of every group_norm / instance_norm op of a saved PIR program, in program order."""
    with open(program_json, "r", encoding="utf-8") as f:
        program = json.load(f)
    found: List[float] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            op = node.get("#")
            if isinstance(op, str) and op.split(".")[-1] in _NORM_OPS and isinstance(node.get("A"), list):
                eps = [a["AT"]["D"] for a in node["A"] if isinstance(a, dict) and a.get("N") == "epsilon"]
                if eps:
                    found.append(float(eps[0]))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(program)
    return found


def repair_norm_epsilons(model: Any, epsilons: Sequence[float]) -> int:
    """Set each InstanceNormalization's ``epsilon`` to the Paddle op's, in order; returns the count.

    paddle2onnx emits nodes in program order, so the k-th InstanceNormalization is the k-th
    group_norm / instance_norm op. A count that differs means the graph holds norms this
    mapping does not know, and is an error rather than a guess.
    """
    nodes = [n for n in model.graph.node if n.op_type == "InstanceNormalization"]
    if len(nodes) != len(epsilons):
        raise RuntimeError(f"ONNX export: the converted graph has {len(nodes)} InstanceNormalization nodes but "
                           f"the Paddle program {len(epsilons)} group_norm/instance_norm ops; cannot restore "
                           f"their epsilons (paddle2onnx 2.1.0 writes them wrongly)")
    for node, eps in zip(nodes, epsilons):
        attrs = [a for a in node.attribute if a.name == "epsilon"]
        if attrs:
            attrs[0].f = float(eps)
        else:
            from onnx import helper
            node.attribute.append(helper.make_attribute("epsilon", float(eps)))
    return len(nodes)


def rename_outputs(model: Any, names: Sequence[str]) -> None:
    """Give the graph's outputs ``names`` (paddle2onnx writes fetch_name_0, fetch_name_1, ...)."""
    outputs = list(model.graph.output)
    if len(outputs) != len(names):
        raise RuntimeError(f"ONNX export: the converted graph has {len(outputs)} outputs, expected "
                           f"{len(names)} ({', '.join(names)})")
    mapping = {o.name: new for o, new in zip(outputs, names) if o.name != new}
    taken = {v for n in model.graph.node for v in n.output} | {i.name for i in model.graph.input}
    clash = (set(mapping.values()) & taken) - set(mapping)
    if clash:
        raise RuntimeError(f"ONNX export: cannot name the outputs {sorted(clash)}: the graph already uses them")
    for node in model.graph.node:
        node.output[:] = [mapping.get(v, v) for v in node.output]
        node.input[:] = [mapping.get(v, v) for v in node.input]
    for out in outputs:
        out.name = mapping.get(out.name, out.name)


def drop_unused_constants(model: Any) -> int:
    """Remove Constant nodes and initializers that nothing reads; returns how many.

    paddle2onnx leaves such constants behind, and onnxruntime logs a warning for each one in every
    session a user opens on the file.
    """
    removed = 0
    while True:
        used = {v for n in model.graph.node for v in n.input} | {o.name for o in model.graph.output}
        dead = [n for n in model.graph.node if n.op_type == "Constant" and not set(n.output) & used]
        dead_init = [t for t in model.graph.initializer if t.name not in used]
        if not dead and not dead_init:
            return removed
        for node in dead:
            model.graph.node.remove(node)
        for tensor in dead_init:
            model.graph.initializer.remove(tensor)
        removed += len(dead) + len(dead_init)


def describe(onnx_file: str) -> Dict[str, Any]:
    """``opset`` (default domain), ``inputs`` and ``outputs`` names as the file records them."""
    import onnx

    return _describe_model(onnx.load(onnx_file, load_external_data=False))


def _describe_model(model: Any) -> Dict[str, Any]:
    """:func:`describe` of an ``onnx.ModelProto`` already in memory."""
    opset = next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    initializers = {t.name for t in model.graph.initializer}
    return {"opset": opset, "inputs": [i.name for i in model.graph.input if i.name not in initializers],
            "outputs": [o.name for o in model.graph.output]}


def default_onnx_size(preprocess: Sequence[Dict[str, Any]]) -> List[int]:
    """The padded (H, W) the test preprocessing produces at most: Resize target rounded up to the stride.

    With ``keep_ratio`` the target is [short, long]; a fixed-size ONNX model is given a landscape
    image padded to (short, long), the usual case for COCO.
    """
    resize = next((p for p in preprocess if p["type"] == "Resize"), None)
    if resize is None:
        raise ConfigError("ONNX export needs a fixed input size: TestReader has no Resize, so pass "
                          "--onnx_input_size H W")
    target = resize["target_size"]
    size = [min(target), max(target)] if resize["keep_ratio"] else list(target)
    stride = next((p["stride"] for p in preprocess if p["type"] == "PadStride"), 0) or 1
    return [int(-(-s // stride) * stride) for s in size]


# --------------------------------------------------------------------------- inputs for the check

def random_feeds(height: int, width: int, seed: int = 0) -> Dict[str, np.ndarray]:
    """One normalised-looking random image of exactly (height, width) at scale 1."""
    rng = np.random.default_rng(seed)
    return {"image": rng.normal(size=(1, 3, height, width)).astype(np.float32),
            "im_shape": np.array([[height, width]], np.float32),
            "scale_factor": np.ones((1, 2), np.float32)}


def sample_feeds(cfg: dict, height: int, width: int) -> List[Tuple[str, Dict[str, np.ndarray]]]:
    """Inputs to check an ONNX graph of size (height, width) on: a random image, and the first image of
    the config's eval set when it exists (a trained model's real detections are what the check must
    preserve), through TestReader's preprocessing with its Resize set to exactly (height, width).

    Resized rather than padded: a large constant padding gives thousands of anchors the same
    score, and the two runtimes' top-k may then keep different ones of them, which is no
    conversion error but would fail the check.
    """
    feeds = [("random", random_feeds(height, width))]
    path = _first_eval_image(cfg)
    if path is None:
        return feeds
    from ppdet_retina.core.workspace import create

    section = {k: v for k, v in (cfg.get("TestReader") or {}).items() if k != "name"}
    ops = [op for op in section.get("sample_transforms", []) if "Resize" not in op]
    interp = next((op["Resize"].get("interp", 1) for op in section.get("sample_transforms", [])
                   if "Resize" in op), 1)
    resize = {"Resize": {"target_size": [height, width], "keep_ratio": False, "interp": interp}}
    section["sample_transforms"] = ops[:1] + [resize] + ops[1:]  # right after Decode
    test_section = cfg.get("TestDataset")
    images = create("TestDataset", cfg) if isinstance(test_section, dict) and test_section.get("name") else None
    if images is None or not hasattr(images, "set_images"):
        from ppdet_retina.data.coco import ImageFolder

        images = ImageFolder(metric=cfg.get("metric"), num_classes=cfg.get("num_classes"))
    images.set_images([path])
    loader = create({"name": "TestReader", **section}, cfg)(images, 0)
    batch = {k: np.asarray(v.numpy() if hasattr(v, "numpy") else v) for k, v in next(iter(loader)).items()}
    if tuple(batch["image"].shape[2:]) != (height, width):
        logger.info(f"export: {path} preprocesses to {list(batch['image'].shape[2:])}, not the ONNX input "
                    f"{height}x{width}; the ONNX check uses a random image only")
        return feeds
    feeds.append((os.path.basename(path), {k: batch[k][:1].astype(np.float32)
                                           for k in ("image", "im_shape", "scale_factor")}))
    return feeds


_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp")


def _first_eval_image(cfg: dict) -> Optional[str]:
    section = cfg.get("EvalDataset")
    if not isinstance(section, dict) or not section.get("image_dir"):
        return None
    root = os.path.join(section.get("dataset_dir") or "", section["image_dir"])
    if not os.path.isdir(root):
        return None
    names = sorted(n for n in os.listdir(root) if n.lower().endswith(_IMAGE_EXTS) and not n.startswith("."))
    return os.path.join(root, names[0]) if names else None


# --------------------------------------------------------------------------- the check

def ort_session(onnx_file: str) -> Any:
    """An onnxruntime CPU session; warnings only (its notes on unused initialisers are not for users)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(onnx_file, options, providers=["CPUExecutionProvider"])


def check_onnx(onnx_file: str, paddle_prefix: str, feeds: Sequence[Tuple[str, Dict[str, np.ndarray]]],
               nms: Optional[Dict[str, Any]] = None, detect_prefix: Optional[str] = None) -> str:
    """Run the ONNX file and the Paddle graph it was converted from on each of ``feeds``.

    With ``nms`` (settings of :func:`multiclass_nms`) the outputs are candidates: they must match
    Paddle's (:func:`compare_candidates`; near-equal anchors swapped at a top-k cut are ties), and
    the NMS applied to the ONNX candidates must give Paddle's detections, those of ``detect_prefix``
    (the Paddle export with its NMS inside) when given: what a user gets is what decides. Otherwise every output must match elementwise. An input on which several candidates
    score exactly 1.0 is not compared: such ties have no defined order in any runtime. Returns a
    one-line verdict with the largest differences ('ok: ...', 'not comparable: ...' when no input
    could be compared, 'skipped: ...' without onnxruntime); raises OnnxCheckError on a mismatch.
    """
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "skipped: onnxruntime is not installed (pip install onnxruntime)"
    from ppdet_retina.runtime import create_predictor, run as run_predictor

    session = ort_session(onnx_file)
    names = [i.name for i in session.get_inputs()]
    paddle_graph = create_predictor(paddle_prefix + ".json", paddle_prefix + ".pdiparams", mkldnn=False)
    detector = None
    if detect_prefix is not None:
        detector = create_predictor(detect_prefix + ".json", detect_prefix + ".pdiparams", mkldnn=False)
    summaries, skipped = [], []
    for label, inputs in feeds:
        expected = run_predictor(paddle_graph, inputs)
        got = session.run(None, {n: inputs[n] for n in names})
        where = f"ONNX check on {label} ({inputs['image'].shape[2]}x{inputs['image'].shape[3]})"
        if nms is None:
            worst = _compare_elementwise(expected, got, where)
            summaries.append(f"{label}: max relative difference {worst:.2g}")
            continue
        saturated = int((np.asarray(expected[1])[0].max(axis=0) >= 1.0).sum())
        if saturated > 1:
            # Scores of exactly 1.0 tie: the top-k and the NMS may keep any of them, in Paddle too.
            skipped.append(f"{label}: {saturated} of {expected[1].shape[2]} candidates score exactly 1.0 "
                           f"(saturated logits, as untrained weights give), so their order is arbitrary")
            continue
        cand = compare_candidates(expected, got, float(nms["score_threshold"]), where=where)
        reference = run_predictor(detector, inputs)[:2] if detector is not None else \
            multiclass_nms(expected[0], expected[1], **nms)
        dets = compare_detections(reference, multiclass_nms(got[0], got[1], **nms), where=where,
                                  score_threshold=float(nms["score_threshold"]), keep_top_k=int(nms["keep_top_k"]),
                                  tied=cand["tied"])
        summaries.append(f"{label}: {cand['rows']} candidates ({cand['compared']} above the score threshold) "
                         f"max score difference {cand['score_rel']:.2g} (relative), box {cand['box']:.2g} px"
                         + (f", {cand['at_cut']} swapped at a top-k cut" if cand["at_cut"] else "")
                         + f"; {dets['count']} detections after NMS, max score difference {dets['score_rel']:.2g}, "
                         f"box {dets['box']:.2g} px"
                         + (f", {dets['at_cut']} swapped at a cut" if dets["at_cut"] else ""))
    if skipped and not summaries:
        logger.warning("export: the ONNX file could not be checked: " + "; ".join(skipped))
        return "not comparable: " + "; ".join(skipped)
    return "ok: " + "; ".join(summaries + [f"not compared on {s}" for s in skipped])


def _compare_elementwise(expected: Sequence[np.ndarray], got: Sequence[np.ndarray], where: str) -> float:
    if len(expected) != len(got):
        raise OnnxCheckError(f"{where}: the ONNX graph has {len(got)} outputs, the Paddle graph {len(expected)}")
    worst = 0.0
    for i, (a, b) in enumerate(zip(expected, got)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if a.shape != b.shape:
            raise OnnxCheckError(f"{where}: output {i} has shape {list(b.shape)} in ONNX, {list(a.shape)} in Paddle")
        if not np.isfinite(b).all():
            raise OnnxCheckError(f"{where}: output {i} has {int((~np.isfinite(b)).sum())} non-finite values in ONNX")
        scale = max(1.0, float(np.abs(a).max()) if a.size else 1.0)
        diff = float(np.abs(a - b).max()) / scale if a.size else 0.0
        if diff > SCORE_RTOL:
            raise OnnxCheckError(f"{where}: output {i} differs from Paddle by {diff:.3g} relative to its largest "
                                 f"value {scale:.3g} (> {SCORE_RTOL})")
        worst = max(worst, diff)
    return worst


def compare_candidates(expected: Sequence[np.ndarray], got: Sequence[np.ndarray], score_threshold: float,
                       where: str = "ONNX check") -> Dict[str, Any]:
    """Candidates (boxes [1, M, 4], scores [1, C, M]) of Paddle and ONNX must be the same.

    Every candidate that can become a detection (a class score at or above ``score_threshold``)
    must appear on the other side with its box within :func:`box_tolerance` and scores within
    SCORE_RTOL (relative). Rows are matched by their box, not their position: anchors whose best
    scores differ only in the last bits may be ranked either way by the two runtimes' top-k.
    At a top-k cut such near-equal anchors may also be swapped, one runtime keeping one and the
    other the other: rows without an equal are accepted when they pair up across the two sides
    at equal best scores and each sits at the bottom of its sorted block of candidates (the cut).
    Returns {rows, compared, box, score_rel, at_cut, tied}, ``tied`` the boxes [n, 4] of the rows
    swapped at a cut (both sides), for :func:`compare_detections`; raises OnnxCheckError.
    """
    (boxes_a, scores_a), (boxes_b, scores_b) = expected[:2], got[:2]
    if boxes_a.shape != boxes_b.shape or scores_a.shape != scores_b.shape:
        raise OnnxCheckError(f"{where}: ONNX gives boxes {list(boxes_b.shape)} and scores {list(scores_b.shape)}, "
                             f"Paddle {list(boxes_a.shape)} and {list(scores_a.shape)}")
    rows_a = np.concatenate([boxes_a[0], scores_a[0].T], axis=1).astype(np.float64)  # [M, 4 + C]
    rows_b = np.concatenate([boxes_b[0], scores_b[0].T], axis=1).astype(np.float64)
    bad = ~np.isfinite(rows_b).all(axis=1)
    if bad.any():
        raise OnnxCheckError(f"{where}: {int(bad.sum())} of {len(rows_b)} ONNX candidates have non-finite boxes "
                             f"or scores (first at row {int(np.argmax(bad))}: {rows_b[np.argmax(bad)][:4].tolist()})")
    box_worst, score_worst, compared = 0.0, 0.0, 0
    unmatched = {}  # side -> (row indices, nearest box diff, score diff) of rows without an equal
    for mine, other, side in ((rows_a, rows_b, "Paddle"), (rows_b, rows_a, "ONNX")):
        live = np.where(mine[:, 4:].max(axis=1) >= score_threshold)[0]
        compared = max(compared, len(live))
        lost = ([], [], [])
        for start in range(0, len(live), 256):
            idx = live[start:start + 256]
            box_diff = np.abs(mine[idx, None, :4] - other[None, :, :4]).max(axis=2)  # [n, M]
            nearest = box_diff.argmin(axis=1)
            box = box_diff[np.arange(len(idx)), nearest]
            score = _relative(mine[idx, 4:], other[nearest, 4:]).max(axis=1)
            fail = (box > box_tolerance(mine[idx, :4])) | (score > SCORE_RTOL)
            for part, values in zip(lost, (idx, box, score)):
                part.extend(values[fail].tolist())
            box_worst = max(box_worst, float(box[~fail].max()) if (~fail).any() else 0.0)
            score_worst = max(score_worst, float(score[~fail].max()) if (~fail).any() else 0.0)
        unmatched[side] = tuple(np.asarray(v) for v in lost)
    tied = _swapped_at_cut(rows_a, rows_b, unmatched["Paddle"][0], unmatched["ONNX"][0])
    if tied is None:
        side, rows = ("Paddle", rows_a) if len(unmatched["Paddle"][0]) else ("ONNX", rows_b)
        idx, box, score = unmatched[side]
        k = 0
        raise OnnxCheckError(
            f"{where}: {len(idx)} of the {compared} {side} candidates scoring >= {score_threshold} "
            f"have no equal in the other graph (and are not near-equal anchors swapped at a top-k cut); e.g. "
            f"row {int(idx[k])} box {rows[idx[k], :4].round(3).tolist()} best score {rows[idx[k], 4:].max():.5f}: "
            f"nearest box differs by {box[k]:.3g} px (tolerance {float(box_tolerance(rows[idx[k], :4])[0]):.3g}), "
            f"its scores by {score[k]:.3g} relative (tolerance {SCORE_RTOL})")
    return {"rows": int(len(rows_a)), "compared": int(compared), "box": box_worst, "score_rel": score_worst,
            "at_cut": int(len(unmatched["Paddle"][0])), "tied": tied}


def box_tolerance(boxes: np.ndarray) -> np.ndarray:
    """Per box [n, 4]: BOX_ATOL px plus BOX_RTOL of its larger side (fp32 rounding of a box decoded
    from deltas grows with the anchor's size)."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    side = np.maximum(np.abs(boxes[:, 2] - boxes[:, 0]), np.abs(boxes[:, 3] - boxes[:, 1]))
    return BOX_ATOL + BOX_RTOL * side


def _block_floor(best: np.ndarray) -> np.ndarray:
    """Per row, the lowest best score of its block: a run of rows in non-increasing score order (each
    pyramid level's top-k comes sorted), a block ending where the next row scores higher."""
    rise = np.where(best[1:] > best[:-1] * (1.0 + SCORE_RTOL) + SCORE_ATOL)[0] + 1
    starts = np.concatenate([[0], rise])
    ends = np.concatenate([rise, [len(best)]])
    floor = np.empty_like(best)
    for s, e in zip(starts, ends):
        floor[s:e] = best[s:e].min()
    return floor


def _swapped_at_cut(rows_a: np.ndarray, rows_b: np.ndarray, lost_a: np.ndarray,
                    lost_b: np.ndarray) -> Optional[np.ndarray]:
    """Boxes [n, 4] of the unmatched rows when they are ties swapped at a top-k cut, else None.

    Both sides must have as many unmatched rows, paired in score order at equal best scores
    (within SCORE_RTOL), each within SCORE_RTOL of the lowest score of its sorted block.
    """
    if len(lost_a) != len(lost_b):
        return None
    if not len(lost_a):
        return np.zeros((0, 4))
    best_a, best_b = rows_a[:, 4:].max(axis=1), rows_b[:, 4:].max(axis=1)
    pairs_a, pairs_b = np.sort(best_a[lost_a]), np.sort(best_b[lost_b])
    if (_relative(pairs_a, pairs_b) > SCORE_RTOL).any():
        return None
    for best, lost in ((best_a, lost_a), (best_b, lost_b)):
        if (_relative(best[lost], _block_floor(best)[lost]) > SCORE_RTOL).any():
            return None
    return np.concatenate([rows_a[lost_a, :4], rows_b[lost_b, :4]])


def compare_detections(expected: Sequence[np.ndarray], got: Sequence[np.ndarray], where: str = "ONNX check",
                       score_threshold: float = 0.0, keep_top_k: int = -1,
                       tied: Optional[np.ndarray] = None) -> Dict[str, Any]:
    """Detections (bbox [K, 6], bbox_num [B]) must be the same rows, in any order.

    Each row is matched to the other side's row of the same image and class with the nearest box;
    boxes must agree within :func:`box_tolerance` and scores within SCORE_RTOL. A row without an
    equal is accepted only at a cut, where two runtimes' last bits decide: a score within
    SCORE_RTOL of ``score_threshold`` or, in an image that reached ``keep_top_k`` rows, of its
    lowest kept score, or a box among ``tied`` (candidates swapped at a top-k cut,
    :func:`compare_candidates`). Returns {count, box, score_rel, at_cut}; raises OnnxCheckError.
    """
    (bbox_a, num_a), (bbox_b, num_b) = (np.asarray(expected[0]).reshape(-1, 6), np.asarray(expected[1])), \
        (np.asarray(got[0]).reshape(-1, 6), np.asarray(got[1]))
    if len(num_a) != len(num_b):
        raise OnnxCheckError(f"{where}: ONNX + NMS gives detections for {len(num_b)} images, Paddle {len(num_a)}")
    tied = np.zeros((0, 4)) if tied is None else np.asarray(tied, np.float64).reshape(-1, 4)
    box_worst, score_worst, at_cut = 0.0, 0.0, 0
    starts_a, starts_b = np.concatenate([[0], np.cumsum(num_a)]), np.concatenate([[0], np.cumsum(num_b)])
    for i in range(len(num_a)):
        a = bbox_a[starts_a[i]:starts_a[i + 1]].astype(np.float64)
        b = bbox_b[starts_b[i]:starts_b[i + 1]].astype(np.float64)
        cut = float(score_threshold)
        for rows in (a, b):
            if keep_top_k > 0 and len(rows) >= keep_top_k:
                cut = max(cut, float(rows[:, 1].min()))
        for mine, other, side, other_side in ((a, b, "Paddle", "ONNX + NMS"), (b, a, "ONNX + NMS", "Paddle")):
            for row in mine:
                same = np.where(other[:, 0] == row[0])[0]
                box = np.abs(other[same, 2:] - row[2:]).max(axis=1) if len(same) else np.array([np.inf])
                k = same[int(np.argmin(box))] if len(same) else None
                box_diff = float(box.min())
                score_diff = float(_relative(row[1:2], other[k, 1:2]).max()) if k is not None else np.inf
                tolerance = float(box_tolerance(row[2:])[0])
                if box_diff <= tolerance and score_diff <= SCORE_RTOL:
                    box_worst, score_worst = max(box_worst, box_diff), max(score_worst, score_diff)
                elif row[1] <= cut * (1.0 + SCORE_RTOL) + SCORE_ATOL or \
                        (len(tied) and float(np.abs(tied - row[2:]).max(axis=1).min()) <= tolerance):
                    at_cut += 1
                else:
                    nearest = "none of its class" if k is None else \
                        f"nearest {other[k, 2:].round(3).tolist()} score {other[k, 1]:.5f} (box {box_diff:.3g} px, " \
                        f"score {score_diff:.3g} relative)"
                    raise OnnxCheckError(
                        f"{where}: {side}'s detection class {int(row[0])} score {row[1]:.5f} box "
                        f"{row[2:].round(3).tolist()} (image {i}) has no equal in {other_side}'s {len(other)} "
                        f"detections: {nearest}; {side} gives {len(mine)} detections there")
    return {"count": int(num_a.sum()), "box": box_worst, "score_rel": score_worst, "at_cut": at_cut}


def _relative(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a - b) / np.maximum(np.maximum(np.abs(a), np.abs(b)), SCORE_ATOL / SCORE_RTOL)

