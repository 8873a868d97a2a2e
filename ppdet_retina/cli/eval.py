#!/usr/bin/env python
"""Evaluate trained weights on EvalDataset with COCO bbox mAP (PaddleDetection's tools/eval.py flags).

    python tools/eval.py -c <config> -o weights=output/<config>/model_final use_gpu=false --classwise
    python tools/eval.py -c <config> -o weights=... --engine dygraph          # the training graph itself
    python tools/eval.py -c <config> --exported output_inference/<config>   # an export made by hand

On CPU the weights run on Paddle Inference with oneDNN by default (--engine auto): traced once per
weights file into ~/.cache/ppdet_retina/exports, same mAP as dygraph, about twice as fast.
"""

import argparse
import sys

from ppdet_retina.core.workspace import ConfigError
from ppdet_retina.core import env


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    env.add_config_args(parser)
    parser.add_argument("--classwise", action="store_true", help="also print the AP of every category")
    parser.add_argument("--output_eval", default=None, metavar="DIR",
                        help="folder for bbox.json (the detections in COCO result format); "
                             "default: save_dir/<config name>")
    parser.add_argument("--exported", default=None, metavar="DIR",
                        help="evaluate a model written by tools/export_model.py through the Paddle Inference "
                             "predictor (oneDNN on CPU: several times faster than the training graph)")
    parser.add_argument("--save_prediction_only", action="store_true",
                        help="only write bbox.json (the detections in COCO result format), without computing "
                             "the mAP: e.g. for a test split whose annotations hold no boxes")
    from ppdet_retina.inference.engines import add_engine_args

    add_engine_args(parser)
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    cfg = env.load_tool_config(args)
    cfg["classwise"] = args.classwise
    if args.save_prediction_only:
        cfg["save_prediction_only"] = True
    if args.output_eval:
        cfg["output_eval"] = args.output_eval
    if args.exported:
        from ppdet_retina.inference.exported_eval import evaluate_exported

        evaluate_exported(cfg, args.exported, bf16=args.bf16, classwise=args.classwise,
                          output_eval=args.output_eval)
        return
    if not cfg.get("weights"):
        raise ConfigError("no weights to evaluate: pass -o weights=<path to .pdparams or its prefix>")
    from ppdet_retina.inference.evaluate import Evaluator

    evaluator = Evaluator(cfg, args.engine, args.bf16)
    evaluator.load_weights(cfg["weights"])
    if env.is_main_process():
        evaluator.evaluate()
    env.barrier()


if __name__ == "__main__":
    sys.exit(env.run_tool(main))
