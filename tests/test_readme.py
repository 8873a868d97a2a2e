"""Every command in README.md is checked here, so the README cannot go stale.

Commands that need COCO or a GPU cannot run on a CI machine, so each `python tools/X.py ...` line is
parsed by that tool's own argument parser and its config resolved and loaded with its `-o`
overrides; `make` lines must name Makefile targets; launcher lines must use the launcher's flags.
The tools themselves run end to end in test_tools.py, test_export.py and `make demo`.
"""

import os
import re
import runpy
import shlex

import pytest

from ppdet_retina.core.workspace import load_config, resolve_config_path

from conftest import ppdet_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Flags of `python -m paddle.distributed.launch` that the README uses.
LAUNCH_FLAGS = {"--gpus", "--devices", "--nproc_per_node", "--ips", "--master", "--nnodes", "--log_level",
                "--log_dir"}


def readme_commands():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        text = f.read()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


COMMANDS = readme_commands()


def test_readme_opens_with_the_two_commands():
    assert COMMANDS[:2] == ["make demo", "make test"]


def _tool_parser(name):
    module = runpy.run_path(os.path.join(REPO, "tools", name), run_name="readme_check")
    if "parse_args" in module:
        return module["parse_args"]
    return module["build_parser"]().parse_args


def _config_path(path):
    """The README shows PaddleDetection's own config paths: found through tests/conftest.py's ppdet_config."""
    marker = "PaddleDetection/configs/"
    if path.startswith(marker):
        path = ppdet_config(path[len(marker):])
    in_repo = os.path.join(REPO, path)
    return in_repo if os.path.isfile(in_repo) else resolve_config_path(path)


def _check_tool_command(argv):
    tool = os.path.basename(argv[0])
    args = _tool_parser(tool)(argv[1:])
    config = getattr(args, "config", None)
    if config:
        cfg = load_config(_config_path(config), list(getattr(args, "opt", None) or []))
        assert cfg.get("architecture") or cfg.get("TrainDataset")


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command(command):
    argv = shlex.split(command)
    if argv[0] == "make":
        with open(os.path.join(REPO, "Makefile"), encoding="utf-8") as f:
            targets = set(re.findall(r"^([\w-]+):", f.read(), flags=re.M))
        assert set(argv[1:]) <= targets, command
        return
    if argv[:2] == ["pip", "install"]:
        return
    assert argv[0] == "python", f"unexpected README command: {command}"
    if argv[1:3] == ["-m", "paddle.distributed.launch"]:
        tool_at = next(i for i, a in enumerate(argv) if a.startswith("tools/"))
        for flag in argv[3:tool_at]:
            if flag.startswith("--"):
                assert flag.split("=")[0] in LAUNCH_FLAGS, (flag, command)
        argv = ["python"] + argv[tool_at:]
    assert argv[1].startswith("tools/") and os.path.isfile(os.path.join(REPO, argv[1])), command
    _check_tool_command(argv[1:])
