"""The package as a user installs it: the wheel built from this checkout, installed into a fresh venv and
run from a folder outside the repository through the `ppdet-retina` command.

The venv sees the dependencies already installed for this interpreter (paddle, numpy, opencv, ...)
through a .pth file, so nothing is downloaded; only the wheel's own files come from the build.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from types import SimpleNamespace
from typing import List, Optional

import pytest

from conftest import REPO, tool_env

# What a build reads: the package (its configs link to configs/, cli/deploy.py to tools/deploy.py) and metadata.
BUILD_INPUTS = ("ppdet_retina", "configs", os.path.join("tools", "deploy.py"), "pyproject.toml", "README.md")


def _run(cmd: List[str], cwd: str, timeout: float = 300) -> subprocess.CompletedProcess:
    # Without PYTHONPATH: the checkout on the path would hide whether the installed copy works.
    env = {k: v for k, v in tool_env().items() if k != "PYTHONPATH"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _build_wheel(tmp: str) -> str:
    """Build from a copy of the build inputs (links kept), so the checkout gets no build/ folder."""
    src = os.path.join(tmp, "src")
    for rel in BUILD_INPUTS:
        target = os.path.join(src, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if os.path.isdir(os.path.join(REPO, rel)) and not os.path.islink(os.path.join(REPO, rel)):
            shutil.copytree(os.path.join(REPO, rel), target, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(os.path.join(REPO, rel), target, follow_symlinks=False)
    dist = os.path.join(tmp, "dist")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", dist, src]
    # setuptools builds wheels itself from 70.1 on (before, with the `wheel` package): then no build
    # environment, and so no index, is needed.
    import setuptools

    if tuple(int(x) for x in setuptools.__version__.split(".")[:2]) >= (70, 1) or importlib.util.find_spec("wheel"):
        cmd.insert(4, "--no-build-isolation")
    proc = _run(cmd, tmp)
    if proc.returncode and "No matching distribution found for setuptools" in proc.stdout + proc.stderr:
        pytest.skip("building the wheel needs setuptools>=70.1 (or setuptools + wheel) in this interpreter, "
                    "or a package index pip can reach for its build environment")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = os.listdir(dist)
    return os.path.join(dist, wheel)


def _purelib(python: str, cwd: str) -> str:
    return _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd).stdout.strip()


def _make_venv(tmp: str, wheel: str, name: str = "venv", dependencies: Optional[str] = None,
               resolve: bool = False) -> SimpleNamespace:
    """A venv holding only the wheel; the dependencies, when given, are the site-packages folder
    ``dependencies`` (seen through a .pth file). ``resolve``: pip checks the wheel's requirements against
    them (nothing may need installing: no index is used); else the wheel is installed alone."""
    env_dir = os.path.join(tmp, name)
    proc = _run([sys.executable, "-m", "venv", "--without-pip", env_dir], tmp)
    if proc.returncode:
        pytest.skip(f"cannot create a venv here ({proc.stderr.strip()[-200:]})")
    python = os.path.join(env_dir, "bin", "python")
    if dependencies:
        with open(os.path.join(_purelib(python, tmp), "dependencies.pth"), "w") as f:
            f.write(dependencies + "\n")
    proc = _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-index", wheel]
                + ([] if resolve else ["--no-deps"]), tmp)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return SimpleNamespace(python=python, bin=os.path.dirname(python), pip_output=proc.stdout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> SimpleNamespace:
    tmp = str(tmp_path_factory.mktemp("wheel"))
    wheel = _build_wheel(tmp)
    venv = _make_venv(tmp, wheel, dependencies=sysconfig.get_paths()["purelib"])
    work = os.path.join(tmp, "work")  # the user's folder: no checkout, no configs/ beside it
    os.makedirs(work)
    return SimpleNamespace(wheel=wheel, python=venv.python, bin=venv.bin, cli=os.path.join(venv.bin, "ppdet-retina"),
                           work=work, tmp=tmp)


def _repo_configs() -> List[str]:
    root = os.path.join(REPO, "configs")
    found = []
    for dirpath, dirnames, files in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != "_base_"]
        found += [os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/") for f in files
                  if f.endswith(".yml")]
    return sorted(found)


def test_the_wheel_holds_the_package_configs_and_both_commands(installed):
    with zipfile.ZipFile(installed.wheel) as z:
        names = set(z.namelist())
        entry_points = next(z.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
        metadata = next(z.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    # paddlepaddle only with the `cpu` extra: a plain install must not put the CPU build over paddlepaddle-gpu.
    assert [line for line in metadata.splitlines() if "paddlepaddle" in line and line.startswith("Requires-Dist")] == [
        'Requires-Dist: paddlepaddle<3.4,>=3.0; extra == "cpu"']
    configs = sorted(n[len("ppdet_retina/configs/"):] for n in names if n.startswith("ppdet_retina/configs/"))
    with_bases = sorted(os.path.relpath(os.path.join(d, f), os.path.join(REPO, "configs")).replace(os.sep, "/")
                        for d, _, files in os.walk(os.path.join(REPO, "configs")) for f in files)
    assert configs == with_bases  # every config and every _base_ piece it reads
    assert {"ppdet_retina/cli/deploy.py", "ppdet_retina/runtime.py", "ppdet_retina/cli/train.py"} <= names
    assert not any(n.startswith(("tests/", "tools/")) for n in names)
    assert "ppdet-retina = ppdet_retina.cli:main" in entry_points
    assert "ppdet-retina-plugin = ppdet_retina.ppdet_plugin:main" in entry_points
    assert os.access(installed.cli, os.X_OK) and os.access(os.path.join(installed.bin, "ppdet-retina-plugin"), os.X_OK)
    plugin = "ppdet_retina/ppdet_plugin.py"
    if plugin in names:  # written on another branch: the entry point needs its main()
        with zipfile.ZipFile(installed.wheel) as z:
            tree = ast.parse(z.read(plugin).decode())
        assert "main" in {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}


def test_installed_package_imports_from_the_venv_and_lists_its_configs(installed):
    proc = _run([installed.python, "-c", "import ppdet_retina.cli, ppdet_retina.modeling; "
                 "print(ppdet_retina.__file__)"], installed.work)
    assert proc.returncode == 0, proc.stderr
    proc_file = proc.stdout.strip()
    assert proc_file.startswith(os.path.dirname(installed.bin) + os.sep), proc.stdout

    proc = _run([installed.cli, "configs"], installed.work)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == _repo_configs()
    assert proc.stderr.strip() == f"(in {os.path.realpath(os.path.join(os.path.dirname(proc_file), 'configs'))})"
    assert "retinanet/retinanet_r50_fpn_1x.yml" in proc.stdout.split()

    proc = _run([installed.cli, "train", "-h"], installed.work)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: ppdet-retina train "), proc.stdout
    proc = _run([installed.cli, "evaluate"], installed.work)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: unknown command 'evaluate'; choose from train, eval, infer, export, "
                                   "deploy, demo-data, configs")
    proc = _run([installed.cli, "train", "-c", "no_such_config.yml"], installed.work)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: config file 'no_such_config.yml' not found")


def test_without_paddle_the_command_says_how_to_install_it(installed):
    from ppdet_retina.cli import PADDLE_MISSING

    bare = _make_venv(installed.tmp, installed.wheel, name="bare_venv")
    proc = _run([os.path.join(bare.bin, "ppdet-retina"), "train", "-c", "retinanet_demo.yml"], installed.work)
    assert proc.returncode == 2 and proc.stderr.strip() == PADDLE_MISSING
    assert "pip install 'paddlepaddle>=3.0,<3.4'" in PADDLE_MISSING and "paddlepaddle-gpu" in PADDLE_MISSING


PPDET_VENV = os.path.join(REPO, ".venv-ppdet")


@pytest.mark.skipif(not os.path.isfile(os.path.join(PPDET_VENV, "bin", "python")),
                    reason=f"no {PPDET_VENV}: the environment with PaddleDetection's dependencies (numpy < 2, "
                           f"imgaug, ...) that the PaddleDetection plugin's tests run in")
def test_the_wheel_installs_into_the_paddledetection_environment(installed):
    """pip resolves the wheel's requirements against PaddleDetection's environment without installing
    anything else, and the package's components import there (numpy 1.x)."""
    ppdet_site = _purelib(os.path.join(PPDET_VENV, "bin", "python"), installed.tmp)
    venv = _make_venv(installed.tmp, installed.wheel, name="ppdet_venv", dependencies=ppdet_site, resolve=True)
    assert "Installing collected packages: ppdet-retina\n" in venv.pip_output
    proc = _run([venv.python, "-c", "import numpy, ppdet_retina.modeling, ppdet_retina.training.trainer; "
                 "from ppdet_retina.core.workspace import load_config; "
                 "print(numpy.__version__.split('.')[0], load_config('retinanet_demo.yml')['architecture'])"],
                installed.work)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["1", "RetinaNet"]


