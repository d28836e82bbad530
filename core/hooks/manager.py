"""The plugin manager: loads built-in and third-party plugins and keeps the rules.

Built-ins are the modules of ``DEFAULT_PLUGINS``; third-party plugins are the
entry points of the group ``distillzoo``. ``DISTILLZOO_PLUGINS`` is an allow-list
of third-party plugins (distribution or entry-point names, comma-separated; empty:
none; unset: all). A plugin that fails to import gives one ``PluginWarning``
naming its package and is skipped. A third-party hook implementation that raises,
or registers something that fails validation, is isolated the same way: a
``PluginWarning`` names the plugin, its package and the error, and everything that
implementation registered through that hook is left out (all or nothing), while
the other plugins load. Two registrations under one name stay an error naming
both packages. The core, not the plugins, enforces these rules and records which
package provided what.

This module knows no contract class: what a registration must be is checked by
the ``check`` each registry hands :func:`collect` (the objective registry in
:mod:`distillzoo.objectives.registry`; algorithms and components here, by shape).
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

from distillzoo.hooks import hookspecs
from distillzoo.hooks.catalogue import ParamSpec, params_as_dict, validate_params
from distillzoo.errors import PluginError, PluginWarning, UnknownNameError, did_you_mean

ENTRYPOINT_GROUP = "distillzoo"
DEFAULT_PLUGINS = ("distillzoo.plugins.objectives.divergences", "distillzoo.plugins.objectives.token",
                   "distillzoo.plugins.objectives.sequence", "distillzoo.plugins.formats", "distillzoo.plugins.scorers",
                   "distillzoo.plugins.algorithms.distill", "distillzoo.plugins.algorithms.preference",
                   "distillzoo.plugins.algorithms.dpkd", "distillzoo.plugins.trackers", "distillzoo.plugins.curation",
                   "distillzoo.plugins.curation_models")
BUILTIN_PACKAGE = "distillzoo"
COMPONENT_HOOKS = {
    "data_formats": "register_data_formats",
    "scorers": "register_scorers",
    "curation_stages": "register_curation_stages",
    "taggers": "register_taggers",
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
        #: PluginWarning messages already shown (each broken hook warns once per manager)
        self.warned: set[str] = set()
        #: entry points that failed to import: (entry-point name, package, version, error)
        self.failed: list[tuple[str, str, str | None, str]] = []

    def register(self, plugin: Any, name: str | None = None) -> str | None:
        self.warned.clear()  # the set of plugins changed: problems are worth repeating
        return super().register(plugin, name=name)

    def unregister(self, plugin: Any = None, name: str | None = None) -> Any:
        self.warned.clear()
        return super().unregister(plugin, name=name)

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


def _package(ep) -> str:
    return ep.dist.metadata["Name"] if ep.dist is not None else ep.value.split(":")[0]


def allowed_entry_points() -> list:
    """The entry points of group ``distillzoo`` that DISTILLZOO_PLUGINS allows (all when it is unset)."""
    allowed = os.environ.get("DISTILLZOO_PLUGINS")
    allow = None if allowed is None else {_normalise(n) for n in allowed.split(",") if n.strip()}
    return [ep for ep in metadata.entry_points(group=ENTRYPOINT_GROUP)
            if allow is None or {_normalise(_package(ep)), _normalise(ep.name)} & allow]


def load_entrypoint_plugins(pm: PluginManager) -> None:
    for ep in allowed_entry_points():
        package, version = _package(ep), ep.dist.version if ep.dist is not None else None
        if pm.has_plugin(ep.name):
            continue  # the same distribution seen twice on sys.path
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken plugin must not take the others down
            pm.failed.append((ep.name, package, version, f"{type(exc).__name__}: {exc}"))
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


@dataclass(frozen=True)
class Registration:
    """One thing a plugin registered through a hook, after the core checked it."""

    name: str
    value: Any
    plugin: str
    package: str


def collect(pm: PluginManager, hook_name: str, check: Callable[..., tuple[str, Any]], what: str,
             problems: list[dict] | None = None) -> dict[str, Registration]:
    """Call every implementation of a register-style hook and keep what passes ``check``.

    ``check(plugin, package, *args, **kwargs)`` turns one call of ``register`` into
    ``(name, value)`` or raises ``PluginError``. A third-party implementation that raises
    (in its own code or through ``check``) is isolated: none of its registrations
    through this hook are kept, and a ``PluginWarning`` names it (or, given
    ``problems``, a record is appended there instead). A built-in that raises is a bug
    in distillzoo and propagates. A name registered by two plugins raises
    ``PluginError`` naming both packages (recorded in ``problems`` instead, if given).
    """
    found: dict[str, Registration] = {}
    for impl in getattr(pm.hook, hook_name).get_hookimpls():
        plugin, package = impl.plugin_name, pm.package_of(impl.plugin_name)
        staged: dict[str, Registration] = {}

        def register(*args: Any, **kwargs: Any) -> None:
            name, value = check(plugin, package, *args, **kwargs)
            if name in staged:
                raise PluginError(f"{what} {name!r} is registered twice by package {package!r}")
            staged[name] = Registration(name, value, plugin, package)

        try:
            impl.function(*[register for _ in impl.argnames])
        except Exception as exc:
            if package == BUILTIN_PACKAGE:
                raise
            message = (f"distillzoo: plugin {plugin!r} from package {package!r} failed in {hook_name} and its "
                       f"{what}s were skipped: {type(exc).__name__}: {exc}")
            if problems is not None:
                problems.append({"plugin": plugin, "package": package, "hook": hook_name,
                                 "error": f"{type(exc).__name__}: {exc}"})
            elif message not in pm.warned:
                pm.warned.add(message)
                warnings.warn(message, PluginWarning, stacklevel=3)
            continue
        for name, registration in staged.items():
            if name in found:
                error = (f"{what} {name!r} is registered twice: by package {found[name].package!r} and by package "
                         f"{package!r}. Uninstall one, or leave it out of DISTILLZOO_PLUGINS.")
                if problems is None:
                    raise PluginError(error)
                problems.append({"plugin": plugin, "package": package, "hook": hook_name, "error": f"PluginError: {error}"})
                continue
            found[name] = registration
    return found


def class_name(cls: type, what: str, package: str) -> str:
    """The ``name`` a registered class declares: lower-case letters, digits and underscores, or a PluginError."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise PluginError(f"{what} class {cls.__qualname__} (package {package!r}) needs a lower-case `name`, "
                          f"got {name!r}")
    return name


