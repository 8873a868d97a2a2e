"""norm_type: sync_bn: one norm factory everywhere, SyncBatchNorm only with several GPU processes,
plain BatchNorm (one log line) otherwise, and the same weights either way."""

import os

import paddle
import pytest

from ppdet_retina.core.workspace import create, load_config
from ppdet_retina.io import checkpoint
from ppdet_retina.modeling.layers import SyncableBatchNorm, convert_sync_batchnorm, make_norm

from conftest import REPO, launch_two_ranks, write_tiny_config
from instrumented_tool import WEIGHTS_HASH_ENV

# Backbone, neck and head towers.
SYNC_BN = ["ResNet.norm_type=sync_bn", "FPN.norm_type=sync_bn", "RetinaHead.conv_feat.norm_type=sync_bn"]
PLAIN_BN = [item.replace("sync_bn", "bn") for item in SYNC_BN]


def _sync_cfg(tmp_path, tiny_coco, extra=()):
    return load_config(write_tiny_config(tmp_path, tiny_coco, epoch=1), SYNC_BN + list(extra))


def _types(model):
    return [type(layer).__name__ for layer in model.sublayers()
            if isinstance(layer, paddle.nn.layer.norm._BatchNormBase)]


def test_sync_bn_is_marked_everywhere_and_converts_in_place(tmp_path, tiny_coco):
    model = create("RetinaNet", _sync_cfg(tmp_path, tiny_coco))
    kinds = _types(model)
    # ResNet-18: 21 BN (stem 1, 16 block convs, 4 shortcuts), FPN: 3 lateral + 3 output + 2 extra, towers 2
    assert kinds == ["SyncableBatchNorm"] * len(kinds) and len(kinds) == 21 + 8 + 2
    before = model.state_dict()
    params = {n: p for n, p in model.named_parameters()}
    assert convert_sync_batchnorm(model, synchronise=True) == 31
    assert set(_types(model)) == {"SyncBatchNorm"}
    after = model.state_dict()
    assert list(after) == list(before)
    # The very same tensors: an optimizer built before the conversion keeps updating them.
    assert all(after[k] is before[k] for k in before)
    assert all(p is params[n] for n, p in model.named_parameters())

    # Weights of the synchronised model load into a plain-BN build and back.
    prefix = checkpoint.save_checkpoint(model, None, str(tmp_path / "w"), "sync")
    plain = create("RetinaNet", load_config(write_tiny_config(tmp_path, tiny_coco, epoch=1), PLAIN_BN))
    assert set(_types(plain)) == {"BatchNorm2D"}
    assert checkpoint.load_weights(plain, prefix)["loaded"] == len(before)
    assert checkpoint.load_weights(model, checkpoint.save_checkpoint(plain, None, str(tmp_path / "w"), "bn"))[
        "loaded"] == len(before)


def test_frozen_or_single_process_norms_stay_plain(tmp_path, tiny_coco, messages):
    assert type(make_norm("sync_bn", 4, freeze_norm=True)) is paddle.nn.BatchNorm2D  # frozen: nothing to sync
    assert type(make_norm("sync_bn", 4)) is SyncableBatchNorm
    model = create("RetinaNet", _sync_cfg(tmp_path, tiny_coco))
    assert convert_sync_batchnorm(model, synchronise=False) == 31
    assert set(_types(model)) == {"SyncableBatchNorm"}
    lines = [r.getMessage() for r in messages.records if "sync_bn" in r.getMessage()]
    assert lines == ["norm_type sync_bn: 31 norm layer(s) run as plain BatchNorm (synchronised batch norm "
                     "needs more than one GPU process)"]
    with pytest.raises(ValueError, match="norm_type 'syncbn'"):
        make_norm("syncbn", 4)


def test_top_level_sync_bn_converts_every_trainable_batchnorm(tmp_path, tiny_coco):
    """PaddleDetection's top-level ``norm_type: sync_bn`` synchronises the whole model's BN layers."""
    cfg = load_config(write_tiny_config(tmp_path, tiny_coco, epoch=1), ["FPN.norm_type=bn"])
    model = create("RetinaNet", cfg)
    assert convert_sync_batchnorm(model, synchronise=True) == 0
    assert convert_sync_batchnorm(model, synchronise=True, every_batchnorm=True) == 21 + 8
    frozen = create("ResNet", {"ResNet": {"depth": 18, "width_mult": 0.125, "freeze_norm": True}})
    assert convert_sync_batchnorm(frozen, synchronise=True, every_batchnorm=True) == 0


def test_two_cpu_processes_with_sync_bn_and_fleet_train_and_load(tmp_path, tiny_coco):
    """Under the launcher on CPU: plain BN with one log line, --fleet's collective data parallel keeps
    the ranks identical, and the snapshot loads into a model built with norm_type bn."""
    cfg = write_tiny_config(tmp_path, tiny_coco, epoch=1)
    hash_dir = str(tmp_path / "hash")
    proc, logs = launch_two_ranks(str(tmp_path / "log"), [
        os.path.join(REPO, "tests", "instrumented_tool.py"), os.path.join(REPO, "tools", "train.py"),
        "-c", cfg, "--fleet", "--seed", "5", "-o", *SYNC_BN],
        extra_env={WEIGHTS_HASH_ENV: hash_dir})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + str(logs)
    assert logs[0].count("norm_type sync_bn: 31 norm layer(s) run as plain BatchNorm") == 1
    assert "--fleet: collective data parallel over 2 processes" in logs[0]
    hashes = {r: open(os.path.join(hash_dir, f"rank{r}.sha256")).read() for r in (0, 1)}
    assert len(hashes[0]) == 64 and hashes[0] == hashes[1]

    plain = create("RetinaNet", load_config(cfg, PLAIN_BN))
    final = os.path.join(str(tmp_path), "output", "tiny_retina", "model_final")
    assert checkpoint.load_weights(plain, final)["loaded"] == len(plain.state_dict())