def _detections(path: str) -> List[dict]:
    with open(path) as f:
        return sorted(json.load(f), key=lambda row: -row["score"])


def test_installed_commands_train_evaluate_infer_export_and_deploy(installed):
    """The demo config by bare name, on 8 + 4 generated images: each command as a user types it."""
    work, cli = installed.work, installed.cli

    def ok(*args: str) -> str:
        proc = _run([cli, *args], work)
        assert proc.returncode == 0, f"ppdet-retina {' '.join(args)}\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout + proc.stderr

    ok("demo-data", "--output", "dataset/shapes", "--num-train", "8", "--num-val", "4")
    assert sorted(os.listdir(os.path.join(work, "dataset", "shapes", "annotations"))) == [
        "instances_train.json", "instances_val.json"]

    ok("train", "-c", "retinanet_demo.yml", "--seed", "0", "-o", "epoch=1", "log_iter=1", "save_dir=out")
    with open(os.path.join(work, "out", "retinanet_demo", "train_log.jsonl")) as f:
        steps = [json.loads(line) for line in f]
    # 8 images in batches of 4 (drop_last): two steps, the first at the demo's warm-up LR 0.004 x 0.01.
    assert [s["step"] for s in steps] == [0, 1] and steps[0]["lr"] == pytest.approx(4e-5)
    weights = "out/retinanet_demo/model_final"
    assert os.path.isfile(os.path.join(work, weights + ".pdparams"))

    # Multi-card as the README gives it: the launcher starts the console script (found on PATH) per rank. The
    # config is the user's own, on top of a shipped one named by its file name alone.
    with open(os.path.join(work, "mine.yml"), "w") as f:
        f.write("_BASE_: ['retinanet_demo.yml']\nepoch: 1\nsave_dir: out2\n")
    launch = [installed.python, "-m", "paddle.distributed.launch", "--log_dir", "launch_log", "--nproc_per_node",
              "2", "ppdet-retina", "train", "-c", "mine.yml"]
    env = {k: v for k, v in tool_env({"PATH": installed.bin + os.pathsep + os.environ.get("PATH", "")}).items()
           if k != "PYTHONPATH"}
    proc = subprocess.run(launch, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    with open(os.path.join(work, "launch_log", "workerlog.0")) as f:
        rank0 = f.read()
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:] + rank0
    assert "2 process(es)" in rank0 and "saved checkpoint out2/mine/model_final" in rank0

    # A model two steps old scores every box about 0.01: keep them all so each command has rows to show.
    keep_all = "RetinaHead.nms.score_threshold=0.0"
    out = ok("eval", "-c", "retinanet_demo", "-o", f"weights={weights}", "save_dir=out", keep_all,
             "--engine", "dygraph")
    assert "400 detections written" in out and "COCO bbox metrics" in out  # 4 images x keep_top_k 100

    with open(os.path.join(work, "dataset", "shapes", "annotations", "instances_val.json")) as f:
        image = os.path.join("dataset", "shapes", "images", "val", json.load(f)["images"][0]["file_name"])
    ok("infer", "-c", "configs/demo/retinanet_demo.yml", "-o", f"weights={weights}", keep_all,
       "--infer_img", image, "--output_dir", "infer_out", "--save_results", "--engine", "dygraph")
    ok("export", "-c", "retinanet_demo", "-o", f"weights={weights}", keep_all, "--output_dir", "exported")
    assert sorted(os.listdir(os.path.join(work, "exported", "retinanet_demo"))) == [
        "infer_cfg.yml", "model.json", "model.pdiparams"]
    ok("deploy", "--model_dir", "exported/retinanet_demo", "--image_file", image, "--output_dir", "deploy_out",
       "--save_results")

    # The export, run by the shipped deploy.py, finds what the training graph finds on the same image.
    dygraph = _detections(os.path.join(work, "infer_out", "bbox.json"))
    deployed = _detections(os.path.join(work, "deploy_out", "bbox.json"))
    assert len(dygraph) == len(deployed) == 100
    for row in dygraph[:10]:
        assert any(other["category_id"] == row["category_id"] and abs(other["score"] - row["score"]) < 1e-4
                   and max(abs(a - b) for a, b in zip(other["bbox"], row["bbox"])) < 0.05 for other in deployed), row
