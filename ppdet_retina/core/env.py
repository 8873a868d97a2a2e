"""Process environment for training and tools: device, CPU threads, multi-process setup, seeds."""

from __future__ import annotations

import logging
import os
import random
from typing import Any, Callable, NoReturn, Optional

import numpy as np
import paddle

__all__ = [
    "world_size",
    "rank",
    "local_world_size",
    "is_main_process",
    "available_cpus",
    "cpu_threads_per_process",
    "set_cpu_threads",
    "restore_cpu_threads",
    "select_device",
    "init_distributed",
    "barrier",
    "run_on_main_then_sync",
    "PEER_FAILED",
    "RunFailure",
    "PeerFailure",
    "stop_all_ranks",
    "check_peers",
    "set_random_seed",
    "setup_environment",
    "str2bool",
]

logger = logging.getLogger("ppdet_retina.core.env")


def world_size() -> int:
    """Number of training processes (1 outside ``paddle.distributed.launch``)."""
    return int(os.environ.get("PADDLE_TRAINERS_NUM", "1") or 1)


def rank() -> int:
    """This process's global rank (0 outside the launcher)."""
    return int(os.environ.get("PADDLE_TRAINER_ID", "0") or 0)


def local_world_size() -> int:
    """Processes started by the launcher on this machine; they share its cores."""
    return int(os.environ.get("PADDLE_LOCAL_SIZE", str(world_size())) or 1)


def is_main_process() -> bool:
    return rank() == 0


def available_cpus() -> int:
    """Cores this process may run on (respects taskset / cgroup affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cpu_threads_per_process(num_cpus: Optional[int] = None, local_size: Optional[int] = None) -> int:
    """Cores split evenly between the processes of this machine, at least one each."""
    cpus = available_cpus() if num_cpus is None else num_cpus
    procs = local_world_size() if local_size is None else local_size
    return max(1, cpus // max(1, procs))


def set_cpu_threads(num_threads: Optional[int] = None) -> int:
    """Set the math-library threads used by dygraph CPU kernels; returns the count.

    Paddle 3.3 dygraph runs conv on a single thread unless told, and
    OMP_NUM_THREADS does not change that; ``paddle.base.core.set_num_threads``
    does (docs/DESIGN.md, "Performance notes").
    """
    global _DYGRAPH_THREADS
    threads = cpu_threads_per_process() if num_threads is None else max(1, int(num_threads))
    paddle.base.core.set_num_threads(threads)
    _DYGRAPH_THREADS = threads
    return threads


# What set_cpu_threads last gave dygraph (None: never called, Paddle's default of one thread).
_DYGRAPH_THREADS: Optional[int] = None


def restore_cpu_threads() -> Optional[int]:
    """Set the math-library threads back to what :func:`set_cpu_threads` chose; returns that count.

    A Paddle Inference predictor's run (Paddle 3.3.1) leaves MKL and Intel OpenMP at one thread
    when it returns, so every dygraph step after an evaluation on it ran its convolutions' GEMMs
    on one core: training after ``--eval`` was up to 1.5x slower for the rest of the run.
    """
    if _DYGRAPH_THREADS is not None:
        paddle.base.core.set_num_threads(_DYGRAPH_THREADS)
    return _DYGRAPH_THREADS


_WARNED_NO_GPU = False


def select_device(use_gpu: bool = False) -> str:
    """Set and return the paddle device: ``gpu:<local rank>`` if asked and present, else ``cpu``.

    Asking for a GPU on a machine without one falls back to CPU with a single
    warning per process (PaddleDetection configs default to ``use_gpu: true``).
    """
    global _WARNED_NO_GPU
    if use_gpu and paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0:
        local_rank = int(os.environ.get("PADDLE_LOCAL_RANK", "0") or 0)
        device = f"gpu:{local_rank}"
    else:
        if use_gpu and not _WARNED_NO_GPU:
            _WARNED_NO_GPU = True
            logger.warning("use_gpu is true but no GPU is available to this paddle build: running on CPU "
                           "(set use_gpu=false to silence this)")
        device = "cpu"
    paddle.set_device(device)
    return device


_PARALLEL_READY = False


def init_distributed() -> bool:
    """Initialise the process group when launched with more than one process; idempotent."""
    global _PARALLEL_READY
    if world_size() <= 1:
        return False
    if not _PARALLEL_READY:
        paddle.distributed.init_parallel_env()
        _PARALLEL_READY = True
    return True


def barrier() -> None:
    """Wait for every process (no-op in a single process)."""
    if world_size() > 1 and _PARALLEL_READY:
        paddle.distributed.barrier()


def run_on_main_then_sync(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 only, then let every rank continue together, or fail together.

    A plain barrier after rank-0-only work would leave the other ranks waiting for ever when
    rank 0 raises; here the ranks agree on a failure flag first, and every rank raises.
    Returns ``fn``'s result on rank 0 and None elsewhere.
    """
    result, error = None, None
    if is_main_process():
        try:
            result = fn()
        except Exception as err:  # noqa: BLE001 - re-raised below, after the other ranks know
            error = err
    if world_size() > 1 and _PARALLEL_READY:
        flag = paddle.to_tensor([1.0 if error is not None else 0.0])
        paddle.distributed.all_reduce(flag, op=paddle.distributed.ReduceOp.MAX)
        status = float(flag.numpy()[0])
        if status >= PEER_FAILED:  # another rank failed on its own (stop_all_ranks) meanwhile
            failures = _gather_failures(error)
            if error is None:
                raise PeerFailure(_peer_message(failures))
        elif error is None and status > 0:
            raise RuntimeError("rank 0 failed while working alone (evaluation or saving); see its log "
                               "(log/workerlog.0 under paddle.distributed.launch)")
    if error is not None:
        raise error
    return result


