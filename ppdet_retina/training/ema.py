"""Exponential moving average (EMA) of the model weights, configured as in PaddleDetection.

Top-level config keys (PaddleDetection's names and defaults):

* ``use_ema`` (false): keep the average; evaluation during training and every saved snapshot use it.
* ``ema_decay`` (0.9998): the decay ``d``.
* ``ema_decay_type`` ('threshold'): how the decay of update ``s`` (0-based) is scheduled:
  'threshold' ``min(d, (1 + s) / (10 + s))`` (a short average early on), 'normal' ``d``,
  'exponential' ``d * (1 - exp(-(s + 1) / 2000))``.
* ``cycle_epoch`` (-1): restart the average after this many snapshots (-1: never).
* ``ema_black_list`` ([]): entries whose name contains one of these substrings are not averaged
  (they keep the trained value).
* ``ema_filter_no_grad`` (false): leave frozen parameters out too (BatchNorm statistics stay in).

The average starts at zero, ``acc <- d_s * acc + (1 - d_s) * w`` after each optimizer step, and the
weights it stands for after ``n`` updates are ``acc / (1 - d_{n-1} ** n)`` (the zero start corrected
with the last decay, as PaddleDetection does; 'exponential' uses ``acc`` as it is).

Checkpoints (PaddleDetection's layout): ``<prefix>.pdparams`` holds the averaged weights, so eval,
infer and export pick them up; ``<prefix>.pdema`` holds the trained weights that resume continues
from; the update count and snapshot count go into the ``.pdopt`` extra dict.
"""

from __future__ import annotations

import contextlib
import math
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np
import paddle

from ppdet_retina.core.options import TrainingOption, declare_training_options
from ppdet_retina.core.workspace import ConfigError

__all__ = ["EMA_DECAY_TYPES", "RAW_WEIGHTS_SUFFIX", "ModelEMA", "build_ema"]

EMA_DECAY_TYPES = ("threshold", "normal", "exponential")
# PaddleDetection writes the trained (not averaged) weights of an EMA run next to .pdparams under this.
RAW_WEIGHTS_SUFFIX = ".pdema"

declare_training_options({
    "use_ema": TrainingOption("keep an exponential moving average of the weights (eval and snapshots use it)"),
    "ema_decay": TrainingOption("EMA decay (0.9998)"),
    "ema_decay_type": TrainingOption("EMA decay schedule: threshold, normal or exponential"),
    "cycle_epoch": TrainingOption("restart the EMA after this many snapshots (-1: never)"),
    "ema_black_list": TrainingOption("substrings of parameter names kept out of the EMA"),
    "ema_filter_no_grad": TrainingOption("keep frozen parameters out of the EMA"),
})


def _batchnorm_statistics(model: paddle.nn.Layer) -> set:
    """Names of BatchNorm running statistics: frozen (no gradient) but averaged all the same."""
    names = set()
    for prefix, layer in model.named_sublayers(include_self=True):
        if isinstance(layer, paddle.nn.layer.norm._BatchNormBase):
            dot = f"{prefix}." if prefix else ""
            names.update({f"{dot}_mean", f"{dot}_variance"})
    return names


