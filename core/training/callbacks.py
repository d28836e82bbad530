"""Trainer callbacks: code a config enables by name that ``distillzoo train`` calls at fixed points.

A plugin registers a factory through the ``register_trainer_callbacks`` hook; a
config enables it with its params::

    callbacks:
      - {name: early_stop, patience: 3}

The factory is called with the params (checked against its signature before any
model loads). Callbacks are usually :class:`Callback` subclasses; the trainer
calls each method the object defines, on rank 0 only unless ``all_ranks`` is True.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

from distillzoo.errors import ConfigError, DistillzooError, did_you_mean

EVENTS = ("on_train_start", "on_log", "on_evaluate", "on_checkpoint", "on_train_end")


class Callback:
    """Base class of trainer callbacks: override the events you need (all are no-ops here).

    - ``on_train_start(run)``: a :class:`~distillzoo.training.algorithm.Run`; ``run.extra["step"]``
      is the step the run starts from (non-zero after a resume);
    - ``on_log(step, record)``: the metrics record just written to metrics.jsonl;
    - ``on_evaluate(step, metrics)``: the ``eval/*`` values of a held-out evaluation;
    - ``on_checkpoint(step, path)``: a checkpoint directory, complete on disk;
    - ``on_train_end(result)``: the :class:`~distillzoo.training.loop.TrainResult`, after the final save.
    """

    #: True: called on every rank under torchrun (default: rank 0 only)
    all_ranks: ClassVar[bool] = False

    def on_train_start(self, run) -> None:
        pass

    def on_log(self, step: int, record: dict) -> None:
        pass

    def on_evaluate(self, step: int, metrics: dict) -> None:
        pass

    def on_checkpoint(self, step: int, path) -> None:
        pass

    def on_train_end(self, result) -> None:
        pass


class Callbacks:
    """The enabled callbacks of one process: ``callbacks.fire("on_log", step, record)``."""

    def __init__(self, callbacks: list[Any], rank: int = 0) -> None:
        self.active = [cb for cb in callbacks if rank == 0 or getattr(cb, "all_ranks", False)]

    def fire(self, event: str, *args: Any) -> None:
        for cb in self.active:
            method = getattr(cb, event, None)
            if method is not None:
                method(*args)


def build_callbacks(cfg, where: str, construct: bool = True) -> list[Any]:
    """The callbacks a config's ``callbacks`` list enables, each checked by name and params, then built
    (``construct=False``: checked only, for ``distillzoo check``; returns [])."""
    from omegaconf import DictConfig, OmegaConf

    from distillzoo.hooks.manager import components

    entries = cfg.get("callbacks") or []
    if not entries:
        return []
    available = components("trainer_callbacks")
    built = []
    for i, node in enumerate(entries):
        key = f"callbacks[{i}]"
        if not isinstance(node, DictConfig):
            raise ConfigError(f"{where}: {key} must be a mapping {{name: ..., params}}, got {node!r}")
        params = OmegaConf.to_container(node, resolve=True)
        name = params.pop("name", None)
        if name not in available:
            raise ConfigError(f"{where}: {key}.name: unknown callback {name!r}. Available: "
                              f"{', '.join(sorted(available)) or '(none registered)'}." + did_you_mean(str(name), available))
        factory = available[name].obj
        try:
            inspect.signature(factory).bind(**params)
        except TypeError as e:
            raise ConfigError(f"{where}: {key}: callback {name!r} (package {available[name].package!r}) does not take "
                              f"these params: {e}") from None
        except ValueError:
            pass  # no signature to check (a builtin); the call below tells
        if not construct:
            continue
        try:
            built.append(factory(**params))
        except DistillzooError as e:
            raise ConfigError(f"{where}: {key}: {e}") from None
    return built
