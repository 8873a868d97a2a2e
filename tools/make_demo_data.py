#!/usr/bin/env python
"""Write the synthetic shapes dataset used by the demo configs (``ppdet-retina demo-data`` of the installed package).

The code and its flags are in ppdet_retina/cli/make_demo_data.py: ``python tools/make_demo_data.py -h``.
"""

import os
import sys

# Run from a clean checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ppdet_retina.cli.make_demo_data import main, parse_args  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(main())
