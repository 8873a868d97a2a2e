"""Run a tool with the instrumentation some tests need, switched on by this file's environment variables:

    python tests/instrumented_tool.py tools/train.py -c <config> ...

* ``WEIGHTS_HASH_ENV=<folder>``: when ``Trainer.train`` returns, each rank writes the sha256 of its
  trainable weights (:func:`weights_digest`) to ``<folder>/rank<r>.sha256``, so a test can check that
  data-parallel ranks stayed identical;
* ``SAVE_PAUSE_ENV=<checkpoint name>``: saving that checkpoint prints a line and sleeps 60 s once its
  temp files (commit record included) are written and before they are renamed, so a test can kill
  the process inside a save.

The package itself knows nothing of this: the hooks are patched in here before the tool runs.
"""

import hashlib
import os
import runpy
import sys
import time

import numpy as np

WEIGHTS_HASH_ENV = "PPDET_RETINA_WEIGHTS_HASH_DIR"
SAVE_PAUSE_ENV = "PPDET_RETINA_TEST_SAVE_PAUSE"
HERE = os.path.dirname(os.path.abspath(__file__))


def weights_digest(model) -> str:
    """sha256 over every trainable parameter, in name order.

    Paddle's BatchNorm stores its running statistics as (non-trainable) parameters; plain BN keeps
    them per rank, so they legitimately differ between data-parallel ranks and are left out.
    """
    digest = hashlib.sha256()
    trainable = [(n, p) for n, p in model.named_parameters() if not p.stop_gradient]
    for name, value in sorted(trainable, key=lambda item: item[0]):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(value.numpy()).tobytes())
    return digest.hexdigest()


def _write_hash_after_training(folder: str) -> None:
    from ppdet_retina.training.trainer import Trainer

    train = Trainer.train

    def train_then_hash(self, *args, **kwargs):
        result = train(self, *args, **kwargs)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"rank{self.rank}.sha256"), "w") as f:
            f.write(weights_digest(self.model))
        return result

    Trainer.train = train_then_hash


def _pause_inside_save(name: str) -> None:
    from ppdet_retina.io import checkpoint

    write_temp = checkpoint._write_temp

    def write_then_pause(obj, path):
        tmp = write_temp(obj, path)
        if os.path.basename(path) == name + checkpoint.COMMIT_SUFFIX:  # the last temp file of the save
            print(f"checkpoint '{name}': temp files written, pausing before commit ({SAVE_PAUSE_ENV})", flush=True)
            time.sleep(60)
        return tmp

    checkpoint._write_temp = write_then_pause


def main() -> None:
    tool = os.path.abspath(sys.argv[1])
    sys.path.insert(0, os.path.dirname(os.path.dirname(tool)))  # the checkout the tool belongs to
    if os.environ.get(WEIGHTS_HASH_ENV):
        _write_hash_after_training(os.environ[WEIGHTS_HASH_ENV])
    if os.environ.get(SAVE_PAUSE_ENV):
        _pause_inside_save(os.environ[SAVE_PAUSE_ENV])
    sys.argv = sys.argv[1:]
    runpy.run_path(tool, run_name="__main__")


if __name__ == "__main__":
    main()
