"""Hooks: everything a training run does besides stepping the model, called by the loop at fixed points.

The :class:`~ppdet_retina.training.trainer.Trainer` loop calls, on every hook in ``priority`` order
(lower first, ties in the order added):

    before_train -> [before_epoch -> (before_step -> step -> after_step)* -> after_epoch
                     -> snapshot (every ``snapshot_epoch`` epochs and after the last)]* -> after_train

A snapshot runs on rank 0 while the other ranks wait: inside every hook's ``snapshot_weights()``
context (EMA puts the averaged weights in), each hook's ``on_snapshot`` (evaluate, then save), then
``after_snapshot``. ``after_eval`` reports an evaluation's stats to the hooks that record them, and
``checkpoint_state`` / ``resume`` let a hook keep its own state in the checkpoint.

A hook of one's own derives from :class:`Hook`, is registered (``@register``) and named in the
config's top-level ``hooks:`` list (a name, or a dict with ``name:`` and its arguments), or is passed
in Python (``Trainer(cfg, hooks=[...])``); see ``docs/hooks.md``.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import TYPE_CHECKING, Any, ContextManager, Dict, List, Optional, Tuple

from ppdet_retina.core import env
from ppdet_retina.core.options import TrainingOption, declare_training_options
from ppdet_retina.training.ema import RAW_WEIGHTS_SUFFIX
from ppdet_retina.training.profiling import StepProfiler
from ppdet_retina.training.vdl import VisualDLWriter
from ppdet_retina.utils.logger import JsonlWriter, TrainingStats, format_eta, setup_logger

if TYPE_CHECKING:  # the trainer imports this module
    from ppdet_retina.training.trainer import Trainer

__all__ = ["Hook", "EvalHook", "EMAHook", "LoggerHook", "ProfilerHook", "drop_partial_last_line"]

declare_training_options({
    "hooks": TrainingOption("training hooks of your own: a list of registered Hook names or dicts with name: "
                            "and the hook's arguments (docs/hooks.md)"),
})

logger = setup_logger("ppdet_retina")


class Hook:
    """Does nothing at every point; a hook overrides the points it needs. ``trainer`` is the running
    :class:`~ppdet_retina.training.trainer.Trainer` (its ``model``, ``optimizer``, ``lr``, ``cfg``,
    ``output_dir``, ``rank`` and ``world_size``)."""

    priority = 50

    def before_train(self, trainer: "Trainer") -> None:
        pass

    def before_epoch(self, trainer: "Trainer", epoch: int) -> None:
        pass

    def before_step(self, trainer: "Trainer", epoch: int, it: int) -> None:
        pass

    def after_step(self, trainer: "Trainer", epoch: int, it: int, losses: Dict[str, float]) -> None:
        """``losses``: this step's loss terms as floats; ``trainer.step_info`` has lr, timings, batch."""

    def after_epoch(self, trainer: "Trainer", epoch: int) -> None:
        pass

    def snapshot_weights(self, trainer: "Trainer") -> ContextManager:
        """The weights evaluations and saves of a snapshot see (rank 0 only)."""
        return contextlib.nullcontext()

    def on_snapshot(self, trainer: "Trainer", epoch: int, last: bool) -> None:
        pass

    def after_snapshot(self, trainer: "Trainer", epoch: int) -> None:
        pass

    def after_eval(self, trainer: "Trainer", epoch: int, step: int, stats: Dict[str, List[float]]) -> None:
        pass

    def checkpoint_state(self, trainer: "Trainer") -> Tuple[Dict[str, Any], Dict[str, Any]]:
        """(entries of the checkpoint's extra dict, suffix -> state dict of extra files) to save."""
        return {}, {}

    def resume(self, trainer: "Trainer", prefix: str, extra: Dict[str, Any]) -> None:
        """Restore this hook's state from checkpoint ``prefix`` (its extra dict ``extra``)."""

    def after_train(self, trainer: "Trainer") -> None:
        pass


class EvalHook(Hook):
    """``--eval``: rank 0 evaluates at each snapshot, keeps ``trainer.best_ap`` and marks a new best
    (``trainer.new_best``) for the checkpoint hook to save as ``best_model``."""

    priority = 10

    def before_train(self, trainer: "Trainer") -> None:
        # A wrong EvalDataset should fail now, not after the first epoch of training.
        env.run_on_main_then_sync(trainer.eval_loader)

    def on_snapshot(self, trainer: "Trainer", epoch: int, last: bool) -> None:
        stats = trainer.evaluate()
        ap = float(stats["bbox"][0])
        step = (epoch + 1) * len(trainer.loader) - 1  # the last iteration of this epoch
        trainer.call_hooks("after_eval", epoch, step, stats)
        trainer.new_best = ap > trainer.best_ap
        if trainer.new_best:
            trainer.best_ap = ap

    def after_snapshot(self, trainer: "Trainer", epoch: int) -> None:
        logger.info(f"best bbox mAP so far: {trainer.best_ap:.4f}")


