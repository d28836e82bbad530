"""The hooks a distillzoo plugin may implement.

Every hook hands the plugin a ``register`` callback and collects nothing from
its return value: the core owns the rules (name clashes, which package provided
what), the plugin only declares what it offers. Every implementation of a hook
is called; the order between plugins carries no meaning.

A plugin is a module with functions decorated by ``distillzoo.hookimpl``::

    import distillzoo as dz

    @dz.hookimpl
    def register_objectives(register):
        register(MyObjective, entry={...})
"""

from __future__ import annotations

from typing import Callable

import pluggy

hookspec = pluggy.HookspecMarker("distillzoo")
hookimpl = pluggy.HookimplMarker("distillzoo")

# register(objective_class, entry=None)
RegisterObjective = Callable[..., None]
# register(name, component, summary="")
RegisterComponent = Callable[..., None]


@hookspec
def register_objectives(register: RegisterObjective) -> None:
    """Declare distillation objectives.

    Called by the core when it builds the objective catalogue; every plugin's
    implementation is called. Call ``register(cls, entry=None)`` once per
    objective, where ``cls`` subclasses ``distillzoo.Objective`` and sets
    ``cls.name``. ``entry`` is the catalogue entry (the same fields as an item
    of registry.yaml: kind, summary, formula, params, inputs, paper). Built-in
    objectives leave it out and are described by registry.yaml; third-party
    objectives must pass it. Two objectives with one name are an error that
    names both packages.
    """


@hookspec
def register_data_formats(register: RegisterComponent) -> None:
    """Declare dataset record formats (dolly, alpaca, chat messages, ...).

    Called by the core when it resolves a ``format:`` name; every plugin's
    implementation is called. Call ``register(name, reader, summary="")``,
    where ``reader`` turns one decoded JSONL record into the fields the data
    pipeline tokenizes. Names must be unique across plugins.
    """


@hookspec
def register_scorers(register: RegisterComponent) -> None:
    """Declare sample scorers used for data selection (e.g. a teacher-student gap).

    Called by the core when it resolves a scorer name; every plugin's
    implementation is called. Call ``register(name, scorer, summary="")``.
    Names must be unique across plugins.
    """


@hookspec
def register_trainer_callbacks(register: RegisterComponent) -> None:
    """Declare trainer callbacks that can be enabled by name in a config.

    Called by the core when it resolves the ``callbacks:`` list of a config;
    every plugin's implementation is called. Call
    ``register(name, callback_factory, summary="")``. Names must be unique
    across plugins.
    """


__all__ = [
    "hookimpl",
    "hookspec",
    "register_objectives",
    "register_data_formats",
    "register_scorers",
    "register_trainer_callbacks",
]
