"""Logging for training and tools: a rank-aware console logger, windowed averages, a JSON-lines log."""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import sys
from typing import Deque, Dict, Mapping, Optional

__all__ = ["setup_logger", "SmoothedValue", "TrainingStats", "JsonlWriter", "format_eta"]

_FORMAT = "[%(asctime)s] %(name)s %(levelname)s: %(message)s"


def _rank() -> int:
    return int(os.environ.get("PADDLE_TRAINER_ID", "0") or 0)


def setup_logger(name: str = "ppdet_retina", output: Optional[str] = None) -> logging.Logger:
    """Return the named logger, writing to stdout (and ``output`` if given).

    On ranks other than 0 only errors are shown, so a multi-process run prints
    each message once. Calling it again does not add handlers twice.
    """
    logger = logging.getLogger(name)
    logger.propagate = False
    logger.setLevel(logging.INFO if _rank() == 0 else logging.ERROR)
    formatter = logging.Formatter(_FORMAT, datefmt="%m/%d %H:%M:%S")
    if not any(getattr(h, "_ppdet_console", False) for h in logger.handlers):
        console = logging.StreamHandler(stream=sys.stdout)
        console.setFormatter(formatter)
        console._ppdet_console = True
        logger.addHandler(console)
    if output and _rank() == 0:
        path = os.path.abspath(output)
        if not any(getattr(h, "baseFilename", None) == path for h in logger.handlers):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            file_handler = logging.FileHandler(path)
            file_handler.setFormatter(formatter)
            logger.addHandler(file_handler)
    return logger


class SmoothedValue:
    """Window of recent values: median/avg over the window, plus the global mean."""

    def __init__(self, window_size: int = 20):
        self.window: Deque[float] = collections.deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0

    def update(self, value: float, n: int = 1) -> None:
        self.window.append(float(value))
        self.total += float(value) * n
        self.count += n

    @property
    def median(self) -> float:
        ordered = sorted(self.window)
        return ordered[len(ordered) // 2] if ordered else 0.0

    @property
    def avg(self) -> float:
        return sum(self.window) / len(self.window) if self.window else 0.0

    @property
    def global_avg(self) -> float:
        return self.total / max(self.count, 1)


class TrainingStats:
    """Smoothed loss terms keyed by name; ``get()`` gives the window medians."""

    def __init__(self, window_size: int = 20):
        self.window_size = window_size
        self.meters: Dict[str, SmoothedValue] = {}

    def update(self, values: Mapping[str, float]) -> None:
        for key, value in values.items():
            self.meters.setdefault(key, SmoothedValue(self.window_size)).update(value)

    def get(self) -> Dict[str, float]:
        return {k: m.median for k, m in self.meters.items()}

    def log(self) -> str:
        return ", ".join(f"{k}: {v:.6f}" for k, v in self.get().items())


class JsonlWriter:
    """Appends one JSON object per line; a no-op on ranks other than 0.

    ``append=False`` starts the file afresh (a new run), True continues it (a resume).
    """

    def __init__(self, path: str, append: bool = True):
        self.path = path
        self.enabled = _rank() == 0
        if self.enabled:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            if not append:
                open(path, "w", encoding="utf-8").close()

    def write(self, record: Mapping) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(_plain(record)) + "\n")


def _plain(value):
    """Make numpy scalars and non-finite floats JSON-safe (non-finite -> null)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def format_eta(seconds: float) -> str:
    """``h:mm:ss`` for a duration in seconds."""
    seconds = max(int(seconds), 0)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
