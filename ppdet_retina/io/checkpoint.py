"""Checkpoints: atomic save, strict and partial weight loading, resume.

Files: ``<prefix>.pdparams`` holds the model's state dict (our parameter names); ``<prefix>.pdopt``
holds the optimizer's state dict plus our ``extra`` dict (epoch, step, ...) under ``EXTRA_KEY``.

Weight files in our names, a PaddleDetection model's or its ImageNet backbone's are accepted; the names
are translated by :mod:`ppdet_retina.io.ppdet_names`.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import time
import uuid
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import paddle

from ppdet_retina.core.env import RunFailure
from ppdet_retina.io import download_cache
from ppdet_retina.io.ppdet_names import convert_ppdet_state_dict, detect_key_style

__all__ = [
    "EXTRA_KEY",
    "save_checkpoint",
    "load_weights",
    "load_pretrain_weights",
    "resume_checkpoint",
    "log_load_report",
    "CheckpointSaveError",
    "output_dir_of",
    "COMMIT_SUFFIX",
    "read_commit",
    "find_latest_checkpoint",
    "remove_stale_temps",
]

logger = logging.getLogger("ppdet_retina.io.checkpoint")

EXTRA_KEY = "__ppdet_retina_extra__"
# PaddleDetection keeps the number of finished epochs in its .pdopt under this key (our extra 'epoch').
_PPDET_EPOCH_KEY = "last_epoch"
_MAX_LISTED = 12
_MAX_LOGGED = 5  # names shown per group in a load report
_STYLE_NAMES = {"ours": "our names", "ppdet": "PaddleDetection model names",
                "ppdet_backbone": "PaddleDetection backbone names"}
# Paddle keys optimizer state by each parameter's global name (``conv2d_7.w_0_velocity_0``), which
# depends on how many layers the process built before; we store ``<structured name>@@<accumulator>``
# instead so a checkpoint resumes into any fresh build of the same model.
_OPT_NAMING_KEY = "__ppdet_retina_opt_naming__"
_OPT_SEP = "@@"
_OPT_PASSTHROUGH = ("LR_Scheduler",)

# Parameters whose first (conv) or last (linear) dimension depends on the number of classes.
_CLASS_DEPENDENT = re.compile(r"^(head\.cls_logits|bbox_head\.cls_score|bbox_head\.bbox_pred)\.")


# --------------------------------------------------------------------------- files

def output_dir_of(cfg: dict) -> str:
    """``save_dir/<config name>``: where a config's checkpoints, logs and eval results go."""
    return os.path.join(str(cfg.get("save_dir", "output")), str(cfg.get("filename", "model")))


def _check_not_url(path: str, what: str) -> None:
    if re.match(r"^[a-z]+://", str(path)):
        raise FileNotFoundError(
            f"{what} '{path}' is a URL; resuming needs a local checkpoint (its .pdparams and .pdopt). "
            f"To start from downloaded weights use -o pretrain_weights=<url> instead.")


def _weights_file(path: str, what: str) -> str:
    """``path`` (with or without ``.pdparams``, or an http(s) URL, downloaded once into the cache) ->
    the existing file, or a clear FileNotFoundError."""
    path = download_cache.resolve_weights(str(path), what)
    path = os.path.expanduser(str(path))
    candidates = [path] if path.endswith(".pdparams") else [path + ".pdparams", path]
    for cand in candidates:
        if os.path.isfile(cand):
            return cand
    raise FileNotFoundError(
        f"{what} file '{candidates[0]}' not found. Check the path (with or without .pdparams), train a model "
        f"first, or pass the right file with -o {what}=<path>.")


def _load_numpy_state(file: str) -> Dict[str, np.ndarray]:
    try:
        raw = paddle.load(file, return_numpy=True)
    except Exception as err:  # pickle/paddle errors have many types; all mean "not a weight file"
        cached = os.path.dirname(os.path.abspath(file)) == download_cache.weights_home()
        hint = "; it is in the download cache: delete it to download it again" if cached else ""
        raise ValueError(f"cannot read weights file '{file}' ({type(err).__name__}: {err}); "
                         f"it may be truncated or not a .pdparams file{hint}") from err
    if not isinstance(raw, dict):
        raise ValueError(f"weights file '{file}' holds a {type(raw).__name__}, not a state dict")
    return {k: np.asarray(v) for k, v in raw.items() if isinstance(v, (np.ndarray, paddle.Tensor))}