class EMAHook(Hook):
    """``use_ema``: the moving average of the weights (:mod:`ppdet_retina.training.ema`), updated after
    every step, swapped in for snapshots (evaluation and the saved ``.pdparams``; ``.pdema`` keeps the
    trained weights), restored on resume. Rank 0 only: only it evaluates and saves."""

    priority = 20

    def __init__(self, ema: Any):
        self.ema = ema
        self._trained: Optional[Dict[str, Any]] = None

    def after_step(self, trainer: "Trainer", epoch: int, it: int, losses: Dict[str, float]) -> None:
        self.ema.update()

    @contextlib.contextmanager
    def snapshot_weights(self, trainer: "Trainer"):
        with self.ema.applied() as trained:
            self._trained = trained
            try:
                yield
            finally:
                self._trained = None

    def on_snapshot(self, trainer: "Trainer", epoch: int, last: bool) -> None:
        self.ema.snapshot_done()  # after the evaluation, before the save: the save records the count

    def checkpoint_state(self, trainer: "Trainer") -> Tuple[Dict[str, Any], Dict[str, Any]]:
        files = {RAW_WEIGHTS_SUFFIX: self._trained} if self._trained is not None else {}
        return self.ema.counters(), files


class LoggerHook(Hook):
    """Every ``log_iter`` steps (and at an epoch's last) one console line and one ``train_log.jsonl``
    record with window-median losses; evaluations to the journal too; with ``use_vdl`` the same as
    VisualDL scalars (rank 0)."""

    priority = 40

    def __init__(self, log_iter: int = 20, vdl_dir: Optional[str] = None):
        self.log_iter = max(1, int(log_iter))
        self.vdl = VisualDLWriter(vdl_dir) if vdl_dir is not None and env.is_main_process() else None
        self.journal: Optional[JsonlWriter] = None
        self.stats: Optional[TrainingStats] = None
        self._run_tic, self._done = 0.0, 0

    def before_train(self, trainer: "Trainer") -> None:
        # Every run appends (a fresh one too: earlier runs stay readable); a killed run's half line goes first.
        path = os.path.join(trainer.output_dir, "train_log.jsonl")
        if trainer.rank == 0:
            drop_partial_last_line(path)
        self.journal = JsonlWriter(path, append=True)
        self._run_tic, self._done = time.time(), 0

    def before_epoch(self, trainer: "Trainer", epoch: int) -> None:
        self.stats = TrainingStats(window_size=self.log_iter)

    def after_step(self, trainer: "Trainer", epoch: int, it: int, losses: Dict[str, float]) -> None:
        self.stats.update(losses)
        self._done += 1
        info = trainer.step_info
        steps, end = info["steps_per_epoch"], info["end_epoch"]
        if it % self.log_iter and it != steps - 1:
            return
        total = (end - trainer.start_epoch) * steps
        eta = (time.time() - self._run_tic) / self._done * (total - self._done)
        smoothed = self.stats.get()
        ips = int(info["batch"]["image"].shape[0]) * trainer.world_size / max(info["batch_cost"], 1e-9)
        lr, step = info["lr"], epoch * steps + it
        losses_text = ", ".join(f"{k}: {v:.6f}" for k, v in smoothed.items())
        logger.info(f"Epoch: [{epoch}/{end}] [{it:>{len(str(steps))}}/{steps}] eta: {format_eta(eta)} "
                    f"lr: {lr:.6g} {losses_text} batch_cost: {info['batch_cost']:.4f} s "
                    f"data_cost: {info['data_cost']:.4f} s ips: {ips:.2f} images/s")
        self.journal.write({"type": "train", "epoch": epoch, "iter": it, "step": step, "lr": lr, **smoothed,
                            "batch_cost": info["batch_cost"], "data_cost": info["data_cost"], "ips": ips,
                            "time": time.time()})
        if self.vdl is not None:
            self.vdl.train_step(step, lr, smoothed)

    def after_eval(self, trainer: "Trainer", epoch: int, step: int, stats: Dict[str, List[float]]) -> None:
        ap = float(stats["bbox"][0])
        self.journal.write({"type": "eval", "epoch": epoch, "step": step, "bbox_map": ap, "bbox": stats["bbox"],
                            "time": time.time()})
        if self.vdl is not None:
            self.vdl.evaluation(step, ap)

    def after_train(self, trainer: "Trainer") -> None:
        if self.vdl is not None:
            self.vdl.close()


class ProfilerHook(Hook):
    """``profiler_options``: paddle.profiler over the chosen steps (:mod:`ppdet_retina.training.profiling`)."""

    priority = 0

    def __init__(self, options: str, device: str = "cpu"):
        self.profiler = StepProfiler(str(options), device)

    def before_step(self, trainer: "Trainer", epoch: int, it: int) -> None:
        self.profiler.step()

    def after_train(self, trainer: "Trainer") -> None:
        self.profiler.finish()


def drop_partial_last_line(path: str) -> None:
    """Cut a last line without its newline (a run killed while writing it), so appends stay valid JSON."""
    try:
        f = open(path, "rb+")
    except FileNotFoundError:
        return
    with f:
        end = f.seek(0, os.SEEK_END)
        pos = end
        while pos > 0:  # walk back in blocks to the last newline
            start = max(0, pos - 65536)
            f.seek(start)
            block = f.read(pos - start)
            if pos == end and block.endswith(b"\n"):
                return
            cut = block.rfind(b"\n")
            if cut >= 0:
                f.truncate(start + cut + 1)
                return
            pos = start
        f.truncate(0)
