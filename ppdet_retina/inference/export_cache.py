"""The cache of traced exports that the inference engines load instead of tracing again.

An export's folder is named by a sha256 of what the traced graph depends on (:func:`weights_key`:
every state-dict tensor, the config keys that build the model, the Paddle version and this package's
own source, :func:`code_key`), so a second evaluation of the same weights finds it and a new release
of the package (or an edited checkout) traces again. The cache is ``$PPDET_RETINA_EXPORT_CACHE`` or
``~/.cache/ppdet_retina/exports`` and keeps the ``PPDET_RETINA_EXPORT_CACHE_SIZE`` (default 8) most
recently used exports. Both engines that trace (Paddle Inference, OpenVINO via ONNX) store here,
each under its own folder suffix.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import tempfile
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import numpy as np
import paddle

from ppdet_retina.core.options import keys_outside_graph

__all__ = ["CACHE_ENV", "CACHE_SIZE_ENV", "META_FILE", "cache_root", "code_key", "graph_config", "config_key",
           "weights_key", "cached_folder", "export_folder", "prune"]

CACHE_ENV = "PPDET_RETINA_EXPORT_CACHE"
CACHE_SIZE_ENV = "PPDET_RETINA_EXPORT_CACHE_SIZE"
META_FILE = "engine_meta.json"
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Config keys that do not change the traced graph: data, schedule, logging, output locations; the
# training options say so in their declaration (core/options.py), so they are added when read.
_NOT_IN_GRAPH = {
    "weights", "pretrain_weights", "save_dir", "filename", "config_path", "output_eval", "classwise",
    "save_prediction_only", "use_gpu", "log_iter", "snapshot_epoch", "epoch", "worker_num", "LearningRate",
    "OptimizerBuilder", "metric", "draw_threshold", "print_flops", "find_unused_parameters",
    "max_bad_image_ratio", "_BASE_",
}


def cache_root() -> str:
    """Folder of the cached exports: ``$PPDET_RETINA_EXPORT_CACHE`` or ``~/.cache/ppdet_retina/exports``."""
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "ppdet_retina", "exports")


def _stable(value: Any) -> Any:
    """A JSON-able form of a config value that is the same in every process (no object addresses)."""
    if isinstance(value, dict):
        return {str(k): _stable(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_stable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "__dict__"):
        return {"__type__": type(value).__name__, **_stable(vars(value))}
    return f"{type(value).__name__}:{value}"


@functools.lru_cache(maxsize=1)
def code_key() -> str:
    """sha256 (16 hex) of this package's Python sources: what the traced graph and the engines are
    made of besides weights and config. A release that changes a model's graph or an engine (a
    faster reduction, a new NMS) must not be served an export, or an engine choice, made by the old
    code; hashing the source makes that automatic, where a hand-bumped format number was forgotten."""
    sources = sorted(os.path.relpath(os.path.join(folder, name), _PACKAGE_DIR)
                     for folder, _, files in os.walk(_PACKAGE_DIR) for name in files if name.endswith(".py"))
    digest = hashlib.sha256()
    for source in sources:
        digest.update(source.encode() + b"\n")
        with open(os.path.join(_PACKAGE_DIR, source), "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:16]


def graph_config(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The config keys that build the traced graph (not data, schedule, logging or outputs)."""
    outside = _NOT_IN_GRAPH | keys_outside_graph()
    return {k: v for k, v in cfg.items() if k not in outside and not k.endswith(("Dataset", "Reader"))}


def _graph_config_json(cfg: Dict[str, Any]) -> str:
    return json.dumps(_stable(graph_config(cfg)), sort_keys=True)


def config_key(cfg: Dict[str, Any]) -> str:
    """sha256 (16 hex) of the config keys that build the model, whatever its weights."""
    return hashlib.sha256(_graph_config_json(cfg).encode()).hexdigest()[:16]


def weights_key(model: paddle.nn.Layer, cfg: Dict[str, Any]) -> str:
    """sha256 (hex) of what the export of ``model`` depends on: every state-dict tensor (name,
    dtype, shape, bytes), the config keys that build the model, the Paddle version, this package's
    source (:func:`code_key`)."""
    digest = hashlib.sha256(f"ppdet_retina export {code_key()} paddle {paddle.__version__}\n".encode())
    digest.update(_graph_config_json(cfg).encode())
    for name, tensor in sorted(model.state_dict().items()):
        array = np.ascontiguousarray(tensor.numpy())
        digest.update(f"\n{name} {array.dtype} {list(array.shape)}\n".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def cached_folder(model: paddle.nn.Layer, cfg: Dict[str, Any], build: Callable[[str], float], suffix: str = "",
                  meta: Optional[Dict[str, Any]] = None, root: Optional[str] = None) -> Tuple[str, float]:
    """(folder, build seconds: 0.0 when it came from the cache) of ``model``'s export.

    ``build(folder)`` writes the export into an empty folder and returns the seconds it took; it
    runs in a temporary folder beside the final place, which is renamed into it, so an interrupted
    trace or two processes tracing the same weights never leave a half export. ``suffix`` tells
    the kinds of export apart; ``meta`` adds entries to the folder's ``engine_meta.json``.
    """
    root = root or cache_root()
    key = weights_key(model, cfg)
    folder = os.path.join(root, key[:32] + suffix)
    if os.path.isfile(os.path.join(folder, META_FILE)):
        os.utime(folder)  # most recently used: kept longest by prune
        return folder, 0.0
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tracing-", dir=root)
    try:
        seconds = build(tmp)
        with open(os.path.join(tmp, META_FILE), "w", encoding="utf-8") as f:
            json.dump({"key": key, "architecture": cfg.get("architecture"), "trace_s": round(seconds, 3),
                       "paddle": paddle.__version__, **(meta or {}), "weights": str(cfg.get("weights") or "")}, f)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process stored the same export first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune(root, keep=folder)
    return folder, seconds


@contextlib.contextmanager
def export_folder(model: paddle.nn.Layer, cfg: Dict[str, Any], build: Callable[[str], float], cache: bool,
                  suffix: str = "", meta: Optional[Dict[str, Any]] = None) -> Iterator[Tuple[str, float]]:
    """(folder, build seconds) for loading ``model``'s export: from the cache (:func:`cached_folder`),
    or, with ``cache`` False (training's evaluations, whose weights are new every time), built into a
    temporary folder that is removed once the caller has loaded it (the runtime holds the weights)."""
    if cache:
        yield cached_folder(model, cfg, build, suffix=suffix, meta=meta)
        return
    tmp = tempfile.mkdtemp(prefix="ppdet_retina_eval_export_")
    try:
        yield tmp, build(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prune(root: str, keep: str) -> None:
    """Remove the least recently used exports beyond the cache size (each R50 export is ~150 MB)."""
    limit = max(1, int(os.environ.get(CACHE_SIZE_ENV, "8")))
    entries = [os.path.join(root, n) for n in os.listdir(root) if not n.startswith(".")]
    entries = [e for e in entries if os.path.isfile(os.path.join(e, META_FILE))]
    entries.sort(key=lambda e: os.path.getmtime(e), reverse=True)
    for old in entries[limit:]:
        if os.path.abspath(old) != os.path.abspath(keep):
            shutil.rmtree(old, ignore_errors=True)
