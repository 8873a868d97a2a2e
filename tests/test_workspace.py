"""The config system: _BASE_, __shared__, __inject__, tags, overrides, errors, isolation."""

import os
import textwrap

import pytest

from ppdet_retina.core import workspace as ws
from ppdet_retina.core.workspace import ConfigError, create, load_config, merge_config, register, serializable

from conftest import ppdet_config


@register
class _WsNms:
    def __init__(self, score_threshold: float = 0.05, keep_top_k: int = 100):
        self.score_threshold = score_threshold
        self.keep_top_k = keep_top_k


@register
class _WsHead:
    __shared__ = ["num_classes"]
    __inject__ = ["nms"]

    def __init__(self, num_classes: int = 80, nms="_WsNms", width: int = 8):
        self.num_classes = num_classes
        self.nms = nms
        self.width = width


@register
class _WsArch:
    def __init__(self, head, in_channels: int = 0):
        self.head = head
        self.in_channels = in_channels

    @classmethod
    def from_config(cls, cfg, input_channels: int = 3):
        return {"head": create(cfg["head"]), "in_channels": input_channels}


@serializable
class _WsTag:
    def __init__(self, gamma: float = 0.1, milestones=(8, 11)):
        self.gamma = gamma
        self.milestones = list(milestones)


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_base_inheritance_merges_dicts_and_replaces_lists(tmp_path):
    _write(tmp_path, "_base_/a.yml", """
        num_classes: 80
        lst: [1, 2, 3]
        _WsHead: {width: 4, nms: {name: _WsNms, keep_top_k: 50}}
    """)
    _write(tmp_path, "_base_/b.yml", """
        _BASE_: a.yml
        lst: [9]
    """)
    path = _write(tmp_path, "top.yml", """
        _BASE_: ['_base_/b.yml']
        num_classes: 3
        _WsHead: {width: 16}
    """)
    cfg = load_config(path)
    assert cfg.lst == [9]
    assert cfg._WsHead == {"width": 16, "nms": {"name": "_WsNms", "keep_top_k": 50}}
    head = create("_WsHead", cfg)
    assert head.num_classes == 3  # __shared__ from the top-level key
    assert head.width == 16
    assert isinstance(head.nms, _WsNms) and head.nms.keep_top_k == 50
    assert cfg.filename == "top"


def test_shared_key_own_section_wins_then_top_level_then_default(tmp_path):
    cfg = load_config(_write(tmp_path, "c.yml", "_WsHead: {num_classes: 7}\nnum_classes: 5\n"))
    assert create("_WsHead", cfg).num_classes == 7
    cfg = load_config(_write(tmp_path, "d.yml", "num_classes: 5\n"))
    assert create("_WsHead", cfg).num_classes == 5
    cfg = load_config(_write(tmp_path, "e.yml", "other: 1\n"))
    assert create("_WsHead", cfg).num_classes == 80


def test_inject_by_name_reads_that_section(tmp_path):
    cfg = load_config(_write(tmp_path, "c.yml", "_WsHead: {nms: _WsNms}\n_WsNms: {score_threshold: 0.3}\n"))
    assert create("_WsHead", cfg).nms.score_threshold == 0.3


def test_inject_dict_without_name_uses_default_class(tmp_path):
    cfg = load_config(_write(tmp_path, "c.yml", "_WsHead: {nms: {keep_top_k: 7}}\n"))
    nms = create("_WsHead", cfg).nms
    assert isinstance(nms, _WsNms) and nms.keep_top_k == 7


def test_inject_built_object_and_from_config(tmp_path):
    cfg = load_config(_write(tmp_path, "c.yml", "_WsArch: {head: _WsHead}\n"))
    arch = create("_WsArch", cfg, input_channels=5)
    assert isinstance(arch.head, _WsHead) and arch.in_channels == 5
    obj = _WsNms(0.9)
    assert create("_WsHead", cfg, nms=obj).nms is obj


def test_tags_build_serializable_objects(tmp_path):
    cfg = load_config(_write(tmp_path, "c.yml", """
        schedulers:
        - !_WsTag {gamma: 0.5, milestones: [2, 3]}
        - !_WsTag {}
    """))
    first, second = cfg.schedulers
    assert isinstance(first, _WsTag) and first.gamma == 0.5 and first.milestones == [2, 3]
    assert second.gamma == 0.1


def test_unknown_tag_names_the_tag(tmp_path):
    with pytest.raises(ConfigError, match="_WsTagg.*did you mean _WsTag"):
        load_config(_write(tmp_path, "c.yml", "s: !_WsTagg {}\n"))


