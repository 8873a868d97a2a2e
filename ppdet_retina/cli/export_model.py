#!/usr/bin/env python
"""Export a trained detector for deployment (PaddleDetection's tools/export_model.py flags).

    python tools/export_model.py -c retinanet_r50_fpn_1x -o weights=output/retinanet_r50_fpn_1x/model_final
    python tools/export_model.py -c <config> -o weights=<pdparams> --onnx --onnx_input_size 800 1344

Writes ``<output_dir>/<config name>/``: model.json + model.pdiparams (Paddle inference),
infer_cfg.yml (preprocessing, labels, outputs) and, with --onnx, model.onnx. Run the result
with tools/deploy.py --model_dir <that folder>.

--onnx converts one image of a fixed size, stopping before the NMS: outputs ``boxes`` [1, M, 4]
and ``scores`` [1, C, M]; infer_cfg.yml's ``onnx.nms`` holds the NMS settings to apply
(ppdet_retina.export.onnx.multiclass_nms does it in NumPy). The file is checked with
onnxruntime against the Paddle graphs (candidates, then detections after that NMS, on a random
image and the first eval image); a difference fails the export.
"""

import argparse
import sys

from ppdet_retina.core import env


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    env.add_config_args(parser)
    parser.add_argument("--output_dir", default="output_inference",
                        help="parent folder; the export goes to <output_dir>/<config name>/")
    parser.add_argument("--raw_outputs", action="store_true",
                        help="export the raw head outputs (logits and deltas per level) without decoding or "
                             "NMS; same as -o export.post_process=false")
    parser.add_argument("--fixed_input_size", type=int, nargs=2, default=None, metavar=("H", "W"),
                        help="trace one image of exactly this padded size instead of dynamic batch/H/W "
                             "(needed by Faster R-CNN until its proposal generator traces with dynamic sizes)")
    parser.add_argument("--onnx", action="store_true", help="also convert to ONNX with paddle2onnx (fixed input size)")
    parser.add_argument("--onnx_input_size", type=int, nargs=2, default=None, metavar=("H", "W"),
                        help="the ONNX model's fixed padded input size; default: TestReader's Resize target "
                             "rounded up to the PadBatch stride")
    parser.add_argument("--onnx_opset", type=int, default=11,
                        help="ONNX opset asked of paddle2onnx (>= 11); infer_cfg.yml records the one written")
    parser.add_argument("--no_onnx_check", action="store_true",
                        help="skip comparing the ONNX model with the Paddle graphs in onnxruntime")
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    cfg = env.load_tool_config(args)
    from ppdet_retina.export.paddle_inference import export_model
    from ppdet_retina.export.onnx import OnnxCheckError

    env.setup_environment(use_gpu=False)
    try:
        save_dir = export_model(cfg, args.output_dir, weights=cfg.get("weights") or None,
                                raw_outputs=True if args.raw_outputs else None, onnx=args.onnx,
                                onnx_input_size=args.onnx_input_size, onnx_opset=args.onnx_opset,
                                check_onnx=not args.no_onnx_check, fixed_input_size=args.fixed_input_size)
    except OnnxCheckError as err:
        print(f"error: {err}\nThe Paddle export is written; model.onnx is not.", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"exported to {save_dir}")


if __name__ == "__main__":
    sys.exit(env.run_tool(main))
