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


# Top-level keys only these tests use; any other unknown top-level key is an error.
ws.register_top_level_keys({"_ws_list": "test", "_ws_other": "test", "_ws_schedulers": "test",
                            "_ws_name": "test", "_ws_nested": "test"})


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
        _ws_list: [1, 2, 3]
        _WsHead: {width: 4, nms: {name: _WsNms, keep_top_k: 50}}
    """)
    _write(tmp_path, "_base_/b.yml", """
        _BASE_: a.yml
        _ws_list: [9]
    """)
    path = _write(tmp_path, "top.yml", """
        _BASE_: ['_base_/b.yml']
        num_classes: 3
        _WsHead: {width: 16}
    """)
    cfg = load_config(path)
    assert cfg._ws_list == [9]
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
    cfg = load_config(_write(tmp_path, "e.yml", "_ws_other: 1\n"))
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
        _ws_schedulers:
        - !_WsTag {gamma: 0.5, milestones: [2, 3]}
        - !_WsTag {}
    """))
    first, second = cfg._ws_schedulers
    assert isinstance(first, _WsTag) and first.gamma == 0.5 and first.milestones == [2, 3]
    assert second.gamma == 0.1


def test_unknown_tag_names_the_tag(tmp_path):
    with pytest.raises(ConfigError, match="_WsTagg.*did you mean _WsTag"):
        load_config(_write(tmp_path, "c.yml", "s: !_WsTagg {}\n"))


def test_overrides_are_typed_like_yaml(tmp_path):
    path = _write(tmp_path, "c.yml", "use_gpu: true\nTrainReader: {batch_size: 2, shuffle: true}\n")
    cfg = load_config(path, ["use_gpu=false", "epoch=2", "TrainReader.batch_size=4", "_ws_name=abc",
                             "_ws_list=[1,2]", "_ws_nested.y.z=0.5"])
    assert cfg.use_gpu is False and cfg.epoch == 2 and cfg._ws_name == "abc" and cfg._ws_list == [1, 2]
    assert cfg.TrainReader == {"batch_size": 4, "shuffle": True}
    assert cfg._ws_nested.y.z == 0.5
    cfg = merge_config(["weights=out/model_final"], cfg)
    assert cfg.weights == "out/model_final"
    with pytest.raises(ConfigError, match="key=value"):
        merge_config(["oops"], cfg)


def test_unknown_component_suggests_close_names(tmp_path):
    cfg = load_config(_write(tmp_path, "c.yml", "_WsHead: {nms: _WsNsm}\n"))
    with pytest.raises(ConfigError, match=r"unknown component '_WsNsm'.*did you mean _WsNms"):
        create("_WsHead", cfg)


def test_unknown_key_names_component_and_valid_keys(tmp_path):
    with pytest.raises(ConfigError) as err:  # caught while loading, before anything is built
        load_config(_write(tmp_path, "c.yml", "_WsHead: {widht: 3}\n"))
    msg = str(err.value)
    assert "'widht'" in msg and "did you mean 'width'" in msg and "_WsHead" in msg
    assert "num_classes, nms, width" in msg


