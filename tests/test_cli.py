"""The `ppdet-retina` dispatcher from a checkout (`python -m ppdet_retina.cli`); the installed command
itself runs end to end in test_wheel.py."""

import os
import subprocess
import sys

from ppdet_retina import cli

from conftest import REPO, tool_env


def test_no_command_prints_the_usage_and_fails(capsys):
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: ppdet-retina <command> [flags]")
    assert "  export     export for Paddle Inference (and ONNX) (tools/export_model.py)" in err.splitlines()
    assert cli.main(["--help"]) == 0 and capsys.readouterr().out.startswith("usage: ppdet-retina")


def test_every_command_names_a_module_and_a_tool_of_the_checkout():
    for name, command in cli.COMMANDS.items():
        assert os.path.isfile(os.path.join(REPO, "ppdet_retina", "cli", command.module + ".py")), name
        assert os.path.isfile(os.path.join(REPO, "tools", command.script)), name


def test_configs_lists_the_checkout_configs_without_base_pieces(capsys):
    assert cli.main(["configs"]) == 0
    listed = capsys.readouterr().out.split()
    assert "demo/retinanet_demo.yml" in listed and "retinanet/retinanet_r50_fpn_1x.yml" in listed
    assert not [p for p in listed if "_base_" in p]
    assert len(listed) == sum(f.endswith(".yml") for d, _, files in os.walk(os.path.join(REPO, "configs"))
                              if "_base_" not in d for f in files)


def test_demo_data_runs_in_process_and_names_itself(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["pytest"])
    out = str(tmp_path / "shapes")
    assert cli.main(["demo-data", "--output", out, "--num-train", "2", "--num-val", "1", "--size", "64"]) == 0
    assert sorted(os.listdir(os.path.join(out, "images"))) == ["train", "val"]
    assert len(os.listdir(os.path.join(out, "images", "train"))) == 2
    assert cli.main(["demo-data", "--bogus"]) == 2  # argparse's own exit status
    assert capsys.readouterr().err.startswith("usage: ppdet-retina demo-data ")


def test_module_form_gives_the_tools_errors_and_exit_status():
    proc = subprocess.run([sys.executable, "-m", "ppdet_retina.cli", "train", "-c", "no_such_config.yml"],
                          cwd=REPO, env=tool_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: config file 'no_such_config.yml' not found (also searched ")