def test_overrides_are_typed_like_yaml(tmp_path):
    path = _write(tmp_path, "c.yml", "use_gpu: true\nTrainReader: {batch_size: 2, shuffle: true}\n")
    cfg = load_config(path, ["use_gpu=false", "epoch=2", "TrainReader.batch_size=4", "name=abc",
                             "lst=[1,2]", "x.y.z=0.5"])
    assert cfg.use_gpu is False and cfg.epoch == 2 and cfg.name == "abc" and cfg.lst == [1, 2]
    assert cfg.TrainReader == {"batch_size": 4, "shuffle": True}
    assert cfg.x.y.z == 0.5
    cfg = merge_config(["weights=out/model_final"], cfg)
    assert cfg.weights == "out/model_final"
    with pytest.raises(ConfigError, match="key=value"):
        merge_config(["oops"], cfg)


def test_unknown_component_suggests_close_names(tmp_path):
    cfg = load_config(_write(tmp_path, "c.yml", "_WsHead: {nms: _WsNsm}\n"))
    with pytest.raises(ConfigError, match=r"unknown component '_WsNsm'.*did you mean _WsNms"):
        create("_WsHead", cfg)


def test_unknown_key_names_component_and_valid_keys(tmp_path):
    cfg = load_config(_write(tmp_path, "c.yml", "_WsHead: {widht: 3}\n"))
    with pytest.raises(ConfigError) as err:
        create("_WsHead", cfg)
    msg = str(err.value)
    assert "'widht'" in msg and "did you mean 'width'" in msg and "_WsHead" in msg
    assert "num_classes, nms, width" in msg


def test_missing_base_names_the_including_file(tmp_path):
    path = _write(tmp_path, "top.yml", "_BASE_: ['nope/missing.yml']\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "top.yml" in str(err.value) and "nope/missing.yml" in str(err.value)


def test_two_configs_in_a_row_do_not_leak(tmp_path):
    first = load_config(_write(tmp_path, "a.yml", "_WsHead: {nms: {name: _WsNms, keep_top_k: 1}, width: 2}\n"))
    head_a = create("_WsHead", first)
    second = load_config(_write(tmp_path, "b.yml", "other: 0\n"))
    head_b = create("_WsHead", second)
    assert head_a.nms.keep_top_k == 1 and head_a.width == 2
    assert head_b.nms.keep_top_k == 100 and head_b.width == 8
    assert ws._REGISTRY["_WsHead"].defaults["nms"] == "_WsNms"
    assert ws.get_config() is second


def test_custom_imports_register_user_components(tmp_path, monkeypatch):
    pkg = tmp_path / "userpkg_ws"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "my_head.py").write_text(textwrap.dedent("""
        from ppdet_retina.core.workspace import register

        @register
        class UserHeadForWsTest:
            def __init__(self, depth: int = 1):
                self.depth = depth
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = load_config(_write(tmp_path, "c.yml", "custom_imports: [userpkg_ws.my_head]\n"
                                                "UserHeadForWsTest: {depth: 4}\n"))
    assert create("UserHeadForWsTest", cfg).depth == 4
    with pytest.raises(ConfigError, match="custom_imports.*no_such_module_xyz"):
        load_config(_write(tmp_path, "d.yml", "custom_imports: [no_such_module_xyz]\n"))


def test_bare_config_name_is_found_under_configs(tmp_path):
    root = tmp_path / "configs"
    _write(root, "retinanet/my_model.yml", "epoch: 1\n")
    assert ws.resolve_config_path("my_model.yml", str(root)).endswith("retinanet/my_model.yml")
    assert ws.resolve_config_path("my_model", str(root)).endswith("retinanet/my_model.yml")
    with pytest.raises(ConfigError, match="not found"):
        ws.resolve_config_path("absent.yml", str(root))


def test_project_config_found_by_bare_name():
    path = ws.resolve_config_path("retinanet_r50_fpn_1x.yml")
    assert path.replace(os.sep, "/").endswith("configs/retinanet/retinanet_r50_fpn_1x.yml")


def test_reference_ppdet_configs_parse():
    for rel in ["retinanet/retinanet_r50_fpn_1x_coco.yml", "retinanet/retinanet_r101_fpn_2x_coco.yml",
                "faster_rcnn/faster_rcnn_r50_fpn_1x_coco.yml"]:
        cfg = load_config(ppdet_config(rel))
        assert cfg.num_classes == 80 and cfg.TrainDataset["name"] == "COCODataSet"
        assert len(cfg.LearningRate["schedulers"]) == 2


def test_from_config_builds_children_from_the_config_given_to_create(tmp_path):
    other = load_config(_write(tmp_path, "other.yml", "_WsArch: {head: _WsHead}\n_WsHead: {width: 77}\n"))
    load_config(_write(tmp_path, "global.yml", "_WsHead: {width: 1}\n"))
    arch = create("_WsArch", other)
    assert arch.head.width == 77
