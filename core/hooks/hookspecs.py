"""The hooks a distillzoo plugin may implement.

Every hook hands the plugin a ``register`` callback and collects nothing from
its return value: the core owns the rules (name clashes, which package provided
what), the plugin only declares what it offers. Every implementation of a hook
is called; the order between plugins carries no meaning.

The hooks: objectives, training algorithms, data formats, scorers and trainer
callbacks. A plugin is a module with functions decorated by ``distillzoo.hookimpl``::

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

#: what the records of a data format hold, and what an algorithm trains on
RECORDS = ("instruction", "preference")

# register(objective_class, entry=None)
RegisterObjective = Callable[..., None]
# register(name, component, summary="", **details), e.g. a data format's records="preference"
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
def register_algorithms(register: Callable[[type], None]) -> None:
    """Declare training algorithms that ``distillzoo train`` runs, selected by ``algorithm: {name: ...}``.

    Called by the core when it resolves a config's algorithm (and for
    ``distillzoo algorithms`` / ``plugins``); every plugin's implementation is
    called. Call ``register(cls)`` once per algorithm, where ``cls`` subclasses
    ``distillzoo.Algorithm`` and sets ``name``, ``summary``, ``records`` and
    ``params`` (see :mod:`distillzoo.training.algorithm` for what it implements). Built-in
    algorithms (distill, preference, dpkd) register the same way. Two algorithms
    with one name are an error that names both packages.
    """


@hookspec
def register_data_formats(register: RegisterComponent) -> None:
    """Declare dataset record formats (dolly, alpaca, chat messages, ...).

    Called by the core when it resolves a ``format:`` name; every plugin's
    implementation is called. Call ``register(name, reader, summary="",
    records="instruction")``, where ``reader`` turns one decoded JSONL record into
    the fields the data pipeline tokenizes: ``{"id", "messages"}`` for
    ``records="instruction"``, ``{"id", "prompt", "chosen", "rejected"}`` for
    ``records="preference"``. ``records`` lets ``distillzoo train`` check, before any
    model loads, that a stream suits its algorithm. Names must be unique across plugins.
    """


@hookspec
def register_scorers(register: RegisterComponent) -> None:
    """Declare sample scorers used for data selection (e.g. a teacher-student gap).

    Called by the core when it resolves a scorer name; every plugin's
    implementation is called. Call ``register(name, scorer, summary="")``.
    Names must be unique across plugins.
    """


@hookspec
def register_curation_stages(register: RegisterComponent) -> None:
    """Declare curation stages that ``distillzoo curate`` runs by name: ``curate.stages: [{name: ..., **params}]``.

    Called by the core when it resolves a stage name; every plugin's implementation is
    called. Call ``register(name, factory, summary="")``: ``factory(**params)`` returns a
    ``distillzoo.curate.pipeline.Stage``. Names must be unique across plugins.
    """


@hookspec
def register_taggers(register: RegisterComponent) -> None:
    """Declare taggers that the ``tag`` curation stage runs by name: ``{name: tag, tagger: ..., **params}``.

    Called by the core when it resolves a tagger name; every plugin's implementation is
    called. Call ``register(name, factory, summary="")``: ``factory(**params)`` returns a
    ``distillzoo.curate.pipeline.Tagger`` (a trained classifier, a rule set). Names must be
    unique across plugins.
    """


@hookspec
def register_trainer_callbacks(register: RegisterComponent) -> None:
    """Declare trainer callbacks that a config enables by name: ``callbacks: [{name: ..., **params}]``.

    Called by ``distillzoo train`` when it checks a config (before any model
    loads); every plugin's implementation is called. Call
    ``register(name, factory, summary="")``: ``factory(**params)`` returns the
    callback, usually a ``distillzoo.Callback`` subclass. The trainer calls its
    methods, where defined, at these points (on rank 0 only, unless the callback
    sets ``all_ranks = True``):

    - ``on_train_start(run)``: models built, the resumed step known (``run.extra["step"]``);
    - ``on_log(step, record)``: each step written to metrics.jsonl, with that record;
    - ``on_evaluate(step, metrics)``: after each held-out evaluation (``eval/*`` values);
    - ``on_checkpoint(step, path)``: after a checkpoint directory is complete;
    - ``on_train_end(result)``: after the final student is saved (a ``TrainResult``).

    Names must be unique across plugins; an exception in a callback stops the run.
    """


__all__ = [
    "RECORDS",
    "hookimpl",
    "hookspec",
    "register_objectives",
    "register_algorithms",
    "register_data_formats",
    "register_scorers",
    "register_curation_stages",
    "register_trainer_callbacks",
]
