"""``tools/train.py --use_vdl``: training curves as VisualDL scalars (optional extra ``vdl``).

Scalars, all against the global iteration: every loss term under its own name (``loss``,
``loss_cls``, ... : the logged window medians), ``lr``, and after each evaluation ``bbox-mAP``
(AP@[.5:.95], PaddleDetection's tag). View with ``visualdl --logdir <vdl_log_dir>``.
"""

from __future__ import annotations

from typing import Mapping

from ppdet_retina.core.workspace import ConfigError

__all__ = ["VisualDLWriter"]


class VisualDLWriter:
    """Writes the training scalars into ``log_dir``; ConfigError naming the fix when VisualDL is missing."""

    def __init__(self, log_dir: str = "vdl_log_dir/scalar"):
        try:
            from visualdl import LogWriter
        except ImportError as err:
            raise ConfigError(f"--use_vdl needs VisualDL, which is not installed ({err}): "
                              f"pip install visualdl (or pip install -e '.[vdl]'), or drop --use_vdl") from None
        self.log_dir = log_dir
        self._writer = LogWriter(logdir=log_dir)

    def train_step(self, step: int, lr: float, losses: Mapping[str, float]) -> None:
        for name, value in losses.items():
            self._writer.add_scalar(name, float(value), int(step))
        self._writer.add_scalar("lr", float(lr), int(step))
        self._writer.flush()

    def evaluation(self, step: int, bbox_map: float) -> None:
        self._writer.add_scalar("bbox-mAP", float(bbox_map), int(step))
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
