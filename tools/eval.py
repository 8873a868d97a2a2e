#!/usr/bin/env python
"""Evaluate trained weights with COCO bbox mAP (``ppdet-retina eval`` of the installed package).

The code and its flags are in ppdet_retina/cli/eval.py: ``python tools/eval.py -h``.
"""

import os
import sys

# Run from a clean checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ppdet_retina.cli.eval import build_parser, main  # noqa: E402,F401
from ppdet_retina.core import env  # noqa: E402

if __name__ == "__main__":
    sys.exit(env.run_tool(main))
