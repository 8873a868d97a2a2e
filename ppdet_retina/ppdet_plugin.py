"""Run our RetinaNet components inside PaddleDetection: its tools, its configs, its Trainer.

Two ways in:

* ``python -m ppdet_retina.ppdet_plugin PaddleDetection/tools/train.py -c <config> [its flags]``
  (the same for ``eval.py``, ``infer.py``, ``export_model.py``): registers our components, then
  runs PaddleDetection's script unchanged, with its own argv, ``sys.path`` as when run directly
  and its exit code;
* ``from ppdet_retina import ppdet_plugin; ppdet_plugin.register()`` before building
  ``ppdet.engine.Trainer`` in your own script.

After :func:`register`, the names PaddleDetection's RetinaNet configs use (``RetinaHead``,
``RetinaFeat``, ``RetinaAnchorGenerator``, ``MaxIoUAssigner``, ``FocalLoss``, ``MultiClassNMS``)
build the adapters of :mod:`ppdet_retina.ppdet_adapters`, which run our components with
PaddleDetection's config keys, calling conventions and parameter names. PaddleDetection's modules
themselves are not changed: code that imports its classes directly still gets them.

For a multi-card launch, give paddle's launcher this file's path (``plugin_path()``)::

    python -m paddle.distributed.launch --nproc_per_node 2 "$(python -m ppdet_retina.ppdet_plugin --path)" \\
        PaddleDetection/tools/train.py -c PaddleDetection/configs/retinanet/retinanet_r50_fpn_1x_coco.yml
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import runpy
import sys
from typing import List, Optional, Sequence

__all__ = ["register", "registered", "main", "plugin_path", "PluginError", "SUPPORTED"]

SUPPORTED = ("PaddleDetection develop (2.7 / 2.8 line, Paddle 3): a registry ppdet.core.workspace with "
             "global_config, create() and extract_schema, and a RetinaNet that calls head(feats, inputs) in "
             "training and unpacks head.post_process(head_outs, im_shape, scale_factor) into 2 or 3 values")
_ENV_HINT = ("put PaddleDetection's checkout on the path: PYTHONPATH=/path/to/PaddleDetection "
             "(the folder that holds ppdet/ and tools/), or pip install paddledet")


class PluginError(RuntimeError):
    """PaddleDetection is missing, or differs from what the adapters support."""


def plugin_path() -> str:
    """This file's path: the script to give ``python -m paddle.distributed.launch``."""
    return os.path.abspath(__file__)


def _import_ppdet():
    try:
        import ppdet  # noqa: F401
        workspace = importlib.import_module("ppdet.core.workspace")
        # Every PaddleDetection module registers its classes on import; all must be in before ours
        # take their names, or a later import would refuse the name as already registered.
        importlib.import_module("ppdet.modeling")
    except ImportError as err:
        raise PluginError(f"ppdet_retina.ppdet_plugin: cannot import PaddleDetection ({err}); {_ENV_HINT}") from err
    return ppdet, workspace


def _version(ppdet) -> str:
    version = getattr(ppdet, "__version__", None) or "unknown (a source checkout without ppdet/version.py)"
    return f"{version} at {os.path.dirname(os.path.dirname(os.path.abspath(ppdet.__file__)))}"


def _mismatch(ppdet, what: str) -> PluginError:
    return PluginError(f"ppdet_retina.ppdet_plugin: PaddleDetection {_version(ppdet)} differs from what the "
                       f"adapters support: {what}. Supported: {SUPPORTED}")


def _check_registry(ppdet, workspace) -> None:
    for attr in ("global_config", "create", "register"):
        if not hasattr(workspace, attr):
            raise _mismatch(ppdet, f"ppdet.core.workspace has no '{attr}'")
    schema = importlib.import_module("ppdet.core.config.schema")
    if not hasattr(schema, "extract_schema"):
        raise _mismatch(ppdet, "ppdet.core.config.schema has no 'extract_schema'")
    missing = [name for name in _adapters() if name not in workspace.global_config]
    if missing:
        raise _mismatch(ppdet, f"its registry has no {', '.join(missing)}")


