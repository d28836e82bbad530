"""docs/reference/config.md is what docs/gen_config_reference.py generates from the schema and the built-ins."""

from __future__ import annotations

import dataclasses
import importlib.util
import typing
from pathlib import Path

import distillzoo as dz
from distillzoo.config import DistillConfig

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "reference" / "config.md"


def _generator():
    spec = importlib.util.spec_from_file_location("gen_config_reference", ROOT / "docs" / "gen_config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_committed_config_reference_is_what_the_schema_generates():
    assert PAGE.read_text(encoding="utf-8") == _generator().render(), \
        "docs/reference/config.md is out of date: run python docs/gen_config_reference.py"


def _schema_fields(cls, seen=None):
    seen = set() if seen is None else seen
    if cls in seen:
        return
    seen.add(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        yield cls, f
        for inner in [hints[f.name], *typing.get_args(hints[f.name])]:
            for candidate in [inner, *typing.get_args(inner)]:
                if dataclasses.is_dataclass(candidate):
                    yield from _schema_fields(candidate, seen)


def test_every_schema_key_and_algorithm_parameter_is_on_the_page_with_its_doc():
    page = _generator().render()
    fields = list(_schema_fields(DistillConfig))
    assert len(fields) > 50  # every section's keys, not only the top level
    for cls, f in fields:
        doc = f.metadata.get("doc")
        assert doc, f"{cls.__name__}.{f.name} has no metadata['doc']"
        assert f"| `{f.name}` |" in page and doc.replace("|", "\\|") in page, f"{cls.__name__}.{f.name} is missing"
    for name, spec in dz.algorithm_specs().items():
        assert f"### algorithm: {name}" in page
        for param in spec.params.values():
            assert f"| `{param.name}` | {param.type} |" in page and param.doc.replace("|", "\\|") in page, \
                f"algorithm {name}'s parameter {param.name} is missing"
    assert "| `on_policy` | float | `0.0` | `[0, 1]` |" in page  # GKD's lambda belongs to distill, not to train
