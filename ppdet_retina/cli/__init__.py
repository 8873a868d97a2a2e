"""The ``ppdet-retina`` command (console script of the installed package): one subcommand per tool.

    ppdet-retina train -c retinanet_r50_fpn_1x.yml --eval -o use_gpu=false
    ppdet-retina eval -c retinanet_r50_fpn_1x.yml -o weights=output/retinanet_r50_fpn_1x/model_final
    ppdet-retina infer -c retinanet_r50_fpn_1x.yml -o weights=... --infer_img demo.jpg
    ppdet-retina export -c retinanet_r50_fpn_1x.yml -o weights=...
    ppdet-retina deploy --model_dir output_inference/retinanet_r50_fpn_1x --image_file demo.jpg
    ppdet-retina demo-data --output dataset/shapes
    ppdet-retina configs

Each subcommand is the checkout's ``tools/<script>`` with the same flags, output and exit status:
``tools/train.py`` etc. are thin wrappers over the modules here, and ``deploy`` runs the standalone
``deploy.py`` shipped beside them. ``-c`` takes a path or the file name of a config shipped with
the package (``ppdet-retina configs`` lists them and says where they are); so does a ``_BASE_`` entry
that is not found beside the config naming it, so a copy of a shipped config runs from anywhere.
"""

from __future__ import annotations

import importlib.util
import os
import runpy
import sys
import warnings
from typing import Dict, List, NamedTuple, Optional

PROG = "ppdet-retina"
# The wheel does not require paddlepaddle (pip would put the CPU build over paddlepaddle-gpu), so say how to get it.
PADDLE_MISSING = ("error: PaddlePaddle is not installed in this environment. CPU: pip install 'paddlepaddle>=3.0,<3.4' "
                  "(or pip install 'ppdet_retina[cpu]'); NVIDIA GPU: paddlepaddle-gpu of the same versions from "
                  "Paddle's package index for your CUDA version (https://www.paddlepaddle.org.cn/install)")


class Command(NamedTuple):
    module: str  # module under ppdet_retina.cli run as __main__ (deploy: a file run by path)
    script: str  # the same tool in a checkout's tools/
    summary: str


COMMANDS: Dict[str, Command] = {
    "train": Command("train", "train.py", "train a detector from a config"),
    "eval": Command("eval", "eval.py", "COCO bbox mAP of trained weights on EvalDataset"),
    "infer": Command("infer", "infer.py", "detect objects in images and draw them"),
    "export": Command("export_model", "export_model.py", "export for Paddle Inference (and ONNX)"),
    "deploy": Command("deploy", "deploy.py", "run an export with Paddle Inference"),
    "demo-data": Command("make_demo_data", "make_demo_data.py", "write the synthetic shapes dataset"),
}


def _usage() -> str:
    lines = [f"usage: {PROG} <command> [flags]   ({PROG} <command> -h for its flags)", "", "commands:"]
    lines += [f"  {name:<10} {cmd.summary} (tools/{cmd.script})" for name, cmd in COMMANDS.items()]
    lines.append(f"  {'configs':<10} list the configs shipped with the package (names for -c and _BASE_)")
    return "\n".join(lines)


def shipped_configs() -> List[str]:
    """The shipped configs' paths relative to their folder, sorted; ``_base_`` pieces left out."""
    from ppdet_retina.core.workspace import shipped_configs_dir

    root = shipped_configs_dir()
    found = []
    for dirpath, dirnames, files in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != "_base_"]
        found += [os.path.relpath(os.path.join(dirpath, f), root) for f in files if f.endswith((".yml", ".yaml"))]
    return sorted(p.replace(os.sep, "/") for p in found)


def _run_deploy() -> None:
    """deploy.py reads the predictor runtime by file path; hand it the package's own copy first so the
    standalone script runs unchanged from inside the package."""
    here = os.path.dirname(os.path.abspath(__file__))
    # The module name deploy.py's load_runtime() looks up; runtime.py imports nothing else of the package.
    sys.modules.setdefault("ppdet_retina_predictor_runtime", importlib.import_module("ppdet_retina.runtime"))
    runpy.run_path(os.path.join(here, "deploy.py"), run_name="__main__")


def main(argv: Optional[List[str]] = None) -> int:
    """Run ``ppdet-retina <command> [flags]``; returns the exit status the tool's own ``__main__`` gives."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    name, args = argv[0], argv[1:]
    if name == "configs":
        from ppdet_retina.core.workspace import shipped_configs_dir

        print("\n".join(shipped_configs()))
        print(f"(in {shipped_configs_dir()})", file=sys.stderr)  # where to copy one from to edit it
        return 0
    if name not in COMMANDS:
        print(f"error: unknown command '{name}'; choose from {', '.join(list(COMMANDS) + ['configs'])}",
              file=sys.stderr)
        return 2
    if name != "demo-data" and importlib.util.find_spec("paddle") is None:
        print(PADDLE_MISSING, file=sys.stderr)
        return 2
    # The tool parses sys.argv and names itself after argv[0] in its usage lines.
    sys.argv = [f"{PROG} {name}", *args]
    try:
        if name == "deploy":
            _run_deploy()
        else:
            with warnings.catch_warnings():
                # Called in-process after the module was imported (tests, tools/ wrappers): running it again
                # as __main__ is the point, not a mistake.
                warnings.filterwarnings("ignore", message=r".*found in sys\.modules", category=RuntimeWarning)
                runpy.run_module(f"{__name__}.{COMMANDS[name].module}", run_name="__main__", alter_sys=False)
    except SystemExit as done:
        code = done.code
        if code is None or isinstance(code, int):
            return code or 0
        print(code, file=sys.stderr)  # SystemExit("error: ...") prints its message, as Python does
        return 1
    return 0
