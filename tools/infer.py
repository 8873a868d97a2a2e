#!/usr/bin/env python
"""Detect objects in images and draw them (PaddleDetection's tools/infer.py flags).

    python tools/infer.py -c <config> -o weights=output/<config>/model_final --infer_img demo.jpg
    python tools/infer.py -c <config> -o weights=... --infer_dir images/ --save_results

Each picture is written as soon as it is done. Files that cannot be read are skipped with a
warning naming each (hidden files such as ._x.jpg and non-image extensions are not listed at
all), and the tool exits with status 2 at the end when any was skipped.
"""

import argparse
import os
import sys

# Run from a clean checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ppdet_retina.core.workspace import ConfigError  # noqa: E402
from ppdet_retina.engine import env  # noqa: E402


def str2bool(text: str) -> bool:
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "y", "on"):
        return True
    if value in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{text}'")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    env.add_config_args(parser)
    parser.add_argument("--infer_img", default=None, metavar="FILE",
                        help="one image to run on (wins over --infer_dir)")
    parser.add_argument("--infer_dir", default=None, metavar="DIR", help="run on every image in this folder")
    parser.add_argument("--output_dir", default="output", metavar="DIR",
                        help="where the drawn images (same file names) and bbox.json go (default: output)")
    parser.add_argument("--draw_threshold", type=float, default=0.5,
                        help="draw only boxes scoring at least this (default: 0.5)")
    parser.add_argument("--save_results", type=str2bool, nargs="?", const=True, default=False,
                        help="also write output_dir/bbox.json: COCO results (xywh, original category ids) "
                             "holding every detection the model returned, whatever --draw_threshold; "
                             "image_id is the id TestDataset.anno_path gives the file (so COCOeval runs on "
                             "it directly), else a running index")
    return parser


def images_from(args) -> str:
    if args.infer_img:
        if not os.path.isfile(args.infer_img):
            raise FileNotFoundError(f"--infer_img '{args.infer_img}' does not exist")
        return args.infer_img
    if args.infer_dir:
        if not os.path.isdir(args.infer_dir):
            raise FileNotFoundError(f"--infer_dir '{args.infer_dir}' is not a folder")
        return args.infer_dir
    raise ValueError("give the images with --infer_img <file> or --infer_dir <folder>")


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    images = images_from(args)
    cfg = env.load_tool_config(args)
    if not cfg.get("weights"):
        raise ConfigError("no weights to run: pass -o weights=<path to .pdparams or its prefix>")
    from ppdet_retina.engine.trainer import Trainer

    trainer = Trainer(cfg, mode="test")
    trainer.load_weights(cfg["weights"])
    trainer.predict(images, draw_threshold=args.draw_threshold, output_dir=args.output_dir,
                    save_results=args.save_results)


if __name__ == "__main__":
    sys.exit(env.run_tool(main))