class ModelEMA:
    """The moving average of ``model``'s state dict (parameters and BatchNorm statistics).

    Args:
        model: the (unwrapped) model whose weights are averaged.
        decay, decay_type, cycle_epoch, black_list, filter_no_grad: the config keys above.

    Floating-point entries are averaged in float32; others are left out (kept live).
    """

    def __init__(self, model: paddle.nn.Layer, decay: float = 0.9998, decay_type: str = "threshold",
                 cycle_epoch: int = -1, black_list: Optional[Sequence[str]] = None, filter_no_grad: bool = False):
        if decay_type not in EMA_DECAY_TYPES:
            raise ConfigError(f"ema_decay_type '{decay_type}' is not one of {list(EMA_DECAY_TYPES)}")
        if not 0.0 < float(decay) < 1.0:
            raise ConfigError(f"ema_decay must be in (0, 1), got {decay}")
        self.model = model
        self.decay = float(decay)
        self.decay_type = decay_type
        self.cycle_epoch = int(cycle_epoch)
        self.step = 0
        self.epoch = 0
        state = model.state_dict()
        patterns = [str(p) for p in (black_list or [])]
        excluded = {k for k in state if any(p in k for p in patterns)}
        if filter_no_grad:
            keep = _batchnorm_statistics(model)
            excluded |= {k for k, p in model.named_parameters() if p.stop_gradient and k not in keep}
        self.names: List[str] = [k for k, v in state.items() if k not in excluded and v.is_floating_point()]
        self._acc: Dict[str, paddle.Tensor] = {}
        self.reset()

    def reset(self) -> None:
        """Start the average again from zero (``cycle_epoch``)."""
        state = self.model.state_dict()
        self._acc = {k: paddle.zeros(state[k].shape, dtype="float32") for k in self.names}
        self.step = 0
        self.epoch = 0

    def decay_at(self, step: int) -> float:
        """The decay used by update number ``step`` (0-based)."""
        if self.decay_type == "threshold":
            return min(self.decay, (1.0 + step) / (10.0 + step))
        if self.decay_type == "exponential":
            return self.decay * (1.0 - math.exp(-(step + 1) / 2000.0))
        return self.decay

    def _correction(self) -> float:
        if self.decay_type == "exponential":
            return 1.0
        return 1.0 - self.decay_at(self.step - 1) ** self.step

    @paddle.no_grad()
    def update(self) -> None:
        """Fold the model's current weights in; call after every optimizer step."""
        decay = self.decay_at(self.step)
        state = self.model.state_dict()
        for name in self.names:
            _fold_in(self._acc[name], state[name], decay)
        self.step += 1

    @paddle.no_grad()
    def averaged_state(self) -> Dict[str, paddle.Tensor]:
        """The averaged weights (zero start corrected) for every averaged entry, in the model's dtypes.

        Before the first update these are the model's own weights.
        """
        state = self.model.state_dict()
        if self.step == 0:
            return {k: state[k].clone() for k in self.names}
        scale = 1.0 / self._correction()
        return {k: (self._acc[k] * scale).astype(state[k].dtype) for k in self.names}

    @contextlib.contextmanager
    def applied(self) -> Iterator[Dict[str, paddle.Tensor]]:
        """Within the block the model holds the averaged weights; the trained ones come back after.

        Yields the trained state dict (what a resume continues from).
        """
        state = self.model.state_dict()
        trained = {k: state[k].clone() for k in self.names}
        averaged = self.averaged_state()
        with paddle.no_grad():
            for name in self.names:
                state[name].set_value(averaged[name])
        try:
            yield {k: trained.get(k, v) for k, v in state.items()}
        finally:
            with paddle.no_grad():
                for name in self.names:
                    state[name].set_value(trained[name])

    def snapshot_done(self) -> None:
        """Count a snapshot; after ``cycle_epoch`` of them the average restarts."""
        self.epoch += 1
        if self.cycle_epoch > 0 and self.epoch == self.cycle_epoch:
            self.reset()

    def counters(self) -> Dict[str, int]:
        """What resume needs besides the averaged weights (saved in the checkpoint's extra dict)."""
        return {"ema_step": self.step, "ema_epoch": self.epoch}

    @paddle.no_grad()
    def load(self, averaged: Dict[str, paddle.Tensor], step: int, epoch: int = 0) -> None:
        """Restore from averaged weights (a snapshot's ``.pdparams``) and the update count ``step``."""
        missing = [k for k in self.names if k not in averaged]
        if missing:
            raise ValueError(f"EMA resume: the averaged weights lack {len(missing)} entries, e.g. {missing[:3]}")
        self.step, self.epoch = int(step), int(epoch)
        factor = self._correction() if self.step > 0 else 0.0
        for name in self.names:
            value = paddle.to_tensor(averaged[name]).astype("float32")
            self._acc[name] = value * factor


def _fold_in(acc: paddle.Tensor, value: paddle.Tensor, decay: float) -> None:
    """``acc <- decay * acc + (1 - decay) * value`` in place (``acc`` float32)."""
    if value.place.is_cpu_place() and value.dtype == paddle.float32 and acc.place.is_cpu_place():
        # NumPy on zero-copy views: several times cheaper per step than Paddle's scale_/add_ or
        # lerp_ on CPU (docs/DESIGN.md, "Performance notes").
        view = np.from_dlpack(acc)
        view *= decay
        view += (1.0 - decay) * np.from_dlpack(value.detach())
        return
    acc.scale_(decay).add_(value.astype("float32") * (1.0 - decay))


def build_ema(cfg: dict, model: paddle.nn.Layer) -> Optional[ModelEMA]:
    """A :class:`ModelEMA` from the config's ``use_ema`` keys, or None when ``use_ema`` is off."""
    if not cfg.get("use_ema", False):
        return None
    black_list = cfg.get("ema_black_list") or []
    if isinstance(black_list, str):
        black_list = [black_list]
    return ModelEMA(model, decay=float(cfg.get("ema_decay", 0.9998)),
                    decay_type=str(cfg.get("ema_decay_type", "threshold")),
                    cycle_epoch=int(cfg.get("cycle_epoch", -1)), black_list=black_list,
                    filter_no_grad=bool(cfg.get("ema_filter_no_grad", False)))
