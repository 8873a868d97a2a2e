"""``tools/train.py --profiler_options``: Paddle's profiler over a range of training iterations.

The option string is PaddleDetection's: ``key=value`` pairs separated by ``;``, e.g.
``"batch_range=[10,20];profile_path=output/profile;sorted_key=total"``. Keys and defaults:

* ``batch_range`` ([10, 20]): profile iterations start <= i < end, counted from the run's first one;
* ``state`` ('All'): 'CPU', 'GPU' or 'All' (GPU only where one runs);
* ``sorted_key`` ('total'): order of the printed op table: 'total', 'ave', 'max', 'min' ('calls' is
  accepted and sorts by total);
* ``tracer_option`` ('Default'): 'OpDetail' / 'AllOpDetail' print per-op details;
* ``profile_path`` ('/tmp/profile'): the Chrome-trace JSON is written to this path (a folder is
  created for it when it does not end in ``.json``);
* ``exit_on_finished`` (true): stop the run once the range is profiled, as PaddleDetection does.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, Optional

import paddle

from ppdet_retina.runtime import parse_bool

__all__ = ["ProfilerDone", "parse_profiler_options", "StepProfiler"]

logger = logging.getLogger("ppdet_retina.training.profiling")

_DEFAULTS: Dict[str, Any] = {"batch_range": [10, 20], "state": "All", "sorted_key": "total",
                             "tracer_option": "Default", "profile_path": "/tmp/profile", "exit_on_finished": True}
_SORT_KEYS = {"total": "Total", "calls": "Total", "ave": "Avg", "max": "Max", "min": "Min"}


class ProfilerDone(Exception):
    """The profiled range is over and ``exit_on_finished`` asks to end the run."""


def _parse_range(text: str) -> list:
    try:
        values = [int(v) for v in text.strip("[]").split(",") if v.strip()]
    except ValueError:
        values = []
    if len(values) != 2 or values[0] < 0 or values[1] <= values[0]:
        raise ValueError(f"--profiler_options batch_range={text}: give two iterations [start,end] with "
                         f"0 <= start < end, e.g. batch_range=[10,20]")
    return values


def parse_profiler_options(text: str) -> Dict[str, Any]:
    """PaddleDetection's ``"key=value;key=value"`` string -> the options dict (defaults filled in)."""
    options = dict(_DEFAULTS)
    for item in str(text).replace(" ", "").split(";"):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or key not in _DEFAULTS:
            raise ValueError(f"--profiler_options: '{item}' is not key=value with a key among "
                             f"{sorted(_DEFAULTS)} (e.g. \"batch_range=[10,20];profile_path=output/profile\")")
        if key == "batch_range":
            options[key] = _parse_range(value)
        elif key == "exit_on_finished":
            try:
                options[key] = parse_bool(value)
            except ValueError as err:
                raise ValueError(f"--profiler_options exit_on_finished: {err}") from None
        elif key == "sorted_key" and value not in _SORT_KEYS:
            raise ValueError(f"--profiler_options sorted_key={value}: use one of {sorted(_SORT_KEYS)}")
        elif key == "state" and value not in ("CPU", "GPU", "All"):
            raise ValueError(f"--profiler_options state={value}: use CPU, GPU or All")
        else:
            options[key] = value
    return options


def _no_trace(_profiler: Any) -> None:
    return None


class StepProfiler:
    """Call :meth:`step` once before every training iteration; profiles ``batch_range``.

    Raises :class:`ProfilerDone` at the end of the range when ``exit_on_finished``.
    """

    def __init__(self, options: str, device: str = "cpu"):
        self.options = parse_profiler_options(options)
        self.start, self.end = self.options["batch_range"]
        self.on_gpu = str(device).startswith("gpu")
        self.iteration = 0
        self._profiler: Optional[paddle.profiler.Profiler] = None

    def _targets(self) -> list:
        state = self.options["state"]
        targets = [] if state == "GPU" else [paddle.profiler.ProfilerTarget.CPU]
        if self.on_gpu and state in ("GPU", "All"):
            targets.append(paddle.profiler.ProfilerTarget.GPU)
        return targets or [paddle.profiler.ProfilerTarget.CPU]

    def step(self) -> None:
        if self.iteration == self.start:
            # on_trace_ready: the trace goes to profile_path in finish(), not Paddle's ./profiler_log default.
            self._profiler = paddle.profiler.Profiler(targets=self._targets(), on_trace_ready=_no_trace)
            self._profiler.start()
            logger.info(f"profiler: recording iterations {self.start}..{self.end - 1}")
        elif self.iteration == self.end and self._profiler is not None:
            self.finish()
            if self.options["exit_on_finished"]:
                raise ProfilerDone(f"profiled iterations {self.start}..{self.end - 1}; trace in "
                                   f"{self.trace_path()} (exit_on_finished=true ends the run here)")
        elif self._profiler is not None:
            self._profiler.step()
        self.iteration += 1

    def trace_path(self) -> str:
        path = self.options["profile_path"]
        return path if path.endswith(".json") else os.path.join(path, "trace.json")

    def finish(self) -> None:
        """Stop, print the op table and write the trace; a no-op outside the range."""
        if self._profiler is None:
            return
        profiler, self._profiler = self._profiler, None
        profiler.stop()
        device = "GPU" if self.on_gpu and self.options["state"] != "CPU" else "CPU"
        key = getattr(paddle.profiler.SortedKeys, device + _SORT_KEYS[self.options["sorted_key"]])
        profiler.summary(sorted_by=key, op_detail=self.options["tracer_option"] != "Default")
        path = self.trace_path()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        profiler.export(path=path, format="json")
        logger.info(f"profiler: trace written to {path}")
