"""The package's layers import only downwards (docs/DESIGN.md, "Layers"), checked on the source with ast.

core -> {data, modeling} -> metrics -> engine -> cli (the tools' code) -> tools; utils is usable from every
layer above core. Two files stand alone: engine/predictor.py (deploy.py loads it by path) and tools/deploy.py
(shipped in the package as cli/deploy.py, a link to it).
"""

from __future__ import annotations

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
    "engine": {"core", "utils", "data", "modeling", "metrics"},
    "cli": {"core", "utils", "data", "modeling", "metrics", "engine"},
}
# Inside modeling, the shared pieces (geometry, matching, targets, losses, NMS, the dense-head base)
# serve the heads and architectures and never import them.
MODELING_UPPER = ("heads", "architectures")
STANDALONE = ("ppdet_retina/engine/predictor.py", "tools/deploy.py")


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
            if target and target != layer and target not in ALLOWED[layer]:
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
    fake.write_text("import os\nfrom ..engine import trainer\nfrom ppdet_retina.core import workspace\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", str(tmp_path))
    assert module_imports(str(fake), REPO) == [(1, "os"), (2, "ppdet_retina.engine"), (3, "ppdet_retina.core")]
    with pytest.raises(AssertionError, match=r"modeling/bad.py:2 \(modeling\) imports ppdet_retina.engine"):
        test_layers_import_only_downwards()
