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
* ``__ignored__``: ``{key: why}`` of keys accepted from a config only because
  PaddleDetection's configs carry them. They are checked like other keys but
  never reach the constructor (and so are never stored); a subclass inherits
  them, so it only re-declares the parameters whose defaults it changes.
* ``from_config(cls, args, **kwargs) -> dict``: optional hook (PaddleDetection's name). ``create`` calls
  it with the resolved keyword arguments and any extra ``kwargs`` the caller
  passed (e.g. ``input_shape`` of the previous stage); the dict it returns
  updates the constructor arguments.

One rule for sub-components: from a config the workspace resolves every ``__inject__`` key before
the constructor runs; in plain Python a constructor receives built objects, or a name / dict that
it hands to :func:`build_component`, which builds from the class defaults. Nothing reads the
config loaded last: ``create(name)`` without a config builds from the class defaults too (inside
a ``from_config`` hook it reads the config being built from).

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
import re
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import yaml

from ppdet_retina.runtime import parse_bool

__all__ = [
    "AttrDict",
    "ConfigError",
    "register",
    "serializable",
    "create",
    "build_component",
    "load_config",
    "merge_config",
    "parse_overrides",
    "registered_names",
    "resolve_config_path",
    "shipped_configs_dir",
    "check_config_keys",
    "register_top_level_keys",
    "KNOWN_TOP_LEVEL_KEYS",
    "PPDET_IGNORED_TOP_LEVEL_KEYS",
]

BASE_KEY = "_BASE_"
# Sub-packages whose modules register components; imported before a config is
# read so that every `!Tag` and every `name:` is known.
_COMPONENT_PACKAGES = ("ppdet_retina.modeling", "ppdet_retina.data", "ppdet_retina.training")

# Top-level keys besides component sections (a registered class name, or a section a config names
# elsewhere, e.g. ``architecture: RetinaNet``) and ``__shared__`` keys. Everything else at the top level
# of a config is a typo and an error. Add a key here (or with :func:`register_top_level_keys`) when code
# starts reading it.
KNOWN_TOP_LEVEL_KEYS: Dict[str, str] = {
    "architecture": "name of the detector class to build",
    "use_gpu": "run on the GPU (bool)",
    "epoch": "number of training epochs",
    "log_iter": "log every N iterations",
    "snapshot_epoch": "save (and with --eval evaluate) every N epochs",
    "save_dir": "output root; a run writes to <save_dir>/<config name>/",
    "worker_num": "data loader worker processes",
    "metric": "evaluation metric (COCO)",
    "classwise": "per-class AP table in evaluation",
    "output_eval": "folder for evaluation results (bbox.json)",
    "weights": "model weights for eval / infer / export (path or http(s) URL)",
    "pretrain_weights": "initial weights for training (path or http(s) URL; empty: random init)",
    "draw_threshold": "score threshold for drawn boxes (export's infer_cfg.yml)",
    "export": "export settings (post_process, nms, benchmark; fuse_conv_bn and fuse_normalize are "
              "accepted and ignored, see ppdet_retina.export.trace.EXPORT_IGNORED)",
    "custom_imports": "modules imported before building (user components)",
    "TrainDataset": "training dataset section", "EvalDataset": "evaluation dataset section",
    "TestDataset": "inference dataset section",
    "filename": "set by load_config: the config file's stem",
    "config_path": "set by load_config: the config file's absolute path",
    # Model averaging, mixed precision and tools/train.py's flags are registered by the engine modules that
    # read them (register_top_level_keys), which check_config_keys imports before checking.
}

# Keys PaddleDetection's own configs carry that this package reads nowhere: accepted so that its files
# load unchanged, and ignored.
PPDET_IGNORED_TOP_LEVEL_KEYS: Dict[str, str] = {
    "use_xpu": "other accelerators: this package runs on CPU or CUDA",
    "use_mlu": "other accelerators", "use_npu": "other accelerators", "use_gcu": "other accelerators",
    "print_flops": "FLOPs report at start", "print_params": "parameter-count report at start",
    "find_unused_parameters": "DataParallel option",
}


def register_top_level_keys(keys: Dict[str, str]) -> None:
    """Declare top-level config keys (name -> what it does) that some code reads, so configs may set them."""
    KNOWN_TOP_LEVEL_KEYS.update(keys)


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
    """What the registry knows of one component class.

    A subclass whose constructor takes ``**kwargs`` passes them on to its parent's, so the keys
    of its registered bases are its keys too (a redeclared key keeps the subclass's default), and
    their ``__shared__`` / ``__inject__`` lists add to its own: ``MyHead(RetinaHead)`` reads
    ``num_classes`` from the top level and takes RetinaHead's keys in its own section.
    """

    def __init__(self, cls: type):
        self.cls = cls
        self.name = cls.__name__
        chain = _constructor_chain(cls)
        self.shared: List[str] = _union(getattr(c, "__shared__", []) for c in chain)
        self.inject: List[str] = _union(getattr(c, "__inject__", []) for c in chain)
        # Most derived first, so a subclass may re-word a base's reason.
        self.ignored: Dict[str, str] = {}
        for klass in reversed(chain):
            self.ignored.update(getattr(klass, "__ignored__", {}))
        params: Dict[str, inspect.Parameter] = {}
        self.accepts_var_kwargs = False
        for klass in chain:
            own = [p for p in inspect.signature(klass.__init__).parameters.values() if p.name != "self"]
            for p in own:
                if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                    params.setdefault(p.name, p)
            self.accepts_var_kwargs = any(p.kind == p.VAR_KEYWORD for p in own)
        clash = sorted(k for k in self.ignored if k in params)
        if clash:
            raise ConfigError(f"{cls.__name__}: {clash} are both constructor parameters and __ignored__; "
                              f"an ignored key must not reach the constructor")
        self.params = list(params.values())
        self.defaults = {p.name: p.default for p in self.params if p.default is not p.empty}
        self.required = [p.name for p in self.params if p.default is p.empty]

    @property
    def keys(self) -> List[str]:
        return [p.name for p in self.params]


def _constructor_chain(cls: type) -> List[type]:
    """``cls``, then each registered base its constructor's ``**kwargs`` reach, most derived first.

    The chain stops at a constructor without ``**kwargs`` or at an unregistered base (whose keys
    are not known: the last ``**kwargs`` then accepts any key, as before).
    """
    chain = [cls]
    for base in cls.__mro__[1:]:
        if "__init__" not in vars(base):
            continue
        last = inspect.signature(chain[-1].__init__).parameters.values()
        if not any(p.kind == p.VAR_KEYWORD for p in last):
            break
        spec = _REGISTRY.get(base.__name__)
        if spec is None or spec.cls is not base:
            break
        chain.append(base)
    return chain


def _union(lists: Iterable[Sequence[str]]) -> List[str]:
    out: List[str] = []
    for keys in lists:
        out.extend(k for k in keys if k not in out)
    return out


_REGISTRY: Dict[str, _Spec] = {}
# Configs being built from, innermost last: a `create` without an explicit cfg inside a
# `from_config` hook reads the config its parent was created from.
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


def _base_file(path: str, base: str) -> str:
    """The file a ``_BASE_`` entry of ``path`` names: relative to ``path``'s folder, else (as ``-c`` does) the
    shipped config of that file name, so that a copy of a shipped config runs from anywhere."""
    base_path = os.path.join(os.path.dirname(path), os.path.expanduser(base))
    if os.path.isfile(base_path):
        return base_path
    root = shipped_configs_dir()
    found = _find_by_name(base, root)
    if len(found) == 1:
        return found[0]
    name = os.path.basename(base)
    if found:
        raise ConfigError(f"{path}: _BASE_ file '{base}' is not at {os.path.normpath(base_path)}, and '{name}' is "
                          f"ambiguous under {root}: {', '.join(found)}; give its path relative to {path}")
    raise ConfigError(f"{path}: _BASE_ file '{base}' not found (looked for {os.path.normpath(base_path)} and for "
                      f"'{name}' under {root})")


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
        base_path = _base_file(path, base)
        merged = _deep_merge(merged, _load_with_bases(base_path, list(chain) + [path]))
    return _deep_merge(merged, data)


def _to_attrdict(value: Any) -> Any:
    if isinstance(value, dict) and not isinstance(value, AttrDict):
        return AttrDict({k: _to_attrdict(v) for k, v in value.items()})
    if isinstance(value, AttrDict):
        for k, v in list(value.items()):
            value[k] = _to_attrdict(v)
    return value


def shipped_configs_dir() -> str:
    """The project's ``configs/`` folder: ``ppdet_retina/configs``, which in a checkout is a link to the
    repository's ``configs/`` and in an installed wheel holds a copy of it (package data)."""
    package_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # Resolved so that paths found in a checkout read configs/..., as the README and logs show them.
    return os.path.realpath(os.path.join(package_dir, "configs"))


def _find_by_name(path: str, root: str) -> List[str]:
    """Every file under ``root`` named like ``path``'s last part (``.yml`` / ``.yaml`` added when it has
    neither), sorted."""
    wanted = os.path.basename(path)
    candidates = [wanted] if wanted.endswith((".yml", ".yaml")) else [wanted + ".yml", wanted + ".yaml"]
    found = []
    for dirpath, _, files in os.walk(root):
        found += [os.path.join(dirpath, fname) for fname in files if fname in candidates]
    return sorted(found)


def resolve_config_path(path: str, search_root: Optional[str] = None) -> str:
    """Return ``path`` if it exists, else the unique file of that name under ``configs/``
    (:func:`shipped_configs_dir`, or ``search_root``)."""
    if os.path.isfile(path):
        return path
    root = search_root or shipped_configs_dir()
    wanted = os.path.basename(path)
    found = _find_by_name(path, root)
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise ConfigError(f"config '{path}' is ambiguous under {root}: {', '.join(sorted(found))}; give the full path")
    raise ConfigError(f"config file '{path}' not found (also searched {root} for '{wanted}')")


def load_config(path: str, overrides: Optional[Iterable[str] | dict] = None) -> AttrDict:
    """Read ``path`` (with its ``_BASE_`` files) and apply ``overrides``.

    ``path`` may be a bare file name found under the project's ``configs/``.
    The config's ``filename`` key is set to the file's stem (used for output
    folders). ``custom_imports`` (a list of module names) are imported so that
    components they register can be named in the config. Unknown top-level keys and unknown keys
    of component sections are errors (:func:`check_config_keys`).
    """
    path = resolve_config_path(path)
    cfg = _to_attrdict(_load_with_bases(path))
    cfg["filename"] = os.path.splitext(os.path.basename(path))[0]
    cfg["config_path"] = os.path.abspath(path)
    if overrides:
        cfg = merge_config(overrides, cfg)
    _import_custom(cfg.get("custom_imports") or [])
    check_config_keys(cfg, f"config {path} (or its _BASE_ files)", _override_roots(overrides or {}))
    return cfg


# --------------------------------------------------------------------------- key checks

def _shared_keys() -> Dict[str, Any]:
    """Every ``__shared__`` key of a registered component -> the first default found for it."""
    keys: Dict[str, Any] = {}
    for spec in _REGISTRY.values():
        for key in spec.shared:
            if keys.get(key) is None:
                keys[key] = spec.defaults.get(key)
    return keys


def _referenced_names(value: Any, out: set) -> set:
    """Every string value inside ``value``: a section may be named by another (``nms: MyNMS``)."""
    if isinstance(value, str):
        out.add(value)
    elif isinstance(value, dict):
        for item in value.values():
            _referenced_names(item, out)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _referenced_names(item, out)
    return out


def _override_roots(overrides: Iterable[str] | dict) -> List[str]:
    if isinstance(overrides, dict):
        return list(overrides)
    return [str(item).split("=", 1)[0].strip().split(".")[0] for item in overrides]


def check_config_keys(cfg: dict, source: str = "config", override_keys: Iterable[str] = ()) -> None:
    """Raise :class:`ConfigError` for top-level keys nothing reads and for unknown keys of sections.

    A top-level key is valid when it is in ``KNOWN_TOP_LEVEL_KEYS`` or ``PPDET_IGNORED_TOP_LEVEL_KEYS``,
    a registered component's name, a ``__shared__`` key, or a section that another value names. Each
    unknown key gets its closest valid names; ``override_keys`` (top-level names set with ``-o``) are
    reported as coming from ``-o`` rather than from ``source``.
    """
    _import_components()
    shared = _shared_keys()
    valid = set(KNOWN_TOP_LEVEL_KEYS) | set(PPDET_IGNORED_TOP_LEVEL_KEYS) | set(_REGISTRY) | set(shared)
    referenced = _referenced_names({k: v for k, v in cfg.items()}, set())
    override_keys = set(override_keys)
    problems = []
    for key in cfg:
        if key in valid or key in referenced:
            continue
        close = difflib.get_close_matches(str(key), sorted(valid), n=3, cutoff=0.6)
        hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
        origin = "-o" if key in override_keys else source
        problems.append(f"'{key}' from {origin}{hint}")
    if problems:
        raise ConfigError(
            f"unknown top-level config key {'; '.join(problems)}. Valid: component sections, __shared__ "
            f"keys (num_classes, ...) and KNOWN_TOP_LEVEL_KEYS / PPDET_IGNORED_TOP_LEVEL_KEYS in "
            f"ppdet_retina/core/workspace.py")
    for key, value in cfg.items():
        _check_section(key, value)


def _check_section(key: str, value: Any) -> None:
    """Keys of a section are checked now, even for a component this config never builds."""
    if not isinstance(value, dict):
        return
    name = value.get("name", key if key in _REGISTRY else None)
    if isinstance(name, str) and name in _REGISTRY:
        _check_keys(_REGISTRY[name], {k: v for k, v in value.items() if k != "name"}, key)


def _import_custom(modules: Sequence[str]) -> None:
    if isinstance(modules, str):
        modules = [modules]
    for mod in modules:
        try:
            importlib.import_module(mod)
        except ImportError as err:
            raise ConfigError(f"custom_imports: cannot import '{mod}': {err}. "
                              f"Is its folder on PYTHONPATH?") from None


# --------------------------------------------------------------------------- overrides

def parse_overrides(items: Iterable[str], cfg: Optional[dict] = None) -> dict:
    """Turn ``["a.b=1", "use_gpu=false"]`` into a nested dict; values are typed like YAML.

    With ``cfg``, a key whose current value (or, for a section key, the component's default) is a
    bool, int, float, list or string takes a value of that type, or a :class:`ConfigError` names the
    key; booleans take the words of :func:`ppdet_retina.runtime.parse_bool`.
    """
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
        parts = key.split(".")
        if cfg is not None:
            value = _typed_override(key, raw, value, _current_value(cfg, parts))
        node = result
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{part}' is set twice, once as a value")
        node[parts[-1]] = value
    return result


def merge_config(overrides: Iterable[str] | dict, cfg: AttrDict) -> AttrDict:
    """``cfg`` with ``overrides`` (a dict or ``key=value`` strings) merged in (a new dict)."""
    if not isinstance(overrides, dict):
        overrides = parse_overrides(overrides, cfg)
    return _to_attrdict(_deep_merge(cfg, overrides))


_MISSING = object()


def _current_value(cfg: dict, parts: Sequence[str]) -> Any:
    """The value ``parts`` names in ``cfg``; else the default of the component or shared key it names."""
    node: Any = cfg
    for part in parts:
        if isinstance(node, dict) and part in node:
            node = node[part]
            continue
        if len(parts) == 1:
            _import_components()
            return _shared_keys().get(parts[0], _MISSING)
        if len(parts) == 2:
            section = cfg.get(parts[0])
            name = section.get("name", parts[0]) if isinstance(section, dict) else parts[0]
            spec = _REGISTRY.get(name) if isinstance(name, str) else None
            return spec.defaults.get(parts[1], _MISSING) if spec else _MISSING
        return _MISSING
    return node


def _typed_override(key: str, raw: str, value: Any, current: Any) -> Any:
    """``value`` converted to the type of ``current``; a ConfigError naming ``key`` when it cannot be."""
    def wrong(kind: str) -> ConfigError:
        return ConfigError(f"-o {key}={raw}: '{key}' takes {kind}, got {type(value).__name__} {value!r}")

    if current is _MISSING or current is None:
        return value
    if isinstance(current, bool):
        try:
            return parse_bool(raw)
        except ValueError:
            raise ConfigError(f"-o {key}={raw}: '{key}' takes a boolean: true/false, yes/no, on/off, 1/0") from None
    if value is None:
        return None  # an explicit null unsets any other kind of key
    if isinstance(current, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise wrong("an integer")
    if isinstance(current, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise wrong("a number")
    if isinstance(current, (list, tuple)):
        if isinstance(value, list):
            return value
        raise wrong(f"a list (e.g. -o {key}=[1,2])")
    if isinstance(current, str) and isinstance(value, (bool, int, float)):
        return raw.strip()  # a path or name that looks like a number stays as written ('001')
    return value


# --------------------------------------------------------------------------- create

def create(component: Any, cfg: Optional[dict] = None, **kwargs: Any) -> Any:
    """Build a component.

    ``component`` is a registered class name (its section in ``cfg`` gives the
    arguments), a top-level config key whose value is a dict with ``name:``
    (e.g. ``TrainDataset``), a dict with ``name:``, or an already built object
    (returned as is). Without ``cfg`` the component is built from its class
    defaults (inside a ``from_config`` hook: from the config being built from),
    never from the config loaded last. ``kwargs`` go to the class's
    ``from_config`` hook when it has one, else to the constructor, and win over
    config values.
    """
    if cfg is None:
        cfg = _ACTIVE_CONFIGS[-1] if _ACTIVE_CONFIGS else AttrDict()
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


def build_component(value: Any, default: Optional[str], where: str, shared: Optional[dict] = None,
                    **kwargs: Any) -> Any:
    """The one way a constructor turns a sub-component argument into an object.

    ``value`` is a built object (returned as is), a registered name, a dict of keys (its
    ``name:`` or else ``default`` picks the class) or None (``default``'s class; None when
    ``default`` is None too, for optional parts). Names and dicts are built from the class
    defaults, never from a loaded config; ``shared`` gives values of the owner's ``__shared__``
    keys (e.g. ``{"num_classes": 3}``) and ``kwargs`` go to the class's ``from_config`` hook
    (e.g. ``input_shape``). ``where`` (``"BBoxHead.bbox_assigner"``) names the argument in errors.
    """
    if value is None:
        if default is None:
            return None
        value = default
    return _build_value(value, default, AttrDict(shared or {}), where, extra=kwargs)


def _build(spec: _Spec, section: dict, cfg: dict, where: str, extra: Optional[dict] = None) -> Any:
    extra = dict(extra or {})
    section = copy.deepcopy(section)
    section.pop("name", None)
    _check_keys(spec, section, where)
    for key in spec.ignored:
        section.pop(key, None)
    resolved: Dict[str, Any] = {}
    for key in spec.keys:
        if key in section:
            resolved[key] = section[key]
        elif key in spec.shared and key in cfg:
            resolved[key] = copy.deepcopy(cfg[key])
        elif key in spec.defaults:
            resolved[key] = copy.deepcopy(spec.defaults[key])
    if spec.accepts_var_kwargs:
        # Keys the registry cannot name go to the constructor's **kwargs (an unregistered base's).
        resolved.update({k: v for k, v in section.items() if k not in resolved})
    for key in spec.inject:
        if key in resolved and key not in extra:
            resolved[key] = _build_injected(spec, key, resolved[key], cfg, where)
    from_config: Optional[Callable] = getattr(spec.cls, "from_config", None)
    if from_config is not None:
        _ACTIVE_CONFIGS.append(cfg)
        try:
            resolved.update(from_config(dict(resolved), **extra))
        except ConfigError as err:
            raise _named_for(spec, err)
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
    except ConfigError as err:
        raise _named_for(spec, err)
    except NotImplementedError:
        raise
    except TypeError as err:
        raise ConfigError(f"{where}: cannot build {spec.name} from {sorted(resolved)}: {err}") from err


def _named_for(spec: _Spec, err: ConfigError) -> ConfigError:
    """``err`` with the names of ``spec``'s registered bases replaced by its own.

    A subclass runs its parent's checks, whose messages name the parent ('RetinaHead.nms_pre must
    be >= 1'); the user's config has a section of the subclass.
    """
    message = original = str(err)
    for base in spec.cls.__mro__[1:]:
        known = _REGISTRY.get(base.__name__)
        if known is not None and known.cls is base:
            message = re.sub(rf"\b{re.escape(base.__name__)}\b", spec.name, message)
    if message == original:
        return err
    renamed = ConfigError(message)
    renamed.__cause__ = err
    return renamed


def _check_keys(spec: _Spec, section: dict, where: str) -> None:
    if spec.accepts_var_kwargs:
        return
    valid = spec.keys + list(spec.ignored)
    unknown = [k for k in section if k not in valid]
    if unknown:
        raise unknown_keys_error(where, spec.name, unknown, spec.keys, spec.ignored)


def unknown_keys_error(where: str, name: str, unknown: Sequence[str], keys: Sequence[str],
                       ignored: Iterable[str] = ()) -> ConfigError:
    """The registry's error for config keys ``unknown`` that component ``name`` does not take.

    Public so that a component built by another registry (the PaddleDetection plugin's adapters)
    words it the same way.
    """
    ignored = list(ignored)
    valid = list(keys) + ignored
    parts = []
    for key in unknown:
        close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
        parts.append(f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    note = f" (accepted and ignored: {', '.join(ignored)})" if ignored else ""
    return ConfigError(f"{where}: unknown config key {', '.join(parts)} for {name}; "
                       f"valid keys: {', '.join(keys)}{note}")


def _build_injected(spec: _Spec, key: str, value: Any, cfg: dict, where: str) -> Any:
    if value is None:
        return None
    return _build_value(value, _default_class_name(spec, key), cfg, f"{where}.{key}")


def _build_value(value: Any, default: Optional[str], cfg: dict, where: str,
                 extra: Optional[dict] = None) -> Any:
    """A component from a name (a registered class, whose section in ``cfg`` gives its keys, or a
    top-level section with ``name:``), a dict of keys (``name:`` or else ``default`` is the class)
    or a built object (returned as is)."""
    if isinstance(value, str):
        top = cfg.get(value)
        if isinstance(top, dict) and "name" in top and value not in _REGISTRY:
            return create(value, cfg, **(extra or {}))
        return _build(_spec(value, where=where), dict(top or {}) if isinstance(top, dict) else {},
                      cfg, where=f"{where} ({value})", extra=extra)
    if isinstance(value, dict):
        section = dict(value)
        name = section.pop("name", None) or default
        if name is None:
            raise ConfigError(f"{where}: give the component's class with 'name:' "
                              f"(e.g. {where.rsplit('.', 1)[-1]}: {{name: SomeClass, ...}})")
        return _build(_spec(name, where=where), section, cfg, where=f"{where} ({name})", extra=extra)
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
