"""Trainer: the training loop around a config-built detector; everything else it does is a hook.

The loop (data, forward, backward, step) calls hooks (:mod:`ppdet_retina.training.hooks`) before and
after training, each epoch and each step, and at snapshots: checkpoints and resume
(:mod:`ppdet_retina.training.checkpointing`), logging with VisualDL, EMA, the profiler and ``--eval``
are hooks; AMP is the step's strategy (:class:`~ppdet_retina.training.amp.MixedPrecision`).
Evaluation itself is :func:`ppdet_retina.inference.evaluate.evaluate`.

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
import time
from typing import Any, Dict, Iterable, List, Optional, Tuple

import paddle

from ppdet_retina.core import env
from ppdet_retina.core.workspace import ConfigError, create
from ppdet_retina.inference.engines import EngineChooser
from ppdet_retina.inference.evaluate import build_eval_loader, build_metric, evaluate
from ppdet_retina.inference.session import check_num_classes, setup_device
from ppdet_retina.io import checkpoint
from ppdet_retina.io.checkpoint import output_dir_of
from ppdet_retina.modeling.layers import convert_sync_batchnorm
from ppdet_retina.training.amp import MixedPrecision
from ppdet_retina.training.checkpointing import CheckpointHook
from ppdet_retina.training.ema import build_ema
from ppdet_retina.training.hooks import EMAHook, EvalHook, Hook, LoggerHook, ProfilerHook
from ppdet_retina.training.optimizer import build_optimizer
from ppdet_retina.training.train_options import distributed_model, to_static_model
from ppdet_retina.utils.logger import setup_logger

__all__ = ["Trainer", "build_hooks"]

logger = setup_logger("ppdet_retina")


class Trainer:
    """Builds dataset, reader, model, optimizer and hooks from ``cfg`` and trains.

    Args:
        cfg: a loaded config (``load_config``); reads ``architecture``, ``use_gpu``, ``epoch``,
            ``log_iter``, ``snapshot_epoch``, ``save_dir``, ``filename``, ``worker_num``, the
            ``{Train,Eval}{Dataset,Reader}``, ``LearningRate`` and ``OptimizerBuilder`` sections, and
            PaddleDetection's switches: ``amp`` (training/amp.py), ``use_ema`` and its keys
            (training/ema.py), ``norm_type: sync_bn``, ``to_static``, ``fleet``, ``profiler_options``,
            ``use_vdl`` / ``vdl_log_dir`` (training/train_options.py); ``hooks``: the config's own hooks.
        mode: only ``train`` (PaddleDetection's signature).
        hooks: more hooks (:class:`~ppdet_retina.training.hooks.Hook`) to run, after the config's.
    """

    def __init__(self, cfg: dict, mode: str = "train", hooks: Optional[Iterable[Hook]] = None):
        if mode != "train":
            # PaddleDetection's Trainer(cfg, mode=...) is three objects; here they are apart.
            raise ValueError(f"Trainer only trains (mode='train', got '{mode}'): evaluate with "
                             f"ppdet_retina.inference.evaluate.Evaluator, predict with "
                             f"ppdet_retina.inference.predict.Predictor")
        self.cfg = cfg
        self.device = setup_device(cfg)
        self.world_size, self.rank = env.world_size(), env.rank()
        self.output_dir = output_dir_of(cfg)
        self.start_epoch, self.best_ap, self.resumed, self.new_best = 0, -1.0, False, False
        self._eval_loader = self._eval_dataset = None
        self.step_info: Dict[str, Any] = {}
        # What evaluations run on (Paddle Inference on CPU by default); tools/train.py calls set_engine.
        self.engine = EngineChooser("auto", False, self.device, training=True)
        self.dataset = create("TrainDataset", cfg)
        self.loader = create("TrainReader", cfg)(self.dataset, int(cfg.get("worker_num", 0)))
        self.model = create(cfg["architecture"], cfg)
        check_num_classes(self.dataset, self.model, "TrainDataset")
        self.lr, self.optimizer = build_optimizer(cfg, self.model, len(self.loader))
        convert_sync_batchnorm(self.model, synchronise=self.world_size > 1 and self.device.startswith("gpu"),
                               every_batchnorm=cfg.get("norm_type") == "sync_bn")
        # The step's strategy: float32, or float16 autocast with loss scaling.
        self.amp = MixedPrecision.from_config(cfg, self.device)
        self.model, self.optimizer = self.amp.decorate(self.model, self.optimizer)
        self.hooks: List[Hook] = []
        for hook in build_hooks(cfg, self.device, self.model) + list(hooks or []):
            self.register_hook(hook)
        model = to_static_model(self.model) if cfg.get("to_static") else self.model
        # step_optimizer steps (fleet wraps it); self.optimizer is what checkpoints hold.
        self.train_model, self.step_optimizer = distributed_model(model, self.optimizer, bool(cfg.get("fleet")))

    # ------------------------------------------------------------------ hooks
    def register_hook(self, hook: Hook) -> None:
        """Add ``hook``; hooks run in ``priority`` order (lower first), ties in the order added."""
        if not isinstance(hook, Hook):
            raise TypeError(f"{type(hook).__name__} is not a ppdet_retina.training.hooks.Hook")
        self.hooks.append(hook)
        self.hooks.sort(key=lambda h: h.priority)  # stable: ties keep their order

    def call_hooks(self, point: str, *args: Any) -> None:
        for hook in self.hooks:
            getattr(hook, point)(self, *args)

    @property
    def ema(self) -> Any:
        """The weight average (ModelEMA) when ``use_ema`` is on (rank 0), else None."""
        return next((h.ema for h in self.hooks if isinstance(h, EMAHook)), None)

    # ------------------------------------------------------------------ weights
    def set_engine(self, engine: str = "auto", bf16: bool = False) -> None:
        """Engine of ``--eval``'s evaluations: ``auto``, ``paddle_inference`` or ``dygraph``
        (:mod:`ppdet_retina.inference.engines`); ``bf16`` for oneDNN bfloat16. Checked at once."""
        self.engine = EngineChooser(engine, bf16, self.device, training=True)
        self.engine.check(str(self.cfg["architecture"]))

    def load_weights(self, path: str, skip_mismatch_head: bool = False) -> None:
        """Load model weights through the checkpoint API (which logs its report)."""
        checkpoint.load_weights(self.model, path, skip_mismatch_head=skip_mismatch_head)

    def load_pretrain_weights(self, path: Optional[str]) -> None:
        """Load backbone / ImageNet weights (``pretrain_weights``); nothing when empty."""
        if path:
            # A head trained for another class count is skipped and re-initialised; the report says so.
            checkpoint.load_pretrain_weights(self.model, path)

    def resume_weights(self, path_prefix: str) -> bool:
        """``-r``: continue from checkpoint ``path_prefix`` or ``auto`` (see
        :meth:`CheckpointHook.resume_from <ppdet_retina.training.checkpointing.CheckpointHook.resume_from>`)."""
        return CheckpointHook().resume_from(self, path_prefix)

    def run_shape(self) -> Dict[str, int]:
        """What sets the number of images per step and steps per epoch; recorded in checkpoints."""
        per_process = getattr(getattr(self.loader, "batch_sampler", None), "batch_size", None)
        return {"world_size": self.world_size, "batch_size": int(per_process or 0),
                "steps_per_epoch": len(self.loader)}

    # ------------------------------------------------------------------ the loop
    def train(self, validate: bool = False) -> None:
        """Run epochs ``start_epoch .. epoch-1``; with ``validate`` (``--eval``) evaluate at each snapshot."""
        end_epoch = int(self.cfg.get("epoch", 12))
        snapshot = max(1, int(self.cfg.get("snapshot_epoch", 1)))
        if validate and not any(isinstance(h, EvalHook) for h in self.hooks):
            self.register_hook(EvalHook())
        self.call_hooks("before_train")
        if self.start_epoch >= end_epoch:
            logger.warning(f"nothing to train: start epoch {self.start_epoch} >= epoch {end_epoch}")
        steps_per_epoch = len(self.loader)
        for epoch in range(self.start_epoch, end_epoch):
            self._set_epoch(epoch)
            self.train_model.train()
            self.call_hooks("before_epoch", epoch)
            tic = time.time()
            for it, batch in enumerate(self._batches()):
                data_cost = time.time() - tic
                lr = float(self.lr.get_lr())
                self.call_hooks("before_step", epoch, it)
                losses = self.run_step(batch, epoch, it)
                self.step_info = {"lr": lr, "data_cost": data_cost, "batch_cost": time.time() - tic,
                                  "batch": batch, "steps_per_epoch": steps_per_epoch, "end_epoch": end_epoch}
                self.call_hooks("after_step", epoch, it, losses)
                tic = time.time()
            self._log_bad_images(epoch, end_epoch)
            self.call_hooks("after_epoch", epoch)
            last = epoch == end_epoch - 1
            if (epoch + 1) % snapshot == 0 or last:
                # Rank 0 evaluates and then saves (so the saved best mAP is current); the others wait for
                # it, and stop with it if it fails.
                env.run_on_main_then_sync(lambda: self._snapshot(epoch, last))
        self.call_hooks("after_train")

    def run_step(self, batch: Dict[str, paddle.Tensor], epoch: int, it: int) -> Dict[str, float]:
        """Forward, loss check, backward and optimizer / LR step; returns the loss terms as floats."""
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
        return values

    def _snapshot(self, epoch: int, last: bool) -> None:
        self.new_best = False
        with contextlib.ExitStack() as stack:
            for hook in self.hooks:
                stack.enter_context(hook.snapshot_weights(self))
            self.call_hooks("on_snapshot", epoch, last)
        self.call_hooks("after_snapshot", epoch)

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

    # ------------------------------------------------------------------ evaluation
    def eval_loader(self) -> Any:
        """The EvalReader loader of ``--eval`` (built once)."""
        if self._eval_loader is None:
            self._eval_loader, self._eval_dataset = build_eval_loader(self.cfg)
        return self._eval_loader

    def evaluate(self) -> Dict[str, List[float]]:
        """COCO bbox evaluation of the current model on ``EvalDataset``: ``{'bbox': [12 stats]}``."""
        loader = self.eval_loader()
        metric = build_metric(self.cfg, self._eval_dataset, self.cfg.get("output_eval") or self.output_dir)
        stats = evaluate(self.engine.runner(self.model, self.cfg), loader, metric, timed=self.engine.finished)
        self.model.train()
        return stats


def build_hooks(cfg: dict, device: str, model: Any) -> List[Hook]:
    """The built-in hooks ``cfg`` asks for, then the config's own ``hooks:`` (``--eval`` adds EvalHook)."""
    hooks: List[Hook] = [CheckpointHook(),
                         LoggerHook(int(cfg.get("log_iter", 20)),
                                    str(cfg.get("vdl_log_dir") or "vdl_log_dir/scalar") if cfg.get("use_vdl")
                                    else None)]
    # Only rank 0 evaluates and saves, so only it needs the average.
    ema = build_ema(cfg, model) if env.is_main_process() else None
    if ema is not None:
        hooks.append(EMAHook(ema))
    if cfg.get("profiler_options"):
        hooks.append(ProfilerHook(str(cfg["profiler_options"]), device))
    user = cfg.get("hooks") or []
    if not isinstance(user, (list, tuple)):
        raise ConfigError(f"hooks: expected a list of hook names or dicts with name:, got {user!r}")
    for i, spec in enumerate(user):
        hook = create(spec, cfg)
        if not isinstance(hook, Hook):
            raise ConfigError(f"hooks[{i}]: {type(hook).__name__} is not a ppdet_retina.training.hooks.Hook")
        hooks.append(hook)
    return hooks
