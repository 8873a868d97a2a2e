"""Faults for real: kill -9 (at fixed training steps, and inside a save), a full disk, bad data on rank 1,
and two launchers acting as two nodes. Every run is a real tools/train.py process on a tiny config."""

import hashlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys

import paddle
import pytest

from ppdet_retina.core.workspace import load_config
from ppdet_retina.io import checkpoint
from ppdet_retina.core import env
from ppdet_retina.training.trainer import Trainer

from conftest import REPO, make_coco, tool_env, write_tiny_config
from instrumented_tool import SAVE_PAUSE_ENV, WEIGHTS_HASH_ENV, weights_digest

TRAIN = os.path.join(REPO, "tools", "train.py")
# Runs TRAIN with the test-only hooks its environment asks for (weights hash, a pause inside a save).
INSTRUMENTED = os.path.join(REPO, "tests", "instrumented_tool.py")
_ENV = tool_env({"PYTHONUNBUFFERED": "1"})
EPOCHS = 4  # of 3 steps each (3 training images, batch 1)
SEED = 1


@pytest.fixture(scope="module")
def run_setup(tmp_path_factory):
    """(config path, digest of the weights an uninterrupted run ends with)."""
    root = tmp_path_factory.mktemp("faults")
    cfg = write_tiny_config(root, make_coco(str(root / "tiny_coco")), epoch=EPOCHS, batch_size=1)
    env.set_random_seed(SEED)  # what --seed does in rank 0
    trainer = Trainer(load_config(cfg, {"save_dir": str(root / "uninterrupted")}), mode="train")
    trainer.train()
    return cfg, weights_digest(trainer.model)


def _train_cmd(cfg, save_dir, *args):
    return [sys.executable, INSTRUMENTED, TRAIN, "-c", cfg, "--seed", str(SEED), "-r", "auto", "-o", f"save_dir={save_dir}",
            *args]


def _finish(cfg, save_dir, tmp_path):
    """Run ``-r auto`` to the end; returns (its output, the digest of its final weights)."""
    hash_dir = str(tmp_path / "hash")
    proc = subprocess.run(_train_cmd(cfg, save_dir), capture_output=True, text=True, timeout=60, cwd=REPO,
                          env=dict(_ENV, **{WEIGHTS_HASH_ENV: hash_dir}))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(os.path.join(hash_dir, "rank0.sha256")) as f:
        return proc.stdout + proc.stderr, f.read()


