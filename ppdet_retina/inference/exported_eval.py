"""COCO evaluation of an exported model through the Paddle Inference predictor (the one evaluation loop).

On CPU the predictor (:mod:`ppdet_retina.runtime`) runs the convolutions with oneDNN (optionally in bf16), while dygraph
convolutions use Paddle's plain CPU kernel even with the oneDNN flags on, so evaluating an
export is the fast way to score a model on a CPU. Data and metric are the package's own: ``EvalDataset``,
``EvalReader`` and :class:`~ppdet_retina.metrics.coco.COCOMetric`, so the numbers are
comparable with ``tools/eval.py`` on the dygraph model.

    from ppdet_retina.inference.exported_eval import evaluate_exported
    stats = evaluate_exported(cfg, "output_inference/retinanet_r50_fpn_1x", bf16=True)
    stats["bbox"][0]   # AP@[.50:.95]
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from ppdet_retina.core import env
from ppdet_retina.core.workspace import ConfigError
from ppdet_retina.export.paddle_inference import preprocess_entries
from ppdet_retina.inference.engines import PredictorModel, choose_engine
from ppdet_retina.inference.evaluate import build_eval_loader, build_metric, evaluate
from ppdet_retina.io.checkpoint import output_dir_of
from ppdet_retina.runtime import create_predictor, model_files, read_infer_cfg
from ppdet_retina.utils.logger import setup_logger

__all__ = ["evaluate_exported"]

logger = setup_logger("ppdet_retina")


def _check_export(infer_cfg: Dict[str, Any], cfg: dict, model_dir: str) -> None:
    if not infer_cfg.get("nms_inside", False):
        raise ConfigError(f"{model_dir}: the export returns {infer_cfg.get('outputs')} without NMS; evaluation "
                          f"needs detections. Re-export with export.post_process=true export.nms=true")
    arch = cfg.get("architecture")
    if arch and infer_cfg.get("arch") and arch != infer_cfg["arch"]:
        raise ConfigError(f"{model_dir} holds a {infer_cfg['arch']} but the config's architecture is {arch}; "
                          f"pass the config the model was exported from")
    try:
        eval_pre = preprocess_entries(cfg, "EvalReader")
    except ConfigError:
        return
    if eval_pre != infer_cfg.get("Preprocess"):
        # The reader, not infer_cfg.yml, prepares the images here; say so when they differ.
        logger.warning(f"exported eval: EvalReader preprocessing {eval_pre} differs from the export's "
                       f"{infer_cfg.get('Preprocess')}; images are prepared by EvalReader")


def evaluate_exported(cfg: dict, model_dir: str, use_mkldnn: bool = True, bf16: bool = False,
                      cpu_threads: Optional[int] = None, use_gpu: bool = False, classwise: bool = False,
                      output_eval: Optional[str] = None) -> Dict[str, List[float]]:
    """COCO bbox mAP of the export in ``model_dir`` on ``cfg``'s EvalDataset: ``{'bbox': [12 stats]}``.

    Args:
        cfg: the loaded config (EvalDataset, EvalReader, worker_num, metric).
        model_dir: folder written by tools/export_model.py (with NMS inside).
        use_mkldnn: oneDNN kernels on CPU (the fast path).
        bf16: oneDNN bf16 kernels; refused on CPUs without avx512_bf16.
        cpu_threads: math threads of the predictor; default every core this process may use.
        use_gpu: run the predictor on GPU 0 instead.
        classwise: also log per-category AP.
        output_eval: folder for bbox.json; default ``cfg['output_eval']`` or save_dir/<config name>.
    """
    if str(cfg.get("metric", "COCO")) != "COCO":
        raise ConfigError(f"metric '{cfg.get('metric')}' is not supported; set metric: COCO")
    # The engine rules of every other evaluation (bf16 only on a CPU that has it).
    choose_engine("paddle_inference", "gpu" if use_gpu else "cpu", str(cfg.get("architecture", "")), bf16)
    infer_cfg = read_infer_cfg(model_dir)
    _check_export(infer_cfg, cfg, model_dir)
    threads = env.cpu_threads_per_process() if cpu_threads is None else int(cpu_threads)
    predictor = create_predictor(*model_files(model_dir), device="gpu" if use_gpu else "cpu", cpu_threads=threads,
                                 mkldnn=use_mkldnn, bf16=bf16)
    mode = "bf16" if bf16 else "fp32"
    runner = PredictorModel(predictor, f"exported model on Paddle Inference ({mode}, {threads} thread(s))")
    logger.info(f"exported eval: {runner.description}, {model_dir}")
    loader, dataset = build_eval_loader(cfg)
    metric = build_metric(cfg, dataset, output_eval or cfg.get("output_eval") or output_dir_of(cfg), classwise=classwise,
                          prediction_only=bool(cfg.get("save_prediction_only", False)))
    return evaluate(runner, loader, metric)
