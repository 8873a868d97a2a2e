"""PaddleDetection's training switches beyond the model: flags of ``tools/train.py`` and their config keys.

``tools/train.py`` copies each flag it is given into the top-level config key of the same name
(as PaddleDetection's ``merge_args`` does), so a config may set them too: ``amp``, ``fleet``,
``enable_ce``, ``to_static``, ``use_vdl``, ``vdl_log_dir``, ``profiler_options``. The trainer reads
the keys; this module holds the pieces that are not the trainer's own loop.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any, Tuple

import paddle

from ppdet_retina.core import env
from ppdet_retina.core.options import TrainingOption, declare_training_options, train_flags
from ppdet_retina.core.workspace import ConfigError, register_top_level_keys

__all__ = ["add_train_flags", "flags_to_config", "make_deterministic", "to_static_model", "distributed_model"]

# The switches of tools/train.py, each also a config key; a new one is one entry here.
declare_training_options({
    "amp": TrainingOption(
        "mixed precision: float16 autocast with dynamic loss scaling on a GPU (amp_level O1/O2 in the config; "
        "the scaler state is checkpointed). On a CPU it trains in float32 and says so", flag="switch"),
    "to_static": TrainingOption(
        "train a paddle.jit.to_static graph; refused with the reason for architectures whose training graph "
        "does not convert (RetinaNet, Faster R-CNN on Paddle 3.3)", flag="switch"),
    "use_vdl": TrainingOption(
        "write losses, LR and bbox mAP as VisualDL scalars (needs pip install visualdl, or the package's [vdl] "
        "extra)", flag="bool"),
    "vdl_log_dir": TrainingOption("folder of the VisualDL scalars (default: vdl_log_dir/scalar)", flag="DIR"),
    "fleet": TrainingOption(
        "under paddle.distributed.launch, distribute through paddle.distributed.fleet (collective mode) instead "
        "of paddle.DataParallel; same data-parallel result", flag="switch"),
    "enable_ce": TrainingOption(
        "deterministic run: seed 0 (or --seed) for python, numpy, paddle and the shuffling, deterministic cuDNN; "
        "two runs give the same weights", flag="bool"),
    "profiler_options": TrainingOption(
        "profile training iterations with paddle.profiler, PaddleDetection's format: \"batch_range=[10,20];"
        "profile_path=output/profile;sorted_key=total;exit_on_finished=true\" (prints the op table, writes a "
        "Chrome trace)", flag="OPTIONS"),
})
register_top_level_keys({
    "save_prediction_only": "tools/eval.py --save_prediction_only: write bbox.json without the mAP",
})

logger = logging.getLogger("ppdet_retina.training.train_options")


def add_train_flags(parser: argparse.ArgumentParser) -> None:
    """Add the declared training options' flags to ``parser``; each defaults to None (not given)."""
    for key, option in train_flags().items():
        kind, text = option.flag, option.help
        if kind == "switch":
            parser.add_argument(f"--{key}", action="store_true", default=None, help=text)
        elif kind == "bool":
            parser.add_argument(f"--{key}", type=env.str2bool, nargs="?", const=True, default=None, metavar="BOOL",
                                help=text)
        else:
            parser.add_argument(f"--{key}", default=None, metavar=kind, help=text)


def flags_to_config(cfg: dict, args: Any) -> dict:
    """Copy the training flags the user gave (not None: ``--use_vdl false`` does turn a config's true
    off) into ``cfg``; returns ``cfg``."""
    for key in train_flags():
        value = getattr(args, key, None)
        if value is not None:
            cfg[key] = value
    return cfg


def make_deterministic(seed: int = 0) -> None:
    """``--enable_ce``: one fixed seed for python, numpy and paddle (plus the rank), and cuDNN's
    deterministic algorithms. Shuffling and augmentation then repeat run to run, since the samplers
    and loader workers draw from the seeded generators."""
    env.set_random_seed(seed)
    cudnn = ""
    if paddle.is_compiled_with_cuda():  # a CPU build does not have (or need) the flag
        paddle.set_flags({"FLAGS_cudnn_deterministic": True})
        cudnn = ", deterministic cuDNN"
    logger.info(f"--enable_ce: seed {seed} (+ rank){cudnn}")


def to_static_model(model: paddle.nn.Layer) -> paddle.nn.Layer:
    """``--to_static``: the model's training forward as a ``paddle.jit.to_static`` graph.

    Only an architecture whose class sets ``supports_to_static = True`` is converted; for the others
    the conversion is refused with the reason, because on Paddle 3.3.1 it fails for both of ours: the
    bytecode translator (default) stops inside the anchor generator; the AST translator
    (``full_graph=True``) stops at Faster R-CNN's data-dependent branches and, worse, runs RetinaNet
    but returns a total loss equal to the class loss alone (the box loss dropped).
    """
    name = type(model).__name__
    if not getattr(model, "supports_to_static", False):
        raise ConfigError(
            f"--to_static is not supported for {name}: Paddle 3.3's dynamic-to-static conversion of its "
            f"training graph stops (bytecode mode) or is wrong (AST mode: a RetinaNet total loss without "
            f"the box loss). Train without --to_static; tools/export_model.py builds the static "
            f"inference graph.")
    logger.info(f"--to_static: training {name} as a static graph")
    return paddle.jit.to_static(model)


def distributed_model(model: paddle.nn.Layer, optimizer: Any, use_fleet: bool) -> Tuple[paddle.nn.Layer, Any]:
    """The model and optimizer a multi-process run steps: ``paddle.DataParallel``, or with ``--fleet``
    ``fleet.distributed_model`` / ``fleet.distributed_optimizer`` (collective mode; for plain data
    parallelism the same all-reduce of gradients). One process: both unchanged."""
    if env.world_size() <= 1:
        if use_fleet:
            logger.info("--fleet: one process, nothing to distribute")
        return model, optimizer
    if not use_fleet:
        return paddle.DataParallel(model), optimizer
    from paddle.distributed import fleet

    fleet.init(is_collective=True, strategy=fleet.DistributedStrategy())
    logger.info(f"--fleet: collective data parallel over {env.world_size()} processes")
    return fleet.distributed_model(model), fleet.distributed_optimizer(optimizer)
