"""Mixed-precision training (``--amp``), as PaddleDetection configures it.

Top-level config keys: ``amp`` (set by ``tools/train.py --amp``), ``amp_level`` ('O1': white-listed
ops run in float16, weights stay float32; 'O2': the model itself is cast to float16 with float32
master weights in the optimizer), ``init_loss_scaling`` (1024), ``custom_white_list`` /
``custom_black_list`` (op names forced into / out of float16).

On a GPU the forward runs under ``paddle.amp.auto_cast`` and the loss goes through a
``paddle.amp.GradScaler`` (dynamic loss scaling: the scale halves when a step's gradients overflow,
and that step is skipped; it doubles after 1000 clean steps). The scaler's state is saved with
each checkpoint and restored by resume. On a CPU, training stays float32: Paddle has no float16
CPU kernels for these networks, and bfloat16 autocast (O1) measured no faster than float32 on a
CPU with avx512_bf16 (figures in docs/DESIGN.md, "Performance notes").
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, ContextManager, Dict, Optional, Tuple

import paddle

from ppdet_retina.core.options import TrainingOption, declare_training_options
from ppdet_retina.core.workspace import ConfigError

__all__ = ["AMP_LEVELS", "MixedPrecision"]

AMP_LEVELS = ("O1", "O2")

declare_training_options({
    "amp_level": TrainingOption("mixed precision level: O1 (autocast) or O2 (float16 model, float32 master weights)"),
    "init_loss_scaling": TrainingOption("initial loss scale of --amp's dynamic loss scaling (1024)"),
    "custom_white_list": TrainingOption("op names --amp runs in float16"),
    "custom_black_list": TrainingOption("op names --amp keeps in float32"),
})

logger = logging.getLogger("ppdet_retina.training.amp")


class MixedPrecision:
    """Autocast + loss scaling for one training run; a plain float32 step when inactive.

    Args:
        enabled: ``--amp`` was asked for.
        device: the paddle device string; float16 runs only on ``gpu:*``.
        level, init_loss_scaling, white_list, black_list: the config keys above.
    """

    def __init__(self, enabled: bool, device: str, level: str = "O1", init_loss_scaling: float = 1024.0,
                 white_list: Optional[list] = None, black_list: Optional[list] = None):
        if level not in AMP_LEVELS:
            raise ConfigError(f"amp_level '{level}' is not one of {list(AMP_LEVELS)}")
        self.requested = bool(enabled)
        self.active = self.requested and str(device).startswith("gpu")
        self.level = level
        self.white_list = list(white_list) if white_list else None
        self.black_list = list(black_list) if black_list else None
        self.scaler: Optional[paddle.amp.GradScaler] = None
        if self.active:
            self.scaler = paddle.amp.GradScaler(enable=True, init_loss_scaling=float(init_loss_scaling))
            logger.info(f"--amp: float16 autocast ({level}) with dynamic loss scaling from {init_loss_scaling:g}")
        elif self.requested:
            logger.warning(f"--amp asked on {device}: training runs in float32 (float16 needs a GPU; bfloat16 "
                           f"autocast measured no gain on CPU)")

    @classmethod
    def from_config(cls, cfg: dict, device: str) -> "MixedPrecision":
        return cls(bool(cfg.get("amp", False)), device, level=str(cfg.get("amp_level", "O1")),
                   init_loss_scaling=float(cfg.get("init_loss_scaling", 1024.0)),
                   white_list=cfg.get("custom_white_list"), black_list=cfg.get("custom_black_list"))

    def decorate(self, model: paddle.nn.Layer, optimizer: Any) -> Tuple[paddle.nn.Layer, Any]:
        """O2 casts the model to float16 and gives the optimizer float32 master weights."""
        if self.active and self.level == "O2":
            return paddle.amp.decorate(models=model, optimizers=optimizer, level="O2")
        return model, optimizer

    def autocast(self) -> ContextManager:
        """The context the forward runs in."""
        if not self.active:
            return contextlib.nullcontext()
        return paddle.amp.auto_cast(enable=True, level=self.level, custom_white_list=self.white_list,
                                    custom_black_list=self.black_list)

    def backward_and_step(self, loss: paddle.Tensor, optimizer: Any) -> None:
        """Backward and optimizer step; with loss scaling, a step whose gradients overflowed is skipped."""
        if self.scaler is None:
            loss.backward()
            optimizer.step()
            return
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> Dict[str, Any]:
        """The loss scaler's state (empty when no scaler runs)."""
        return self.scaler.state_dict() if self.scaler is not None else {}

    def set_state_dict(self, state: Optional[Dict[str, Any]]) -> None:
        """Restore :meth:`state_dict`; a checkpoint without scaler state leaves the initial scale."""
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
            scale = float(self.scaler.state_dict()["scale"].reshape(-1)[0])
            logger.info(f"--amp: loss scale restored to {scale:g}")
