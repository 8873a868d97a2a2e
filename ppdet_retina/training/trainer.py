"""Trainer: the training loop around a config-built detector (evaluation: ppdet_retina.inference).

Outputs of a training run go to ``<save_dir>/<config file stem>/``:

* ``<epoch>.pdparams`` / ``.pdopt`` / ``.commit.json`` every ``snapshot_epoch``
  epochs (0-based epoch id), ``model_final`` after the last epoch,
  ``best_model`` with ``--eval`` (highest bbox mAP so far); the commit record
  makes the pair one save (``io/checkpoint.py``), and ``-r auto`` resumes
  from the newest complete one;
* ``train_log.jsonl``: one JSON object per log step (``"type": "train"``:
  epoch, iter, step, lr, every loss term, batch_cost, data_cost, ips) and per
  evaluation (``"type": "eval"``: epoch, step, bbox_map = AP@[.5:.95], bbox =
  the 12 COCO stats). Every run appends to it, fresh or resumed.

Multi-process runs (``python -m paddle.distributed.launch``) wrap the model
in ``paddle.DataParallel``; only rank 0 logs and saves, and evaluation runs
on rank 0 alone over the whole validation set while the others wait.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import paddle

from ppdet_retina.core import env
from ppdet_retina.core.workspace import create
from ppdet_retina.inference.engines import EngineChooser
from ppdet_retina.inference.evaluate import build_eval_loader, build_metric, evaluate
from ppdet_retina.inference.session import check_num_classes, setup_device
from ppdet_retina.io import checkpoint
from ppdet_retina.io.checkpoint import output_dir_of
from ppdet_retina.modeling.layers import convert_sync_batchnorm
from ppdet_retina.training.amp import MixedPrecision
from ppdet_retina.training.ema import RAW_WEIGHTS_SUFFIX, build_ema
from ppdet_retina.training.optimizer import build_optimizer
from ppdet_retina.training.profiling import StepProfiler
from ppdet_retina.training.train_options import distributed_model, to_static_model
from ppdet_retina.training.vdl import VisualDLWriter
from ppdet_retina.utils.logger import JsonlWriter, TrainingStats, format_eta, setup_logger

__all__ = ["Trainer"]

logger = setup_logger("ppdet_retina")

# Set to a folder to make every rank write the sha256 of its final weights
# there (``rank<r>.sha256``); tests use it to check that ranks stayed in sync.
WEIGHTS_HASH_ENV = "PPDET_RETINA_WEIGHTS_HASH_DIR"


def weights_digest(model: paddle.nn.Layer) -> str:
    """sha256 over every trainable parameter, in name order.

    Paddle's BatchNorm stores its running statistics as (non-trainable)
    parameters; plain BN keeps them per rank, so they legitimately differ
    between data-parallel ranks and are left out.
    """
    digest = hashlib.sha256()
    trainable = [(n, p) for n, p in model.named_parameters() if not p.stop_gradient]
    for name, value in sorted(trainable, key=lambda item: item[0]):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(value.numpy()).tobytes())
    return digest.hexdigest()


class Trainer:
    """Builds dataset, reader, model and optimizer from ``cfg`` and trains.

    Args:
        cfg: a loaded config (``load_config``); reads ``architecture``, ``use_gpu``,
            ``epoch``, ``log_iter``, ``snapshot_epoch``, ``save_dir``, ``filename``,
            ``worker_num``, ``metric``, ``classwise``, ``output_eval`` and the
            ``{Train,Eval}{Dataset,Reader}``, ``LearningRate``,
            ``OptimizerBuilder`` sections, and PaddleDetection's
            switches: ``amp`` (training/amp.py), ``use_ema`` and its keys
            (training/ema.py), ``norm_type: sync_bn``, ``to_static``, ``fleet``,
            ``profiler_options``, ``use_vdl`` / ``vdl_log_dir``
            (training/train_options.py, profiling.py, vdl.py).
        mode: only ``train`` (PaddleDetection's signature).
    """

    def __init__(self, cfg: dict, mode: str = "train"):
        if mode != "train":
            # PaddleDetection's Trainer(cfg, mode=...) is three objects; here they are apart.
            raise ValueError(f"Trainer only trains (mode='train', got '{mode}'): evaluate with "
                             f"ppdet_retina.inference.evaluate.Evaluator, predict with "
                             f"ppdet_retina.inference.predict.Predictor")
        self.cfg = cfg
        self.device = setup_device(cfg)
        self.world_size = env.world_size()
        self.rank = env.rank()
        self.output_dir = output_dir_of(cfg)
        self.start_epoch = 0
        self._resumed = False
        self.best_ap = -1.0
        self._eval_loader = None
        self._eval_dataset = None
        # What evaluations run on (Paddle Inference on CPU by default); tools/train.py calls set_engine.
        self.engine = EngineChooser("auto", False, self.device, training=True)
        self.dataset = create("TrainDataset", cfg)
        self.loader = create("TrainReader", cfg)(self.dataset, int(cfg.get("worker_num", 0)))
        self.model = create(cfg["architecture"], cfg)
        check_num_classes(self.dataset, self.model, "TrainDataset")
        self.profiler = self.vdl = None
        self._build_optimizer()
        self._setup_training_options()

    # ------------------------------------------------------------------ setup
    def _setup_training_options(self) -> None:
        """sync_bn, --amp, use_ema, --to_static, DataParallel or --fleet, --profiler_options, --use_vdl."""
        cfg = self.cfg
        convert_sync_batchnorm(self.model, synchronise=self.world_size > 1 and self.device.startswith("gpu"),
                               every_batchnorm=cfg.get("norm_type") == "sync_bn")
        self.amp = MixedPrecision.from_config(cfg, self.device)
        self.model, self.optimizer = self.amp.decorate(self.model, self.optimizer)
        # Only rank 0 evaluates and saves, so only it needs the average.
        self.ema = build_ema(cfg, self.model) if env.is_main_process() else None
        model = to_static_model(self.model) if cfg.get("to_static") else self.model
        # step_optimizer steps (fleet wraps it); self.optimizer is what checkpoints hold.
        self.train_model, self.step_optimizer = distributed_model(model, self.optimizer, bool(cfg.get("fleet")))
        if cfg.get("profiler_options"):
            self.profiler = StepProfiler(str(cfg["profiler_options"]), self.device)
        if cfg.get("use_vdl") and env.is_main_process():
            self.vdl = VisualDLWriter(str(cfg.get("vdl_log_dir") or "vdl_log_dir/scalar"))

    def _build_optimizer(self) -> None:
        self.lr, self.optimizer = build_optimizer(self.cfg, self.model, len(self.loader))

    def set_engine(self, engine: str = "auto", bf16: bool = False) -> None:
        """Engine of evaluate / predict: ``auto``, ``paddle_inference`` or ``dygraph``
        (:mod:`ppdet_retina.inference.engines`); ``bf16`` for oneDNN bfloat16. Checked at once."""
        self.engine = EngineChooser(engine, bf16, self.device, training=True)
        self.engine.check(str(self.cfg["architecture"]))

    def load_weights(self, path: str, skip_mismatch_head: bool = False) -> None:
        """Load model weights (``weights:`` for eval / test) through the checkpoint API."""
        checkpoint.load_weights(self.model, path, skip_mismatch_head=skip_mismatch_head)  # logs its report

    def load_pretrain_weights(self, path: Optional[str]) -> None:
        """Load backbone / ImageNet weights (``pretrain_weights``); nothing when empty."""
        if path:
            # A head trained for another class count is skipped and re-initialised; the report says so.
            checkpoint.load_pretrain_weights(self.model, path)

    def resume_weights(self, path_prefix: str) -> bool:
        """Restore model, optimizer and LR state and the epoch to continue from; True when resumed.

        ``path_prefix`` is a checkpoint prefix (``output/<config>/5``) or ``auto``: the newest
        complete checkpoint in this run's output folder, or nothing (False: a fresh start) when it
        has none. A checkpoint saved with another world size, batch size per process or steps
        per epoch continues the schedule by epoch (see :meth:`_continue_by_epoch`).
        """
        if path_prefix == "auto":
            path_prefix = self._auto_resume_point()
            if path_prefix is None:
                return False
        extra = checkpoint.resume_checkpoint(self.model, self.optimizer, path_prefix) or {}
        # "last_epoch" is what a PaddleDetection .pdopt records (epochs completed).
        self.start_epoch = int(extra.get("epoch", extra.get("last_epoch", 0)))
        self.best_ap = float(extra.get("best_ap", -1.0))
        if "lr_step" in extra:
            # The optimizer state usually carries the scheduler too; the explicit
            # counter covers checkpoints whose optimizer state lacks it.
            self.lr.last_epoch = int(extra["lr_step"])
            self.lr.last_lr = self.lr.get_lr()
        self._resumed = True
        self._resume_ema_and_amp(path_prefix, extra)
        changed = any(k in extra and int(extra[k]) != v for k, v in self._run_shape().items())
        if changed or self.lr.last_epoch != self.start_epoch * len(self.loader):
            self._continue_by_epoch(path_prefix, extra)
        else:
            logger.info(f"resumed from {path_prefix}: continuing at epoch {self.start_epoch}, "
                        f"iteration {self.lr.last_epoch}, lr {self.lr.get_lr():.6g}")
        return True

    def _resume_ema_and_amp(self, path_prefix: str, extra: Dict[str, Any]) -> None:
        """An EMA checkpoint's .pdparams holds the average and .pdema the trained weights (PaddleDetection's
        layout): training continues from the trained ones, the average from the saved one."""
        prefix = checkpoint.checkpoint_prefix(path_prefix)
        raw = prefix + RAW_WEIGHTS_SUFFIX
        if os.path.isfile(raw):
            if self.ema is not None:
                # Only what the average restores from, before the trained weights replace them.
                state = self.model.state_dict()
                averaged = {k: state[k].clone() for k in self.ema.names if k in state}
            checkpoint.load_weights(self.model, raw)
            if self.ema is not None:
                self.ema.load(averaged, int(extra.get("ema_step", self.lr.last_epoch)), int(extra.get("ema_epoch", 0)))
                logger.info(f"resumed the weight average ({self.ema.step} updates) and the trained weights {raw}")
            else:
                logger.info(f"resumed the trained weights {raw} (use_ema is off: the saved average is not used)")
        elif self.ema is not None:
            logger.warning(f"{prefix} has no {RAW_WEIGHTS_SUFFIX} file (not saved with use_ema): the weight "
                           f"average starts afresh from the resumed weights")
        self.amp.set_state_dict(extra.get("amp_scaler"))

    def _run_shape(self) -> Dict[str, int]:
        """What sets the number of images per step and steps per epoch; recorded in checkpoints."""
        per_process = getattr(getattr(self.loader, "batch_sampler", None), "batch_size", None)
        return {"world_size": self.world_size, "batch_size": int(per_process or 0),
                "steps_per_epoch": len(self.loader)}

    def _continue_by_epoch(self, path_prefix: str, extra: Dict[str, Any]) -> None:
        """Re-position the LR schedule at the start of ``start_epoch`` of this run's loader.

        The schedule's milestones are in epochs, turned into iterations with this run's steps per
        epoch, so the iteration counter of a run with another world size or batch size points
        elsewhere in it; ``start_epoch * steps_per_epoch`` is the same point of the schedule.
        """
        old_step = int(self.lr.last_epoch)
        self.lr.last_epoch = self.start_epoch * len(self.loader)
        self.lr.last_lr = self.lr.get_lr()
        now = self._run_shape()
        moved = f" (not {old_step})" if old_step != self.lr.last_epoch else ""
        if all(k in extra for k in now):
            saved = f"{extra['world_size']} process(es) x {extra['batch_size']} image(s), " \
                    f"{extra['steps_per_epoch']} steps per epoch"
            match = (f"; to train exactly as saved, launch {extra['world_size']} process(es) with "
                     f"-o TrainReader.batch_size={extra['batch_size']}")
        else:
            saved, match = f"iteration {old_step} after {self.start_epoch} epoch(s)", ""
        logger.warning(
            f"resumed from {path_prefix}, which was saved by a run with {saved}; this run has "
            f"{now['world_size']} process(es) x {now['batch_size']} image(s), {now['steps_per_epoch']} steps per "
            f"epoch. Continuing the schedule by epoch: epoch {self.start_epoch}, iteration {self.lr.last_epoch}"
            f"{moved}, lr {self.lr.get_lr():.6g}; LearningRate.base_lr is not rescaled{match}")

    def _auto_resume_point(self) -> Optional[str]:
        """``-r auto``: the newest complete checkpoint in the output folder, the same on every rank."""
        prefix, skipped = checkpoint.find_latest_checkpoint(self.output_dir)
        if skipped:
            logger.warning(f"-r auto: skipped incomplete checkpoint(s) {', '.join(skipped)} in {self.output_dir} "
                           f"(no commit record, or files that do not match it: an interrupted save; a checkpoint "
                           f"saved before commit records existed can still be resumed with -r <its path>)")
        self._check_same_choice(prefix)
        if prefix is None:
            logger.info(f"-r auto: no complete checkpoint in {self.output_dir}; starting a fresh run")
        else:
            logger.info(f"-r auto: resuming from {prefix}, the newest complete checkpoint")
        return prefix

    def _check_same_choice(self, prefix: Optional[str]) -> None:
        """Every rank must resume from the same epoch, which needs save_dir visible to all of them."""
        if self.world_size <= 1:
            return
        record = checkpoint.read_commit(prefix) if prefix else None
        epoch = float(record["epoch"]) if record else -1.0
        both = paddle.to_tensor([epoch, -epoch], dtype="float32")
        paddle.distributed.all_reduce(both, op=paddle.distributed.ReduceOp.MAX)
        high, low = float(both.numpy()[0]), -float(both.numpy()[1])
        if high != low:
            raise ValueError(f"-r auto: the ranks see different checkpoints in {self.output_dir} (rank "
                             f"{self.rank} found {prefix or 'none'}; epochs seen range from {low:g} to {high:g}). "
                             f"save_dir must be one folder shared by every machine, or copy the checkpoint "
                             f"to each and pass its path with -r")

    # ------------------------------------------------------------------ training
    def train(self, validate: bool = False) -> None:
        """Run epochs ``start_epoch .. epoch-1``; with ``validate`` evaluate after each snapshot."""
        cfg = self.cfg
        end_epoch = int(cfg.get("epoch", 12))
        log_iter = max(1, int(cfg.get("log_iter", 20)))
        snapshot = max(1, int(cfg.get("snapshot_epoch", 1)))
        journal = self._open_journal()
        if self.start_epoch >= end_epoch:
            logger.warning(f"nothing to train: start epoch {self.start_epoch} >= epoch {end_epoch}")
        if validate:
            # A wrong EvalDataset should fail now, not after the first epoch of training.
            env.run_on_main_then_sync(self._build_eval_loader)
        self._run_epochs(end_epoch, log_iter, snapshot, validate, journal)
        if self.profiler is not None:
            self.profiler.finish()
        if self.vdl is not None:
            self.vdl.close()
        self._write_weights_hash()

    def _open_journal(self) -> JsonlWriter:
        """``train_log.jsonl``, appended to by every run (a fresh one too: earlier runs stay readable).

        Rank 0 also clears temp files that killed runs left, cuts a half-written last line, and
        warns when a fresh run goes into a folder that holds another run's checkpoints.
        """
        path = os.path.join(self.output_dir, "train_log.jsonl")
        if self.rank == 0:
            checkpoint.remove_stale_temps(self.output_dir)
            _drop_partial_last_line(path)
            existing = checkpoint.list_checkpoints(self.output_dir)
            if existing and not self._resumed:
                logger.warning(f"{self.output_dir} already holds checkpoints ({', '.join(existing)}) of an "
                               f"earlier run: this run starts fresh and replaces them as it saves, and appends to "
                               f"train_log.jsonl. To continue that run instead pass -r auto")
        return JsonlWriter(path, append=True)

    def _batches(self):
        """The loader's batches; an error while reading one stops every rank with it."""
        batches = iter(self.loader)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except Exception as err:  # noqa: BLE001 - re-raised by stop_all_ranks
                env.stop_all_ranks(err)
            yield batch

    def _run_epochs(self, end_epoch: int, log_iter: int, snapshot: int, validate: bool,
                    journal: JsonlWriter) -> None:
        steps_per_epoch = len(self.loader)
        total_steps = (end_epoch - self.start_epoch) * steps_per_epoch
        done_steps = 0
        run_tic = time.time()
        for epoch in range(self.start_epoch, end_epoch):
            self._set_epoch(epoch)
            self.train_model.train()
            stats = TrainingStats(window_size=log_iter)
            tic = time.time()
            for it, batch in enumerate(self._batches()):
                data_cost = time.time() - tic
                step_lr = float(self.lr.get_lr())
                stats.update(self._train_step(batch, epoch, it))
                batch_cost = time.time() - tic
                done_steps += 1
                if it % log_iter == 0 or it == steps_per_epoch - 1:
                    eta = (time.time() - run_tic) / done_steps * (total_steps - done_steps)
                    self._log_step(journal, stats, step_lr, epoch, end_epoch, it, steps_per_epoch, batch,
                                   batch_cost, data_cost, eta)
                tic = time.time()
            self._log_bad_images(epoch, end_epoch)
            last = epoch == end_epoch - 1
            if (epoch + 1) % snapshot == 0 or last:
                self._snapshot(epoch, last, validate, journal)

    def _log_bad_images(self, epoch: int, end_epoch: int) -> None:
        """The epoch's count of broken images the reader replaced (each was named in a warning)."""
        bad = getattr(self.loader, "bad_images", [])
        if bad:
            logger.warning(f"Epoch: [{epoch}/{end_epoch}] done; {len(bad)} broken image(s) were replaced by "
                           f"others this epoch")

    def _set_epoch(self, epoch: int) -> None:
        sampler = getattr(self.loader, "batch_sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)

    def _train_step(self, batch: Dict[str, paddle.Tensor], epoch: int, it: int) -> Dict[str, float]:
        if self.profiler is not None:
            self.profiler.step()
        try:
            with self.amp.autocast():
                outputs = self.train_model(batch)
        except Exception as err:  # noqa: BLE001 - one rank's bad batch must not leave the others hanging
            env.stop_all_ranks(err)
        if "loss" not in outputs:
            raise ValueError(f"the model's training output has no 'loss' key (got {sorted(outputs)})")
        values, bad = self._loss_values(outputs)
        if bad:
            self._stop_on_non_finite(values, epoch, it)
        self.amp.backward_and_step(outputs["loss"], self.step_optimizer)
        self.step_optimizer.clear_grad()
        self.lr.step()
        if self.ema is not None:
            self.ema.update()
        return values

    def _loss_values(self, outputs: Dict[str, paddle.Tensor]) -> Tuple[Dict[str, float], bool]:
        """The loss terms as floats and whether any rank saw a non-finite one, in one host copy.

        Every rank must stop together, or the others hang in the gradient all-reduce, so the
        flag is all-reduced before it is read.
        """
        names = list(outputs)
        stacked = paddle.stack([outputs[k].astype("float32").reshape([]) for k in names])
        flag = paddle.logical_not(paddle.isfinite(stacked)).any().astype("float32").reshape([1])
        if self.world_size > 1:
            paddle.distributed.all_reduce(flag, op=paddle.distributed.ReduceOp.MAX)
        host = paddle.concat([stacked.detach(), flag]).numpy()
        env.check_peers(float(host[-1]))
        return {k: float(v) for k, v in zip(names, host[:-1])}, bool(host[-1] > 0)

    def _stop_on_non_finite(self, values: Dict[str, float], epoch: int, it: int) -> None:
        terms = ", ".join(f"{k}={v:.6g}" for k, v in values.items())
        where = f" on some rank (rank {self.rank} had {terms})" if self.world_size > 1 else f": {terms}"
        raise FloatingPointError(
            f"non-finite loss at epoch {epoch}, iteration {it} (global step {self.lr.last_epoch}){where}. "
            f"Training stopped before the update, so the last saved checkpoint in "
            f"{self.output_dir} is intact. Lower LearningRate.base_lr, lengthen LinearWarmup, or "
            f"check the data (degenerate boxes).")

    def _log_step(self, journal: JsonlWriter, stats: TrainingStats, lr: float, epoch: int, end_epoch: int,
                  it: int, steps_per_epoch: int, batch: dict, batch_cost: float, data_cost: float,
                  eta: float) -> None:
        """One console line and one ``train_log.jsonl`` record; losses are window medians."""
        smoothed = stats.get()
        images = int(batch["image"].shape[0]) * self.world_size
        ips = images / max(batch_cost, 1e-9)
        width = len(str(steps_per_epoch))
        losses = ", ".join(f"{k}: {v:.6f}" for k, v in smoothed.items())
        logger.info(f"Epoch: [{epoch}/{end_epoch}] [{it:>{width}}/{steps_per_epoch}] eta: {format_eta(eta)} "
                    f"lr: {lr:.6g} {losses} batch_cost: {batch_cost:.4f} s data_cost: {data_cost:.4f} s "
                    f"ips: {ips:.2f} images/s")
        journal.write({"type": "train", "epoch": epoch, "iter": it, "step": epoch * steps_per_epoch + it,
                       "lr": lr, **smoothed, "batch_cost": batch_cost, "data_cost": data_cost, "ips": ips,
                       "time": time.time()})
        if self.vdl is not None:
            self.vdl.train_step(epoch * steps_per_epoch + it, lr, smoothed)

    def _snapshot(self, epoch: int, last: bool, validate: bool, journal: JsonlWriter) -> None:
        """Rank 0 evaluates (with ``validate``) and then saves, so the saved best mAP is current;
        the other ranks wait for it, and stop with it if it fails."""
        env.run_on_main_then_sync(lambda: self._evaluate_and_save(epoch, last, validate, journal))

    def _evaluate_and_save(self, epoch: int, last: bool, validate: bool, journal: JsonlWriter) -> None:
        # With use_ema, evaluation and the saved .pdparams see the averaged weights; .pdema keeps the trained.
        with self.ema.applied() if self.ema is not None else contextlib.nullcontext() as trained:
            improved = self._validate(epoch, journal) if validate else False
            if self.ema is not None:
                self.ema.snapshot_done()
            path = self._save("model_final" if last else str(epoch), epoch, trained)
            logger.info(f"saved checkpoint {path}")
            if improved:
                logger.info(f"new best model saved to {self._save('best_model', epoch, trained)}")
        if validate:
            logger.info(f"best bbox mAP so far: {self.best_ap:.4f}")

    def _save(self, name: str, epoch: int, trained: Optional[Dict[str, paddle.Tensor]] = None) -> str:
        extra = {"epoch": epoch + 1, "lr_step": int(self.lr.last_epoch), "best_ap": self.best_ap,
                 **self._run_shape(), "amp_scaler": self.amp.state_dict()}
        if self.ema is not None:
            extra.update(self.ema.counters())
        more = {RAW_WEIGHTS_SUFFIX: trained} if trained is not None else None
        return checkpoint.save_checkpoint(self.model, self.optimizer, self.output_dir, name, extra, more)

    def _validate(self, epoch: int, journal: JsonlWriter) -> bool:
        """Evaluate, log to the journal, update ``best_ap``; True when it improved."""
        stats = self.evaluate()
        ap = float(stats["bbox"][0])
        step = (epoch + 1) * len(self.loader) - 1  # the last iteration of this epoch
        journal.write({"type": "eval", "epoch": epoch, "step": step, "bbox_map": ap, "bbox": stats["bbox"],
                       "time": time.time()})
        if self.vdl is not None:
            self.vdl.evaluation(step, ap)
        if ap <= self.best_ap:
            return False
        self.best_ap = ap
        return True

    def _write_weights_hash(self) -> None:
        folder = os.environ.get(WEIGHTS_HASH_ENV)
        if folder:
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, f"rank{self.rank}.sha256"), "w") as f:
                f.write(weights_digest(self.model))

    # ------------------------------------------------------------------ evaluation
    def _build_eval_loader(self):
        if self._eval_loader is None:
            self._eval_loader, self._eval_dataset = build_eval_loader(self.cfg)
        return self._eval_loader

    def evaluate(self) -> Dict[str, List[float]]:
        """COCO bbox evaluation of the current model on ``EvalDataset``: ``{'bbox': [12 stats]}``."""
        loader = self._build_eval_loader()
        metric = build_metric(self.cfg, self._eval_dataset, self.cfg.get("output_eval") or self.output_dir)
        stats = evaluate(self.engine.runner(self.model, self.cfg), loader, metric, timed=self.engine.finished)
        self.model.train()
        return stats


def _drop_partial_last_line(path: str) -> None:
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
