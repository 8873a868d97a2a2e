"""``python -m ppdet_retina.cli <command> ...``: the ``ppdet-retina`` command without its console script."""

import sys

from ppdet_retina.cli import main

if __name__ == "__main__":
    sys.exit(main())
