"""A config's detector on this process's device, with its weights and the engine that runs it.

The shared start of evaluation (:class:`~ppdet_retina.inference.evaluate.Evaluator`) and prediction
(:class:`~ppdet_retina.inference.predict.Predictor`); training builds its own model
(:mod:`ppdet_retina.training.trainer`) and runs its evaluations through the same engine chooser.
"""

from __future__ import annotations

from typing import Any

import paddle

from ppdet_retina.core import env
from ppdet_retina.core.workspace import ConfigError, create
from ppdet_retina.inference.engines import EngineChooser
from ppdet_retina.io import checkpoint
from ppdet_retina.utils.logger import setup_logger

__all__ = ["ModelSession", "setup_device", "check_num_classes"]

logger = setup_logger("ppdet_retina")


def setup_device(cfg: dict) -> str:
    """Device, CPU threads and process group for ``cfg`` (``use_gpu``), logged once; returns the device."""
    if "architecture" not in cfg:
        raise ConfigError("config has no 'architecture' key (e.g. architecture: RetinaNet)")
    device = env.setup_environment(bool(cfg.get("use_gpu", False)))
    threads = f", {env.cpu_threads_per_process()} CPU thread(s) per process" if device == "cpu" else ""
    logger.info(f"device {device}, {env.world_size()} process(es){threads}")
    return device


def check_num_classes(dataset: Any, model: paddle.nn.Layer, section: str) -> None:
    """ConfigError when the dataset's category count differs from the class count the model's heads use.

    With more categories than ``num_classes`` the extra ones would silently train as background, with
    fewer the head would learn classes that never occur.
    """
    categories = getattr(dataset, "clsid2catid", None)
    if not categories:
        return  # a dataset without category information (an image folder) has nothing to compare
    counts = sorted({layer.num_classes for layer in model.sublayers(include_self=True)
                     if isinstance(getattr(layer, "num_classes", None), int)})
    for count in counts:
        if count != len(categories):
            anno = dataset.get_anno() if hasattr(dataset, "get_anno") else ""
            source = f" ({anno})" if anno else ""
            raise ConfigError(
                f"{section} has {len(categories)} categories{source} but the model is built for "
                f"num_classes {count}; set num_classes: {len(categories)} in the config (or "
                f"-o num_classes={len(categories)}). Fine-tuning from weights of another class count "
                f"works: their head is re-initialised.")


class ModelSession:
    """``cfg``'s dataset ``section`` and detector on the configured device, run by ``engine``.

    Args:
        cfg: a loaded config (``architecture``, ``use_gpu``, the dataset section, ``save_dir``...).
        section: the dataset to build (``EvalDataset``, ``TestDataset``); its category count is
            checked against the model's when ``check_classes``.
        engine, bf16: what runs the model (:class:`~ppdet_retina.inference.engines.EngineChooser`),
            checked at once.
    """

    def __init__(self, cfg: dict, section: str, engine: str = "auto", bf16: bool = False,
                 check_classes: bool = True):
        self.cfg = cfg
        self.device = setup_device(cfg)
        self.output_dir = checkpoint.output_dir_of(cfg)
        self.dataset = create(section, cfg)
        self.model = create(cfg["architecture"], cfg)
        if check_classes:
            check_num_classes(self.dataset, self.model, section)
        self.engine = EngineChooser(engine, bf16, self.device)
        self.engine.check(str(cfg["architecture"]))

    def load_weights(self, path: str, skip_mismatch_head: bool = False) -> None:
        """Load model weights (``weights:``) through the checkpoint API (which logs its report)."""
        checkpoint.load_weights(self.model, path, skip_mismatch_head=skip_mismatch_head)

    def runner(self) -> Any:
        """What to call on batches this time (the model or its Paddle Inference export)."""
        return self.engine.runner(self.model, self.cfg)
