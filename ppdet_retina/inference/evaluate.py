"""COCO evaluation, whatever runs the model: one loop for tools/eval.py, training's ``--eval`` and
``eval.py --exported`` (detectron2's ``inference_on_dataset``).

    loader, dataset = build_eval_loader(cfg)
    stats = evaluate(runner, loader, build_metric(cfg, dataset, output_eval))
    stats["bbox"][0]   # AP@[.50:.95]

``runner`` is anything called on a reader batch that returns ``{'bbox', 'bbox_num'}``: the dygraph
model in eval mode or a :class:`~ppdet_retina.inference.engines.PredictorModel`.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import paddle

from ppdet_retina.core.workspace import ConfigError, create
from ppdet_retina.inference.session import ModelSession
from ppdet_retina.metrics.coco import COCOMetric
from ppdet_retina.utils.logger import setup_logger

__all__ = ["evaluate", "build_eval_loader", "build_metric", "Evaluator"]

logger = setup_logger("ppdet_retina")


def build_eval_loader(cfg: dict, dataset: Any = None) -> Tuple[Any, Any]:
    """(EvalReader loader, dataset) over ``dataset`` or the config's EvalDataset.

    Evaluation runs in one process over every image, so the loader must not shard the set
    across ranks even under the launcher.
    """
    dataset = create("EvalDataset", cfg) if dataset is None else dataset
    reader = create("EvalReader", cfg)
    sampler = paddle.io.BatchSampler(dataset, batch_size=reader.batch_size, shuffle=False, drop_last=False)
    return reader(dataset, int(cfg.get("worker_num", 0)), batch_sampler=sampler), dataset


def build_metric(cfg: dict, dataset: Any, output_eval: str, classwise: Optional[bool] = None,
                 prediction_only: bool = False) -> COCOMetric:
    """The config's ``metric`` (COCO) over ``dataset``, writing bbox.json into ``output_eval``;
    ``classwise`` defaults to the config's key.

    ``prediction_only`` skips the mAP (tools/eval.py's ``save_prediction_only``); training's
    evaluations need it for best_model.
    """
    kind = str(cfg.get("metric", "COCO"))
    if kind != "COCO":
        raise ConfigError(f"metric '{kind}' is not supported; set metric: COCO")
    classwise = bool(cfg.get("classwise", False)) if classwise is None else bool(classwise)
    return COCOMetric(dataset.get_anno(), dataset.clsid2catid, classwise=classwise,
                      output_eval=output_eval, save_prediction_only=prediction_only)


def evaluate(runner: Callable[[Dict[str, Any]], Dict[str, Any]], loader: Any, metric: COCOMetric,
             timed: Optional[Callable[[float], None]] = None) -> Dict[str, List[float]]:
    """Run ``runner`` over every batch of ``loader`` into ``metric``; ``{'bbox': [12 stats]}``.

    ``timed`` receives the seconds the batches took (before the metric's own work), for the
    engine choice of training's evaluations. Images the reader could not read are named in its
    warnings and counted here: their ground truth counts as missed.
    """
    tic, images = time.time(), 0
    with paddle.no_grad():
        for batch in loader:
            outputs = runner(batch)
            metric.update(batch, outputs)
            images += int(batch["image"].shape[0])
    cost = time.time() - tic
    if timed is not None:
        timed(cost)
    logger.info(f"evaluated {images} images in {cost:.2f} s ({images / max(cost, 1e-9):.2f} images/s)")
    bad = getattr(loader, "bad_images", [])
    if bad:
        logger.warning(f"{len(bad)} broken image(s) were left out of the evaluation; their "
                       f"ground truth counts as missed")
    return metric.accumulate()


class Evaluator(ModelSession):
    """tools/eval.py: ``cfg``'s model with loaded weights, scored on its EvalDataset.

    Reads ``EvalDataset``, ``EvalReader``, ``worker_num``, ``metric``, ``classwise``, ``output_eval``
    and ``save_prediction_only`` besides the model sections.
    """

    def __init__(self, cfg: dict, engine: str = "auto", bf16: bool = False):
        super().__init__(cfg, "EvalDataset", engine, bf16)

    def evaluate(self) -> Dict[str, List[float]]:
        """COCO bbox evaluation of the current weights: ``{'bbox': [12 stats]}``."""
        loader, dataset = build_eval_loader(self.cfg, self.dataset)
        metric = build_metric(self.cfg, dataset, self.cfg.get("output_eval") or self.output_dir,
                              prediction_only=bool(self.cfg.get("save_prediction_only", False)))
        return evaluate(self.runner(), loader, metric, timed=self.engine.finished)
