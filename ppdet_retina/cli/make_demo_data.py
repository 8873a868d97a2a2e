"""Write the synthetic shapes dataset (COCO format) used by the demo configs.

    python tools/make_demo_data.py --output dataset/shapes --num-train 1200 --num-val 100 --size 128 --seed 0

Does nothing when the output is already complete for the same parameters.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import List, Optional

from ppdet_retina.data.shapes import ensure_demo_dataset, is_complete


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="dataset/shapes", help="dataset root to write")
    parser.add_argument("--num-train", type=int, default=1200)
    parser.add_argument("--num-val", type=int, default=100)
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="regenerate even if complete")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    params = dict(num_train=args.num_train, num_val=args.num_val, size=args.size, seed=args.seed)
    if not args.force and is_complete(args.output, **params):
        print(f"{args.output}: already complete ({params}); nothing to do")
        return 0
    start = time.time()
    try:
        ensure_demo_dataset(args.output, force=args.force, **params)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.output}: wrote {args.num_train} train + {args.num_val} val images "
          f"in {time.time() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
