"""Component registry and PaddleDetection-dialect YAML configs.

A component is a class decorated with :func:`register`. Its constructor
arguments are its config keys. Class attributes give it PaddleDetection's
extra semantics:

* ``__shared__``: keys whose value falls back to the top-level config key of
  the same name (e.g. ``num_classes``) when the component's own section does
  not set it.
* ``__inject__``: keys whose value is itself a component, given in YAML as a
  registered name (``nms: MultiClassNMS``), a top-level section name, a dict
  with ``name:`` plus keys, a dict without ``name:`` (the class named by the
  argument's default is used), or an already built object.
* ``from_config(cls, cfg, **kwargs) -> dict``: optional hook. ``create`` calls
  it with the resolved keyword arguments and any extra ``kwargs`` the caller
  passed (e.g. ``input_shape`` of the previous stage); the dict it returns
  updates the constructor arguments.

Classes decorated with :func:`serializable` may also be written as YAML tags
(``- !PiecewiseDecay {milestones: [8, 11]}``) and are built while loading.

Loading never changes a registered class or its defaults: every ``create``
works on a deep copy of the config it reads, so two configs loaded one after
the other in one process do not leak into each other.
"""

from __future__ import annotations

import copy
import difflib
import importlib
import inspect
import os
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import yaml

__all__ = [
    "AttrDict",
    "ConfigError",
    "register",
    "serializable",
    "create",
    "load_config",
    "merge_config",
    "parse_overrides",
    "get_config",
    "registered_names",
    "resolve_config_path",
]

BASE_KEY = "_BASE_"
# Sub-packages whose modules register components; imported before a config is
# read so that every `!Tag` and every `name:` is known.
_COMPONENT_PACKAGES = ("ppdet_retina.modeling", "ppdet_retina.data", "ppdet_retina.engine")


class ConfigError(ValueError):
    """A config file or key is wrong; the message says which and how to fix it."""


class AttrDict(dict):
    """A dict whose keys can also be read as attributes (``cfg.epoch``)."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None

    def __setattr__(self, key: str, value: Any) -> None:
        self[key] = value

    def __deepcopy__(self, memo):
        return AttrDict({k: copy.deepcopy(v, memo) for k, v in self.items()})


class _Spec:
    """What the registry knows of one component class."""

    def __init__(self, cls: type):
        self.cls = cls
        self.name = cls.__name__
        self.shared: List[str] = list(getattr(cls, "__shared__", []))
        self.inject: List[str] = list(getattr(cls, "__inject__", []))
        sig = inspect.signature(cls.__init__)
        params = [p for p in sig.parameters.values() if p.name != "self"]
        self.accepts_var_kwargs = any(p.kind == p.VAR_KEYWORD for p in params)
        self.params = [p for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
        self.defaults = {p.name: p.default for p in self.params if p.default is not p.empty}
        self.required = [p.name for p in self.params if p.default is p.empty]

    @property
    def keys(self) -> List[str]:
        return [p.name for p in self.params]


_REGISTRY: Dict[str, _Spec] = {}
_GLOBAL_CONFIG: AttrDict = AttrDict()
# Configs being built from, innermost last: a `create` without an explicit cfg inside a
# `from_config` hook reads the config its parent was created from, not the global one.
_ACTIVE_CONFIGS: List[dict] = []


# --------------------------------------------------------------------------- registry

def register(cls: type) -> type:
    """Make ``cls`` buildable by name from a config. Returns ``cls`` unchanged."""
    name = cls.__name__
    if name in _REGISTRY and _REGISTRY[name].cls is not cls:
        old = _REGISTRY[name].cls
        raise ConfigError(
            f"component name '{name}' is registered twice: {old.__module__}.{name} and "
            f"{cls.__module__}.{name}; rename one of them")
    _REGISTRY[name] = _Spec(cls)
    return cls


def serializable(cls: type) -> type:
    """Allow ``!ClassName {key: value}`` tags for ``cls`` in YAML (implies :func:`register`)."""
    register(cls)
    cls.__yaml_tag__ = True
    return cls


def registered_names() -> List[str]:
    return sorted(_REGISTRY)


def _spec(name: str, where: str = "") -> _Spec:
    _import_components()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        loc = f" (in {where})" if where else ""
        raise ConfigError(f"unknown component '{name}'{loc}{hint}. "
                          f"Registered components: {', '.join(registered_names())}")
    return _REGISTRY[name]


_IMPORTED = False


def _import_components() -> None:
    global _IMPORTED
    if _IMPORTED:
        return
    _IMPORTED = True
    for pkg in _COMPONENT_PACKAGES:
        try:
            importlib.import_module(pkg)
        except ModuleNotFoundError as err:
            # Only a missing sub-package itself is tolerated (partial installs in
            # unit tests); an import error inside one is a real bug.
            if err.name != pkg:
                raise


# --------------------------------------------------------------------------- YAML

class _Loader(yaml.SafeLoader):
    """Safe YAML loader that also builds ``!ClassName`` tags of serializable components."""


def _construct_tagged(loader: _Loader, tag_suffix: str, node: yaml.Node) -> Any:
    spec = _spec(tag_suffix, where=f"YAML tag !{tag_suffix} at {node.start_mark}")
    if not getattr(spec.cls, "__yaml_tag__", False):
        raise ConfigError(f"!{tag_suffix} at {node.start_mark}: '{tag_suffix}' cannot be used as a YAML tag")
    if isinstance(node, yaml.MappingNode):
        kwargs = loader.construct_mapping(node, deep=True)
    elif isinstance(node, yaml.ScalarNode) and loader.construct_scalar(node) in ("", None):
        kwargs = {}
    else:
        raise ConfigError(f"!{tag_suffix} at {node.start_mark} needs a mapping of its config keys")
    return _build(spec, dict(kwargs), AttrDict(), where=f"!{tag_suffix}")


_Loader.add_multi_constructor("!", _construct_tagged)


def _read_yaml(path: str) -> dict:
    _import_components()
    with open(path, "r", encoding="utf-8") as f:
        try:
            data = yaml.load(f, Loader=_Loader)
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of keys, got {type(data).__name__}")
    return data


def _deep_merge(base: dict, override: dict) -> dict:
    """Dicts merge key by key; any other value (lists included) is replaced."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _load_with_bases(path: str, chain: Sequence[str] = ()) -> dict:
    path = os.path.abspath(path)
    if path in chain:
        raise ConfigError(f"{path}: _BASE_ cycle: {' -> '.join(list(chain) + [path])}")
    data = _read_yaml(path)
    bases = data.pop(BASE_KEY, None) or []
    if isinstance(bases, str):
        bases = [bases]
    merged: dict = {}
    for base in bases:
        base_path = os.path.join(os.path.dirname(path), os.path.expanduser(base))
        if not os.path.isfile(base_path):
            raise ConfigError(f"{path}: _BASE_ file '{base}' not found (looked for {os.path.normpath(base_path)})")
        merged = _deep_merge(merged, _load_with_bases(base_path, list(chain) + [path]))
    return _deep_merge(merged, data)


