"""DistilQwen2's recipe on the quickstart task set, one distillzoo command per stage.

    python examples/distilqwen2_recipe.py

DistilQwen2 (Alibaba PAI) distils with teacher-written data, keeps the samples on
which teacher and student differ most (the "model fitting difficulty", MFD), then
runs KD and a preference stage. Here every stage is a distillzoo command with its
config under configs/distilqwen2/, printed before it runs:

0. curate: ``distillzoo curate`` deduplicates the training prompts, drops those sharing a
   13-gram with the held-out set and empty or repetitive replies, balances English and
   Chinese, and prints the data's distributions after it;
1. teacher answers: ``distillzoo generate`` (the teacher answers the training prompts);
2. MFD scores: ``distillzoo score`` with the ``mfd`` scorer (student NLL minus teacher NLL);
3. filter: ``distillzoo filter --quantile`` keeps the samples with the larger gaps;
4. KD: ``distillzoo train`` with fkl on the selected teacher answers;
5. pairs: ``distillzoo generate`` mode ``pairs``: the teacher's answer as chosen, the
   distilled student's own as rejected;
6. DPKD: ``distillzoo train`` with the dpkd algorithm, the teacher as the reference.

It prints held-out exact match (greedy) after each stage that yields a model. The
teacher is the quickstart's (runs/quickstart/teacher/final, written by
examples/quickstart.py); without it the script trains one first with
configs/quickstart_teacher.yaml.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path

import distillzoo as dz
from distillzoo.curate.pipeline import curate
from distillzoo.models.causal_lm import load_causal_lm
from distillzoo.teacher.evaluation import Decoding, evaluate, read_split
from distillzoo.teacher.generate import generate_from_config
from distillzoo.teacher.scoring import filter_records, read_scores, score_from_config
from distillzoo.data.tokenizer import load_tokenizer
from distillzoo.training.loop import train

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs" / "distilqwen2"
EVAL = "data/quickstart/eval.jsonl"


def show(label: str, command: str) -> float:
    print(f"\n== {label}\n$ {command}", flush=True)
    return time.perf_counter()


def config(name: str, overrides: list[str], extra: list[str]):
    """The stage's config with the script's overrides and the user's ``--set`` ones for this stage (by number)."""
    overrides = overrides + [o.split(":", 1)[1] for o in extra if o.split(":", 1)[0] == name.split("_")[0]]
    return dz.load_config(CONFIGS / name, overrides), f"{(CONFIGS / name).relative_to(ROOT)} {' '.join(overrides)}"


