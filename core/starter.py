"""``distillzoo config NAME``: a complete config that trains objective NAME as it is printed.

It trains tiny Qwen2-architecture models (the real 151,936-entry vocab) on the
bundled quickstart data for 50 steps, so a newcomer can run it from the repository
root at once, and its comments say what to change for real models. What it holds
follows from the objective: its parameters at their defaults, the algorithm it
trains under (``default_algorithm``), the records that algorithm reads
(``data/quickstart/train.jsonl`` and ``eval.jsonl`` for instruction records,
``pairs.jsonl`` and ``eval_pairs.jsonl`` for preference records) and a teacher only where the algorithm reads one. That works
for a plugin's objective as for a built-in one.
"""

from __future__ import annotations

import textwrap

import yaml

from distillzoo.config import DistillConfig, load_config
from distillzoo.hooks.manager import algorithm_spec
from distillzoo.objectives.registry import objective_spec
from distillzoo.training.spec import build_algorithm, sections

DATA = {"instruction": ("tasks", "data/quickstart/train.jsonl", "chat"),
        "preference": ("pairs", "data/quickstart/pairs.jsonl", "preference")}
EVAL = {"instruction": ("data/quickstart/eval.jsonl", "chat"),
        "preference": ("data/quickstart/eval_pairs.jsonl", "preference")}
STUDENT = {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 4, "seed": 2}
TEACHER = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 4, "seed": 1}
TRAIN = {"steps": 50, "batch_size": 16, "lr": 3.0e-3, "warmup_steps": 5, "log_every": 10, "eval_every": 50}


def _override_example(spec) -> str:
    for pname, p in spec.params.items():
        if p.type == "float" and p.default is not None:
            return f"objective.{pname}={p.default * 2:g}"
    return f"objective.{next(iter(spec.params))}=..." if spec.params else "seed=1"


def _flow(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, sort_keys=False, allow_unicode=True).strip() \
        .removesuffix("...").strip()


def _reads(name: str) -> tuple[str, str, bool]:
    """``(records, eval records, reads a teacher)`` of objective ``name`` under its default algorithm,
    asked of the algorithm itself (its check decides what it reads)."""
    algorithm, _ = build_algorithm(load_config({"objective": {"name": name}}))
    records = algorithm.records
    eval_records = algorithm.eval_records or records
    probe = load_config({
        "objective": {"name": name}, "student": {"tiny": STUDENT}, "teacher": {"tiny": TEACHER},
        "data": {"streams": [{"name": "s", "path": DATA[records][1], "format": DATA[records][2]}],
                 "eval": {"name": "held-out", "path": EVAL[eval_records][0], "format": EVAL[eval_records][1]}}})
    spec = sections(probe, "<starter>")
    algorithm.check(spec, "<starter>")
    return records, eval_records, "teacher" in algorithm.reads(spec)


def starter_config(name: str) -> str:
    """The commented YAML ``distillzoo config NAME`` prints; ``load_config`` and ``train`` accept it."""
    spec = objective_spec(name)
    algorithm = algorithm_spec(spec.cls.default_algorithm)
    records, eval_records, teacher = _reads(name)
    stream, path, fmt = DATA[records]
    lines = [
        f"# distillzoo config: {spec.name} - {spec.summary}",
        f"# formula: {spec.formula}",
        "# Trains as printed, from the repository root (data/quickstart ships with it), for 50 steps on a",
        "# CPU: tiny Qwen2-architecture models with the real 151,936-entry vocab. Lines marked 'real:' say what",
        "# to change for real models. Override any key on the command line: key=value",
        f"# (e.g. {_override_example(spec)}).",
        "objective:",
        f"  name: {spec.name}",
    ]
    for pname, p in spec.params.items():
        doc = f"  # {p.doc}" if p.doc else ""
        lines.append(f"  {pname}: {_flow(p.default)}{doc}")
    lines += [
        *textwrap.wrap(f"trained by the '{algorithm.name}' algorithm: {algorithm.summary} (`distillzoo algorithms` "
                       "lists the others)", 100, initial_indent="# ", subsequent_indent="# "),
        f"seed: {DistillConfig.seed}",
        "student:",
        f"  tiny: {_flow(STUDENT)}",
        "  # real: path: /models/Qwen2.5-0.5B-Instruct (a local transformers directory; nothing is downloaded)",
    ]
    if teacher:
        lines += [
            "teacher:  # random here, so only the mechanics are real; train one with python examples/quickstart.py",
            f"  tiny: {_flow(TEACHER)}",
            "  # real: path: /models/Qwen2.5-7B-Instruct, or path: runs/quickstart/teacher/final after the quickstart,",
            "  #       or cache: DIR from distillzoo cache-teacher (top-k logits, no teacher model at train time)",
        ]
    lines += [
        "data:",
        "  streams:  # mixed by repeat count; real: your JSONL (chat, alpaca, dolly, preference) or a prepare dir",
        f"    - {_flow({'name': stream, 'path': path, 'format': fmt, 'repeat': 1})}",
        f"  eval: {_flow({'name': 'held-out', 'path': EVAL[eval_records][0], 'format': EVAL[eval_records][1]})}",
        "  max_length: 64  # real: 1024 to 4096",
        "  system: null  # no system message; real: leave it out for Qwen2.5's default",
        f"train: {_flow(TRAIN)}",
        "  # real: lr: 1.0e-5, batch_size: 32, micro_batch_size: 4, steps in the thousands, checkpoint_every: 500;",
        "  #       precision auto runs bf16 on a GPU; torchrun --nproc_per_node N with parallel: ddp or fsdp",
        f"output_dir: runs/{spec.name}",
        "resume: auto",
    ]
    return "\n".join(lines) + "\n"
