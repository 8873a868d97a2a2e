#!/usr/bin/env python
"""Export a trained detector for deployment (``ppdet-retina export`` of the installed package).

The code and its flags are in ppdet_retina/cli/export_model.py: ``python tools/export_model.py -h``.
"""

import os
import sys

# Run from a clean checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ppdet_retina.cli.export_model import build_parser, main  # noqa: E402,F401
from ppdet_retina.core import env  # noqa: E402

if __name__ == "__main__":
    sys.exit(env.run_tool(main))
