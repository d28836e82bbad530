"""The teacher-side chain on the quickstart models: generate -> cache-teacher -> train from the cache -> evaluate."""

import json
from pathlib import Path

import yaml

import distillzoo as dz
from distillzoo.models.causal_lm import load_causal_lm
from distillzoo.cli import main
from distillzoo.teacher.evaluation import Decoding, evaluate, read_split
from distillzoo.teacher.cache import TeacherCache
from distillzoo import train

ROOT = Path(__file__).resolve().parent.parent


def test_generate_cache_train_evaluate(tmp_path, tok):
    # the quickstart teacher, briefly trained (its config, fewer steps)
    teacher = train(dz.load_config(ROOT / "configs" / "quickstart_teacher.yaml", [
        f"output_dir={tmp_path / 'teacher'}", "train.steps=40", "train.progress=false", "train.eval_every=0",
        f"data.streams.0.path={ROOT / 'data/quickstart/train.jsonl'}",
        f"data.eval.path={ROOT / 'data/quickstart/eval.jsonl'}"])).output_dir / "final"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join((ROOT / "data/quickstart/train.jsonl").read_text(encoding="utf-8")
                               .splitlines(keepends=True)[:16]), encoding="utf-8")

    # 1. the teacher answers the prompts (sequence-level data, keyed by the records' ids)
    gen = {"seed": 0, "teacher": {"path": str(teacher)}, "data": {"system": None},
           "generate": {"prompts": str(prompts), "out": str(tmp_path / "answers.jsonl"), "temperature": 1.0,
                        "max_new_tokens": 4, "progress": False}}
    (tmp_path / "gen.yaml").write_text(json.dumps(gen))
    assert main(["generate", str(tmp_path / "gen.yaml")]) == 0
    answers = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text(encoding="utf-8").splitlines()]
    assert 0 < len(answers) <= 16 and all(a["messages"][-1]["role"] == "assistant" for a in answers)

    # 2. cache its top-32 over those answers
    assert main(["cache-teacher", str(teacher), str(tmp_path / "answers.jsonl"), "--format", "chat", "--no-system",
                 "--k", "32", "--out", str(tmp_path / "cache")]) == 0
    assert len(TeacherCache(tmp_path / "cache")) == len(answers)

    # 3. the quickstart student trains with fkl from the cache (no teacher model loaded)
    student_cfg = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    student_cfg.update(teacher={"cache": str(tmp_path / "cache"), "top_k": 32}, output_dir=str(tmp_path / "student"),
                       resume="never")
    student_cfg["data"].update(streams=[{"name": "answers", "path": str(tmp_path / "answers.jsonl"),
                                         "format": "chat", "repeat": 1}], eval=None)
    student_cfg["train"].update(steps=3, eval_every=0, progress=False, batch_size=4, log_every=1)
    result = train(dz.load_config(student_cfg))
    losses = [json.loads(line)["loss"] for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and losses[-1] < losses[0]

    # 4. evaluate the distilled student on the held-out split
    student = load_causal_lm(str(result.output_dir / "final"))
    held_out = ROOT / "data" / "quickstart" / "eval.jsonl"
    scores = evaluate(student, tok, read_split(held_out, "chat", tok, system=None), system=None,
                      decoding=Decoding(max_new_tokens=4))
    assert len(scores.ids) == 340 and 0 <= scores.mean("exact_match") <= 1 and 0 < scores.mean("nll") < 20
