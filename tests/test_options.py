"""One declaration of a training option gives its config key, its tools/train.py flag and its place in
the export cache key (core/options.py)."""

import argparse

import pytest

from ppdet_retina.core.options import TRAINING_OPTIONS, TrainingOption, declare_training_options
from ppdet_retina.core.workspace import ConfigError, load_config
from ppdet_retina.inference import export_cache
from ppdet_retina.training.train_options import add_train_flags, flags_to_config

from conftest import write_tiny_config


@pytest.fixture
def declared():
    declare_training_options({"_opt_switch": TrainingOption("a test switch", flag="switch"),
                              "_opt_graph": TrainingOption("changes the graph", in_graph=True)})
    yield
    for key in ("_opt_switch", "_opt_graph"):  # later tests build tools/train.py's parser too
        TRAINING_OPTIONS.pop(key)


def test_a_declared_option_is_a_flag_a_config_key_and_outside_the_graph(declared, tmp_path, tiny_coco):
    parser = argparse.ArgumentParser()
    add_train_flags(parser)
    args = parser.parse_args(["--_opt_switch"])
    cfg = flags_to_config(load_config(write_tiny_config(tmp_path, tiny_coco), ["_opt_graph=3"]), args)
    assert cfg["_opt_switch"] is True and cfg["_opt_graph"] == 3
    graph = export_cache.graph_config(cfg)
    assert "_opt_switch" not in graph and graph["_opt_graph"] == 3
    assert "use_ema" not in export_cache.graph_config({**cfg, "use_ema": True})  # ema.py's declaration


def test_an_undeclared_key_is_still_refused(tmp_path, tiny_coco):
    with pytest.raises(ConfigError, match="_opt_never_declared"):
        load_config(write_tiny_config(tmp_path, tiny_coco), ["_opt_never_declared=1"])
