"""Resuming: -r auto, committed checkpoints only, another batch size continues the schedule by epoch."""

import json
import logging
import math
import os

import paddle
import pytest

from ppdet_retina.core.workspace import load_config
from ppdet_retina.io import checkpoint
from ppdet_retina.training.trainer import Trainer

from conftest import write_tiny_config

# No warm-up; a cosine over 4 epochs has a different LR at every epoch, so a schedule resumed at
# the wrong point shows.
_COSINE = {"LearningRate": {"base_lr": 0.01, "schedulers": [{"name": "CosineDecay", "max_epochs": 4,
                                                               "use_warmup": False}]}}


def _cfg(path, **overrides):
    return load_config(path, dict(_COSINE, **overrides))


def _log(out):
    with open(os.path.join(out, "train_log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_resume_with_another_batch_size_continues_by_epoch(tmp_path, tiny_coco, messages):
    path = write_tiny_config(tmp_path, tiny_coco)
    # 3 training images: batch 1 gives 3 steps per epoch, batch 2 (drop_last) gives 1.
    first = Trainer(_cfg(path, epoch=2, TrainReader={"batch_size": 1}), mode="train")
    assert len(first.loader) == 3
    first.train()
    assert first.lr.last_epoch == 6
    extra = paddle.load(os.path.join(first.output_dir, "model_final.pdopt"))[checkpoint.EXTRA_KEY]
    assert (extra["world_size"], extra["batch_size"], extra["steps_per_epoch"]) == (1, 1, 3)

    resumed = Trainer(_cfg(path, epoch=4, TrainReader={"batch_size": 2}), mode="train")
    assert resumed.resume_weights("auto") is True
    assert resumed.start_epoch == 2
    # Epoch 2 of this run's loader is iteration 2 (not 6, where the cosine has already ended).
    assert resumed.lr.last_epoch == 2
    assert resumed.lr.get_lr() == pytest.approx(0.01 * 0.5 * (1 + math.cos(math.pi * 2 / 4)))
    # ... which is what an uninterrupted run with batch 2 has at epoch 2.
    uninterrupted = Trainer(_cfg(path, epoch=4, TrainReader={"batch_size": 2}), mode="train").lr
    uninterrupted.last_epoch = 2 * 1
    assert resumed.lr.get_lr() == pytest.approx(uninterrupted.get_lr())
    said = "\n".join(r.getMessage() for r in messages.records if r.levelno == logging.WARNING)
    assert "saved by a run with 1 process(es) x 1 image(s), 3 steps per epoch" in said
    assert "this run has 1 process(es) x 2 image(s), 1 steps per epoch" in said
    assert "iteration 2 (not 6)" in said and "-o TrainReader.batch_size=1" in said

    resumed.train()
    tail = [(r["epoch"], r["iter"], r["step"]) for r in _log(resumed.output_dir)[-2:]]
    assert tail == [(2, 0, 2), (3, 0, 3)]  # one step per epoch now
    assert [r["lr"] for r in _log(resumed.output_dir)[-2:]] == pytest.approx(
        [0.005, 0.01 * 0.5 * (1 + math.cos(math.pi * 3 / 4))])
    extra = paddle.load(os.path.join(resumed.output_dir, "model_final.pdopt"))[checkpoint.EXTRA_KEY]
    assert (extra["epoch"], extra["batch_size"], extra["steps_per_epoch"], extra["lr_step"]) == (4, 2, 1, 4)

    # Batch 3 has the same steps per epoch: the schedule stays where it was, and the log still says so.
    messages.clear()
    third = Trainer(_cfg(path, epoch=5, TrainReader={"batch_size": 3}), mode="train")
    third.resume_weights("auto")
    assert third.lr.last_epoch == 4
    said = "\n".join(r.getMessage() for r in messages.records if r.levelno == logging.WARNING)
    assert "saved by a run with 1 process(es) x 2 image(s), 1 steps per epoch" in said
    assert "this run has 1 process(es) x 3 image(s)" in said and "iteration 4, lr" in said


def test_auto_resume_takes_the_newest_committed_checkpoint(tmp_path, tiny_coco, messages):
    path = write_tiny_config(tmp_path, tiny_coco, epoch=3)
    fresh = Trainer(load_config(path), mode="train")
    assert fresh.resume_weights("auto") is False  # nothing saved yet: a fresh start
    fresh.train()
    out = fresh.output_dir
    assert sorted(os.listdir(out)) == sorted(f"{n}{s}" for n in ("0", "1", "model_final")
                                             for s in (".pdparams", ".pdopt", ".commit.json")) + ["train_log.jsonl"]
    assert checkpoint.find_latest_checkpoint(out) == (os.path.join(out, "model_final"), [])

    # A save killed between its renames leaves files without a commit record: never resumed from.
    os.remove(os.path.join(out, "model_final.commit.json"))
    with pytest.raises(ValueError, match="was not committed"):
        Trainer(load_config(path), mode="train").resume_weights(os.path.join(out, "model_final"))
    # A file that does not match its record (a copy of the wrong file) is refused too.
    with open(os.path.join(out, "1.pdopt"), "ab") as f:
        f.write(b"x")
    with pytest.raises(ValueError, match="1.pdopt' has .* bytes where its commit record says"):
        Trainer(load_config(path), mode="train").resume_weights(os.path.join(out, "1"))

    # A run killed while writing the log left half a line; -r auto resumes from epoch 0's checkpoint.
    with open(os.path.join(out, "train_log.jsonl"), "a") as f:
        f.write('{"type": "train", "epo')
    resumed = Trainer(load_config(path), mode="train")
    assert resumed.resume_weights("auto") is True
    assert resumed.start_epoch == 1
    said = "\n".join(r.getMessage() for r in messages.records)
    assert "skipped incomplete checkpoint(s) 1, model_final" in said
    assert f"resuming from {os.path.join(out, '0')}" in said
    resumed.train()
    assert [r["epoch"] for r in _log(out)] == [0, 1, 2, 1, 2]  # the partial line is gone
    assert checkpoint.read_commit(os.path.join(out, "model_final"))["epoch"] == 3


def test_fresh_run_into_a_used_folder_warns_and_appends(tmp_path, tiny_coco, messages):
    path = write_tiny_config(tmp_path, tiny_coco, epoch=1)
    older = Trainer(load_config(path, {"epoch": 3}), mode="train")
    older.train()  # leaves 1.pdparams of epoch 2 and model_final of epoch 3
    again = Trainer(load_config(path), mode="train")
    again.train()
    said = "\n".join(r.getMessage() for r in messages.records if r.levelno == logging.WARNING)
    assert "already holds checkpoints (0, 1, model_final) of an earlier run" in said and "-r auto" in said
    assert [r["epoch"] for r in _log(again.output_dir)] == [0, 1, 2, 0]
    # -r auto would take the newest commit (this run's model_final), not the older run's epoch 2.
    newest, _ = checkpoint.find_latest_checkpoint(again.output_dir)
    assert newest.endswith("model_final") and checkpoint.read_commit(newest)["epoch"] == 1