def _post_process_arity(ppdet) -> int:
    """How many values PaddleDetection's RetinaNet unpacks from ``head.post_process`` (2 or 3)."""
    try:
        arch = importlib.import_module("ppdet.modeling.architectures.retinanet").RetinaNet
        source = inspect.getsource(arch)
    except (ImportError, AttributeError, OSError) as err:
        raise _mismatch(ppdet, f"no readable ppdet.modeling.architectures.retinanet.RetinaNet ({err})") from err
    if not re.search(r"self\.head\(\s*\w+\s*,\s*self\.inputs\s*\)", source):
        raise _mismatch(ppdet, "its RetinaNet does not call self.head(neck_feats, self.inputs) in training")
    unpack = re.search(r"^\s*([\w\s,]+?)\s*=\s*self\.head\.post_process\(", source, re.M)
    if not unpack:
        raise _mismatch(ppdet, "its RetinaNet does not call self.head.post_process(...)")
    count = len([n for n in unpack.group(1).split(",") if n.strip()])
    if count not in (2, 3):
        raise _mismatch(ppdet, f"its RetinaNet unpacks {count} values from head.post_process")
    return count


def _adapters():
    from ppdet_retina import ppdet_adapters
    return ppdet_adapters.ADAPTERS


def registered() -> List[str]:
    """The PaddleDetection registry names that build our components now (empty before :func:`register`)."""
    if "ppdet.core.workspace" not in sys.modules:
        return []
    config = sys.modules["ppdet.core.workspace"].global_config
    return [name for name, cls in _adapters().items()
            if getattr(getattr(config.get(name), "pymodule", None), name, None) is cls]


def register() -> List[str]:
    """Make PaddleDetection's registry build our components under its names; returns those names.

    Idempotent: a second call changes nothing and logs nothing. Raises :class:`PluginError` when
    PaddleDetection is not importable or its registry / RetinaNet differ from what the adapters
    support.
    """
    ppdet, workspace = _import_ppdet()
    _check_registry(ppdet, workspace)
    adapters = _adapters()
    adapters["RetinaHead"].post_process_outputs = _post_process_arity(ppdet)
    done = registered()
    if len(done) == len(adapters):
        return done
    from ppdet.core.config.schema import extract_schema
    from ppdet.core.config.yaml_helpers import serializable
    config = workspace.global_config
    for name, cls in adapters.items():
        # A section merged from a config already loaded (keys the user set) is kept.
        loaded = {k: v for k, v in dict(config[name]).items()} if name in config else {}
        schema = extract_schema(cls)
        schema.update(loaded)
        config[name] = schema
        # PaddleDetection also builds a class from a YAML tag (`nms: !MultiClassNMS {...}`).
        serializable(cls)
    names = list(adapters)
    message = (f"ppdet_retina plugin: PaddleDetection's {', '.join(names)} now build ppdet_retina's components "
               f"(ppdet_retina.ppdet_adapters)")
    # One line, straight to stderr: PaddleDetection's loggers are set up later, by its scripts.
    print(message, file=sys.stderr, flush=True)
    return names


_USAGE = """usage: python -m ppdet_retina.ppdet_plugin PaddleDetection/tools/SCRIPT.py [its arguments]
       python -m ppdet_retina.ppdet_plugin --path

Registers ppdet_retina's RetinaNet components in PaddleDetection's registry, then runs SCRIPT
(train.py, eval.py, infer.py, export_model.py, ...) unchanged with its arguments.
--path prints this module's file, the script to give `python -m paddle.distributed.launch`."""


def _checkout_root(script: str) -> Optional[str]:
    """The PaddleDetection checkout a tools/ script belongs to (the folder holding ppdet/), if any."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(script)))
    return root if os.path.isfile(os.path.join(root, "ppdet", "__init__.py")) else None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Register, then run ``argv[0]`` (a PaddleDetection script) as ``__main__`` with ``argv[1:]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_USAGE)
        return 0 if argv else 2
    if argv[0] == "--path":
        print(plugin_path())
        return 0
    script = argv[0]
    if not os.path.isfile(script):
        print(f"ppdet_retina.ppdet_plugin: script '{script}' not found (give the path of a PaddleDetection "
              f"tool, e.g. PaddleDetection/tools/train.py)\n\n{_USAGE}", file=sys.stderr)
        return 2
    # As `python SCRIPT`: the script's folder first on sys.path, not this package's or the cwd. Our
    # package stays importable (at the end) if only the replaced entry made it so.
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    if package_root not in sys.path:
        sys.path.append(package_root)
    root = _checkout_root(script)
    if root is not None and root not in sys.path:
        # PaddleDetection's tools put their checkout on sys.path themselves, after their imports of
        # the standard library; register() needs ppdet before the script runs.
        sys.path.insert(1, root)
    try:
        register()
    except PluginError as err:
        print(err, file=sys.stderr)
        return 1
    sys.argv = [script] + argv[1:]
    runpy.run_path(script, run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
