"""Import every module of a package so that their ``@register`` decorators run."""

import importlib
import pkgutil
from types import ModuleType


def import_submodules(package: ModuleType) -> None:
    """Import all modules below ``package`` (recursively), in name order."""
    for info in sorted(pkgutil.walk_packages(package.__path__, package.__name__ + "."), key=lambda i: i.name):
        importlib.import_module(info.name)