def test_missing_base_names_the_including_file(tmp_path):
    path = _write(tmp_path, "top.yml", "_BASE_: ['nope/missing.yml']\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (f"{path}: _BASE_ file 'nope/missing.yml' not found (looked for "
                              f"{tmp_path}/nope/missing.yml and for 'missing.yml' under {ws.shipped_configs_dir()})")


def test_copied_shipped_config_finds_its_base_among_the_shipped_configs(tmp_path):
    """A copy of the fine-tuning template (`_BASE_: ['retinanet_r50_fpn_1x.yml']`) made outside configs/, as a
    user of the installed package makes it, reads the shipped base; a base beside it still wins."""
    shipped = os.path.join(ws.shipped_configs_dir(), "retinanet", "retinanet_r50_fpn_finetune_mydata.yml")
    with open(shipped) as f:
        text = f.read()
    assert "_BASE_: ['retinanet_r50_fpn_1x.yml']" in text
    original, copy = dict(load_config(shipped)), dict(load_config(_write(tmp_path, "mine.yml", text)))
    assert copy.pop("config_path") != original.pop("config_path") and copy.pop("filename") == "mine"
    original.pop("filename")
    # The schedulers are objects (!Tags) without equality: compared by class and settings.
    tags = [[(type(t).__name__, vars(t)) for t in c.pop("LearningRate").pop("schedulers")] for c in (copy, original)]
    assert tags[0] == tags[1] and tags[0][0][0] == "PiecewiseDecay"
    assert copy == original and copy["RetinaHead"]["conv_feat"]["feat_in"] == 256

    _write(tmp_path, "retinanet_r50_fpn_1x.yml", "log_iter: 7\n")
    beside = load_config(str(tmp_path / "mine.yml"))
    assert beside["log_iter"] == 7 and "architecture" not in beside


def test_base_name_found_twice_among_the_shipped_configs_is_an_error(tmp_path):
    path = _write(tmp_path, "top.yml", "_BASE_: ['_base_/optimizer_1x.yml']\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    root = ws.shipped_configs_dir()
    assert str(err.value) == (
        f"{path}: _BASE_ file '_base_/optimizer_1x.yml' is not at {tmp_path}/_base_/optimizer_1x.yml, and "
        f"'optimizer_1x.yml' is ambiguous under {root}: {root}/faster_rcnn/_base_/optimizer_1x.yml, "
        f"{root}/retinanet/_base_/optimizer_1x.yml; give its path relative to {path}")


def test_two_configs_in_a_row_do_not_leak(tmp_path):
    first = load_config(_write(tmp_path, "a.yml", "_WsHead: {nms: {name: _WsNms, keep_top_k: 1}, width: 2}\n"))
    head_a = create("_WsHead", first)
    second = load_config(_write(tmp_path, "b.yml", "_ws_other: 0\n"))
    head_b = create("_WsHead", second)
    assert head_a.nms.keep_top_k == 1 and head_a.width == 2
    assert head_b.nms.keep_top_k == 100 and head_b.width == 8
    assert ws._REGISTRY["_WsHead"].defaults["nms"] == "_WsNms"


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


# --------------------------------------------------------------------------- typos and override types

def test_misspelt_section_and_top_level_key_are_errors_with_suggestions(tmp_path):
    path = _write(tmp_path, "c.yml", "epoch: 12\nTrainReader: {batch_size: 2}\nTrainReadr: {batch_size: 4}\n")
    with pytest.raises(ConfigError, match=r"'TrainReadr' from config .*c\.yml.*did you mean 'TrainReader'"):
        load_config(path)
    good = _write(tmp_path, "good.yml", "epoch: 12\n")
    with pytest.raises(ConfigError, match=r"'epochs' from -o \(did you mean 'epoch'"):
        load_config(good, ["epochs=3"])
    with pytest.raises(ConfigError, match=r"'_WsHeda' from -o \(did you mean '_WsHead'"):
        load_config(good, ["_WsHeda.width=3"])


def test_paddledetection_only_keys_and_named_sections_are_accepted(tmp_path):
    cfg = load_config(_write(tmp_path, "c.yml", """
        use_xpu: false
        print_flops: false
        use_ema: true
        _WsHead: {nms: MyNms}
        MyNms: {name: _WsNms, keep_top_k: 3}
    """))
    assert cfg.use_xpu is False and create("_WsHead", cfg).nms.keep_top_k == 3
    assert "use_xpu" in ws.PPDET_IGNORED_TOP_LEVEL_KEYS and "use_xpu" not in ws.KNOWN_TOP_LEVEL_KEYS


def test_register_top_level_keys_extends_the_known_set(tmp_path):
    path = _write(tmp_path, "c.yml", "_ws_registered_later: 0.5\n")
    with pytest.raises(ConfigError, match="_ws_registered_later"):
        load_config(path)
    ws.register_top_level_keys({"_ws_registered_later": "a key a test declares"})
    assert load_config(path)._ws_registered_later == 0.5


@pytest.mark.parametrize("item, value", [
    ("use_gpu=yes", True), ("use_gpu=0", False), ("use_gpu=FALSE", False), ("use_gpu=1", True),
    ("epoch=3", 3), ("_WsNms.score_threshold=1", 1.0), ("save_dir=007", "007"),
    ("pretrain_weights=", ""), ("_ws_list=[1]", [1]),
])
def test_overrides_take_the_type_of_the_key(tmp_path, item, value):
    path = _write(tmp_path, "c.yml", "use_gpu: true\nepoch: 12\nsave_dir: out\npretrain_weights: a.pdparams\n"
                                     "_ws_list: [0]\n")
    cfg = load_config(path, [item])
    key, _ = item.split("=", 1)
    got = cfg[key] if "." not in key else cfg[key.split(".")[0]][key.split(".")[1]]
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize("item, message", [
    ("use_gpu=maybe", r"'use_gpu' takes a boolean: true/false, yes/no, on/off, 1/0"),
    ("use_gpu=maybe", r"'use_gpu' takes a boolean"),
    ("epoch=2.5", r"-o epoch=2.5: 'epoch' takes an integer, got float 2.5"),
    ("epoch=twelve", r"'epoch' takes an integer, got str 'twelve'"),
    ("_WsHead.width=wide", r"'_WsHead.width' takes an integer"),        # the class default is an int
    ("num_classes=[3]", r"'num_classes' takes an integer, got list"),   # a __shared__ key's default
    ("_WsNms.score_threshold=high", r"'_WsNms.score_threshold' takes a number"),
    ("_ws_list=3", r"'_ws_list' takes a list"),
])
def test_overrides_of_the_wrong_type_name_the_key(tmp_path, item, message):
    path = _write(tmp_path, "c.yml", "use_gpu: true\nepoch: 12\n_ws_list: [0]\n")
    with pytest.raises(ConfigError, match=message):
        load_config(path, [item])


@register
class _WsWideHead(_WsHead):
    """A user's subclass: its own key, the parent's through **kwargs."""

    def __init__(self, depth: int = 2, width: int = 16, **kwargs):
        if depth < 1:
            raise ConfigError(f"_WsHead.depth must be >= 1, got {depth}")  # a check written against the parent
        super().__init__(width=width, **kwargs)
        self.depth = depth


def test_a_subclass_takes_its_parents_keys_shared_and_injected_from_its_own_section(tmp_path):
    spec = ws._REGISTRY["_WsWideHead"]
    assert spec.keys == ["depth", "width", "num_classes", "nms"]
    assert spec.shared == ["num_classes"] and spec.inject == ["nms"] and spec.defaults["width"] == 16
    cfg = load_config(_write(tmp_path, "c.yml", "num_classes: 5\n"
                                                "_WsWideHead: {depth: 3, nms: {keep_top_k: 7}}\n"))
    head = create("_WsWideHead", cfg)
    # num_classes from the top level (__shared__), nms built from a dict without name (__inject__,
    # the parent's default class), width the subclass's default.
    assert (head.num_classes, head.depth, head.width) == (5, 3, 16)
    assert isinstance(head.nms, _WsNms) and head.nms.keep_top_k == 7
    with pytest.raises(ConfigError, match=r"_WsWideHead: unknown config key 'widht' \(did you mean 'width'\?\) "
                                          r"for _WsWideHead; valid keys: depth, width, num_classes, nms"):
        create("_WsWideHead", {"_WsWideHead": {"widht": 3}})
    # Errors raised by checks written for the parent name the class the config built.
    with pytest.raises(ConfigError, match=r"^_WsWideHead\.depth must be >= 1, got 0$"):
        create("_WsWideHead", {"_WsWideHead": {"depth": 0}})


def test_a_subclass_of_an_unregistered_class_keeps_accepting_any_key():
    class Base:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    @register
    class _WsFreeForm(Base):
        def __init__(self, a: int = 1, **kwargs):
            super().__init__(**kwargs)
            self.a = a

    built = create("_WsFreeForm", {"_WsFreeForm": {"a": 2, "anything": 3}})
    assert built.a == 2 and built.kwargs == {"anything": 3}


def test_create_without_config_uses_class_defaults_not_the_last_loaded(tmp_path):
    load_config(_write(tmp_path, "c.yml", "num_classes: 3\n_WsHead: {width: 2, nms: {keep_top_k: 9}}\n"))
    head = create("_WsHead")
    assert (head.num_classes, head.width, head.nms.keep_top_k) == (80, 8, 100)
    # Inside a from_config hook a bare create reads the config being built from.
    arch = create("_WsArch", {"_WsArch": {"head": "_WsHead"}, "_WsHead": {"width": 5}})
    assert arch.head.width == 5


@register
class _WsBox:
    """A component whose PaddleDetection-only keys are declared once, and a subclass changing a default."""

    __shared__ = ["num_classes"]
    __inject__ = ["nms"]
    __ignored__ = {"trt": "TensorRT switch", "cpu": "device switch"}

    def __init__(self, num_classes: int = 80, nms=None, size: int = 4):
        self.num_classes = num_classes
        self.nms = ws.build_component(nms, "_WsNms", "_WsBox.nms")
        self.size = size


@register
class _WsSmallBox(_WsBox):
    def __init__(self, size: int = 2, **kwargs):
        super().__init__(size=size, **kwargs)


def test_ignored_keys_are_accepted_from_config_and_never_reach_the_constructor(tmp_path):
    cfg = load_config(_write(tmp_path, "c.yml", "_WsSmallBox: {trt: true, cpu: false, num_classes: 4}\n"))
    box = create("_WsSmallBox", cfg)
    assert (box.size, box.num_classes) == (2, 4)
    assert not hasattr(box, "trt") and not hasattr(box, "cpu")
    with pytest.raises(TypeError):  # plain Python: not a parameter at all
        _WsBox(trt=True)
    with pytest.raises(ConfigError, match=r"'trtt' \(did you mean 'trt'\?\).*accepted and ignored: trt, cpu"):
        load_config(_write(tmp_path, "d.yml", "_WsBox: {trtt: true}\n"))


def test_build_component_one_rule_for_plain_python(tmp_path):
    load_config(_write(tmp_path, "c.yml", "_WsNms: {keep_top_k: 1}\n"))  # must not leak into plain Python
    assert _WsBox().nms.keep_top_k == 100  # None -> the default class with its defaults
    assert _WsBox(nms="_WsNms").nms.keep_top_k == 100
    assert _WsBox(nms={"keep_top_k": 7}).nms.keep_top_k == 7
    built = _WsNms(0.9)
    assert _WsBox(nms=built).nms is built
    head = ws.build_component({"name": "_WsHead", "width": 3}, None, "x.head", shared={"num_classes": 6})
    assert (head.num_classes, head.width) == (6, 3)
    assert ws.build_component(None, None, "x.loss") is None
    with pytest.raises(ConfigError, match=r"unknown component '_WsNmz' \(in _WsBox.nms\)"):
        _WsBox(nms="_WsNmz")
    with pytest.raises(ConfigError, match="x.loss: give the component's class with 'name:'"):
        ws.build_component({"beta": 1.0}, None, "x.loss")
