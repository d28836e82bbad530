"""Exceptions and warnings raised by distillzoo, and the "did you mean" helper."""

from __future__ import annotations

import difflib
from typing import Iterable


class DistillzooError(Exception):
    """Base class of every error distillzoo raises on purpose."""


class UnknownNameError(DistillzooError, LookupError):
    """A name (objective, parameter, config key, component) that is not known."""

    def __str__(self) -> str:  # LookupError would quote the message like a key
        return str(self.args[0]) if self.args else ""


class ParameterError(DistillzooError, ValueError):
    """A parameter value of the wrong type or outside its valid range."""


class NonFiniteError(ParameterError):
    """A value that must be finite is not: a teacher row that is no distribution, a loss, a gradient.

    ``row`` is the flattened token row where it was found (None when it is not one row's);
    callers that know which sample a row belongs to add that to the message.
    """

    def __init__(self, message: str, row: int | None = None) -> None:
        super().__init__(message)
        self.row = row


class PluginError(DistillzooError):
    """A plugin broke a rule of the registry (duplicate name, missing catalogue entry)."""


class ConfigError(DistillzooError, ValueError):
    """A config file or override that cannot be used; the message names the key."""


class DataError(DistillzooError, ValueError):
    """A data file or record that cannot be used; the message names file:line and the field."""


class PluginWarning(UserWarning):
    """A plugin could not be loaded; the others still load."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return " Did you mean 'x'?" for the closest choice, or "" if none is close."""
    close = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""


class ServerError(DistillzooError):
    """A teacher server that could not be used: unreachable, refusing, or answering something else."""
