"""Checkpointing as a hook: saves at snapshots (one commit per checkpoint, io/checkpoint.py), resumes with
``-r <prefix>`` / ``-r auto`` (the newest complete commit), and re-positions the LR schedule when the
launch changed.

An EMA checkpoint's ``.pdparams`` holds the average and ``.pdema`` the trained weights (PaddleDetection's
layout); the ``.pdopt``'s extra dict holds epoch, LR step, best mAP, the run's shape (world size, batch
size per process, steps per epoch), the AMP scaler and what other hooks add (``checkpoint_state``).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Dict, Optional

import paddle

from ppdet_retina.io import checkpoint
from ppdet_retina.training.ema import RAW_WEIGHTS_SUFFIX
from ppdet_retina.training.hooks import Hook
from ppdet_retina.utils.logger import setup_logger

if TYPE_CHECKING:  # the trainer imports this module
    from ppdet_retina.training.trainer import Trainer

__all__ = ["CheckpointHook"]

logger = setup_logger("ppdet_retina")


class CheckpointHook(Hook):
    """Saves ``<epoch>`` / ``model_final`` / ``best_model`` at snapshots as one commit (io/checkpoint.py),
    with every hook's ``checkpoint_state``; at the start clears what killed runs left (rank 0);
    :meth:`resume_from` restores a run (tools/train.py's ``-r``)."""

    priority = 30

    def before_train(self, trainer: "Trainer") -> None:
        if trainer.rank != 0:
            return
        checkpoint.remove_stale_temps(trainer.output_dir)
        existing = checkpoint.list_checkpoints(trainer.output_dir)
        if existing and not trainer.resumed:
            logger.warning(f"{trainer.output_dir} already holds checkpoints ({', '.join(existing)}) of an "
                           f"earlier run: this run starts fresh and replaces them as it saves, and appends to "
                           f"train_log.jsonl. To continue that run instead pass -r auto")

    def on_snapshot(self, trainer: "Trainer", epoch: int, last: bool) -> None:
        logger.info(f"saved checkpoint {self.save(trainer, 'model_final' if last else str(epoch), epoch)}")
        if trainer.new_best:
            logger.info(f"new best model saved to {self.save(trainer, 'best_model', epoch)}")

    @staticmethod
    def save(trainer: "Trainer", name: str, epoch: int) -> str:
        extra = {"epoch": epoch + 1, "lr_step": int(trainer.lr.last_epoch), "best_ap": trainer.best_ap,
                 **trainer.run_shape(), "amp_scaler": trainer.amp.state_dict()}
        files: Dict[str, Any] = {}
        for hook in trainer.hooks:
            more_extra, more_files = hook.checkpoint_state(trainer)
            extra.update(more_extra)
            files.update(more_files)
        return checkpoint.save_checkpoint(trainer.model, trainer.optimizer, trainer.output_dir, name, extra,
                                          files or None)

    def resume_from(self, trainer: "Trainer", path_prefix: str) -> bool:
        """Restore model, optimizer and LR state and the epoch to continue from; True when resumed.

        ``path_prefix`` is a checkpoint prefix (``output/<config>/5``) or ``auto``: the newest
        complete checkpoint in this run's output folder, or nothing (False: a fresh start) when it
        has none. A checkpoint saved with another world size, batch size per process or steps
        per epoch continues the schedule by epoch (see :meth:`_continue_by_epoch`).
        """
        if path_prefix == "auto":
            path_prefix = self._auto_resume_point(trainer)
            if path_prefix is None:
                return False
        extra = checkpoint.resume_checkpoint(trainer.model, trainer.optimizer, path_prefix) or {}
        # "last_epoch" is what a PaddleDetection .pdopt records (epochs completed).
        trainer.start_epoch = int(extra.get("epoch", extra.get("last_epoch", 0)))
        trainer.best_ap = float(extra.get("best_ap", -1.0))
        if "lr_step" in extra:
            # The optimizer state usually carries the scheduler too; the explicit
            # counter covers checkpoints whose optimizer state lacks it.
            trainer.lr.last_epoch = int(extra["lr_step"])
            trainer.lr.last_lr = trainer.lr.get_lr()
        trainer.resumed = True
        self._resume_ema_and_amp(trainer, path_prefix, extra)
        for hook in trainer.hooks:
            hook.resume(trainer, path_prefix, extra)
        changed = any(k in extra and int(extra[k]) != v for k, v in trainer.run_shape().items())
        if changed or trainer.lr.last_epoch != trainer.start_epoch * len(trainer.loader):
            self._continue_by_epoch(trainer, path_prefix, extra)
        else:
            logger.info(f"resumed from {path_prefix}: continuing at epoch {trainer.start_epoch}, "
                        f"iteration {trainer.lr.last_epoch}, lr {trainer.lr.get_lr():.6g}")
        return True

    @staticmethod
    def _resume_ema_and_amp(trainer: "Trainer", path_prefix: str, extra: Dict[str, Any]) -> None:
        """An EMA checkpoint's .pdparams holds the average and .pdema the trained weights (PaddleDetection's
        layout): training continues from the trained ones, the average from the saved one."""
        prefix = checkpoint.checkpoint_prefix(path_prefix)
        raw = prefix + RAW_WEIGHTS_SUFFIX
        if os.path.isfile(raw):
            if trainer.ema is not None:
                # Only what the average restores from, before the trained weights replace them.
                state = trainer.model.state_dict()
                averaged = {k: state[k].clone() for k in trainer.ema.names if k in state}
            checkpoint.load_weights(trainer.model, raw)
            if trainer.ema is not None:
                trainer.ema.load(averaged, int(extra.get("ema_step", trainer.lr.last_epoch)), int(extra.get("ema_epoch", 0)))
                logger.info(f"resumed the weight average ({trainer.ema.step} updates) and the trained weights {raw}")
            else:
                logger.info(f"resumed the trained weights {raw} (use_ema is off: the saved average is not used)")
        elif trainer.ema is not None:
            logger.warning(f"{prefix} has no {RAW_WEIGHTS_SUFFIX} file (not saved with use_ema): the weight "
                           f"average starts afresh from the resumed weights")
        trainer.amp.set_state_dict(extra.get("amp_scaler"))

    @staticmethod
    def _continue_by_epoch(trainer: "Trainer", path_prefix: str, extra: Dict[str, Any]) -> None:
        """Re-position the LR schedule at the start of ``start_epoch`` of this run's loader.

        The schedule's milestones are in epochs, turned into iterations with this run's steps per
        epoch, so the iteration counter of a run with another world size or batch size points
        elsewhere in it; ``start_epoch * steps_per_epoch`` is the same point of the schedule.
        """
        old_step = int(trainer.lr.last_epoch)
        trainer.lr.last_epoch = trainer.start_epoch * len(trainer.loader)
        trainer.lr.last_lr = trainer.lr.get_lr()
        now = trainer.run_shape()
        moved = f" (not {old_step})" if old_step != trainer.lr.last_epoch else ""
        if all(k in extra for k in now):
            saved = f"{extra['world_size']} process(es) x {extra['batch_size']} image(s), " \
                    f"{extra['steps_per_epoch']} steps per epoch"
            match = (f"; to train exactly as saved, launch {extra['world_size']} process(es) with "
                     f"-o TrainReader.batch_size={extra['batch_size']}")
        else:
            saved, match = f"iteration {old_step} after {trainer.start_epoch} epoch(s)", ""
        logger.warning(
            f"resumed from {path_prefix}, which was saved by a run with {saved}; this run has "
            f"{now['world_size']} process(es) x {now['batch_size']} image(s), {now['steps_per_epoch']} steps per "
            f"epoch. Continuing the schedule by epoch: epoch {trainer.start_epoch}, iteration {trainer.lr.last_epoch}"
            f"{moved}, lr {trainer.lr.get_lr():.6g}; LearningRate.base_lr is not rescaled{match}")

    def _auto_resume_point(self, trainer: "Trainer") -> Optional[str]:
        """``-r auto``: the newest complete checkpoint in the output folder, the same on every rank."""
        prefix, skipped = checkpoint.find_latest_checkpoint(trainer.output_dir)
        if skipped:
            logger.warning(f"-r auto: skipped incomplete checkpoint(s) {', '.join(skipped)} in {trainer.output_dir} "
                           f"(no commit record, or files that do not match it: an interrupted save; a checkpoint "
                           f"saved before commit records existed can still be resumed with -r <its path>)")
        self._check_same_choice(trainer, prefix)
        if prefix is None:
            logger.info(f"-r auto: no complete checkpoint in {trainer.output_dir}; starting a fresh run")
        else:
            logger.info(f"-r auto: resuming from {prefix}, the newest complete checkpoint")
        return prefix

    @staticmethod
    def _check_same_choice(trainer: "Trainer", prefix: Optional[str]) -> None:
        """Every rank must resume from the same epoch, which needs save_dir visible to all of them."""
        if trainer.world_size <= 1:
            return
        record = checkpoint.read_commit(prefix) if prefix else None
        epoch = float(record["epoch"]) if record else -1.0
        both = paddle.to_tensor([epoch, -epoch], dtype="float32")
        paddle.distributed.all_reduce(both, op=paddle.distributed.ReduceOp.MAX)
        high, low = float(both.numpy()[0]), -float(both.numpy()[1])
        if high != low:
            raise ValueError(f"-r auto: the ranks see different checkpoints in {trainer.output_dir} (rank "
                             f"{trainer.rank} found {prefix or 'none'}; epochs seen range from {low:g} to {high:g}). "
                             f"save_dir must be one folder shared by every machine, or copy the checkpoint "
                             f"to each and pass its path with -r")
