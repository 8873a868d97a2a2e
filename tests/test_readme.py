"""Every command in README.md is checked here, so the README cannot go stale.

Commands that need COCO or a GPU cannot run on a CI machine, so each `python tools/X.py ...` line is
parsed by that tool's own argument parser and its config resolved and loaded with its `-o`
overrides (`ppdet-retina <command> ...` lines, the installed package's spelling, by the same tool's
parser); `make` lines must name Makefile targets; launcher lines must use the launcher's flags.
The tools themselves run end to end in test_tools.py, test_export.py and `make demo`.
"""

import os
import re
import runpy
import shlex

import pytest

from ppdet_retina.cli import COMMANDS as CLI_COMMANDS
from ppdet_retina.core.workspace import ConfigError, load_config, resolve_config_path

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
    if argv[0] == "python" and argv[1:3] == ["-m", "paddle.distributed.launch"]:
        tool_at = next(i for i, a in enumerate(argv) if a.startswith("tools/") or a == "ppdet-retina")
        for flag in argv[3:tool_at]:
            if flag.startswith("--"):
                assert flag.split("=")[0] in LAUNCH_FLAGS, (flag, command)
        argv = argv[tool_at:] if argv[tool_at] == "ppdet-retina" else ["python"] + argv[tool_at:]
    if argv[0] == "ppdet-retina":  # the installed command: the same tool as tools/<script>
        assert len(argv) > 1 and (argv[1] in CLI_COMMANDS or argv[1] == "configs"), command
        if argv[1] != "configs":
            _check_tool_command([os.path.join("tools", CLI_COMMANDS[argv[1]].script)] + argv[2:])
        return
    assert argv[0] == "python", f"unexpected README command: {command}"
    assert argv[1].startswith("tools/") and os.path.isfile(os.path.join(REPO, argv[1])), command
    _check_tool_command(argv[1:])


def test_installed_command_lines_are_checked_like_the_tools():
    """The README's `ppdet-retina` lines go through the tool's parser and config loading, so a wrong
    subcommand, flag or config name in one fails."""
    test_readme_command("ppdet-retina train -c retinanet_r50_fpn_1x.yml --eval -o use_gpu=false")
    test_readme_command("ppdet-retina export -c retinanet_demo.yml -o weights=output/retinanet_demo/model_final")
    test_readme_command("ppdet-retina configs")
    test_readme_command("python -m paddle.distributed.launch --nproc_per_node 2 ppdet-retina train "
                        "-c retinanet_r50_fpn_1x.yml --eval")
    with pytest.raises(AssertionError, match="--nproc"):
        test_readme_command("python -m paddle.distributed.launch --nproc 2 ppdet-retina train -c retinanet_demo.yml")
    with pytest.raises(AssertionError, match="ppdet-retina evaluate"):
        test_readme_command("ppdet-retina evaluate -c retinanet_r50_fpn_1x.yml")
    with pytest.raises(SystemExit):  # argparse: unrecognized arguments
        test_readme_command("ppdet-retina infer -c retinanet_r50_fpn_1x.yml --no_such_flag")
    with pytest.raises(ConfigError, match="no_such_config"):
        test_readme_command("ppdet-retina train -c no_such_config.yml")


# ----------------------------------------------------------------------------- the custom component example

def _custom_component_example():
    """The README's python and yaml blocks after 'Your own component', each with its file name
    (their first line, a comment)."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        text = f.read()
    section = text[text.index("Your own component, without forking"):]
    blocks = []
    for lang in ("python", "yaml"):
        code = re.search(rf"```{lang}\n(.*?)```", section, flags=re.S).group(1)
        name = re.match(r"# ([\w/.]+)", code).group(1)
        blocks.append((name, code))
    return blocks


def test_readme_custom_component_example_runs(tmp_path, monkeypatch):
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