def _to_attrdict(value: Any) -> Any:
    if isinstance(value, dict) and not isinstance(value, AttrDict):
        return AttrDict({k: _to_attrdict(v) for k, v in value.items()})
    if isinstance(value, AttrDict):
        for k, v in list(value.items()):
            value[k] = _to_attrdict(v)
    return value


def resolve_config_path(path: str, search_root: Optional[str] = None) -> str:
    """Return ``path`` if it exists, else the unique file of that name under ``configs/``."""
    if os.path.isfile(path):
        return path
    root = search_root or os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))), "configs")
    wanted = os.path.basename(path)
    candidates = [wanted] if wanted.endswith((".yml", ".yaml")) else [wanted + ".yml", wanted + ".yaml"]
    found = []
    for dirpath, _, files in os.walk(root):
        for fname in files:
            if fname in candidates:
                found.append(os.path.join(dirpath, fname))
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise ConfigError(f"config '{path}' is ambiguous under {root}: {', '.join(sorted(found))}; give the full path")
    raise ConfigError(f"config file '{path}' not found (also searched {root} for '{wanted}')")


def load_config(path: str, overrides: Optional[Iterable[str] | dict] = None) -> AttrDict:
    """Read ``path`` (with its ``_BASE_`` files), apply ``overrides`` and make it the global config.

    ``path`` may be a bare file name found under the project's ``configs/``.
    The config's ``filename`` key is set to the file's stem (used for output
    folders). ``custom_imports`` (a list of module names) are imported so that
    components they register can be named in the config.
    """
    global _GLOBAL_CONFIG
    path = resolve_config_path(path)
    cfg = _to_attrdict(_load_with_bases(path))
    cfg["filename"] = os.path.splitext(os.path.basename(path))[0]
    cfg["config_path"] = os.path.abspath(path)
    if overrides:
        cfg = merge_config(overrides, cfg)
    _import_custom(cfg.get("custom_imports") or [])
    _GLOBAL_CONFIG = cfg
    return cfg


def _import_custom(modules: Sequence[str]) -> None:
    if isinstance(modules, str):
        modules = [modules]
    for mod in modules:
        try:
            importlib.import_module(mod)
        except ImportError as err:
            raise ConfigError(f"custom_imports: cannot import '{mod}': {err}. "
                              f"Is its folder on PYTHONPATH?") from None


def get_config() -> AttrDict:
    """The config most recently loaded by :func:`load_config`."""
    return _GLOBAL_CONFIG


# --------------------------------------------------------------------------- overrides

def parse_overrides(items: Iterable[str]) -> dict:
    """Turn ``["a.b=1", "use_gpu=false"]`` into a nested dict; values are typed like YAML."""
    result: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value (e.g. -o use_gpu=false)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override '{item}' has an empty key")
        try:
            value = yaml.load(raw, Loader=_Loader) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = result
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{part}' is set twice, once as a value")
        node[parts[-1]] = value
    return result


