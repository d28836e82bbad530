"""The objective catalogue: registry.yaml entries, parameter specs and their validation.

registry.yaml describes every built-in objective (name, kind, summary, formula,
parameters with defaults and ranges, inputs, paper, package). A third-party
plugin passes an entry of the same shape to ``register(cls, entry=...)``. The
parameters shared by every objective of a kind (temperature, ignore_index,
reduction, ...) are declared once under ``kinds:`` and merged into each entry.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Mapping

import yaml

from distillzoo.errors import ParameterError, PluginError, UnknownNameError, did_you_mean

_TYPES = {"float", "int", "bool", "str", "str | list[str]", "list[float]"}
_RANGE = re.compile(r"^\s*([\[(])\s*([^,\s]+)\s*,\s*([^,\s]+)\s*([\])])\s*$")
ENTRY_FIELDS = ("kind", "summary", "formula", "params", "inputs", "paper")


@functools.lru_cache(maxsize=1)
def load_registry_yaml() -> dict:
    """Parse the registry.yaml shipped inside the package (a link to the repo root's)."""
    text = resources.files("distillzoo").joinpath("registry.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


@dataclass(frozen=True)
class Range:
    low: float
    high: float
    low_closed: bool
    high_closed: bool

    @classmethod
    def parse(cls, text: str) -> "Range":
        m = _RANGE.match(str(text))
        if not m:
            raise ValueError(f"range {text!r} is not of the form '(a, b)', '[a, b)', ... with inf allowed")
        lo, hi = float(m.group(2)), float(m.group(3))
        return cls(lo, hi, m.group(1) == "[", m.group(4) == "]")

    def __contains__(self, x: float) -> bool:
        if math.isnan(x):
            return False
        above = x >= self.low if self.low_closed else x > self.low
        below = x <= self.high if self.high_closed else x < self.high
        return above and below

    def __str__(self) -> str:
        def fmt(v: float) -> str:
            return "inf" if v == math.inf else "-inf" if v == -math.inf else f"{v:g}"

        return f"{'[' if self.low_closed else '('}{fmt(self.low)}, {fmt(self.high)}{']' if self.high_closed else ')'}"


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of an objective: its type, default and valid values."""

    name: str
    type: str
    default: Any
    doc: str = ""
    range: Range | None = None
    choices: tuple | None = None

    @classmethod
    def from_entry(cls, name: str, raw: Mapping[str, Any], where: str) -> "ParamSpec":
        if not isinstance(raw, Mapping):
            raise PluginError(f"{where}: parameter {name!r} must be a mapping with type/default, got {raw!r}")
        unknown = set(raw) - {"type", "default", "doc", "range", "choices"}
        if unknown:
            raise PluginError(f"{where}: parameter {name!r} has unknown field(s) {sorted(unknown)}")
        ptype = raw.get("type")
        if ptype not in _TYPES:
            raise PluginError(f"{where}: parameter {name!r} has type {ptype!r}; expected one of {sorted(_TYPES)}")
        if "default" not in raw:
            raise PluginError(f"{where}: parameter {name!r} has no default")
        try:
            prange = Range.parse(raw["range"]) if raw.get("range") is not None else None
        except ValueError as e:
            raise PluginError(f"{where}: parameter {name!r}: {e}") from None
        choices = tuple(raw["choices"]) if raw.get("choices") is not None else None
        spec = cls(name, ptype, raw["default"], str(raw.get("doc", "")), prange, choices)
        try:
            spec.validate(spec.default, where)
        except ParameterError as e:
            raise PluginError(f"{where}: the default of parameter {name!r} is invalid: {e}") from None
        return spec

    def validate(self, value: Any, where: str) -> Any:
        """Return ``value`` coerced to this parameter's type, or raise ParameterError."""
        if value is None and self.default is None:
            return None
        if self.type in ("str | list[str]", "list[float]"):
            return self._validate_list(value, where)
        ok = {
            "float": isinstance(value, (int, float)) and not isinstance(value, bool),
            "int": isinstance(value, int) and not isinstance(value, bool),
            "bool": isinstance(value, bool),
            "str": isinstance(value, str),
        }[self.type]
        if not ok:
            raise ParameterError(
                f"{where}: parameter {self.name!r} must be {'a' if self.type != 'int' else 'an'} {self.type}"
                f"{' or null' if self.default is None else ''}, got {type(value).__name__} {value!r}"
            )
        if self.type == "float":
            value = float(value)
        if self.range is not None and value not in self.range:
            raise ParameterError(f"{where}: parameter {self.name!r} = {value!r} is out of range {self.range}")
        if self.choices is not None and value not in self.choices:
            raise ParameterError(
                f"{where}: parameter {self.name!r} = {value!r} is not one of {list(self.choices)}"
                + did_you_mean(str(value), [str(c) for c in self.choices])
            )
        return value

    def _validate_list(self, value: Any, where: str) -> Any:
        """A list parameter: ``list[float]`` (each in range), or ``str | list[str]`` (one name or a non-empty list,
        each among the choices)."""
        words = self.type == "str | list[str]"
        if words and isinstance(value, str):
            items = [value]
        elif isinstance(value, (list, tuple)) and (value or not words):
            items = list(value)
        else:
            items = None
        good = (lambda v: isinstance(v, str)) if words else (
            lambda v: isinstance(v, (int, float)) and not isinstance(v, bool))
        if items is None or not all(good(v) for v in items):
            kind = "a str or a non-empty list of str" if words else "a list of numbers"
            raise ParameterError(f"{where}: parameter {self.name!r} must be {kind}"
                                 f"{' or null' if self.default is None else ''}, got {type(value).__name__} {value!r}")
        for v in items:
            if not words and self.range is not None and float(v) not in self.range:
                raise ParameterError(f"{where}: parameter {self.name!r}: {v!r} is out of range {self.range}")
            if self.choices is not None and v not in self.choices:
                which = f" = {v!r}" if isinstance(value, str) else f": {v!r}"
                raise ParameterError(f"{where}: parameter {self.name!r}{which} is not one of {list(self.choices)}"
                                     + did_you_mean(str(v), [str(c) for c in self.choices]))
        return value if words and isinstance(value, str) else [v if words else float(v) for v in items]

    def describe(self) -> str:
        valid = f" in {self.range}" if self.range else f" one of {list(self.choices)}" if self.choices else ""
        return f"{self.name}: {self.type} = {self.default!r}{valid}"


def validate_params(specs: Mapping[str, ParamSpec], params: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Defaults of ``specs`` overlaid with ``params``, each checked; unknown names are an error."""
    out = {name: spec.default for name, spec in specs.items()}
    for key, value in params.items():
        if key not in specs:
            raise UnknownNameError(
                f"{where}: unknown parameter {key!r}. Valid parameters: {', '.join(specs) or '(none)'}."
                + did_you_mean(key, specs)
            )
        out[key] = specs[key].validate(value, where)
    return out


def params_as_dict(specs: Mapping[str, ParamSpec]) -> dict:
    """Parameter specs as JSON-ready mappings (what ``distillzoo list --json`` prints)."""
    return {
        n: {k: v for k, v in (("type", p.type), ("default", p.default), ("range", str(p.range) if p.range else None),
                              ("choices", list(p.choices) if p.choices else None), ("doc", p.doc)) if v is not None}
        for n, p in specs.items()
    }


@dataclass(frozen=True)
class ObjectiveSpec:
    """A catalogue entry joined with the class that implements it."""

    name: str
    kind: str
    summary: str
    formula: str
    params: dict[str, ParamSpec]
    inputs: tuple[str, ...]
    paper: dict
    package: str
    cls: type = field(repr=False, compare=False, default=None)

    def validate_params(self, params: Mapping[str, Any], where: str | None = None) -> dict[str, Any]:
        """Defaults overlaid with ``params``, each checked; unknown names are an error."""
        return validate_params(self.params, params, where or f"objective {self.name!r}")

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "summary": self.summary,
            "formula": self.formula,
            "params": params_as_dict(self.params),
            "inputs": list(self.inputs),
            "paper": self.paper,
            "package": self.package,
        }


def build_spec(name: str, cls: type, entry: Mapping[str, Any], package: str) -> ObjectiveSpec:
    """Check a catalogue entry and merge the shared parameters of its kind into it."""
    where = f"catalogue entry for objective {name!r} (package {package!r})"
    if not isinstance(entry, Mapping):
        raise PluginError(f"{where}: expected a mapping, got {type(entry).__name__}")
    missing = [f for f in ENTRY_FIELDS if f not in entry]
    if missing:
        raise PluginError(f"{where}: missing field(s) {missing}; an entry needs {list(ENTRY_FIELDS)}")
    kinds = load_registry_yaml()["kinds"]
    kind = entry["kind"]
    if kind not in kinds:
        raise PluginError(f"{where}: kind {kind!r} is not one of {list(kinds)}")
    own = entry.get("params") or {}
    shared = kinds[kind].get("params") or {}
    clash = set(own) & set(shared)
    if clash:
        raise PluginError(f"{where}: parameter(s) {sorted(clash)} are shared by every {kind} objective; do not redeclare them")
    params = {n: ParamSpec.from_entry(n, raw, where) for n, raw in {**own, **shared}.items()}
    return ObjectiveSpec(
        name=name,
        kind=kind,
        summary=str(entry["summary"]).strip(),
        formula=str(entry["formula"]).strip(),
        params=params,
        inputs=tuple(entry["inputs"]),
        paper=dict(entry["paper"] or {}),
        package=package,
        cls=cls,
    )
