#!/usr/bin/env python
"""Detect objects in images and draw them (PaddleDetection's tools/infer.py flags).

    python tools/infer.py -c <config> -o weights=output/<config>/model_final --infer_img demo.jpg
    python tools/infer.py -c <config> -o weights=... --infer_dir images/ --save_results
    python tools/infer.py -c <config> -o weights=... --infer_img demo.jpg --engine dygraph

On CPU the weights run on Paddle Inference with oneDNN by default (--engine auto): traced once per
weights file into ~/.cache/ppdet_retina/exports, same detections as dygraph, about twice as fast.

Each picture is written as soon as it is done. Files that cannot be read are skipped with a
warning naming each (hidden files such as ._x.jpg and non-image extensions are not listed at
all), and the tool exits with status 2 at the end when any was skipped.
"""

import argparse
import os
import sys
from typing import List, Optional, Union

from ppdet_retina.core.workspace import ConfigError
from ppdet_retina.core import env


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    env.add_config_args(parser)
    parser.add_argument("--infer_img", default=None, metavar="FILE",
                        help="one image to run on (wins over --infer_dir)")
    parser.add_argument("--infer_dir", default=None, metavar="DIR", help="run on every image in this folder")
    parser.add_argument("--infer_list", default=None, metavar="FILE",
                        help="a text file naming one image per line (relative paths are taken from --infer_dir "
                             "when given, else from the list's folder; blank lines and # comments skipped); "
                             "used instead of --infer_dir's folder listing")
    parser.add_argument("--output_dir", default="output", metavar="DIR",
                        help="where the drawn images (same file names) and bbox.json go (default: output)")
    parser.add_argument("--draw_threshold", type=float, default=0.5,
                        help="draw only boxes scoring at least this (default: 0.5)")
    parser.add_argument("--save_results", type=env.str2bool, nargs="?", const=True, default=False,
                        help="also write output_dir/bbox.json: COCO results (xywh, original category ids) "
                             "holding every detection the model returned scoring at least --save_threshold, "
                             "whatever --draw_threshold; "
                             "image_id is the id TestDataset.anno_path gives the file (so COCOeval runs on "
                             "it directly), else a running index")
    parser.add_argument("--save_threshold", type=float, default=0.0,
                        help="with --save_results, write only detections scoring at least this "
                             "(default: 0.0, every detection)")
    parser.add_argument("--visualize", type=env.str2bool, nargs="?", const=True, default=True, metavar="BOOL",
                        help="draw the detections into pictures in output_dir (default: true; "
                             "--visualize false with --save_results writes only bbox.json)")
    from ppdet_retina.inference.engines import add_engine_args

    add_engine_args(parser)
    return parser


def read_infer_list(path: str, base_dir: Optional[str] = None) -> List[str]:
    """The image paths a ``--infer_list`` file names, checked to exist."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--infer_list '{path}' does not exist")
    base = base_dir or os.path.dirname(os.path.abspath(path))
    images = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            name = line.strip()
            if not name or name.startswith("#"):
                continue
            image = os.path.join(base, name)
            if not os.path.isfile(image):
                raise FileNotFoundError(f"--infer_list '{path}' line {number}: image '{image}' does not exist")
            images.append(image)
    if not images:
        raise ValueError(f"--infer_list '{path}' names no image")
    return images


def images_from(args) -> Union[str, List[str]]:
    if args.infer_list and not args.infer_img:
        if args.infer_dir and not os.path.isdir(args.infer_dir):
            raise FileNotFoundError(f"--infer_dir '{args.infer_dir}' is not a folder")
        return read_infer_list(args.infer_list, args.infer_dir)
    if args.infer_img:
        if not os.path.isfile(args.infer_img):
            raise FileNotFoundError(f"--infer_img '{args.infer_img}' does not exist")
        return args.infer_img
    if args.infer_dir:
        if not os.path.isdir(args.infer_dir):
            raise FileNotFoundError(f"--infer_dir '{args.infer_dir}' is not a folder")
        return args.infer_dir
    raise ValueError("give the images with --infer_img <file>, --infer_dir <folder> or --infer_list <file>")


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    images = images_from(args)
    cfg = env.load_tool_config(args)
    if not cfg.get("weights"):
        raise ConfigError("no weights to run: pass -o weights=<path to .pdparams or its prefix>")
    from ppdet_retina.inference.predict import Predictor

    predictor = Predictor(cfg, args.engine, args.bf16)
    predictor.load_weights(cfg["weights"])
    if not args.visualize and not args.save_results:
        raise ValueError("--visualize false without --save_results would write nothing; add --save_results")
    predictor.predict(images, draw_threshold=args.draw_threshold, output_dir=args.output_dir,
                      save_results=args.save_results, save_threshold=args.save_threshold,
                      visualize=args.visualize)


if __name__ == "__main__":
    sys.exit(env.run_tool(main))