def merge_config(overrides: Iterable[str] | dict, cfg: Optional[AttrDict] = None) -> AttrDict:
    """Merge ``overrides`` (a dict or ``key=value`` strings) into ``cfg`` (default: the global config)."""
    global _GLOBAL_CONFIG
    if not isinstance(overrides, dict):
        overrides = parse_overrides(overrides)
    target = _GLOBAL_CONFIG if cfg is None else cfg
    merged = _to_attrdict(_deep_merge(target, overrides))
    if cfg is None or cfg is _GLOBAL_CONFIG:
        _GLOBAL_CONFIG = merged
    return merged


# --------------------------------------------------------------------------- create

def create(component: Any, cfg: Optional[dict] = None, **kwargs: Any) -> Any:
    """Build a component.

    ``component`` is a registered class name (its section in ``cfg`` gives the
    arguments), a top-level config key whose value is a dict with ``name:``
    (e.g. ``TrainDataset``), a dict with ``name:``, or an already built object
    (returned as is). ``cfg`` defaults to the global config. ``kwargs`` go to
    the class's ``from_config`` hook when it has one, else to the constructor,
    and win over config values.
    """
    if cfg is None:
        cfg = _ACTIVE_CONFIGS[-1] if _ACTIVE_CONFIGS else _GLOBAL_CONFIG
    if isinstance(component, dict):
        section = dict(component)
        if "name" not in section:
            raise ConfigError(f"component dict {section} has no 'name:' key naming its class")
        name = section.pop("name")
        return _build(_spec(name), section, cfg, where=name, extra=kwargs)
    if not isinstance(component, str):
        return component
    top = cfg.get(component)
    if isinstance(top, dict) and "name" in top and component not in _REGISTRY:
        section = dict(top)
        name = section.pop("name")
        return _build(_spec(name, where=component), section, cfg, where=component, extra=kwargs)
    spec = _spec(component)
    if top is not None and not isinstance(top, dict):
        if isinstance(top, spec.cls):
            return top
        raise ConfigError(f"config key '{component}' must be a mapping of {component}'s keys, got {top!r}")
    return _build(spec, dict(top or {}), cfg, where=component, extra=kwargs)


def _build(spec: _Spec, section: dict, cfg: dict, where: str, extra: Optional[dict] = None) -> Any:
    extra = dict(extra or {})
    section = copy.deepcopy(section)
    section.pop("name", None)
    _check_keys(spec, section, where)
    resolved: Dict[str, Any] = {}
    for key in spec.keys:
        if key in section:
            resolved[key] = section[key]
        elif key in spec.shared and key in cfg:
            resolved[key] = copy.deepcopy(cfg[key])
        elif key in spec.defaults:
            resolved[key] = copy.deepcopy(spec.defaults[key])
    for key in spec.inject:
        if key in resolved and key not in extra:
            resolved[key] = _build_injected(spec, key, resolved[key], cfg, where)
    from_config: Optional[Callable] = getattr(spec.cls, "from_config", None)
    if from_config is not None:
        _ACTIVE_CONFIGS.append(cfg)
        try:
            resolved.update(from_config(dict(resolved), **extra))
        finally:
            _ACTIVE_CONFIGS.pop()
    else:
        resolved.update(extra)
    missing = [k for k in spec.required if k not in resolved]
    if missing:
        raise ConfigError(f"{where}: missing required config key(s) {missing} of {spec.name}; "
                          f"valid keys: {', '.join(spec.keys)}")
    try:
        return spec.cls(**resolved)
    except (ConfigError, NotImplementedError):
        raise
    except TypeError as err:
        raise ConfigError(f"{where}: cannot build {spec.name} from {sorted(resolved)}: {err}") from err


def _check_keys(spec: _Spec, section: dict, where: str) -> None:
    if spec.accepts_var_kwargs:
        return
    valid = spec.keys
    unknown = [k for k in section if k not in valid]
    if unknown:
        parts = []
        for key in unknown:
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
            parts.append(f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
        raise ConfigError(f"{where}: unknown config key {', '.join(parts)} for {spec.name}; "
                          f"valid keys: {', '.join(valid)}")


def _build_injected(spec: _Spec, key: str, value: Any, cfg: dict, where: str) -> Any:
    sub_where = f"{where}.{key}"
    if value is None:
        return None
    if isinstance(value, str):
        top = cfg.get(value)
        if isinstance(top, dict) and "name" in top and value not in _REGISTRY:
            return create(value, cfg)
        return _build(_spec(value, where=sub_where), dict(top or {}) if isinstance(top, dict) else {},
                      cfg, where=f"{sub_where} ({value})")
    if isinstance(value, dict):
        section = dict(value)
        name = section.pop("name", None) or _default_class_name(spec, key)
        if name is None:
            raise ConfigError(f"{sub_where}: give the component's class with 'name:' "
                              f"(e.g. {key}: {{name: SomeClass, ...}})")
        return _build(_spec(name, where=sub_where), section, cfg, where=f"{sub_where} ({name})")
    return value


def _default_class_name(spec: _Spec, key: str) -> Optional[str]:
    default = spec.defaults.get(key)
    if isinstance(default, str):
        return default
    if isinstance(default, dict):
        return default.get("name")
    if isinstance(default, type):
        return default.__name__
    return None
