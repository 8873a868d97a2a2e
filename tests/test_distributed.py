"""Two CPU processes under paddle.distributed.launch train in lock-step and evaluate once."""

import json
import os

from conftest import REPO, launch_two_ranks, write_tiny_config
from instrumented_tool import WEIGHTS_HASH_ENV

INSTRUMENTED = os.path.join(REPO, "tests", "instrumented_tool.py")


def test_two_process_launch_keeps_ranks_identical(tmp_path, tiny_coco):
    cfg = write_tiny_config(tmp_path, tiny_coco, epoch=1)
    hash_dir = str(tmp_path / "hash")
    proc, logs = launch_two_ranks(str(tmp_path / "log"), [
        INSTRUMENTED, os.path.join(REPO, "tools", "train.py"), "-c", cfg, "--eval",
        "--seed", "5",  # seeds differ per rank, so equal weights also need DataParallel's initial sync
        "-o", "log_iter=1"], extra_env={WEIGHTS_HASH_ENV: hash_dir})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + str(logs)

    hashes = {r: open(os.path.join(hash_dir, f"rank{r}.sha256")).read() for r in (0, 1)}
    assert len(hashes[0]) == 64 and hashes[0] == hashes[1]

    # Rank 0 alone logs, saves and evaluates every one of the 4 validation images once.
    assert "2 process(es), 1 CPU thread(s) per process" in logs[0]
    assert "evaluated 4 images" in logs[0]
    assert "saved checkpoint" not in logs[1] and "Epoch:" not in logs[1]
    out = os.path.join(str(tmp_path), "output", "tiny_retina")
    assert os.path.isfile(os.path.join(out, "model_final.pdparams"))
    records = [json.loads(line) for line in open(os.path.join(out, "train_log.jsonl"))]
    assert [r["type"] for r in records] == ["train", "eval"]
    # The global throughput counts both ranks' images: batch 2 per rank.
    assert "images/s" in logs[0]


_FAILING_RANK0 = """
import sys
sys.path.insert(0, {repo!r})
from ppdet_retina.core import env

env.init_distributed()
def work():
    raise OSError("disk full while saving")
try:
    env.run_on_main_then_sync(work)
except Exception as err:
    print(f"rank {{env.rank()}} stopped: {{type(err).__name__}}: {{err}}", flush=True)
    sys.exit(3)
print("rank continued", flush=True)
"""


def test_rank0_failure_stops_every_rank_instead_of_hanging(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text(_FAILING_RANK0.format(repo=REPO))
    proc, logs = launch_two_ranks(str(tmp_path / "log"), [str(script)], timeout=60)
    assert proc.returncode != 0
    assert "rank 0 stopped: OSError: disk full while saving" in logs[0]
    assert "rank 1 stopped: RuntimeError: rank 0 failed" in logs[1]
    assert "rank continued" not in logs[0] + logs[1]