def lookup(specs: dict, what: str, name: str, where: str | None):
    """``specs[name]``, or an UnknownNameError listing the names and a "did you mean"."""
    if name not in specs:
        prefix = f"{where}: " if where else ""
        raise UnknownNameError(
            f"{prefix}unknown {what} {name!r}. Available: {', '.join(sorted(specs))}." + did_you_mean(name, specs)
        )
    return specs[name]


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


def algorithm_specs(pm: PluginManager | None = None, problems: list[dict] | None = None) -> dict[str, AlgorithmSpec]:
    """Every registered training algorithm, by name (see :func:`collect` for broken plugins)."""
    pm = pm or get_plugin_manager()
    return {name: r.value for name, r in algorithm_registrations(pm, problems).items()}


def algorithm_registrations(pm: PluginManager, problems: list[dict] | None = None) -> dict[str, Registration]:
    def check(plugin: str, package: str, cls: Any) -> tuple[str, AlgorithmSpec]:
        # distillzoo.training.algorithm's base class, by what it defines (that module reaches back to this one)
        if not (isinstance(cls, type) and all(callable(getattr(cls, m, None)) for m in ALGORITHM_METHODS)):
            raise PluginError(f"plugin {plugin!r} (package {package!r}) registered {cls!r} as an algorithm; "
                              "it must be a distillzoo.Algorithm subclass")
        name = class_name(cls, "algorithm", package)
        where = f"algorithm {name!r} (package {package!r})"
        if cls.records not in hookspecs.RECORDS:
            raise PluginError(f"{where}: records {cls.records!r} is not one of {list(hookspecs.RECORDS)}")
        params = {n: ParamSpec.from_entry(n, raw, where) for n, raw in (cls.params or {}).items()}
        shadowed = [n for n in params if callable(getattr(cls, n, None))]
        if shadowed:  # params become attributes of the instance
            raise PluginError(f"{where}: parameter(s) {shadowed} would hide the algorithm's methods; rename them")
        return name, AlgorithmSpec(name, cls, package, params)

    return collect(pm, "register_algorithms", check, "algorithm", problems)


def algorithm_spec(name: str, pm: PluginManager | None = None, where: str | None = None) -> AlgorithmSpec:
    return lookup(algorithm_specs(pm), "algorithm", name, where)


# ---------------------------------------------------------------------- other components
@dataclass(frozen=True)
class Component:
    name: str
    obj: Any
    summary: str
    package: str
    #: extra keywords the plugin passed to register (a data format's ``records``)
    details: dict = field(default_factory=dict)


def components(kind: str, pm: PluginManager | None = None, problems: list[dict] | None = None) -> dict[str, Component]:
    """Registered data formats, scorers, curation stages, taggers or trainer callbacks (``kind`` is one of
    COMPONENT_HOOKS)."""
    pm = pm or get_plugin_manager()
    return {name: r.value for name, r in component_registrations(pm, kind, problems).items()}


def component_registrations(pm: PluginManager, kind: str, problems: list[dict] | None = None) -> dict[str, Registration]:
    label = kind.rstrip("s").replace("_", " ")

    def check(plugin: str, package: str, name: Any, obj: Any, summary: str = "", **details: Any) -> tuple[str, Component]:
        if not isinstance(name, str) or not name:
            raise PluginError(f"plugin {plugin!r} (package {package!r}) registered a {label} named {name!r}; "
                              "a name must be a non-empty string")
        if not callable(obj):
            raise PluginError(f"{label} {name!r} (package {package!r}) registered {obj!r}, which is not callable")
        if kind == "data_formats" and details.get("records", "instruction") not in hookspecs.RECORDS:
            raise PluginError(f"data format {name!r} (package {package!r}) registered records={details['records']!r}; "
                              f"expected one of {list(hookspecs.RECORDS)}")
        return name, Component(name, obj, str(summary), package, details)

    return collect(pm, COMPONENT_HOOKS[kind], check, label, problems)
