"""The plugin manager: loads built-in and third-party plugins and keeps the rules.

Built-ins are the modules of ``DEFAULT_PLUGINS``; third-party plugins are the
entry points of the group ``distillzoo``. ``DISTILLZOO_PLUGINS`` is an allow-list
of third-party plugins (distribution or entry-point names, comma-separated; empty:
none; unset: all). A plugin that fails to import gives one ``PluginWarning``
naming its package and is skipped. The core, not the plugins, enforces that names
are unique and records which package provided what.
"""

from __future__ import annotations

import importlib
import importlib.metadata as metadata
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import pluggy

from . import hookspecs
from .catalogue import ObjectiveSpec, ParamSpec, build_spec, load_registry_yaml, params_as_dict, validate_params
from .errors import PluginError, PluginWarning, UnknownNameError, did_you_mean

ENTRYPOINT_GROUP = "distillzoo"
DEFAULT_PLUGINS = ("distillzoo.plugins.divergences", "distillzoo.plugins.token", "distillzoo.plugins.preference",
                   "distillzoo.plugins.formats", "distillzoo.plugins.scorers", "distillzoo.plugins.algorithms")
BUILTIN_PACKAGE = "distillzoo"
COMPONENT_HOOKS = {
    "data_formats": "register_data_formats",
    "scorers": "register_scorers",
    "trainer_callbacks": "register_trainer_callbacks",
}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


class PluginManager(pluggy.PluginManager):
    """A pluggy manager that also records the package (and version) behind each plugin."""

    def __init__(self) -> None:
        super().__init__("distillzoo")
        self.add_hookspecs(hookspecs)
        self.packages: dict[str, tuple[str, str | None]] = {}

    def register_plugin(self, plugin: Any, name: str, package: str, version: str | None) -> None:
        self.register(plugin, name=name)
        self.packages[name] = (package, version)

    def package_of(self, plugin_name: str) -> str:
        """The package that provided a plugin (plugins registered by hand: their name)."""
        return self.packages.get(plugin_name, (plugin_name, None))[0]


def make_plugin_manager(load_entrypoints: bool = True) -> PluginManager:
    """A fresh manager with the built-ins and (optionally) the allowed entry points."""
    pm = PluginManager()
    version = _version(BUILTIN_PACKAGE)
    for module_name in DEFAULT_PLUGINS:
        pm.register_plugin(importlib.import_module(module_name), module_name, BUILTIN_PACKAGE, version)
    if load_entrypoints:
        load_entrypoint_plugins(pm)
    return pm


def load_entrypoint_plugins(pm: PluginManager) -> None:
    allowed = os.environ.get("DISTILLZOO_PLUGINS")
    allow = None if allowed is None else {_normalise(n) for n in allowed.split(",") if n.strip()}
    for ep in metadata.entry_points(group=ENTRYPOINT_GROUP):
        dist = ep.dist
        package = dist.metadata["Name"] if dist is not None else ep.value.split(":")[0]
        version = dist.version if dist is not None else None
        if allow is not None and not ({_normalise(package), _normalise(ep.name)} & allow):
            continue
        if pm.has_plugin(ep.name):
            continue  # the same distribution seen twice on sys.path
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken plugin must not take the others down
            warnings.warn(
                f"distillzoo: plugin {ep.name!r} from package {package!r} failed to load and was skipped: "
                f"{type(exc).__name__}: {exc}",
                PluginWarning,
                stacklevel=2,
            )
            continue
        if pm.is_registered(plugin):
            continue  # a built-in module also published as an entry point
        pm.register_plugin(plugin, ep.name, package, version)


_pm: PluginManager | None = None


def get_plugin_manager() -> PluginManager:
    """The process-wide manager, built on first use."""
    global _pm
    if _pm is None:
        _pm = make_plugin_manager()
    return _pm


def reset_plugin_manager() -> None:
    """Forget the process-wide manager (entry points are read again on next use)."""
    global _pm
    _pm = None


def _version(dist_name: str) -> str | None:
    try:
        return metadata.version(dist_name)
    except metadata.PackageNotFoundError:
        return None


