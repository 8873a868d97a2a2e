#!/usr/bin/env python
"""Detect objects in images and draw them (``ppdet-retina infer`` of the installed package).

The code and its flags are in ppdet_retina/cli/infer.py: ``python tools/infer.py -h``.
"""

import os
import sys

# Run from a clean checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ppdet_retina.cli.infer import build_parser, images_from, main, read_infer_list  # noqa: E402,F401
from ppdet_retina.core import env  # noqa: E402

if __name__ == "__main__":
    sys.exit(env.run_tool(main))