def _unwrap(model: paddle.nn.Layer) -> paddle.nn.Layer:
    return model._layers if isinstance(model, paddle.DataParallel) else model


def _write_temp(obj: Any, path: str) -> str:
    """Write ``obj`` (paddle.save, or JSON text for a str) to a temp name beside ``path``, fsynced.

    Returns the temp path; on any failure the temp file is removed and the error raised.
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}{_TMP_TAG}{os.getpid()}")
    try:
        if isinstance(obj, str):
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(obj)
        else:
            paddle.save(obj, tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        _remove_quietly(tmp)
        raise
    return tmp


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _fsync_dir(folder: str) -> None:
    # Makes the rename itself durable; some filesystems refuse O_RDONLY on a directory, which is harmless.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- commit records

COMMIT_SUFFIX = ".commit.json"
# Temp files are ``.<final name>.tmp<pid>``; a run that was killed leaves them behind.
_TMP_TAG = ".tmp"
_TMP_NAME = re.compile(r"^\.(?P<final>.+)\.tmp(?P<pid>\d+)$")
_COMMIT_TOKEN = "commit"
_DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


class CheckpointSaveError(OSError, RunFailure):
    """A checkpoint could not be written (full disk, quota, file-size limit); nothing was replaced."""

    def __str__(self) -> str:
        return str(self.strerror)


def _commit_file(prefix: str) -> str:
    return prefix + COMMIT_SUFFIX


def read_commit(prefix: str) -> Optional[Dict[str, Any]]:
    """The commit record of checkpoint ``prefix`` (None when there is none or it is unreadable).

    A record holds ``epoch`` (epochs finished), ``time`` (of the save), ``token`` (also stored in the
    .pdopt) and ``files`` (suffix -> byte size). It is renamed into place after both files, and removed before either
    is replaced, so a record on disk always describes one complete save.
    """
    try:
        with open(_commit_file(prefix), encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("files"), dict) else None


def _commit_problem(prefix: str, record: Dict[str, Any]) -> Optional[str]:
    """Why the files on disk do not match ``record``, or None when they do."""
    for suffix, size in record["files"].items():
        file = prefix + suffix
        if not os.path.isfile(file):
            return f"'{file}' is missing"
        if os.path.getsize(file) != int(size):
            return f"'{file}' has {os.path.getsize(file)} bytes where its commit record says {size}"
    return None


def checkpoint_prefix(path: str) -> str:
    """A checkpoint's prefix from the prefix itself or any of its files (``.pdparams``, ``.pdopt``,
    ``.commit.json``)."""
    return re.sub(r"\.(pdparams|pdopt|commit\.json)$", "", str(path))


def list_checkpoints(save_dir: str) -> List[str]:
    """Names (prefixes without the folder) of the checkpoints (``.pdparams`` files) in ``save_dir``, sorted."""
    if not os.path.isdir(save_dir):
        return []
    return sorted(n[:-len(".pdparams")] for n in os.listdir(save_dir) if n.endswith(".pdparams"))


def find_latest_checkpoint(save_dir: str) -> Tuple[Optional[str], List[str]]:
    """(prefix of the newest complete checkpoint in ``save_dir`` or None, names skipped as incomplete).

    Complete means a commit record whose files are all present with the recorded sizes. The newest
    is the one committed last (not the highest epoch: a fresh run into an old folder must not resume
    the old run's later epochs); ``best_model`` only repeats an epoch checkpoint and is not considered.
    """
    best, best_key, skipped = None, None, []
    for name in list_checkpoints(save_dir):
        if name == "best_model":
            continue
        prefix = os.path.join(save_dir, name)
        record = read_commit(prefix)
        if record is None or "epoch" not in record or _commit_problem(prefix, record):
            skipped.append(name)
            continue
        key = (float(record.get("time", 0.0)), int(record["epoch"]))
        if best_key is None or key > best_key:
            best, best_key = prefix, key
    return best, skipped


def remove_stale_temps(save_dir: str) -> List[str]:
    """Delete temp files that killed processes left in ``save_dir``; returns their names.

    A temp file whose writer (by pid) is still running on this machine is kept.
    """
    removed = []
    if not os.path.isdir(save_dir):
        return removed
    for name in os.listdir(save_dir):
        m = _TMP_NAME.match(name)
        if not m or _pid_alive(int(m["pid"])):
            continue
        _remove_quietly(os.path.join(save_dir, name))
        removed.append(name)
    return removed


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but belongs to someone else
        return True
    return True


# --------------------------------------------------------------------------- public API

def save_checkpoint(model: paddle.nn.Layer, optimizer: Optional[paddle.optimizer.Optimizer], save_dir: str,
                    name: str, extra: Optional[Dict[str, Any]] = None,
                    more_files: Optional[Dict[str, Any]] = None) -> str:
    """Write ``<save_dir>/<name>.pdparams`` (and ``.pdopt`` with ``extra`` if ``optimizer``) as one commit.

    ``more_files`` (suffix -> object, e.g. ``{'.pdema': state_dict}``) joins the same commit.

    Every file is first written in full to a temp name and fsynced (this is where a full disk fails,
    raising :class:`CheckpointSaveError`, with the files already there untouched). Then the old commit
    record is removed, the files are renamed into place, and the new ``<name>.commit.json`` is renamed
    in last: a crash at any point leaves either the old complete checkpoint, or one without a commit
    record, which resuming refuses instead of pairing a .pdparams and a .pdopt of two saves.
    Returns the path prefix ``<save_dir>/<name>`` (what :func:`resume_checkpoint` takes).
    """
    os.makedirs(save_dir, exist_ok=True)
    prefix = os.path.join(save_dir, name)
    token = uuid.uuid4().hex
    parts: Dict[str, Any] = {".pdparams": _unwrap(model).state_dict()}
    if optimizer is not None:
        opt_state = _structured_optimizer_state(optimizer.state_dict(), _unwrap(model))
        opt_state[EXTRA_KEY] = dict(extra or {}, **{_COMMIT_TOKEN: token})
        parts[".pdopt"] = opt_state
    parts.update(more_files or {})
    temps: Dict[str, str] = {}
    try:
        for suffix, obj in parts.items():
            temps[suffix] = _write_temp(obj, prefix + suffix)
        record = {"epoch": (extra or {}).get("epoch"), "time": time.time(), "token": token,
                  "files": {suffix: os.path.getsize(tmp) for suffix, tmp in temps.items()}}
        temps[COMMIT_SUFFIX] = _write_temp(json.dumps(record), _commit_file(prefix))
    except BaseException as err:
        for tmp in temps.values():
            _remove_quietly(tmp)
        if isinstance(err, OSError) and err.errno in _DISK_FULL:
            raise CheckpointSaveError(
                err.errno, f"cannot save checkpoint '{prefix}': {err.strerror} while writing it. Nothing was "
                           f"replaced: the checkpoints already in '{save_dir}' are intact. Free space on that "
                           f"disk (or pass -o save_dir=<another disk>) and continue with -r auto.") from err
        raise
    # Only renames from here on: no new space is needed.
    folder = os.path.dirname(os.path.abspath(prefix))
    old = read_commit(prefix) or {"files": {}}
    _remove_quietly(_commit_file(prefix))
    _fsync_dir(folder)
    for suffix in set(old["files"]) - set(parts):  # a file of the old save that this one lacks
        _remove_quietly(prefix + suffix)
    for suffix in parts:
        os.replace(temps[suffix], prefix + suffix)
    _fsync_dir(folder)
    os.replace(temps[COMMIT_SUFFIX], _commit_file(prefix))
    _fsync_dir(folder)
    return prefix


def _read_for(model: paddle.nn.Layer, path: str, what: str):
    """The start of every weights load: (file, raw tensors, unwrapped model, its state, the file's key
    style, the file's tensors in our names)."""
    file = _weights_file(path, what)
    raw = _load_numpy_state(file)
    model = _unwrap(model)
    model_state = model.state_dict()
    return file, raw, model, model_state, detect_key_style(raw), convert_ppdet_state_dict(raw, model_state.keys())


def _compare(state: Dict[str, np.ndarray], model_state: Dict[str, paddle.Tensor]):
    """Split names into missing (model only), unexpected (file only), class-dependent and other mis-shapes."""
    missing = [k for k in model_state if k not in state]
    unexpected = [k for k in state if k not in model_state]
    head_mismatch, mismatch = [], []
    for key in state:
        if key in model_state and tuple(state[key].shape) != tuple(model_state[key].shape):
            entry = (key, list(state[key].shape), list(model_state[key].shape))
            (head_mismatch if _CLASS_DEPENDENT.match(key) else mismatch).append(entry)
    return missing, unexpected, head_mismatch, mismatch


def _listing(title: str, items: Sequence[Any]) -> str:
    shown = [str(i) for i in items[:_MAX_LISTED]]
    more = f" ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return f"{title} ({len(items)}): " + ", ".join(shown) + more


def _shape_listing(title: str, entries: Sequence[Tuple[str, List[int], List[int]]]) -> str:
    return _listing(title, [f"{k} file {a} vs model {b}" for k, a, b in entries])


def _head_mismatch_message(file: str, entries) -> str:
    return (f"weights '{file}': the head was trained for a different number of classes: "
            + _shape_listing("class-dependent shapes", entries)
            + ". To fine-tune on your classes pass skip_mismatch_head=True (or use pretrain_weights=), "
              "which leaves those layers randomly initialised; else set num_classes to match the file.")


def _assign(model: paddle.nn.Layer, state: Dict[str, np.ndarray], model_state: Dict[str, paddle.Tensor]) -> None:
    typed = {k: v.astype(_numpy_dtype(model_state[k]), copy=False) for k, v in state.items()}
    model.set_state_dict(typed)


def _numpy_dtype(tensor: paddle.Tensor) -> np.dtype:
    # paddle prints dtypes as 'paddle.float32'; numpy knows the part after the dot
    return np.dtype(str(tensor.dtype).split(".")[-1])


def load_weights(model: paddle.nn.Layer, path: str, skip_mismatch_head: bool = False,
                 what: str = "weights") -> Dict[str, Any]:
    """Load a full set of weights strictly (any style); log and return a report dict.

    Raises ValueError listing missing / unexpected / mis-shaped keys. Class-dependent head layers of a
    different class count are skipped (and reported) only when ``skip_mismatch_head``. ``what`` names
    the load in the log (``weights``, ``resume``). Report keys: file, style, total (model tensors),
    loaded (count), skipped (names not loaded), head_shapes ((name, file shape, model shape) of those).
    """
    file, _, model, model_state, style, state = _read_for(model, path, "weights")
    missing, unexpected, head_mismatch, mismatch = _compare(state, model_state)
    if head_mismatch and not skip_mismatch_head:
        raise ValueError(_head_mismatch_message(file, head_mismatch))
    skipped = [k for k, _, _ in head_mismatch]
    missing = [k for k in missing if k not in skipped]
    problems = []
    if missing:
        problems.append(_listing("missing in file", missing))
    if unexpected:
        problems.append(_listing("unexpected in file", unexpected))
    if mismatch:
        problems.append(_shape_listing("wrong shape", mismatch))
    if problems:
        raise ValueError(f"weights '{file}' (key style '{style}') do not fit the model: " + "; ".join(problems)
                         + ". Is it a checkpoint of this architecture/config? For backbone-only or partial "
                           "weights use pretrain_weights instead.")
    for key in skipped:
        state.pop(key)
    _assign(model, state, model_state)
    report = {"file": file, "style": style, "total": len(model_state), "loaded": len(state),
              "skipped": skipped, "head_shapes": head_mismatch}
    log_load_report(report, what)
    return report


def load_pretrain_weights(model: paddle.nn.Layer, path: str) -> Dict[str, Any]:
    """Load what matches from backbone or partial weights; log and return a report dict.

    Names absent from the file (e.g. neck and head for a backbone file) stay as initialised, names the
    model lacks (e.g. an ImageNet classifier) are ignored, class-dependent head layers of another class
    count are skipped (the head is re-initialised for this model's classes), and so are other tensors
    of another shape as long as they are fewer than the loaded ones (a ResNet-vd file's stem in a
    ResNet-b model); more of them means another network and raises ValueError. Report keys: file,
    style, total, loaded, not_in_file, unused, skipped (class-dependent names), head_shapes,
    wrong_shape ((name, file shape, model shape) of other mis-shaped tensors).
    """
    file, raw, model, model_state, style, state = _read_for(model, path, "pretrain_weights")
    missing, unexpected, head_mismatch, mismatch = _compare(state, model_state)
    skipped = [k for k, _, _ in head_mismatch]
    wrong = {k for k, _, _ in mismatch}
    usable = {k: v for k, v in state.items() if k in model_state and k not in skipped and k not in wrong}
    if len(mismatch) > len(usable):
        raise ValueError(f"pretrain_weights '{file}' (key style '{style}'): "
                         + _shape_listing("wrong shape", mismatch)
                         + f" against {len(usable)} that fit. The file is for a different network "
                           f"(depth/variant/width); pick the matching one.")
    if not usable:
        raise ValueError(f"pretrain_weights '{file}' (key style '{style}') share no parameter name with the "
                         f"model (file keys e.g. {list(raw)[:3]}, model keys e.g. {list(model_state)[:3]})")
    _assign(model, usable, model_state)
    report = {"file": file, "style": style, "total": len(model_state), "loaded": len(usable),
              "not_in_file": missing, "unused": unexpected, "skipped": skipped, "head_shapes": head_mismatch,
              "wrong_shape": mismatch}
    log_load_report(report, "pretrain_weights")
    return report


def _first(names: Sequence[Any]) -> str:
    shown = ", ".join(str(n) for n in names[:_MAX_LOGGED])
    return shown + (f", ... ({len(names) - _MAX_LOGGED} more)" if len(names) > _MAX_LOGGED else "")


def log_load_report(report: Dict[str, Any], what: str) -> None:
    """Log how many tensors a load set, how many it skipped or left missing, and the first names of each.

    One info line for the counts (and what the file has that the model does not use); one warning per
    kind of skip: class-dependent head tensors re-initialised, other tensors of another shape.
    """
    style = _STYLE_NAMES.get(report["style"], report["style"])
    line = (f"{what}: loaded {report['loaded']} of the model's {report['total']} tensors from "
            f"{report['file']} ({style})")
    missing = report.get("not_in_file") or []
    unused = report.get("unused") or []
    if missing:
        line += f"; {len(missing)} not in the file, left as initialised: {_first(missing)}"
    if unused:
        line += f"; {len(unused)} in the file unused by the model: {_first(unused)}"
    logger.info(line)
    head = report.get("head_shapes") or []
    if head:
        logger.warning(f"{what}: {len(head)} class-dependent head tensor(s) re-initialised: the file was "
                       f"trained for another number of classes ("
                       + _first([f"{k} file {a} vs model {b}" for k, a, b in head]) + ")")
    wrong = report.get("wrong_shape") or []
    if wrong:
        logger.warning(f"{what}: {len(wrong)} tensor(s) of another shape skipped, left as initialised; the "
                       f"file is probably another variant of the network (e.g. ResNet-vd in ResNet-b): "
                       + _first([f"{k} file {a} vs model {b}" for k, a, b in wrong]))


def resume_checkpoint(model: paddle.nn.Layer, optimizer: Optional[paddle.optimizer.Optimizer],
                      path_prefix: str) -> Dict[str, Any]:
    """Restore model (strictly) and optimizer from ``<prefix>.pdparams`` / ``<prefix>.pdopt``.

    Returns the ``extra`` dict given to :func:`save_checkpoint`; for a PaddleDetection ``.pdopt``
    ``{'epoch': n}`` with n its ``last_epoch`` (epochs finished). A checkpoint of ours whose commit
    record is missing or does not match its files is refused with ValueError (see
    :func:`save_checkpoint`).
    """
    prefix = checkpoint_prefix(path_prefix)
    _check_not_url(prefix, "resume")
    if optimizer is None:
        load_weights(model, prefix, what="resume")
        return {}
    opt_file = prefix + ".pdopt"
    if not os.path.isfile(opt_file):
        raise FileNotFoundError(f"optimizer state '{opt_file}' not found next to '{prefix}.pdparams'; resume "
                                f"needs both files (use weights= to load only the model)")
    record = read_commit(prefix)
    problem = _commit_problem(prefix, record) if record is not None else None
    if problem:
        raise ValueError(f"checkpoint '{prefix}' is incomplete: {problem}. Resume from an earlier checkpoint "
                         f"(-r auto picks the newest complete one).")
    opt_state = paddle.load(opt_file)
    extra = opt_state.pop(EXTRA_KEY, None)
    if extra is None:
        extra = {"epoch": int(opt_state.pop(_PPDET_EPOCH_KEY))} if _PPDET_EPOCH_KEY in opt_state else {}
    token = extra.pop(_COMMIT_TOKEN, None)
    # Files from before commit records (or PaddleDetection's) carry no token and are taken as they are.
    if token is not None and (record is None or record.get("token") != token):
        raise ValueError(f"checkpoint '{prefix}' was not committed: its save was interrupted (or the files "
                         f"come from different saves), so '{prefix}.pdparams' and '{opt_file}' may not "
                         f"belong together. Resume from an earlier checkpoint (-r auto picks the newest "
                         f"complete one).")
    load_weights(model, prefix, what="resume")
    if opt_state.pop(_OPT_NAMING_KEY, None) == "structured":
        opt_state = _runtime_optimizer_state(opt_state, _unwrap(model), opt_file)
    optimizer.set_state_dict(opt_state)
    return dict(extra)


def _structured_optimizer_state(state: Dict[str, Any], model: paddle.nn.Layer) -> Dict[str, Any]:
    """Rename optimizer-state keys from global parameter names to the model's structured names."""
    by_runtime = {p.name: n for n, p in model.named_parameters()}
    out: Dict[str, Any] = {_OPT_NAMING_KEY: "structured"}
    for key, value in state.items():
        if key in _OPT_PASSTHROUGH:
            out[key] = value
        elif key == "master_weights" and isinstance(value, dict):
            out[key] = {by_runtime.get(k, k): v for k, v in value.items()}
        else:
            runtime, rest = _split_accumulator_key(key, by_runtime)
            out[f"{by_runtime[runtime]}{_OPT_SEP}{rest}" if runtime else key] = value
    return out


def _split_accumulator_key(key: str, names: Dict[str, str]) -> Tuple[Optional[str], str]:
    """'conv2d_7.w_0_moment1_0' -> ('conv2d_7.w_0', 'moment1_0'): the longest known parameter prefix."""
    for pos in range(len(key) - 1, 0, -1):
        if key[pos] == "_" and key[:pos] in names:
            return key[:pos], key[pos + 1:]
    return None, key


def _runtime_optimizer_state(state: Dict[str, Any], model: paddle.nn.Layer, file: str) -> Dict[str, Any]:
    """Inverse of :func:`_structured_optimizer_state` for the parameters of ``model`` as built now."""
    by_structured = {n: p.name for n, p in model.named_parameters()}
    out: Dict[str, Any] = {}
    unknown = []
    for key, value in state.items():
        if key == "master_weights" and isinstance(value, dict):
            out[key] = {by_structured.get(k, k): v for k, v in value.items()}
        elif _OPT_SEP in key:
            name, rest = key.split(_OPT_SEP, 1)
            if name not in by_structured:
                unknown.append(name)
                continue
            out[f"{by_structured[name]}_{rest}"] = value
        else:
            out[key] = value
    if unknown:
        raise ValueError(f"optimizer state '{file}' has entries for parameters the model lacks: "
                         + _listing("unknown", sorted(set(unknown))) + "; it belongs to a different model")
    return out