def _call_each(pm: PluginManager, hook_name: str, make_register: Callable[[str, str], Callable],
               only: str | None = None) -> None:
    """Call every implementation of a register-style hook (or plugin ``only``'s) with its own ``register``."""
    for impl in getattr(pm.hook, hook_name).get_hookimpls():
        if only is not None and impl.plugin_name != only:
            continue
        register = make_register(impl.plugin_name, pm.package_of(impl.plugin_name))
        impl.function(*[register for _ in impl.argnames])


# ---------------------------------------------------------------------- objectives
def objective_specs(pm: PluginManager | None = None) -> dict[str, ObjectiveSpec]:
    """Every registered objective's catalogue entry, by name."""
    from .base import Objective

    pm = pm or get_plugin_manager()
    builtin_entries = load_registry_yaml()["objectives"]
    specs: dict[str, ObjectiveSpec] = {}

    def make_register(plugin_name: str, package: str):
        def register(cls, entry=None):
            if not (isinstance(cls, type) and issubclass(cls, Objective)):
                raise PluginError(f"plugin {plugin_name!r} (package {package!r}) registered {cls!r}, which is not a distillzoo.Objective subclass")
            name = cls.name
            if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
                raise PluginError(f"objective class {cls.__qualname__} (package {package!r}) needs a lower-case `name`, got {name!r}")
            if name in specs:
                raise PluginError(
                    f"objective {name!r} is registered twice: by package {specs[name].package!r} and by package "
                    f"{package!r}. Uninstall one, or leave it out of DISTILLZOO_PLUGINS."
                )
            if entry is None:
                if package != BUILTIN_PACKAGE:
                    raise PluginError(f"objective {name!r} from package {package!r} has no catalogue entry: call register(cls, entry={{...}})")
                if name not in builtin_entries:
                    raise PluginError(f"built-in objective {name!r} has no entry in registry.yaml")
                entry = builtin_entries[name]
            specs[name] = build_spec(name, cls, entry, package)

        return register

    _call_each(pm, "register_objectives", make_register)
    return specs


def _lookup(specs: dict, what: str, name: str, where: str | None):
    if name not in specs:
        prefix = f"{where}: " if where else ""
        raise UnknownNameError(
            f"{prefix}unknown {what} {name!r}. Available: {', '.join(sorted(specs))}." + did_you_mean(name, specs)
        )
    return specs[name]


def objective_spec(name: str, pm: PluginManager | None = None, where: str | None = None) -> ObjectiveSpec:
    return _lookup(objective_specs(pm), "objective", name, where)


def list_objectives(pm: PluginManager | None = None) -> list[str]:
    """Names of all objectives, built-in and third-party, sorted."""
    return sorted(objective_specs(pm))


def objective(name: str, **params: Any):
    """Build objective ``name`` with ``params`` checked against its catalogue entry."""
    spec = objective_spec(name)
    return spec.cls(**spec.validate_params(params))


# ---------------------------------------------------------------------- training algorithms
ALGORITHM_METHODS = ("roles", "check", "prepare", "micro_batches", "loss", "eval_batches", "eval_loss",
                     "state_dict", "load_state_dict")

@dataclass(frozen=True)
class AlgorithmSpec:
    """A registered training algorithm: its class, package and parameter specs."""

    name: str
    cls: type
    package: str
    params: dict[str, ParamSpec]

    @property
    def summary(self) -> str:
        return self.cls.summary

    def validate_params(self, params: dict, where: str | None = None) -> dict:
        return validate_params(self.params, params, where or f"algorithm {self.name!r}")

    def as_dict(self) -> dict:
        return {"name": self.name, "package": self.package, "summary": self.summary, "records": self.cls.records,
                "objective_kinds": list(self.cls.objective_kinds), "params": params_as_dict(self.params),
                "paper": dict(self.cls.paper)}