def _start_and_kill_when(cfg, save_dir, marker, delay=0.0, extra_env=None):
    """Start a training, wait for an output line containing ``marker``, wait ``delay`` s, kill -9."""
    proc = subprocess.Popen(_train_cmd(cfg, save_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=REPO, env=dict(_ENV, **(extra_env or {})))
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if marker in line:
                break
        else:
            pytest.fail(f"'{marker}' never printed:\n" + "".join(seen[-30:]))
        if delay:
            try:
                proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                pass
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate()
    return "".join(seen)


def _assert_nothing_corrupt(out):
    """Every checkpoint committed and loadable, no temp file, every log line JSON, epochs all done."""
    names = sorted(os.listdir(out))
    assert not [n for n in names if n.startswith(".")], names
    latest, skipped = checkpoint.find_latest_checkpoint(out)
    assert skipped == [] and latest == os.path.join(out, "model_final")
    assert checkpoint.read_commit(latest)["epoch"] == EPOCHS
    for name in (n[:-len(".pdparams")] for n in names if n.endswith(".pdparams")):
        for suffix in (".pdparams", ".pdopt"):
            assert isinstance(paddle.load(os.path.join(out, name + suffix), return_numpy=True), dict)
    with open(os.path.join(out, "train_log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert {r["epoch"] for r in records} == set(range(EPOCHS))


# Runs tools/train.py (argv[1:]) in a process that kills itself with SIGKILL just before optimizer step
# $KILL_AT_STEP (counted from 1): the same moment on every run, whatever the machine's speed.
_KILL_AT_STEP = """
import os, runpy, signal, sys
import paddle

_step, _count = paddle.optimizer.Optimizer.step, [0]


def step(self, *args, **kwargs):
    _count[0] += 1
    if _count[0] == int(os.environ["KILL_AT_STEP"]):
        print(f"kill -9 before optimizer step {_count[0]}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    return _step(self, *args, **kwargs)


paddle.optimizer.Optimizer.step = step
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
STEPS_PER_EPOCH = 3


@pytest.mark.parametrize("step", [2, 4, 11])  # before the first save; just after one; late in the run
def test_kill_9_at_a_fixed_step_then_auto_resume_finishes(run_setup, tmp_path, step):
    cfg, want = run_setup
    save_dir = str(tmp_path / "out")
    out = os.path.join(save_dir, "tiny_retina")
    cmd = [sys.executable, "-c", _KILL_AT_STEP] + _train_cmd(cfg, save_dir)[1:]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=REPO,
                          env=dict(_ENV, KILL_AT_STEP=str(step)))
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"kill -9 before optimizer step {step}" in proc.stdout
    epochs_done = (step - 1) // STEPS_PER_EPOCH
    said, digest = _finish(cfg, save_dir, tmp_path)
    if epochs_done:
        assert f"-r auto: resuming from {os.path.join(out, str(epochs_done - 1))}," in said, said[-3000:]
    else:
        assert "-r auto: no complete checkpoint in" in said, said[-3000:]
    _assert_nothing_corrupt(out)
    # Resumed (or restarted) to the uninterrupted run's weights.
    assert digest == want, said[-3000:]


def test_kill_9_inside_a_save_resumes_from_the_previous_checkpoint(run_setup, tmp_path):
    cfg, want = run_setup
    save_dir = str(tmp_path / "out")
    out = os.path.join(save_dir, "tiny_retina")
    _start_and_kill_when(cfg, save_dir, "checkpoint '1': temp files written",
                         extra_env={SAVE_PAUSE_ENV: "1"})
    names = sorted(os.listdir(out))
    # Epoch 1's files were written in full under temp names but never committed.
    assert "1.pdparams" not in names and any(n.startswith(".1.pdopt.tmp") for n in names), names
    assert checkpoint.find_latest_checkpoint(out) == (os.path.join(out, "0"), [])
    said, digest = _finish(cfg, save_dir, tmp_path)
    assert f"-r auto: resuming from {os.path.join(out, '0')}" in said
    _assert_nothing_corrupt(out)
    assert digest == want


def _sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_full_disk_while_saving_is_a_clear_error_and_keeps_the_checkpoint(run_setup, tmp_path):
    cfg, _ = run_setup
    save_dir = str(tmp_path / "out")
    Trainer(load_config(cfg, {"save_dir": save_dir, "epoch": 1}), mode="train").train()
    out = os.path.join(save_dir, "tiny_retina")
    files = [os.path.join(out, "model_final" + s) for s in (".pdparams", ".pdopt", ".commit.json")]
    before = [_sha(f) for f in files]
    limit = os.path.getsize(files[0]) // 2  # room for the log, not for a checkpoint

    def limit_file_size():
        # Past the limit a write fails with EFBIG, as on a full disk (the signal would kill instead).
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run(_train_cmd(cfg, save_dir, "epoch=2"), capture_output=True, text=True, timeout=60,
                          cwd=REPO, env=_ENV, preexec_fn=limit_file_size)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: cannot save checkpoint '{os.path.join(out, 'model_final')}': File too large")
    assert "checkpoints already in" in error and "are intact" in error and "-r auto" in error
    assert "Traceback" not in proc.stderr
    assert [_sha(f) for f in files] == before
    assert not [n for n in os.listdir(out) if n.startswith(".")]
    assert checkpoint.find_latest_checkpoint(out) == (os.path.join(out, "model_final"), [])


def _launch(cfg, log_dir, *launch_args, extra_env=None):
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--log_level", "WARNING", "--log_dir", log_dir,
           *launch_args, INSTRUMENTED, TRAIN, "-c", cfg, "--seed", "3", "-r", "auto",  # every rank must agree on a fresh start
           "-o", "epoch=1", "TrainReader.batch_size=2"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            env=dict(_ENV, **(extra_env or {})))


def test_bad_data_on_rank_1_stops_every_rank_with_its_error(tmp_path):
    coco = make_coco(str(tmp_path / "tiny_coco"))
    # Two ranks, batch 2: rank 0 reads images 1 and 2, rank 1 reads image 5 (and 1 again as padding).
    with open(os.path.join(coco.image_root, "img_5.png"), "wb") as f:
        f.write(b"not a png")
    cfg = write_tiny_config(tmp_path, coco)
    proc = _launch(cfg, str(tmp_path / "log"), "--nproc_per_node", "2")
    shown, _ = proc.communicate(timeout=90)  # no rank may hang in a collective
    assert proc.returncode != 0
    # The launcher echoes rank 0's log: it names rank 1's broken file.
    assert "error: rank 1 of 2 failed: ValueError: " in shown, shown[-3000:]
    assert "img_5.png (image id 5)" in shown
    with open(tmp_path / "log" / "workerlog.1") as f:
        assert "img_5.png" in f.read()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_launchers_as_two_nodes_train_identical_weights(tmp_path, tiny_coco):
    cfg = write_tiny_config(tmp_path, tiny_coco)
    master = f"127.0.0.1:{_free_port()}"
    hash_dir = str(tmp_path / "hash")
    nodes = [_launch(cfg, str(tmp_path / f"log{n}"), "--master", master, "--nnodes", "2", "--nproc_per_node", "1",
                     extra_env={WEIGHTS_HASH_ENV: hash_dir}) for n in range(2)]
    outputs = [p.communicate(timeout=120)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    digests = []
    for rank in (0, 1):
        with open(os.path.join(hash_dir, f"rank{rank}.sha256")) as f:
            digests.append(f.read())
    assert len(digests[0]) == 64 and digests[0] == digests[1]
    assert checkpoint.read_commit(str(tmp_path / "output" / "tiny_retina" / "model_final"))["epoch"] == 1
