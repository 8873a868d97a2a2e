#!/usr/bin/env python
"""Train a detector from a config (PaddleDetection's tools/train.py flags).

    python tools/train.py -c configs/retinanet/retinanet_r50_fpn_1x.yml --eval -o use_gpu=false
    python -m paddle.distributed.launch --nproc_per_node 2 tools/train.py -c <config>
"""

import argparse
import sys

from ppdet_retina.core.workspace import ConfigError
from ppdet_retina.core import env


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    env.add_config_args(parser)
    parser.add_argument("-r", "--resume", default=None, metavar="PATH|auto",
                        help="checkpoint prefix to resume from (e.g. output/<config>/5): restores weights, "
                             "optimizer, LR step and epoch. 'auto': the newest complete checkpoint in "
                             "save_dir/<config name>/, or a fresh start when there is none (so the same "
                             "command restarts a stopped run). A checkpoint saved with another number of "
                             "processes or batch size continues the LR schedule by epoch and says so. "
                             "Without -r a run into a folder that holds checkpoints warns and replaces them; "
                             "train_log.jsonl is always appended to")
    parser.add_argument("--eval", action="store_true",
                        help="evaluate on EvalDataset after every snapshot and keep best_model by bbox mAP")
    from ppdet_retina.inference.engines import add_engine_args

    add_engine_args(parser, training=True)
    parser.add_argument("--seed", type=int, default=None,
                        help="random seed for python, numpy and paddle (each rank adds its rank)")
    from ppdet_retina.training.train_options import add_train_flags

    add_train_flags(parser)
    parser.add_argument("--slim_config", default=None, metavar="FILE",
                        help="PaddleSlim compression configs are not supported (refused with a message)")
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.slim_config:
        raise ConfigError(f"--slim_config {args.slim_config}: PaddleSlim compression (pruning, quantisation, "
                          f"distillation) is not supported by ppdet_retina; train without --slim_config")
    cfg = env.load_tool_config(args)
    from ppdet_retina.training import train_options

    train_options.flags_to_config(cfg, args)
    if cfg.get("enable_ce"):
        train_options.make_deterministic(0 if args.seed is None else args.seed)
    elif args.seed is not None:
        env.set_random_seed(args.seed)
    from ppdet_retina.training.profiling import ProfilerDone
    from ppdet_retina.training.trainer import Trainer

    trainer = Trainer(cfg)
    trainer.set_engine(args.engine, args.bf16)
    resumed = bool(args.resume) and trainer.resume_weights(args.resume)
    if not resumed:
        trainer.load_pretrain_weights(cfg.get("pretrain_weights"))
    try:
        trainer.train(validate=args.eval)
    except ProfilerDone as done:
        print(f"profiling finished: {done}")


if __name__ == "__main__":
    sys.exit(env.run_tool(main))
