"""Where the dev scripts find PaddleDetection's own config files (dev only).

They are not part of this repository: point ``PPDET_CONFIGS`` at a PaddleDetection checkout's
``configs/`` folder (``git clone https://github.com/PaddlePaddle/PaddleDetection``), or give the
script a ``--config`` path. The scripts name configs relative to that folder, e.g.
``retinanet/retinanet_r50_fpn_1x_coco.yml``.
"""

from __future__ import annotations

import os

ENV_VAR = "PPDET_CONFIGS"


def ppdet_config(relative: str) -> str:
    """The path of PaddleDetection's ``configs/<relative>``; exits with what to set when it is not found."""
    root = os.environ.get(ENV_VAR)
    if not root:
        raise SystemExit(f"{relative}: set {ENV_VAR} to a PaddleDetection checkout's configs/ folder "
                         "or pass --config PATH")
    path = os.path.join(root, relative)
    if not os.path.isfile(path):
        raise SystemExit(f"{path} not found: {ENV_VAR}={root} should be a PaddleDetection checkout's "
                         "configs/ folder (release 2.6)")
    return path
