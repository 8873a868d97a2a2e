"""Evaluation on Paddle Inference must leave dygraph's CPU threads as training set them.

Paddle 3.3.1's predictor returns from each run with MKL (and Intel OpenMP) at one thread, so the
training steps after an evaluation ran their convolutions' GEMMs on one core. The thread count is
read from MKL itself (the library Paddle's CPU GEMMs run in).
"""

from __future__ import annotations

import ctypes
import os

import numpy as np
import paddle
import pytest

from ppdet_retina.core import env
from ppdet_retina.inference import engines as fast_engine
from ppdet_retina import runtime as rt

MKL = os.path.join(os.path.dirname(paddle.__file__), "libs", "libmklml_intel.so")


@pytest.fixture
def mkl_threads():
    if not os.path.isfile(MKL):
        pytest.skip(f"this Paddle build has no {MKL} to read MKL's thread count from")
    lib = ctypes.CDLL(MKL)
    return lib.MKL_Get_Max_Threads


def test_an_evaluation_on_paddle_inference_gives_training_its_threads_back(mkl_threads, tmp_path, monkeypatch):
    from conftest import make_coco, write_tiny_config
    from ppdet_retina.core.workspace import create, load_config

    monkeypatch.setenv(fast_engine.CACHE_ENV, str(tmp_path / "cache"))
    coco = make_coco(str(tmp_path / "coco"))
    cfg = load_config(write_tiny_config(tmp_path, coco))
    model = create("RetinaNet", cfg)
    batch = {"image": np.zeros((1, 3, 64, 64), np.float32), "im_shape": np.array([[64, 64]], np.float32),
             "scale_factor": np.ones((1, 2), np.float32)}
    # (conftest's autouse fixture puts the thread count back for the tests after this one)
    assert env.set_cpu_threads(2) == 2 and mkl_threads() == 2
    runner = fast_engine.inference_runner(model, cfg, "paddle_inference", threads=2)
    # The cause: the predictor's own run returns with MKL at one thread.
    rt.run(runner.predictor, batch)
    assert mkl_threads() == 1
    # The engine's call gives the threads back.
    out = runner(batch)
    assert out["bbox_num"].shape == [1] and mkl_threads() == 2
