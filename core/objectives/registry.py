"""Objectives by name: the registry the ``register_objectives`` hook fills, and building objectives from it.

``objective("fkl", temperature=2.0)`` builds one with its parameters checked against
its catalogue entry; :func:`build_objective` builds the one objective or the weighted
:class:`~distillzoo.objectives.mixture.Mixture` a config's terms describe. This is the
only place objectives are built from names.
"""

from __future__ import annotations

from typing import Any, Sequence

from distillzoo.errors import DistillzooError, ParameterError, PluginError
from distillzoo.hooks.catalogue import ObjectiveSpec, build_spec, load_registry_yaml
from distillzoo.hooks.manager import (BUILTIN_PACKAGE, PluginManager, Registration, class_name, collect,
                                     get_plugin_manager, lookup)


def objective_specs(pm: PluginManager | None = None, problems: list[dict] | None = None) -> dict[str, ObjectiveSpec]:
    """Every registered objective's catalogue entry, by name (see :func:`~distillzoo.hooks.manager.collect` for
    broken plugins)."""
    pm = pm or get_plugin_manager()
    return {name: r.value for name, r in objective_registrations(pm, problems).items()}


def objective_registrations(pm: PluginManager | None = None, problems: list[dict] | None = None
                            ) -> dict[str, Registration]:
    """Every registered objective by name, with the plugin and package that registered it."""
    from distillzoo.objectives.logit import Objective

    pm = pm or get_plugin_manager()
    builtin_entries = load_registry_yaml()["objectives"]

    def check(plugin: str, package: str, cls: Any, entry: Any = None) -> tuple[str, ObjectiveSpec]:
        if not (isinstance(cls, type) and issubclass(cls, Objective)):
            raise PluginError(f"plugin {plugin!r} (package {package!r}) registered {cls!r}, which is not a "
                              "distillzoo.Objective subclass")
        name = class_name(cls, "objective", package)
        if entry is None:
            if package != BUILTIN_PACKAGE:
                raise PluginError(f"objective {name!r} from package {package!r} has no catalogue entry: call "
                                  "register(cls, entry={...})")
            if name not in builtin_entries:
                raise PluginError(f"built-in objective {name!r} has no entry in registry.yaml")
            entry = builtin_entries[name]
        return name, build_spec(name, cls, entry, package)

    return collect(pm, "register_objectives", check, "objective", problems)


def objective_spec(name: str, pm: PluginManager | None = None, where: str | None = None) -> ObjectiveSpec:
    return lookup(objective_specs(pm), "objective", name, where)


def list_objectives(pm: PluginManager | None = None) -> list[str]:
    """Names of all objectives, built-in and third-party, sorted."""
    return sorted(objective_specs(pm))


def objective(name: str, **params: Any):
    """Build objective ``name`` with ``params`` checked against its catalogue entry."""
    spec = objective_spec(name)
    return spec.cls(**spec.validate_params(params))


def build_objective(terms: Sequence[tuple[float, str, dict]], *, mixture: bool, **overrides: Any):
    """One objective (``mixture=False``: the single term's) or a weighted Mixture of ``(weight, name, params)``
    terms, each built with its params and ``overrides`` (``reduction="sum"`` for training)."""
    from distillzoo.objectives.mixture import Mixture

    built = [(weight, objective(name, **{**params, **overrides})) for weight, name, params in terms]
    if not mixture:
        if len(built) != 1:
            raise ParameterError(f"one objective was asked for, but {len(built)} terms were given")
        return built[0][1]
    try:
        return Mixture(built)
    except DistillzooError as e:
        raise ParameterError(f"objectives: {e}") from None
