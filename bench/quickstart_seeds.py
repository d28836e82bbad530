"""The quickstart's two students over several seeds: does the distilled one win on every metric, on every seed?

    python bench/quickstart_seeds.py --teacher runs/quickstart/teacher/final --seeds 0 1 2 3 4

Trains, from one quickstart teacher, the fkl student and the ce-only student of configs/quickstart.yaml for each
seed (the run's ``seed`` and the student's initialisation ``student.tiny.seed``), evaluates both on the held-out
split as examples/quickstart.py does, and prints one row per seed with the fkl - ce difference of each metric
and its 95% paired bootstrap interval over the prompts. Writes OUT/seeds.json and OUT/seeds.md.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

import distillzoo as dz
from distillzoo.compare.stats import bootstrap_ci
from distillzoo.data.tokenizer import load_tokenizer
from distillzoo.models.causal_lm import load_causal_lm
from distillzoo.teacher.evaluation import evaluate, read_split
from distillzoo.training.loop import train

ROOT = Path(__file__).resolve().parent.parent
SHOWN = ("rouge_l", "exact_match", "nll", "top1_agreement", "fkl")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", required=True, help="a quickstart teacher's final/ directory")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--out", default="runs/quickstart-seeds")
    parser.add_argument("overrides", nargs="*", help="further overrides of configs/quickstart.yaml for both students")
    args = parser.parse_args(argv)
    out, teacher_dir = Path(args.out).resolve(), Path(args.teacher).resolve()
    os.chdir(ROOT)
    config = ROOT / "configs/quickstart.yaml"
    cfg = dz.load_config(config)
    tokenizer = load_tokenizer()
    prompts = read_split(cfg.data.eval.path, "chat", tokenizer, system=cfg.data.system, max_length=cfg.data.max_length)
    teacher = load_causal_lm(str(teacher_dir))
    rows = []
    for seed in args.seeds:
        scores = {}
        for objective in ("fkl", "ce"):
            overrides = [f"teacher.path={teacher_dir}", f"objective.name={objective}", f"seed={seed}",
                         f"student.tiny.seed={seed + 2}", f"output_dir={out / f'{objective}-{seed}'}",
                         "resume=never", "train.progress=false", "train.eval_every=0", *args.overrides]
            final = train(dz.load_config(config, overrides), where=str(config)).output_dir / "final"
            scores[objective] = evaluate(load_causal_lm(str(final)), tokenizer, prompts, teacher=teacher,
                                         system=cfg.data.system)
        row = {"seed": seed}
        for metric in SHOWN:
            weights = scores["fkl"].weights(metric)
            a, b = scores["fkl"].sums[metric], scores["ce"].sums[metric]
            diff, lo, hi = bootstrap_ci((a - b)[None], weights)  # same weights: the difference of the means
            row[metric] = {"fkl": float(np.sum(a) / np.sum(weights)), "ce": float(np.sum(b) / np.sum(weights)),
                           "diff": diff, "lo": lo, "hi": hi}
        rows.append(row)
        print(f"seed {seed}: " + "  ".join(f"{m} {row[m]['fkl']:.3f} vs {row[m]['ce']:.3f} "
                                           f"[{row[m]['lo']:+.3f}, {row[m]['hi']:+.3f}]" for m in SHOWN), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "seeds.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "seeds.md").write_text(table(rows), encoding="utf-8")
    return rows


def table(rows: list[dict]) -> str:
    """A markdown table: per seed and metric, fkl's value, ce's, and fkl - ce with its 95% interval."""
    head = "| seed | " + " | ".join(SHOWN) + " |\n|---|" + "---|" * len(SHOWN) + "\n"
    return head + "".join(
        f"| {row['seed']} | " + " | ".join(f"{row[m]['fkl']:.3f} vs {row[m]['ce']:.3f} ({row[m]['diff']:+.3f} "
                                           f"[{row[m]['lo']:+.3f}, {row[m]['hi']:+.3f}])" for m in SHOWN) + " |\n"
        for row in rows)


if __name__ == "__main__":
    main()
