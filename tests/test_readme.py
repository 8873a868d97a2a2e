"""Every command in README.md and docs/*.md is checked here, so the documentation cannot go stale.

Commands that need COCO or a GPU cannot run on a CI machine, so each `python tools/X.py ...` line is
parsed by that tool's own argument parser and its config resolved and loaded with its `-o`
overrides; `ppdet-retina <command> ...` lines (the installed package's spelling) by the same tool's
parser; `make` lines must name Makefile targets; launcher lines must use the launcher's flags.
Outside the command blocks, every `--flag` quoted in the text must be a flag of a tool or of the
launcher, every quoted repository path (`configs/...`, `tools/...`) and package name
(`ppdet_retina.openvino_runtime.multiclass_nms`) must exist, and every relative link must lead to a file. The tools themselves run end to end in test_tools.py, test_export.py and `make demo`.
"""

import argparse
import glob
import importlib
import importlib.util
import logging
import os
import re
import runpy
import shlex

import pytest

from ppdet_retina.cli import COMMANDS as CLI_COMMANDS
from ppdet_retina.core.workspace import ConfigError, load_config, resolve_config_path

from conftest import ppdet_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Flags of `python -m paddle.distributed.launch` that the pages use.
LAUNCH_FLAGS = {"--gpus", "--devices", "--nproc_per_node", "--ips", "--master", "--nnodes", "--log_level",
                "--log_dir"}
# Tools whose flags the pages may quote in their text.
TOOLS_WITH_FLAGS = ("train.py", "eval.py", "infer.py", "export_model.py", "deploy.py", "benchmark.py",
                    "benchmark_data.py", "bench_isolated.py", "make_demo_data.py", "demo.py")
README_MAX_LINES = 150


def _pages():
    """README.md first, then docs/*.md, as paths relative to the repository."""
    docs = sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md")))
    return ["README.md"] + docs


def _read(page):
    with open(os.path.join(REPO, page), encoding="utf-8") as f:
        return f.read()


def page_commands(page):
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", _read(page), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def _prose(page):
    """The page without its fenced blocks (commands are checked by test_documented_command)."""
    return re.sub(r"```.*?```", "", _read(page), flags=re.S)


def _inline_code(page):
    return re.findall(r"`([^`\n]+)`", _prose(page))


COMMANDS = [(page, command) for page in _pages() for command in page_commands(page)]


def test_readme_opens_with_the_two_commands():
    assert page_commands("README.md")[:2] == ["make demo", "make test"]


def test_readme_is_a_front_door_to_the_docs():
    lines = _read("README.md").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"
    # Every page under docs/ is reachable from the README.
    for page in _pages()[1:]:
        assert page in _read("README.md"), f"README.md does not mention {page}"


def _tool_parser(name):
    module = runpy.run_path(os.path.join(REPO, "tools", name), run_name="readme_check")
    if "parse_args" in module:
        return module["parse_args"]
    return module["build_parser"]().parse_args


class _Captured(Exception):
    def __init__(self, parser):
        super().__init__()
        self.parser = parser


def _tool_flags(name):
    """Option strings of tools/<name>'s parser, caught where the tool would parse its command line."""
    def capture(parser, *args, **kwargs):
        raise _Captured(parser)

    module = runpy.run_path(os.path.join(REPO, "tools", name), run_name="readme_check")
    with pytest.MonkeyPatch.context() as patch:
        # A tool's main() may quiet the package logger before it parses (benchmark_data.py does):
        # later tests in this process read that logger's messages.
        package_logger = logging.getLogger("ppdet_retina")
        patch.setattr(package_logger, "level", package_logger.level)
        patch.setattr(argparse.ArgumentParser, "parse_args", capture)
        patch.setattr(argparse.ArgumentParser, "parse_known_args", capture)
        try:
            if "parse_args" in module:
                module["parse_args"]([])
            elif "build_parser" in module:
                return set(module["build_parser"]()._option_string_actions)
            else:
                module["main"]()
        except _Captured as caught:
            return set(caught.parser._option_string_actions)
    raise AssertionError(f"tools/{name} parsed no command line")


def _config_path(path):
    """The pages show PaddleDetection's own config paths: found through tests/conftest.py's ppdet_config."""
    marker = "PaddleDetection/configs/"
    if path.startswith(marker):
        path = ppdet_config(path[len(marker):])
    in_repo = os.path.join(REPO, path)
    return in_repo if os.path.isfile(in_repo) else resolve_config_path(path)


def _check_tool_command(argv):
    tool = os.path.basename(argv[0])
    # Spelled out in full: argparse would also take a prefix, which a new flag can make ambiguous.
    flags = {a.split("=")[0] for a in argv[1:] if a.startswith("--")}
    assert flags <= _tool_flags(tool), (tool, sorted(flags - _tool_flags(tool)))
    args = _tool_parser(tool)(argv[1:])
    config = getattr(args, "config", None)
    if config:
        cfg = load_config(_config_path(config), list(getattr(args, "opt", None) or []))
        assert cfg.get("architecture") or cfg.get("TrainDataset")