def algorithm_specs(pm: PluginManager | None = None) -> dict[str, AlgorithmSpec]:
    """Every registered training algorithm, by name."""
    pm = pm or get_plugin_manager()
    specs: dict[str, AlgorithmSpec] = {}

    def make_register(plugin_name: str, package: str):
        def register(cls):
            # distillzoo.algorithm's base class, by what it defines (that module reaches back to this one)
            if not (isinstance(cls, type) and all(callable(getattr(cls, m, None)) for m in ALGORITHM_METHODS)):
                raise PluginError(f"plugin {plugin_name!r} (package {package!r}) registered {cls!r} as an algorithm; "
                                  "it must be a distillzoo.Algorithm subclass")
            name = cls.name
            if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
                raise PluginError(f"algorithm class {cls.__qualname__} (package {package!r}) needs a lower-case "
                                  f"`name`, got {name!r}")
            if name in specs:
                raise PluginError(f"algorithm {name!r} is registered twice: by package {specs[name].package!r} and by "
                                  f"package {package!r}. Uninstall one, or leave it out of DISTILLZOO_PLUGINS.")
            where = f"algorithm {name!r} (package {package!r})"
            if cls.records not in hookspecs.RECORDS:
                raise PluginError(f"{where}: records {cls.records!r} is not one of {list(RECORDS)}")
            params = {n: ParamSpec.from_entry(n, raw, where) for n, raw in (cls.params or {}).items()}
            shadowed = [n for n in params if callable(getattr(cls, n, None))]
            if shadowed:  # params become attributes of the instance
                raise PluginError(f"{where}: parameter(s) {shadowed} would hide the algorithm's methods; rename them")
            specs[name] = AlgorithmSpec(name, cls, package, params)

        return register

    _call_each(pm, "register_algorithms", make_register)
    return specs


def algorithm_spec(name: str, pm: PluginManager | None = None, where: str | None = None) -> AlgorithmSpec:
    return _lookup(algorithm_specs(pm), "algorithm", name, where)


# ---------------------------------------------------------------------- other components
@dataclass(frozen=True)
class Component:
    name: str
    obj: Any
    summary: str
    package: str
    #: extra keywords the plugin passed to register (a data format's ``records``)
    details: dict = field(default_factory=dict)


def components(kind: str, pm: PluginManager | None = None) -> dict[str, Component]:
    """Registered data formats, scorers or trainer callbacks (``kind`` is one of COMPONENT_HOOKS)."""
    pm = pm or get_plugin_manager()
    found: dict[str, Component] = {}
    label = kind.rstrip("s").replace("_", " ")

    def make_register(plugin_name: str, package: str):
        def register(name: str, obj: Any, summary: str = "", **details: Any):
            if name in found:
                raise PluginError(
                    f"{label} {name!r} is registered twice: by package {found[name].package!r} and by package {package!r}"
                )
            found[name] = Component(name, obj, summary, package, details)

        return register

    _call_each(pm, COMPONENT_HOOKS[kind], make_register)
    return found


def plugins_info(pm: PluginManager | None = None) -> list[dict]:
    """What ``distillzoo plugins`` prints: each loaded plugin, its package, hooks and names."""
    pm = pm or get_plugin_manager()
    objective_specs(pm)  # surface registry errors (duplicates, bad entries) before listing
    algorithm_specs(pm)
    info = []
    for name, plugin in sorted(pm.list_name_plugin()):
        package, version = pm.packages.get(name, (name, None))
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or [])
        info.append({
            "name": name,
            "package": package,
            "version": version,
            "hooks": hooks,
            "objectives": sorted(_names_from(pm, name, "register_objectives")),
            "algorithms": sorted(_names_from(pm, name, "register_algorithms")),
            **{kind: sorted(_names_from(pm, name, hook)) for kind, hook in COMPONENT_HOOKS.items()},
        })
    return info


def _names_from(pm: PluginManager, plugin_name: str, hook_name: str) -> list[str]:
    """Names one plugin registers through one hook (its implementation called alone)."""
    names: list[str] = []
    record = lambda obj, *args, **kwargs: names.append(getattr(obj, "name", obj))  # noqa: E731
    _call_each(pm, hook_name, lambda plugin, package: record, only=plugin_name)
    return names
