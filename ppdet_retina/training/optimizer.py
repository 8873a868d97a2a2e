"""Learning-rate schedules and the optimizer builder, configured like PaddleDetection.

A config lists decay and warm-up pieces under ``LearningRate.schedulers``::

    LearningRate:
      base_lr: 0.01
      schedulers:
      - !PiecewiseDecay {gamma: 0.1, milestones: [8, 11]}
      - !LinearWarmup {start_factor: 0.001, steps: 500}

``LearningRate(...)(steps_per_epoch)`` turns them into one
``paddle.optimizer.lr.LRScheduler`` that is stepped once per iteration. Its
value at iteration ``i`` is ``decay(i) * warmup_factor(i)``, computed from the
iteration counter alone, so restoring the counter (``set_state_dict``)
restores the schedule exactly on resume.
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple, Union

import paddle

from ppdet_retina.core.workspace import ConfigError, register, serializable

__all__ = [
    "PiecewiseDecay",
    "CosineDecay",
    "LinearWarmup",
    "LearningRate",
    "OptimizerBuilder",
    "ScheduledLR",
    "build_optimizer",
]


class ScheduledLR(paddle.optimizer.lr.LRScheduler):
    """A per-iteration schedule given by a pure function ``lr_at(iteration) -> float``."""

    def __init__(self, lr_at: Callable[[int], float], last_epoch: int = -1):
        self._lr_at = lr_at
        super().__init__(learning_rate=float(lr_at(0)), last_epoch=last_epoch)

    def get_lr(self) -> float:
        return float(self._lr_at(max(self.last_epoch, 0)))

    def set_state_dict(self, state_dict: dict) -> None:
        super().set_state_dict(state_dict)
        # A checkpoint from a run with another schedule must not keep its stale
        # value: the value always follows the restored iteration counter.
        self.last_lr = self.get_lr()


@serializable
class PiecewiseDecay:
    """Step decay at epoch milestones.

    Computes ``values[k]`` (or ``base_lr * gamma[k-1]``, ``gamma[-1] = 1``) for
    iterations in ``[milestone_k, milestone_{k+1})``, milestones counted in
    epochs and converted with ``steps_per_epoch``.

    Config keys:
        gamma: a factor per milestone (list), or one factor applied
            cumulatively (0.1 -> 0.1, 0.01, ...). Used when ``values`` is None.
        milestones: epochs at which the LR drops, ascending.
        values: explicit LRs, one more than ``milestones``; overrides ``gamma``.
        use_warmup: let a ``LinearWarmup`` in the same list ramp the start.
    """

    def __init__(self, gamma: Union[float, Sequence[float]] = (0.1, 0.01),
                 milestones: Sequence[int] = (8, 11), values: Optional[Sequence[float]] = None,
                 use_warmup: bool = True):
        self.milestones = [int(m) for m in milestones]
        if sorted(self.milestones) != self.milestones:
            raise ConfigError(f"PiecewiseDecay.milestones {list(milestones)} must be ascending")
        if values is not None and len(values) != len(self.milestones) + 1:
            raise ConfigError(f"PiecewiseDecay.values needs {len(self.milestones) + 1} entries (one more than "
                              f"milestones {self.milestones}), got {len(values)}")
        if not isinstance(gamma, (list, tuple)):
            gamma = [float(gamma) ** (k + 1) for k in range(len(self.milestones))]
        if values is None and len(gamma) != len(self.milestones):
            raise ConfigError(f"PiecewiseDecay.gamma has {len(gamma)} entries but milestones has "
                              f"{len(self.milestones)}; give one factor per milestone or a single number")
        self.gamma = [float(g) for g in gamma]
        self.values = None if values is None else [float(v) for v in values]
        self.use_warmup = use_warmup

    def build(self, base_lr: float, steps_per_epoch: int) -> Callable[[int], float]:
        """Return ``lr_at(iteration)``."""
        boundaries = [m * steps_per_epoch for m in self.milestones]
        values = self.values or [base_lr] + [base_lr * g for g in self.gamma]

        def lr_at(it: int) -> float:
            return values[sum(1 for b in boundaries if it >= b)]
        return lr_at


@serializable
class CosineDecay:
    """Half-cosine from ``base_lr`` to ``base_lr * min_lr_ratio``.

    The cosine spans the iterations after warm-up (when a warm-up is used) up to
    ``max_epochs`` minus ``last_plateau_epochs``; the plateau holds the minimum.

    Config keys:
        max_epochs: length of the schedule in epochs (usually the config's ``epoch``).
        use_warmup: start the cosine after a ``LinearWarmup`` of the same list.
        min_lr_ratio: final LR as a fraction of ``base_lr``.
        last_plateau_epochs: epochs at the end kept at the minimum LR.
    """

    def __init__(self, max_epochs: int = 1000, use_warmup: bool = True, min_lr_ratio: float = 0.0,
                 last_plateau_epochs: int = 0):
        self.max_epochs = int(max_epochs)
        self.use_warmup = use_warmup
        self.min_lr_ratio = float(min_lr_ratio)
        self.last_plateau_epochs = int(last_plateau_epochs)

    def build(self, base_lr: float, steps_per_epoch: int, warmup_steps: int = 0) -> Callable[[int], float]:
        start = warmup_steps if self.use_warmup else 0
        end = (self.max_epochs - self.last_plateau_epochs) * steps_per_epoch
        min_lr = base_lr * self.min_lr_ratio
        span = max(end - start, 1)

        def lr_at(it: int) -> float:
            progress = min(max(it - start, 0), span) / span
            return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return lr_at


@serializable
class LinearWarmup:
    """Linear ramp of the LR factor from ``start_factor`` to 1 over the first iterations.

    Config keys:
        steps: warm-up length in iterations.
        start_factor: factor at iteration 0.
        epochs: warm-up length in epochs.
        epochs_first: when ``epochs`` is set, use it (True) or keep ``steps`` (False).
    """

    def __init__(self, steps: int = 500, start_factor: float = 1.0 / 3, epochs: Optional[int] = None,
                 epochs_first: bool = True):
        if float(start_factor) < 0:
            raise ConfigError(f"LinearWarmup.start_factor must be >= 0, got {start_factor}")
        self.steps = int(steps)
        self.start_factor = float(start_factor)
        self.epochs = epochs
        self.epochs_first = epochs_first

    def num_steps(self, steps_per_epoch: int) -> int:
        if self.epochs is not None and self.epochs_first:
            return int(self.epochs) * steps_per_epoch
        return self.steps

    def build(self, steps_per_epoch: int) -> Callable[[int], float]:
        """Return ``factor_at(iteration)``: 1 after the warm-up."""
        total = self.num_steps(steps_per_epoch)

        def factor_at(it: int) -> float:
            if total <= 0 or it >= total:
                return 1.0
            alpha = it / total
            return self.start_factor * (1.0 - alpha) + alpha
        return factor_at


_DECAYS = (PiecewiseDecay, CosineDecay)


@register
class LearningRate:
    """The per-iteration LR schedule.

    ``LearningRate(...)(steps_per_epoch)`` returns a ``paddle.optimizer.lr.LRScheduler``
    (call ``.step()`` once per iteration) computing ``decay(i) * warmup(i)``.

    Config keys:
        base_lr: the LR after warm-up and before any decay.
        schedulers: at most one decay (``PiecewiseDecay`` or ``CosineDecay``) and at
            most one ``LinearWarmup``, as ``!Tag`` objects or dicts with ``name:``.
    """

    def __init__(self, base_lr: float = 0.01, schedulers: Optional[List] = None):
        if float(base_lr) <= 0:
            raise ConfigError(f"LearningRate.base_lr must be > 0, got {base_lr}")
        self.base_lr = float(base_lr)
        items = [PiecewiseDecay(), LinearWarmup()] if schedulers is None else list(schedulers)
        self.decay, self.warmup = self._split(items)

    @staticmethod
    def _split(items: List) -> tuple:
        decay, warmup = None, None
        for item in items:
            if isinstance(item, dict):
                from ppdet_retina.core.workspace import create
                item = create(dict(item), {})
            if isinstance(item, _DECAYS):
                if decay is not None:
                    raise ConfigError("LearningRate.schedulers has two decay schedules; keep one of "
                                      "PiecewiseDecay / CosineDecay")
                decay = item
            elif isinstance(item, LinearWarmup):
                if warmup is not None:
                    raise ConfigError("LearningRate.schedulers has two LinearWarmup entries; keep one")
                warmup = item
            else:
                raise ConfigError(f"LearningRate.schedulers: unsupported entry {item!r}; use "
                                  f"!PiecewiseDecay, !CosineDecay or !LinearWarmup")
        return decay, warmup

    def lr_function(self, steps_per_epoch: int) -> Callable[[int], float]:
        """``lr_at(iteration)`` for a run with ``steps_per_epoch`` iterations per epoch."""
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch} (is the dataset empty?)")
        use_warmup = self.warmup is not None and (self.decay is None or self.decay.use_warmup)
        warmup_steps = self.warmup.num_steps(steps_per_epoch) if use_warmup else 0
        if isinstance(self.decay, CosineDecay):
            decay = self.decay.build(self.base_lr, steps_per_epoch, warmup_steps)
        elif self.decay is not None:
            decay = self.decay.build(self.base_lr, steps_per_epoch)
        else:
            decay = lambda it: self.base_lr  # noqa: E731
        factor = self.warmup.build(steps_per_epoch) if use_warmup else (lambda it: 1.0)
        return lambda it: decay(it) * factor(it)

    def __call__(self, steps_per_epoch: int) -> ScheduledLR:
        return ScheduledLR(self.lr_function(int(steps_per_epoch)))


_OPTIMIZERS = ("Momentum", "SGD", "AdamW", "Adam")


@register
class OptimizerBuilder:
    """Builds the paddle optimizer over a model's trainable parameters.

    ``OptimizerBuilder(...)(lr, model)`` returns the optimizer.

    Config keys:
        clip_grad_by_norm: global-norm gradient clip (None = off). The norm is taken over the raw
            gradients of the trainable parameters; weight decay is added after clipping.
        clip_grad_by_value: clip each gradient to [-v, v] (None = off).
        regularizer: ``{type: L2|L1, factor: f}`` weight decay (ignored by AdamW,
            which takes ``weight_decay`` in ``optimizer``); None (or the string None) turns it off.
            A parameter whose ParamAttr names its own regularizer (e.g. ``L2Decay(0.)`` on norm
            scales) keeps that one instead, as in PaddleDetection.
        optimizer: ``{type: Momentum|SGD|AdamW|Adam, ...}``; the other keys go to
            the paddle optimizer (e.g. ``momentum``, ``weight_decay``, ``beta1``).
    """

    def __init__(self, clip_grad_by_norm: Optional[float] = None, clip_grad_by_value: Optional[float] = None,
                 regularizer: Optional[dict] = {"type": "L2", "factor": 1e-4},  # noqa: B006
                 optimizer: Optional[dict] = {"type": "Momentum", "momentum": 0.9}):  # noqa: B006
        self.clip_grad_by_norm = clip_grad_by_norm
        self.clip_grad_by_value = clip_grad_by_value
        # Defaults are read-only here (copied), so sharing them between instances is safe.
        # PaddleDetection's configs may spell "no decay" as the string None (YAML reads it so).
        self.regularizer = dict(regularizer) if regularizer and regularizer != "None" else None
        self.optimizer = dict(optimizer or {"type": "Momentum", "momentum": 0.9})
        kind = self.optimizer.get("type")
        if kind not in _OPTIMIZERS:
            raise ConfigError(f"OptimizerBuilder.optimizer.type '{kind}' is not supported; "
                              f"use one of {', '.join(_OPTIMIZERS)}")

    def _grad_clip(self):
        if self.clip_grad_by_norm is not None:
            return paddle.nn.ClipGradByGlobalNorm(clip_norm=float(self.clip_grad_by_norm))
        if self.clip_grad_by_value is not None:
            bound = abs(float(self.clip_grad_by_value))
            return paddle.nn.ClipGradByValue(min=-bound, max=bound)
        return None

    def _regularization(self):
        if not self.regularizer:
            return None
        kind = str(self.regularizer.get("type", "L2")).upper()
        factor = float(self.regularizer.get("factor", 0.0))
        if kind == "L2":
            return paddle.regularizer.L2Decay(factor)
        if kind == "L1":
            return paddle.regularizer.L1Decay(factor)
        raise ConfigError(f"OptimizerBuilder.regularizer.type '{self.regularizer.get('type')}' is not "
                          f"supported; use L2 or L1")

    def __call__(self, learning_rate, model: paddle.nn.Layer) -> paddle.optimizer.Optimizer:
        args = dict(self.optimizer)
        kind = args.pop("type")
        if kind not in ("AdamW",):
            args["weight_decay"] = self._regularization()
        if kind == "SGD":
            args.pop("momentum", None)
        params = [p for p in model.parameters() if not p.stop_gradient]
        if not params:
            raise ValueError("the model has no trainable parameters (all are frozen); check freeze_at / "
                             "freeze_norm in the config")
        try:
            return getattr(paddle.optimizer, kind)(learning_rate=learning_rate, parameters=params,
                                                   grad_clip=self._grad_clip(), **args)
        except TypeError as err:
            raise ConfigError(f"OptimizerBuilder.optimizer: bad key for {kind}: {err}") from None


def build_optimizer(cfg: dict, model: paddle.nn.Layer,
                    steps_per_epoch: int) -> Tuple[ScheduledLR, paddle.optimizer.Optimizer]:
    """The LR schedule and optimizer a config's ``LearningRate`` / ``OptimizerBuilder`` describe.

    The trainer builds both through here, so a test that calls it trains with what ``tools/train.py``
    trains with. Step order per iteration: ``optimizer.step()``, ``optimizer.clear_grad()``,
    ``lr.step()``.
    """
    from ppdet_retina.core.workspace import create

    lr = create("LearningRate", cfg)(int(steps_per_epoch))
    return lr, create("OptimizerBuilder", cfg)(lr, model)
