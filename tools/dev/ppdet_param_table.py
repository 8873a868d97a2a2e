"""Write a PaddleDetection model's parameter table (name, shape, dtype) for the tests (dev only).

Run it with the python of a venv that has PaddleDetection 2.6 (``import ppdet``), never ours:

    PPDET_CONFIGS=/path/to/PaddleDetection/configs /tmp/ppdet_venv/bin/python tools/dev/ppdet_param_table.py \
        --arch retinanet --out tests/data/ppdet_retinanet_r50_fpn_params.tsv

One line per state-dict entry, in PaddleDetection's order: ``name<TAB>[d0, d1, ...]<TAB>dtype``. The
tests read these tables to check that every PaddleDetection name converts onto a same-shaped
tensor of ours (``load_weights``) and that our R50-FPN configs build the same parameter count;
the values themselves never matter, so no weight file is downloaded.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List

ARCH_CONFIGS = {
    "retinanet": "retinanet/retinanet_r50_fpn_1x_coco.yml",
    "faster_rcnn": "faster_rcnn/faster_rcnn_r50_fpn_1x_coco.yml",
}


def param_rows(config: str) -> List[str]:
    """``name\\t[shape]\\tdtype`` for every entry of the model built from ``config``."""
    from ppdet.core.workspace import create, load_config

    cfg = load_config(config)
    model = create(cfg.architecture)
    rows = []
    for name, tensor in model.state_dict().items():
        dtype = str(tensor.dtype).replace("paddle.", "")
        rows.append(f"{name}\t{list(tensor.shape)}\t{dtype}")
    return rows


def main(argv: List[str] | None = None) -> None:
    os.environ.setdefault("GLOG_minloglevel", "2")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from ppdet_configs import ppdet_config

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=sorted(ARCH_CONFIGS), default="retinanet")
    p.add_argument("--config", default=None,
                   help="PaddleDetection config (default: $PPDET_CONFIGS/<the arch's R50-FPN 1x config>)")
    p.add_argument("--out", default=None, help="default: tests/data/ppdet_<arch>_r50_fpn_params.tsv")
    args = p.parse_args(argv)
    try:
        import ppdet  # noqa: F401
    except ImportError:
        sys.exit("ppdet_param_table.py needs PaddleDetection: run it with the python of the ppdet venv")
    config = args.config or ppdet_config(ARCH_CONFIGS[args.arch])
    out = args.out or f"tests/data/ppdet_{args.arch}_r50_fpn_params.tsv"
    rows = param_rows(config)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        f.write("\n".join(rows) + "\n")
    print(f"wrote {out}: {len(rows)} entries from {config}")


if __name__ == "__main__":
    main()