def _check_package_module(argv, command):
    """`python -m ppdet_retina.<module> ...`: the module exists, and a `-c` config it is given is there."""
    assert importlib.util.find_spec(argv[2]) is not None, f"no module {argv[2]}: {command}"
    if "-c" in argv:
        assert os.path.isfile(_config_path(argv[argv.index("-c") + 1])), command


@pytest.mark.parametrize("page, command", COMMANDS, ids=[f"{p}: {c}" for p, c in COMMANDS])
def test_documented_command(page, command):
    _check_command(page, command)


def _check_command(page, command):
    argv = shlex.split(command)
    while argv and re.match(r"^[A-Z_]+=", argv[0]):  # VAR=value prefixes
        argv = argv[1:]
    if argv[0] == "make":
        with open(os.path.join(REPO, "Makefile"), encoding="utf-8") as f:
            targets = set(re.findall(r"^([\w-]+):", f.read(), flags=re.M))
        assert set(argv[1:]) <= targets, command
        return
    if argv[:2] in (["pip", "install"], ["git", "clone"]):
        return
    if argv[0] == "ppdet-retina":  # the installed command: the same tool as tools/<script>
        with open(os.path.join(REPO, "pyproject.toml"), encoding="utf-8") as f:
            assert re.search(r'^"?ppdet-retina"?\s*=', f.read(), flags=re.M), "no ppdet-retina console script"
        assert len(argv) > 1 and (argv[1] in CLI_COMMANDS or argv[1] == "configs"), command
        if argv[1] != "configs":
            _check_tool_command([os.path.join("tools", CLI_COMMANDS[argv[1]].script)] + argv[2:])
        return
    assert argv[0] == "python", f"unexpected command in {page}: {command}"
    if argv[1] == "-m" and argv[2].startswith("ppdet_retina."):
        _check_package_module(argv, command)
        return
    if argv[1:3] == ["-m", "paddle.distributed.launch"]:
        tool_at = next(i for i, a in enumerate(argv) if a.startswith("tools/") or a == "ppdet-retina")
        for flag in argv[3:tool_at]:
            if flag.startswith("--"):
                assert flag.split("=")[0] in LAUNCH_FLAGS, (flag, command)
        if argv[tool_at] == "ppdet-retina":
            _check_command(page, shlex.join(argv[tool_at:]))
            return
        argv = ["python"] + argv[tool_at:]
    assert argv[1].startswith("tools/") and os.path.isfile(os.path.join(REPO, argv[1])), command
    _check_tool_command(argv[1:])


# ----------------------------------------------------------------------------- the text around the commands

@pytest.fixture(scope="module")
def known_flags():
    flags = set(LAUNCH_FLAGS)
    for tool in TOOLS_WITH_FLAGS:
        flags |= _tool_flags(tool)
    # The plugin runner's own flags: the words its main() compares argv[0] with.
    with open(os.path.join(REPO, "ppdet_retina", "ppdet_plugin.py"), encoding="utf-8") as f:
        flags |= set(re.findall(r'argv\[0\] == "(--[\w-]+)"', f.read()))
    return flags


@pytest.mark.parametrize("page", _pages())
def test_flags_in_the_text_exist(page, known_flags):
    quoted = {m.split("=")[0] for code in _inline_code(page) for m in re.findall(r"(?<![\w-])--[\w-]+", code)}
    assert quoted - known_flags == set(), f"{page} quotes flags no tool has"


@pytest.mark.parametrize("page", _pages())
def test_paths_in_the_text_exist(page):
    paths = {code for code in _inline_code(page) if re.fullmatch(r"(configs|tools|docs|ppdet_retina)/[\w./-]*", code)}
    missing = sorted(p for p in paths if not os.path.exists(os.path.join(REPO, p)))
    assert missing == [], f"{page} names paths that do not exist"
    # Relative links (and pictures) lead to files.
    base = os.path.dirname(os.path.join(REPO, page))
    links = [t for t in re.findall(r"\]\(([^)\s]+)\)", _prose(page)) if not re.match(r"\w+://", t)]
    broken = [t for t in links if not os.path.exists(os.path.join(base, t.split("#")[0]))]
    assert broken == [], f"{page} links to files that do not exist"


