"""Training hooks (docs/hooks.md): a user's hook from a config runs through tools/train.py, a Python hook
sees every point of the loop in order, and a config naming something that is not a hook is refused."""

import json
import os
import re

import pytest

from conftest import REPO, run_tool, write_tiny_config
from ppdet_retina.core.workspace import ConfigError, load_config
from ppdet_retina.training.hooks import Hook
from ppdet_retina.training.trainer import Trainer


def _docs_hook_code() -> str:
    with open(os.path.join(REPO, "docs", "hooks.md"), encoding="utf-8") as f:
        text = f.read()
    return re.search(r"```python\n(.*?)```", text, re.S).group(1)


def test_the_docs_hook_runs_from_a_config_through_train_py(tmp_path, tiny_coco):
    (tmp_path / "step_counter.py").write_text(_docs_hook_code())
    cfg = write_tiny_config(tmp_path, tiny_coco, epoch=2, batch_size=1)
    steps_file = tmp_path / "steps.json"
    with open(cfg, "a") as f:
        f.write(f"custom_imports: [step_counter]\nhooks:\n  - {{name: StepCounter, path: '{steps_file}'}}\n")
    path = os.pathsep.join([str(tmp_path), REPO, os.environ.get("PYTHONPATH", "")])
    proc = run_tool("train.py", "-c", cfg, "-o", "log_iter=1", extra_env={"PYTHONPATH": path})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(steps_file) as f:
        seen = json.load(f)
    with open(tmp_path / "output" / "tiny_retina" / "train_log.jsonl") as f:
        records = [json.loads(line) for line in f if '"type": "train"' in line]
    # log_iter=1 logs every step, with a loss window of one step: the hook saw what the log shows.
    assert seen["steps"] == {"0": 3, "1": 3}  # 3 images with boxes, 1 per batch, 2 epochs
    assert [(r["epoch"], r["iter"]) for r in records] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert seen["last_loss"] == records[-1]["loss"]


class _Recorder(Hook):
    """Records the points it is called at."""

    priority = 60

    def __init__(self):
        self.calls = []

    def before_train(self, trainer):
        self.calls.append("before_train")

    def before_epoch(self, trainer, epoch):
        self.calls.append(f"before_epoch {epoch}")

    def before_step(self, trainer, epoch, it):
        self.calls.append(f"before_step {epoch}.{it}")

    def after_step(self, trainer, epoch, it, losses):
        self.calls.append(f"after_step {epoch}.{it} loss={'loss' in losses}")

    def after_epoch(self, trainer, epoch):
        self.calls.append(f"after_epoch {epoch}")

    def on_snapshot(self, trainer, epoch, last):
        # Runs after CheckpointHook (priority 30): this snapshot's files are already committed.
        saved = os.path.isfile(os.path.join(trainer.output_dir, ("model_final" if last else str(epoch)) + ".commit.json"))
        self.calls.append(f"on_snapshot {epoch} last={last} saved={saved}")

    def after_train(self, trainer):
        self.calls.append("after_train")


def test_a_python_hook_sees_every_point_in_order(tmp_path, tiny_coco):
    recorder = _Recorder()
    trainer = Trainer(load_config(write_tiny_config(tmp_path, tiny_coco, epoch=2, batch_size=1)), hooks=[recorder])
    assert [type(h).__name__ for h in trainer.hooks] == ["CheckpointHook", "LoggerHook", "_Recorder"]
    trainer.train()
    assert recorder.calls == [
        "before_train",
        "before_epoch 0", *[f"{p}_step 0.{i}" + (" loss=True" if p == "after" else "")
                            for i in range(3) for p in ("before", "after")],
        "after_epoch 0", "on_snapshot 0 last=False saved=True",
        "before_epoch 1", *[f"{p}_step 1.{i}" + (" loss=True" if p == "after" else "")
                            for i in range(3) for p in ("before", "after")],
        "after_epoch 1", "on_snapshot 1 last=True saved=True",
        "after_train"]


def test_a_config_hook_that_is_not_a_hook_is_refused(tmp_path, tiny_coco):
    cfg = load_config(write_tiny_config(tmp_path, tiny_coco, epoch=1), {"hooks": ["MultiClassNMS"]})
    with pytest.raises(ConfigError, match=r"hooks\[0\]: MultiClassNMS is not a ppdet_retina.training.hooks.Hook"):
        Trainer(cfg)
