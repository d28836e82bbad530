"""Write docs/reference/config.md from the config schema and the registered algorithms and objectives.

    python docs/gen_config_reference.py            # (re)write docs/reference/config.md
    python docs/gen_config_reference.py --check    # exit 1 if the committed file is not what this writes

It walks :class:`distillzoo.config.DistillConfig` and the dataclasses of its
sections (each key's type, default and ``metadata["doc"]``), then the parameters of
every built-in training algorithm (``distillzoo.hooks.manager.algorithm_specs``)
and objective (the catalogue, registry.yaml), each a ``ParamSpec`` with its type,
default, range or choices and doc. Third-party plugins are left out (entry points
are not loaded), so what is installed does not change the page.
tests/test_docs_reference.py asserts that the committed page equals :func:`render`.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from pathlib import Path

import yaml
from markdown.extensions.toc import slugify
from omegaconf import MISSING

OUT = Path(__file__).resolve().parent / "reference" / "config.md"
TOP = ""  # the root section's key


def _type(hint) -> tuple[str, type | None]:
    """``(text, dataclass or None)`` of a schema type hint: ``int or null``, ``list of data.streams[]``, ..."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    origin = typing.get_origin(hint)
    if origin is typing.Union and len(args) == 1:
        text, inner = _type(args[0])
        return f"{text} or null", inner
    if dataclasses.is_dataclass(hint):
        return "section", hint
    if origin in (dict, typing.Dict):
        return "mapping", None
    if origin in (list, typing.List):
        text, inner = _type(args[0]) if args else ("any", None)
        return (f"list of {text}s" if inner is None else "list of sections"), inner
    return getattr(hint, "__name__", str(hint)), None


def _value(value) -> str:
    if value is None:
        return "`null`"
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=10_000).strip()
    return f"`{text.removesuffix('...').strip()}`"


def _default(f: dataclasses.Field) -> str:
    if f.default_factory is not dataclasses.MISSING:
        made = f.default_factory()
        return "(its defaults)" if dataclasses.is_dataclass(made) else _value(made)
    if f.default is MISSING or f.default is dataclasses.MISSING:
        return "required"
    return _value(f.default)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _sections(root) -> list[tuple[type, list[str]]]:
    """Each dataclass of the schema with the config keys that take it, in the order they first appear."""
    found: dict[type, list[str]] = {}

    def walk(cls, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            text, inner = _type(hints[f.name])
            if inner is None:
                continue
            key = f"{prefix}{f.name}" + ("[]" if text.startswith("list") else "")
            first = inner not in found
            found.setdefault(inner, []).append(key)
            if first:
                walk(inner, f"{key}.")

    found[root] = [TOP]
    walk(root, "")
    return list(found.items())


def _heading(keys: list[str]) -> str:
    return "Top level" if keys == [TOP] else ", ".join(keys)


def _schema(root) -> list[str]:
    sections = _sections(root)
    anchor = {cls: slugify(_heading(keys), "-") for cls, keys in sections}
    lines = []
    for cls, keys in sections:
        lines += [f"## {_heading(keys)}", ""]
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        lines += [f"{doc}" if cls is not root else f"{doc} Each section below is one of its keys.", ""]
        lines += ["| key | type | default | description |", "|---|---|---|---|"]
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            text, inner = _type(hints[f.name])
            if inner is not None:
                word = "sections" if "sections" in text else "section"
                text = text.replace(word, f"[{word}](#{anchor[inner]})", 1)
            lines.append(f"| `{f.name}` | {text} | {_default(f)} | {_cell(f.metadata.get('doc', ''))} |")
        lines.append("")
    return lines


def _params(params: dict) -> list[str]:
    if not params:
        return ["No parameters of its own.", ""]
    lines = ["| key | type | default | valid values | description |", "|---|---|---|---|---|"]
    for p in params.values():
        ok = f"`{p.range}`" if p.range else ", ".join(f"`{c}`" for c in p.choices) if p.choices else ""
        lines.append(f"| `{p.name}` | {p.type} | {_value(p.default)} | {_cell(ok)} | {_cell(p.doc)} |")
    return lines + [""]


def render() -> str:
    """The page, as the schema and the built-in plugins describe it now."""
    from distillzoo.config import DistillConfig
    from distillzoo.hooks.catalogue import ParamSpec, load_registry_yaml
    from distillzoo.hooks.manager import algorithm_specs, make_plugin_manager
    from distillzoo.objectives.registry import objective_specs

    pm = make_plugin_manager(load_entrypoints=False)  # built-ins only: the page does not depend on what is installed
    lines = [
        "# Config reference",
        "",
        "<!-- Generated by `python docs/gen_config_reference.py` from the schema (distillzoo.config) and the built-in",
        "     algorithms and objectives; tests/test_docs_reference.py fails when this file is not what it writes.",
        "     Edit the docs in the code, then regenerate. -->",
        "",
        "Every key a `distillzoo train`, `generate` or `score` config may hold. A config is YAML",
        "read in struct mode: an unknown key fails with its `file:line` and the valid keys. Any key",
        "can be overridden on the command line as `key=value` (`train.steps=100`,",
        "`data.streams[0].path=other.jsonl`), and `distillzoo check CONFIG [key=value ...]` runs",
        "every check `train` runs before a model loads. A `distillzoo compare` config has its own",
        "keys, on [Compare and plots](../compare.md).",
        "",
    ]
    lines += _schema(DistillConfig)
    lines += ["## algorithm", "",
              "`algorithm: {name: NAME, ...parameters}` picks the training algorithm and sets its own",
              "parameters; without it the objective's default algorithm runs with its defaults",
              "(`distill` for logit objectives, `preference` for dpo and simpo, `dpkd` for dpkd).",
              "`distillzoo show NAME` prints the same table for any installed algorithm.", ""]
    for name, spec in sorted(algorithm_specs(pm).items()):
        lines += [f"### algorithm: {name}", "", f"{spec.summary}. Trains on {spec.cls.records} records.", ""]
        lines += _params(spec.params)
    lines += ["## objective, objectives", "",
              "`objective: {name: NAME, ...parameters}`, or a weighted mixture",
              "`objectives: [{name: NAME, weight: W, ...parameters}, ...]` (weights finite and > 0).",
              "`distillzoo show NAME` prints the same table for any installed objective.", ""]
    kinds = load_registry_yaml()["kinds"]
    for kind, body in kinds.items():
        shared = {n: ParamSpec.from_entry(n, raw, f"kind {kind}") for n, raw in (body.get("params") or {}).items()}
        lines += [f"### shared by every {kind} objective", ""]
        lines += _params(shared)
    specs = objective_specs(pm)
    for name, spec in sorted(specs.items()):
        shared = set((kinds[spec.kind].get("params") or {}))
        own = {n: p for n, p in spec.params.items() if n not in shared}
        lines += [f"### objective: {name}", "", f"{spec.summary} ({spec.kind}; also takes the parameters shared by "
                  f"every {spec.kind} objective).", "", f"Formula: `{spec.formula}`", ""]
        lines += _params(own)
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not OUT.is_file() or OUT.read_text(encoding="utf-8") != text:
            print(f"{OUT} is not what {Path(__file__).name} writes: run python docs/gen_config_reference.py",
                  file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