# Status a rank that failed on its own sends to the MAX all-reduce the others are at (the per-step
# loss flag, or run_on_main_then_sync's); 1 there means "non-finite loss" / "rank 0 failed".
PEER_FAILED = 2.0


class RunFailure(Exception):
    """A run stopped by its surroundings, not by its inputs (another rank failed, the disk is full):
    tools print its message and exit with 1."""


class PeerFailure(RunFailure, RuntimeError):
    """Another rank failed; this rank stops with it. The message carries that rank's error."""


def stop_all_ranks(err: BaseException) -> NoReturn:
    """Re-raise ``err`` (caught by this rank alone, e.g. bad data) after telling every other rank.

    Call it where the other ranks are heading for a status all-reduce (before this step's
    backward): they receive PEER_FAILED there, the ranks exchange their error messages, and every
    rank raises, so no rank hangs in a collective and rank 0's log shows this rank's error.
    """
    if world_size() > 1 and _PARALLEL_READY:
        flag = paddle.to_tensor([PEER_FAILED], dtype="float32")
        paddle.distributed.all_reduce(flag, op=paddle.distributed.ReduceOp.MAX)
        _gather_failures(err)
    raise err


def check_peers(status: float) -> None:
    """After a status all-reduce: raise PeerFailure when some rank sent PEER_FAILED."""
    if status >= PEER_FAILED:
        raise PeerFailure(_peer_message(_gather_failures(None)))


def _gather_failures(err: Optional[BaseException]) -> list:
    """Every rank's error text (None where it had none), exchanged between all ranks."""
    texts: list = []
    own = None if err is None else f"{type(err).__name__}: {err}"
    paddle.distributed.all_gather_object(texts, own)
    return [(r, t) for r, t in enumerate(texts) if t]


def _peer_message(failures: list) -> str:
    shown = "; ".join(f"rank {r} of {world_size()} failed: {t}" for r, t in failures)
    return f"{shown}. Every rank stopped with it (that rank's own log has its traceback)"


def set_random_seed(seed: int) -> None:
    """Seed python, numpy and paddle; each rank offsets the seed so data augmentation differs."""
    seed = int(seed) + rank()
    random.seed(seed)
    np.random.seed(seed)
    paddle.seed(seed)


def setup_environment(use_gpu: bool = False, num_threads: Optional[int] = None) -> str:
    """Device + threads + process group, in the order they must happen; returns the device."""
    device = select_device(use_gpu)
    if device == "cpu":
        set_cpu_threads(num_threads)
    init_distributed()
    return device


# --------------------------------------------------------------------------- command-line tools

def add_config_args(parser) -> None:
    """The ``-c`` / ``-o`` flags every tool shares (PaddleDetection's spelling)."""
    parser.add_argument("-c", "--config", required=True,
                        help="config file, or a bare name found under configs/ (e.g. retinanet_r50_fpn_1x)")
    parser.add_argument("-o", "--opt", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override config keys, dotted for nesting: -o use_gpu=false "
                             "TrainReader.batch_size=4 weights=output/x/model_final")


def str2bool(text: str) -> bool:
    """argparse type for PaddleDetection's boolean flags: ``--flag``, ``--flag true``, ``--flag=False``
    (the words of :func:`ppdet_retina.runtime.parse_bool`)."""
    import argparse

    from ppdet_retina.runtime import parse_bool

    try:
        return parse_bool(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None

def load_tool_config(args) -> dict:
    """Load ``args.config`` with the ``-o`` overrides applied."""
    from ppdet_retina.core.workspace import load_config

    return load_config(args.config, args.opt or None)


def run_tool(main, argv=None) -> int:
    """Run ``main(argv)``; a user mistake prints one ``error: ...`` line instead of a traceback.

    Config, missing-file and bad-value errors exit with 2, a diverged training
    (non-finite loss), another rank's failure and a checkpoint that did not fit on the disk
    with 1; anything else is a bug and keeps its traceback.
    """
    import sys

    from ppdet_retina.core.workspace import ConfigError

    try:
        main(argv)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (FloatingPointError, RunFailure) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0
