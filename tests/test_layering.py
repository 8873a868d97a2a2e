"""The package's layers import only downwards (docs/DESIGN.md, "Layers"), checked on the source with ast.

core -> utils -> {data, modeling} -> metrics; io (files) -> export -> inference -> training -> cli (the
tools' code) -> tools. Two files stand alone: runtime.py (deploy.py loads it by path, every layer may
import it) and tools/deploy.py (shipped in the package as cli/deploy.py, a link to it). No module
imports itself back through others (no cycles), lazy imports included.
"""

from __future__ import annotations

import ast
import os
import sys
from typing import Dict, List, Set

import pytest

from conftest import PACKAGE, REPO, module_imports

# Layer -> the package layers its modules may import (its own layer is always allowed).
ALLOWED: Dict[str, Set[str]] = {
    "core": set(),
    "utils": {"core"},
    "data": {"core", "utils"},
    "modeling": {"core", "utils"},
    "metrics": {"core", "utils", "data"},
    "io": {"core", "utils"},
    "export": {"core", "utils", "data", "modeling", "io"},
    "inference": {"core", "utils", "data", "modeling", "metrics", "io", "export"},
    "training": {"core", "utils", "data", "modeling", "metrics", "io", "export", "inference"},
    "runtime": set(),
    "openvino_runtime": set(),
    # The PaddleDetection plugin: adapters of our modeling components, and the module that registers them.
    "ppdet_adapters": {"core", "modeling"},
    "ppdet_plugin": {"ppdet_adapters"},
    "cli": {"core", "utils", "data", "modeling", "metrics", "io", "export", "inference", "training"},
}
# The runtimes import nothing of the package (deploy.py loads them by path), so every layer may use them.
SHARED_BY_ALL = ("runtime", "openvino_runtime")
# Inside modeling, the shared pieces (geometry, matching, targets, losses, NMS, the dense-head base)
# serve the heads and architectures and never import them.
MODELING_UPPER = ("heads", "architectures")
STANDALONE = ("ppdet_retina/runtime.py", "ppdet_retina/openvino_runtime.py", "tools/deploy.py")


def _package_files() -> List[str]:
    out = []
    for root, _, files in os.walk(os.path.join(REPO, PACKAGE)):
        out.extend(os.path.join(root, f) for f in files if f.endswith(".py"))
    return sorted(out)


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in ALLOWED) else ""


def test_every_package_module_belongs_to_a_known_layer():
    unknown = {os.path.relpath(p, REPO) for p in _package_files()
               if _layer(os.path.relpath(p, REPO)[:-3].replace(os.sep, ".")) not in ALLOWED
               and os.path.basename(p) != "__init__.py"}
    assert unknown == set(), f"add these modules' layer to ALLOWED and docs/DESIGN.md: {sorted(unknown)}"


def test_layers_import_only_downwards():
    wrong = []
    for path in _package_files():
        rel = os.path.relpath(path, REPO)
        layer = _layer(rel[:-3].replace(os.sep, "."))
        if layer not in ALLOWED:
            continue
        for line, module in module_imports(path, REPO):
            if not module.startswith(PACKAGE + "."):
                continue
            target = _layer(module)
            if target and target != layer and target not in SHARED_BY_ALL and target not in ALLOWED[layer]:
                wrong.append(f"{rel}:{line} ({layer}) imports {module} ({target})")
    assert wrong == [], "layer rule broken (docs/DESIGN.md, 'Layers'):\n" + "\n".join(wrong)


def test_modeling_shared_pieces_never_import_heads_or_architectures():
    wrong = []
    for path in _package_files():
        rel = os.path.relpath(path, REPO)
        parts = rel[:-3].split(os.sep)
        if parts[1] != "modeling" or (len(parts) > 3 and parts[2] in MODELING_UPPER):
            continue
        for line, module in module_imports(path, REPO):
            sub = module.split(".")
            if module.startswith(PACKAGE + ".modeling.") and len(sub) > 2 and sub[2] in MODELING_UPPER:
                wrong.append(f"{rel}:{line} imports {module}")
    assert wrong == []


@pytest.mark.parametrize("rel", STANDALONE)
def test_standalone_files_import_nothing_from_the_package(rel):
    package_imports = [f"{rel}:{line} {module}" for line, module in module_imports(os.path.join(REPO, rel), REPO)
                       if module == PACKAGE or module.startswith(PACKAGE + ".")]
    assert package_imports == []


def test_the_checker_sees_a_violation(tmp_path, monkeypatch):
    """The rule is not vacuous: an upward import in a modeling module is reported with its line."""
    fake = tmp_path / PACKAGE / "modeling" / "bad.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("import os\nfrom ..training import trainer\nfrom ppdet_retina.core import workspace\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", str(tmp_path))
    assert module_imports(str(fake), REPO) == [(1, "os"), (2, "ppdet_retina.training"), (3, "ppdet_retina.core")]
    with pytest.raises(AssertionError, match=r"modeling/bad.py:2 \(modeling\) imports ppdet_retina.training"):
        test_layers_import_only_downwards()


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
    return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def _imported_modules(path: str, files: Dict[str, str]) -> Set[str]:
    """The package modules ``path`` imports, lazy ones included; ``from pkg import mod`` counts as ``pkg.mod``."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    here = _module_name(path).split(".")
    if path.endswith("__init__.py"):
        here = here + ["__init__"]  # a relative import in __init__ is relative to the package itself
    out = set()
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in files)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(here[:-node.level] + ([node.module] if node.module else [])) if node.level \
                else node.module or ""
            for alias in node.names:
                full = f"{base}.{alias.name}"
                out.add(full if full in files else base)
    return {m for m in out if m in files}


def _runtime_nodes(tree: ast.AST):
    """Every node except those under ``if TYPE_CHECKING:`` (imports for annotations only, never run)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", "")) == "TYPE_CHECKING":
            continue
        yield node
        yield from _runtime_nodes(node)


def _import_graph() -> Dict[str, Set[str]]:
    """Package module -> the package modules it imports."""
    files = {_module_name(p): p for p in _package_files()}
    return {name: _imported_modules(path, files) - {name} for name, path in files.items()}


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """One cycle per strongly connected group of modules (depth-first search)."""
    found, done, stack = [], set(), []

    def visit(node: str) -> None:
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt in stack:
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in done:
                visit(nxt)
        stack.pop()
        done.add(node)

    for node in sorted(graph):
        if node not in done:
            visit(node)
    return found


def test_no_module_imports_itself_back():
    # Package __init__ files import their own modules (registration) and are left out.
    graph = {k: {m for m in v if not _is_package(m)} for k, v in _import_graph().items() if not _is_package(k)}
    assert _cycles(graph) == [], "import cycle(s): " + "; ".join(" -> ".join(c) for c in _cycles(graph))


def _is_package(module: str) -> bool:
    return os.path.isfile(os.path.join(REPO, *module.split("."), "__init__.py"))


def test_the_import_graph_sees_lazy_and_from_package_imports():
    graph = _import_graph()
    assert "ppdet_retina.export.onnx" in graph["ppdet_retina.export.paddle_inference"]
    assert "ppdet_retina.export.trace" in graph["ppdet_retina.inference.engines"]  # inside a function
    assert graph["ppdet_retina.runtime"] == set()
    # The hooks name the Trainer in annotations only (under TYPE_CHECKING): no edge back.
    assert "ppdet_retina.training.trainer" not in graph["ppdet_retina.training.hooks"]


def test_the_cycle_finder_sees_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
