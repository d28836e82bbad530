"""Distil a small Qwen2 teacher into a smaller student on a CPU, and compare with a student trained on CE alone.

    python examples/quickstart.py

Three runs of ``distillzoo train`` on the bundled task set (data/quickstart:
arithmetic, digit reversal, digit sorting and number words, in English and
Chinese, tokenized with the real Qwen vocabulary of 151,936 entries), then a
held-out evaluation of each model:

1. the teacher learns the tasks with ``ce`` (configs/quickstart_teacher.yaml);
2. the student is distilled from it with ``fkl`` (configs/quickstart.yaml);
3. the same student, same data, same steps, with ``ce`` only
   (configs/quickstart.yaml objective.name=ce).

It prints greedy exact-match accuracy and NLL per response token on the held-out
split for all three, and the student's KL from the teacher, and writes that table
to OUT/results.md and OUT/results.json. Nothing is
downloaded; the models are built from their configs. Each run is the command
printed before it, so any step can be rerun or changed by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import distillzoo as dz
from distillzoo.models.causal_lm import load_causal_lm
from distillzoo.teacher.evaluation import exact_match, response_kl, response_nll
from distillzoo.data.shards import ConversationDataset
from distillzoo.data.tokenizer import load_tokenizer
from distillzoo.training.loop import train

ROOT = Path(__file__).resolve().parent.parent


def run(config: Path, overrides: list[str], label: str) -> Path:
    shown = " ".join([f"distillzoo train {config.relative_to(ROOT)}", *overrides])
    print(f"\n== {label}\n$ {shown}", flush=True)
    started = time.perf_counter()
    result = train(dz.load_config(config, overrides), where=str(config))
    print(f"   {result.steps} steps, final loss {result.final_loss:.4f}, {time.perf_counter() - started:.0f} s",
          flush=True)
    return result.output_dir / "final"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/quickstart", help="where the three runs go (default runs/quickstart)")
    parser.add_argument("--teacher-steps", type=int, help="override the teacher config's train.steps")
    parser.add_argument("--student-steps", type=int, help="override the student config's train.steps")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()  # relative to where the command was run
    os.chdir(ROOT)  # the configs name data/quickstart/*.jsonl relative to the repository root
    common = ["resume=never"] + (["train.progress=false"] if args.no_progress else [])
    started = time.perf_counter()

    teacher = run(ROOT / "configs/quickstart_teacher.yaml",
                  [f"output_dir={out / 'teacher'}", *common]
                  + ([f"train.steps={args.teacher_steps}"] if args.teacher_steps else []),
                  "1/3 teacher: ce on the task set")
    student = [f"teacher.path={teacher}", *common] + ([f"train.steps={args.student_steps}"] if args.student_steps else [])
    distilled = run(ROOT / "configs/quickstart.yaml", [f"output_dir={out / 'student-fkl'}", *student],
                    "2/3 student distilled from the teacher: fkl")
    ce_only = run(ROOT / "configs/quickstart.yaml", [f"output_dir={out / 'student-ce'}", "objective.name=ce", *student],
                  "3/3 the same student on ce alone (same data, steps and schedule)")

    cfg = dz.load_config(ROOT / "configs/quickstart.yaml")
    eval_path, system = cfg.data.eval.path, cfg.data.system
    tokenizer = load_tokenizer()
    held_out = ConversationDataset(eval_path, "chat", tokenizer, system=system)
    models = {"teacher (ce)": teacher, "student, distilled (fkl)": distilled, "student, ce only": ce_only}
    loaded = {name: load_causal_lm(str(path)) for name, path in models.items()}
    teacher_model = loaded["teacher (ce)"]
    print(f"\n== held-out evaluation: {eval_path} ({len(held_out)} prompts, greedy decoding)")
    table = [f"{'model':<26} {'params':>8} {'exact match':>12} {'NLL/token':>10} {'KL(teacher||model)':>19}   by task"]
    print(table[0])
    results = {}
    for name, model in loaded.items():
        em = exact_match(model, tokenizer, eval_path, "chat", system=system, max_new_tokens=16)
        nll = response_nll(model, held_out, tokenizer.pad_id)
        kl = response_kl(teacher_model, model, held_out, tokenizer.pad_id) if model is not teacher_model else 0.0
        params = sum(p.numel() for p in model.parameters()) / 1e6
        by_task = "  ".join(f"{k} {v:.0%}" for k, v in em["by_task"].items())
        table.append(f"{name:<26} {params:>7.1f}M {em['exact_match']:>12.1%} {nll:>10.3f} {kl:>19.3f}   {by_task}")
        print(table[-1])
        results[name] = {"model": str(models[name]), "params": sum(p.numel() for p in model.parameters()),
                         "exact_match": em["exact_match"], "by_task": em["by_task"], "nll": nll, "kl": kl}
    total = time.perf_counter() - started
    print(f"\n(params include the 151,936-entry embedding; total {total:.0f} s)")
    (out / "results.json").write_text(json.dumps({"eval": str(eval_path), "seconds": round(total, 1),
                                                  "models": results}, indent=2, ensure_ascii=False) + "\n")
    (out / "results.md").write_text(f"# quickstart: held-out evaluation ({eval_path}, {len(held_out)} prompts, greedy)\n\n"
                                    "```\n" + "\n".join(table) + "\n```\n", encoding="utf-8")
    print(f"results: {out / 'results.md'}, {out / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