def held_out(path: Path, tokenizer, eval_path) -> dict:
    """Greedy exact match, overall and by task, with no teacher-forced metric."""
    scores = evaluate(load_causal_lm(str(path)), tokenizer, read_split(eval_path, "chat", tokenizer, system=None),
                      system=None, decoding=Decoding(max_new_tokens=16), forced=False)
    summary = scores.summary()
    return {"exact_match": summary["exact_match"], "by_task": {k: v["exact_match"] for k, v in summary["by_task"].items()}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/distilqwen2", help="where every stage writes (default runs/distilqwen2)")
    parser.add_argument("--teacher", default="runs/quickstart/teacher/final",
                        help="a trained teacher (default: the quickstart's); trained first when missing")
    parser.add_argument("--teacher-steps", type=int, help="train.steps when the teacher is trained here")
    parser.add_argument("--prompts", type=int, help="answer only the first N training prompts (default: all)")
    parser.add_argument("--quantile", type=float, default=0.5, help="stage 3 keeps scores >= this quantile")
    parser.add_argument("--set", action="append", default=[], metavar="STAGE:key=value",
                        help="an override for one stage's config, e.g. 4:train.steps=300 (repeatable)")
    parser.add_argument("--held-out", type=int, help="evaluate on the first N held-out prompts (default: all 340)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    out, teacher = Path(args.out).resolve(), Path(args.teacher).resolve()
    os.chdir(ROOT)  # the configs name data/quickstart/*.jsonl relative to the repository root
    quiet = ["train.progress=false"] if args.no_progress else []
    progress = "false" if args.no_progress else "true"
    tokenizer = load_tokenizer()
    started = time.perf_counter()
    table = []

    if not (teacher / "config.json").is_file():
        overrides = [f"output_dir={out / 'teacher'}", "resume=never", *quiet] + (
            [f"train.steps={args.teacher_steps}"] if args.teacher_steps else [])
        t0 = show("no trained teacher: train the quickstart's first", "distillzoo train configs/quickstart_teacher.yaml "
                  + " ".join(overrides))
        teacher = train(dz.load_config(ROOT / "configs/quickstart_teacher.yaml", overrides)).output_dir / "final"
        print(f"   {time.perf_counter() - t0:.0f} s", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    prompts = ROOT / "data/quickstart/train.jsonl"
    if args.prompts:
        lines = prompts.read_text(encoding="utf-8").split("\n")[:args.prompts]
        prompts = out / "prompts.jsonl"
        prompts.write_text("\n".join(lines) + "\n", encoding="utf-8")

    # 0. curate the prompts: dedup, decontamination against the held-out set, quality, language balance
    curated_dir = out / "curated"
    cfg, shown = config("0_curate.yaml", [f"curate.data={prompts}", f"curate.out={curated_dir}"], args.set)
    t0 = show("0/6 curate the training prompts", f"rm -rf {curated_dir}; distillzoo curate {shown}")
    shutil.rmtree(curated_dir, ignore_errors=True)  # the prompts may differ from a former run's
    report = curate(cfg.curate, where=str(CONFIGS / "0_curate.yaml"), cfg=cfg, say=lambda line: None)
    print(f"   kept {report['output']} of {report['input']}: "
          + ", ".join(f"{s['stage']} dropped {s['dropped']}" for s in report["stages"])
          + f", {time.perf_counter() - t0:.0f} s", flush=True)
    after = report["distributions"]["after"]
    for dimension in ("task", "language", "length"):  # the data after curation (report.md has before and after)
        total = sum(after[dimension].values())
        print(f"   {dimension}: " + ", ".join(f"{k} {v} ({v / total:.0%})" for k, v in after[dimension].items()))
    prompts = curated_dir / "curated.jsonl"
    eval_path = ROOT / EVAL
    if args.held_out:
        eval_path = out / "held_out.jsonl"
        eval_path.write_text("\n".join((ROOT / EVAL).read_text(encoding="utf-8").split("\n")[:args.held_out]) + "\n",
                             encoding="utf-8")
    em = held_out(teacher, tokenizer, eval_path)
    table.append(("teacher", f"{teacher}", em))

    # 1. the teacher answers every training prompt (greedy)
    answers = out / "teacher_answers.jsonl"
    cfg, shown = config("1_teacher_answers.yaml", [f"teacher.path={teacher}", f"generate.prompts={prompts}",
                                                   f"generate.out={answers}", f"generate.progress={progress}"], args.set)
    t0 = show("1/6 teacher answers", f"rm -f {answers}; distillzoo generate {shown}")
    answers.unlink(missing_ok=True)  # generate resumes a file; this run starts from its own teacher
    report = generate_from_config(cfg, where=str(CONFIGS / "1_teacher_answers.yaml"))
    reference = {r["id"]: r["messages"][-1]["content"] for r in map(json.loads, prompts.open(encoding="utf-8"))}
    written = [json.loads(line) for line in answers.open(encoding="utf-8")]
    if not written:
        raise SystemExit(f"stage 1: the teacher gave no non-empty answer ({len(report['empty'])} empty); train it "
                         "longer, or sample (--set 1:generate.temperature=1.0)")
    agree = sum(r["messages"][-1]["content"].strip() == reference[r["id"]].strip() for r in written) / len(written)
    print(f"   {len(written)} answers ({report['written']} new), {agree:.1%} equal to the data's reference reply, "
          f"{time.perf_counter() - t0:.0f} s", flush=True)

    # 2. MFD: the initial student's NLL minus the teacher's, per token of each answer
    scores_path = out / "mfd_scores.jsonl"
    cfg, shown = config("2_mfd_scores.yaml", [f"teacher.path={teacher}", f"score.data={answers}",
                                              f"score.out={scores_path}", f"score.progress={progress}"], args.set)
    t0 = show("2/6 MFD scores", f"distillzoo score {shown}")
    scores = score_from_config(cfg, where=str(CONFIGS / "2_mfd_scores.yaml"))
    print(f"   {len(scores)} scores, median gap {statistics.median(scores.values()):.3f} nats/token, "
          f"{time.perf_counter() - t0:.0f} s", flush=True)

    # 3. keep the larger gaps
    selected = out / "selected.jsonl"
    t0 = show("3/6 filter", f"distillzoo filter {answers} --format chat --scores {scores_path} "
                            f"--quantile {args.quantile} --out {selected}")
    kept = filter_records(answers, "chat", read_scores(scores_path), selected, quantile=args.quantile)
    print(f"   kept {kept['kept']} of {kept['kept'] + kept['dropped']} (gap >= {kept['cut']:.3f})", flush=True)

    # 4. KD with fkl on the selected teacher answers
    overrides = [f"teacher.path={teacher}", f"data.streams.0.path={selected}", f"output_dir={out / 'kd'}",
                 "resume=never", *quiet]
    cfg, shown = config("4_kd.yaml", overrides, args.set)
    t0 = show("4/6 KD: fkl on the selected teacher answers", f"distillzoo train {shown}")
    kd = train(cfg, where=str(CONFIGS / "4_kd.yaml")).output_dir / "final"
    print(f"   {time.perf_counter() - t0:.0f} s", flush=True)
    table.append(("student after KD (fkl)", str(kd), held_out(kd, tokenizer, eval_path)))

    # 5. pairs: the teacher's answer against the distilled student's own, per prompt
    pairs = out / "pairs.jsonl"
    cfg, shown = config("5_pairs.yaml", [f"teacher.path={teacher}", f"student.path={kd}", f"generate.prompts={selected}",
                                         f"generate.out={pairs}", f"generate.progress={progress}"], args.set)
    t0 = show("5/6 pairs from the distilled student", f"rm -f {pairs}; distillzoo generate {shown}")
    pairs.unlink(missing_ok=True)  # the student is new: its old answers do not apply
    report = generate_from_config(cfg, where=str(CONFIGS / "5_pairs.yaml"))
    records = [json.loads(line) for line in pairs.open(encoding="utf-8")]
    same = sum(r["chosen"].strip() == r["rejected"].strip() for r in records)
    print(f"   {len(records)} pairs ({same} where the student already gives the teacher's answer), "
          f"{time.perf_counter() - t0:.0f} s", flush=True)

    # 6. DPKD from the KD student, the teacher as the reference
    overrides = [f"student.path={kd}", f"teacher.path={teacher}", f"data.streams.0.path={pairs}",
                 f"output_dir={out / 'dpkd'}", "resume=never", *quiet]
    cfg, shown = config("6_dpkd.yaml", overrides, args.set)
    t0 = show("6/6 DPKD from the distilled student", f"distillzoo train {shown}")
    dpkd = train(cfg, where=str(CONFIGS / "6_dpkd.yaml")).output_dir / "final"
    print(f"   {time.perf_counter() - t0:.0f} s", flush=True)
    table.append(("student after DPKD", str(dpkd), held_out(dpkd, tokenizer, eval_path)))

    print(f"\n== held-out exact match: {eval_path.relative_to(ROOT) if eval_path.is_relative_to(ROOT) else eval_path} "
          "(greedy)")
    print(f"{'model':<24} {'exact match':>12}   by task")
    for name, _, result in table:
        by_task = "  ".join(f"{k} {v:.0%}" for k, v in result["by_task"].items())
        print(f"{name:<24} {result['exact_match']:>12.1%}   {by_task}")
    print(f"\n(total {time.perf_counter() - started:.0f} s)")
    return {name: result["exact_match"] for name, _, result in table}


if __name__ == "__main__":
    main()