def _resolves(dotted):
    """Whether ``ppdet_retina.a.b.name`` is a module, or an attribute of the longest module prefix."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        module = ".".join(parts[:cut])
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if found:
            obj = importlib.import_module(module)
            for name in parts[cut:]:
                if not hasattr(obj, name):
                    return False
                obj = getattr(obj, name)
            return True
    return False


@pytest.mark.parametrize("page", _pages())
def test_package_names_in_the_text_exist(page):
    names = {m for code in _inline_code(page) for m in re.findall(r"\bppdet_retina(?:\.\w+)+", code)}
    assert sorted(n for n in names if not _resolves(n)) == [], f"{page} names modules or functions that do not exist"


def test_the_checks_see_the_pages():
    # A regex that stopped matching would pass every check above on nothing.
    assert len(COMMANDS) >= 40 and {p for p, _ in COMMANDS} >= {"README.md", "docs/training.md",
                                                               "docs/evaluation_and_deployment.md",
                                                               "docs/configs.md", "docs/benchmarks.md"}
    assert "--engine dygraph" in _inline_code("docs/evaluation_and_deployment.md")
    assert "configs/retinanet/retinanet_r50_fpn_finetune_mydata.yml" in _inline_code("docs/training.md")
    assert _resolves("ppdet_retina.openvino_runtime.multiclass_nms") and not _resolves("ppdet_retina.openvino_runtime.nms3")


def test_installed_command_lines_are_checked_like_the_tools():
    """The README's `ppdet-retina` lines go through the tool's parser and config loading, so a wrong
    subcommand, flag or config name in one fails."""
    _check_command("README.md", "ppdet-retina train -c retinanet_r50_fpn_1x.yml --eval -o use_gpu=false")
    _check_command("README.md", "ppdet-retina export -c retinanet_demo.yml -o weights=output/retinanet_demo/model_final")
    _check_command("README.md", "ppdet-retina configs")
    _check_command("README.md", "python -m paddle.distributed.launch --nproc_per_node 2 ppdet-retina train "
                        "-c retinanet_r50_fpn_1x.yml --eval")
    with pytest.raises(AssertionError, match="--nproc"):
        _check_command("README.md", "python -m paddle.distributed.launch --nproc 2 ppdet-retina train -c retinanet_demo.yml")
    with pytest.raises(AssertionError, match="ppdet-retina evaluate"):
        _check_command("README.md", "ppdet-retina evaluate -c retinanet_r50_fpn_1x.yml")
    with pytest.raises(AssertionError, match="--no_such_flag"):
        _check_command("README.md", "ppdet-retina infer -c retinanet_r50_fpn_1x.yml --no_such_flag")
    with pytest.raises(ConfigError, match="no_such_config"):
        _check_command("README.md", "ppdet-retina train -c no_such_config.yml")


# ----------------------------------------------------------------------------- the custom component example

def _custom_component_example():
    """docs/configs.md's python and yaml blocks after 'Your own component', each with its file name
    (their first line, a comment)."""
    text = _read(os.path.join("docs", "configs.md"))
    section = text[text.index("Your own component, without forking"):]
    blocks = []
    for lang in ("python", "yaml"):
        code = re.search(rf"```{lang}\n(.*?)```", section, flags=re.S).group(1)
        name = re.match(r"# ([\w/.]+)", code).group(1)
        blocks.append((name, code))
    return blocks


def test_custom_component_example_runs(tmp_path, monkeypatch):
    import numpy as np
    import paddle

    from ppdet_retina.core.workspace import ConfigError, create

    (module_path, module_code), (config_name, config_text) = _custom_component_example()
    assert module_path == "my_pkg/my_head.py" and config_name == "my_retina.yml"
    (tmp_path / "my_pkg").mkdir()
    (tmp_path / module_path).write_text(module_code)
    (tmp_path / config_name).write_text(config_text)
    os.symlink(os.path.join(REPO, "configs"), tmp_path / "configs")  # the example sits beside tools/ and configs/
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)

    cfg = load_config(config_name)
    paddle.seed(0)
    model = create(cfg["architecture"], cfg)
    head = model.head
    assert type(head).__name__ == "TemperedRetinaHead"
    # Its own key, the parent's keys from its own section and num_classes from the demo's top level.
    assert head.temperature.numpy().tolist() == [2.0] and head.conv_feat.feat_in == 64 and head.num_classes == 3
    assert list(head.anchor_generator.strides) == [8.0, 16.0, 32.0]

    rng = np.random.RandomState(0)
    batch = {"image": paddle.to_tensor(rng.randn(2, 3, 128, 128).astype("float32")),
             "im_shape": paddle.to_tensor([[128.0, 128.0]] * 2), "scale_factor": paddle.to_tensor([[1.0, 1.0]] * 2),
             "gt_bbox": paddle.to_tensor([[[10, 12, 40, 50]], [[30, 20, 90, 76]]], dtype="float32"),
             "gt_class": paddle.to_tensor([[[0]], [[2]]], dtype="int32")}
    model.train()
    losses = model(batch)
    assert np.isfinite(float(losses["loss"])) and float(losses["loss"]) > 0
    losses["loss"].backward()
    assert head.temperature.grad is not None  # the new parameter trains
    model.eval()
    with paddle.no_grad():
        out = model(batch)
    assert out["bbox"].shape[1] == 6 and out["bbox_num"].shape == [2]
    # A mistake in the section names the class the config built, not its parent.
    with pytest.raises(ConfigError, match=r"^TemperedRetinaHead\.nms_pre must be >= 1"):
        create("TemperedRetinaHead", {**cfg, "TemperedRetinaHead": {**cfg["TemperedRetinaHead"], "nms_pre": 0}})
