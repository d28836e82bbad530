"""Distil a small Qwen2 teacher into a smaller student on a CPU, and compare with a student trained on CE alone.

    python examples/quickstart.py

Three runs of ``distillzoo train`` on the bundled task set (data/quickstart:
arithmetic, digit reversal, digit sorting and number words, in English and
Chinese, tokenized with the real Qwen vocabulary of 151,936 entries), then a
held-out evaluation of each model:

1. the teacher learns the tasks with ``ce`` from all 6,000 training records
   (configs/quickstart_teacher.yaml);
2. the student is distilled from it with ``fkl`` on a transfer set of 200 of them
   (configs/quickstart.yaml);
3. the same student, same transfer set, same steps, with ``ce`` only
   (configs/quickstart.yaml objective.name=ce).

It prints, for all three, ROUGE-L and exact match of one greedy answer per held-out
prompt, NLL per response token, and top-1 agreement and KL with the teacher
(teacher-forced on the references), then the share of the gap between the ce-only
student and the teacher that distillation closed on each, with a 95% paired
bootstrap interval over the prompts; and writes them to OUT/results.md and
OUT/results.json. Nothing is downloaded; the models are built from their configs.
Each run is the command printed before it, so any step can be rerun or changed by
hand.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import distillzoo as dz
from distillzoo.models.causal_lm import load_causal_lm
from distillzoo.compare.stats import gap_closed
from distillzoo.data.tokenizer import load_tokenizer
from distillzoo.teacher.evaluation import METRICS, evaluate, read_split
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
    prompts = read_split(eval_path, "chat", tokenizer, system=system, max_length=cfg.data.max_length)
    models = {"teacher (ce)": teacher, "student, distilled (fkl)": distilled, "student, ce only": ce_only}
    loaded = {name: load_causal_lm(str(path)) for name, path in models.items()}
    teacher_model = loaded["teacher (ce)"]
    print(f"\n== held-out evaluation: {eval_path} ({len(prompts)} prompts, one greedy answer each; teacher-forced "
          "metrics on the references)")
    head = (f"{'model':<26} {'params':>7} {'ROUGE-L':>8} {'exact match':>12} {'NLL/token':>10} {'top-1 agree':>12} "
            f"{'KL(t||s)':>9}   exact match by task")
    table = [head]
    print(head)
    scores, results = {}, {}
    for name, model in loaded.items():
        s = scores[name] = evaluate(model, tokenizer, prompts, teacher=teacher_model, system=system)
        summary = s.summary()
        params = sum(p.numel() for p in model.parameters())
        by_task = "  ".join(f"{k} {v['exact_match']:.0%}" for k, v in summary["by_task"].items())
        table.append(f"{name:<26} {params / 1e6:>6.1f}M {summary['rouge_l']:>8.1%} {summary['exact_match']:>12.1%} "
                     f"{summary['nll']:>10.3f} {summary['top1_agreement']:>12.1%} {summary['fkl']:>9.3f}   {by_task}")
        print(table[-1])
        results[name] = {"model": str(models[name]), "params": params,
                         **{m: summary[m] for m in ("rouge_l", "exact_match", "nll", "top1_agreement", "fkl")},
                         "by_task": {k: v["exact_match"] for k, v in summary["by_task"].items()}}
    closed = {}
    for metric in ("nll", "top1_agreement", "rouge_l", "exact_match"):
        arrays = [scores[n].sums[metric][None] for n in models]
        try:
            share, lo, hi = gap_closed(arrays[1], arrays[2], arrays[0], scores["teacher (ce)"].weights(metric))
        except dz.DistillzooError:  # the teacher scores no better than the ce-only student: no gap
            continue
        closed[metric] = {"share": share, "lo": lo, "hi": hi}
    lines = ["", "Of the gap between the ce-only student and the teacher, distillation (fkl) closed (95% paired "
             "bootstrap interval over the prompts):"]
    lines += [f"  {METRICS[m].label:<16} {c['share']:>6.1%}  [{c['lo']:.1%}, {c['hi']:.1%}]" for m, c in closed.items()]
    print("\n".join(lines))
    total = time.perf_counter() - started
    print(f"\n(params include the 151,936-entry embedding; total {total:.0f} s)")
    (out / "results.json").write_text(json.dumps({"eval": str(eval_path), "seconds": round(total, 1),
                                                  "models": results, "gap_closed": closed},
                                                 indent=2, ensure_ascii=False) + "\n")
    (out / "results.md").write_text(f"# quickstart: held-out evaluation ({eval_path}, {len(prompts)} prompts, greedy)\n\n"
                                    "```\n" + "\n".join(table + lines) + "\n```\n", encoding="utf-8")
    print(f"results: {out / 'results.md'}, {out / 'results.json'}")
    return {"models": results, "gap_closed": closed}


if __name__ == "__main__":
    main()
