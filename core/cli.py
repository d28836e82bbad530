"""The ``distillzoo`` command line: list, show, plugins, config, check."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from typing import Sequence

from .errors import DistillzooError


def _cmd_list(args: argparse.Namespace) -> int:
    from .manager import objective_specs

    specs = sorted(objective_specs().values(), key=lambda s: s.name)
    if args.json:
        print(json.dumps([s.as_dict() for s in specs], indent=2))
        return 0
    rows = [("NAME", "KIND", "PACKAGE", "SUMMARY")] + [(s.name, s.kind, s.package, s.summary) for s in specs]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3])
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from .manager import objective_spec

    spec = objective_spec(args.name)
    if args.json:
        print(json.dumps(spec.as_dict(), indent=2))
        return 0
    paper = spec.paper
    print(f"{spec.name}  ({spec.kind}, package {spec.package})")
    print(textwrap.fill(spec.summary, 88))
    print(f"\nformula:  {spec.formula}")
    print(f"inputs:   {', '.join(spec.inputs)}")
    print("\nparameters:")
    for p in spec.params.values():
        print(f"  {p.describe()}")
        if p.doc:
            print(textwrap.fill(p.doc, 88, initial_indent="      ", subsequent_indent="      "))
    if paper:
        cite = ", ".join(str(paper[k]) for k in ("authors", "year") if paper.get(k))
        print(f"\npaper:    {paper.get('title', '')} ({cite})")
        if paper.get("url"):
            print(f"          {paper['url']}")
    return 0


def _cmd_plugins(args: argparse.Namespace) -> int:
    from .manager import plugins_info

    print(json.dumps(plugins_info(), indent=2))
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from .config import starter_config

    sys.stdout.write(starter_config(args.name))
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    from .config import build_objective, load_config

    cfg = load_config(args.config, args.overrides)
    loss_fn = build_objective(cfg)
    sys.stdout.write(OmegaConf.to_yaml(cfg))
    print(f"# objective: {loss_fn!r}".replace("\n", "\n# "))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distillzoo",
        description="A plugin-based zoo of distillation objectives for Qwen-family students.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("list", help="list every objective, built-in and third-party")
    p.add_argument("--json", action="store_true", help="print the catalogue entries as JSON")
    p.set_defaults(func=_cmd_list)
    p = sub.add_parser("show", help="formula, parameters and paper of one objective")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_show)
    p = sub.add_parser("plugins", help="JSON of the loaded plugins: package, version, hooks, names")
    p.set_defaults(func=_cmd_plugins)
    p = sub.add_parser("config", help="print a starter YAML config for one objective")
    p.add_argument("name")
    p.set_defaults(func=_cmd_config)
    p = sub.add_parser("check", help="validate a config (with key=value overrides) and print it resolved")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=_cmd_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DistillzooError as e:
        print(f"distillzoo {args.command}: error: {e}", file=sys.stderr)
        return 2
