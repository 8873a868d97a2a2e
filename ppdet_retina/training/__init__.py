"""Registered components; every module below is imported so that ``@register`` runs."""

import sys as _sys

from ppdet_retina.core.registry_import import import_submodules as _import_submodules

_import_submodules(_sys.modules[__name__])
