"""examples/distilqwen2_recipe.py end to end on a tiny budget: curation, six stages, then the held-out table."""

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def lines(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line]


def test_the_recipe_runs_every_stage_and_prints_exact_match_after_each_model(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "distilqwen2_recipe.py"), "--out", str(tmp_path),
                           "--teacher", str(tmp_path / "no-teacher-yet"), "--teacher-steps", "1", "--prompts", "24",
                           "--held-out", "16", "--no-progress", "--set", "4:train.steps=2", "--set", "6:train.steps=2",
                           # models a step or two from random repeat their last token greedily ("\n": empty)
                           "--set", "1:generate.temperature=1.0", "--set", "5:generate.temperature=1.0"],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    for command in ("distillzoo train configs/quickstart_teacher.yaml", "distillzoo curate configs/distilqwen2/0_",
                    "distillzoo generate configs/distilqwen2/1_",
                    "distillzoo score configs/distilqwen2/2_", "distillzoo filter ", "distillzoo train configs/distilqwen2/4_",
                    "distillzoo generate configs/distilqwen2/5_", "distillzoo train configs/distilqwen2/6_"):
        assert f"$ {command}" in out or f"; {command}" in out, command
    curated = lines(tmp_path / "curated" / "curated.jsonl")
    report = json.loads((tmp_path / "curated" / "report.json").read_text(encoding="utf-8"))
    # the first 24 training prompts: a shorter output only through the drops the report counts
    assert report["input"] == 24 and len(curated) == report["output"] == 24 - sum(
        s["dropped"] for s in report["stages"])
    language = report["distributions"]["after"]["language"]
    assert language["en"] == language["zh"] == len(curated) / 2  # balance: equal shares
    assert f"   language: en {language['en']} (50%), zh {language['zh']} (50%)" in out
    answers = lines(tmp_path / "teacher_answers.jsonl")
    scores = {r["id"]: r["score"] for r in lines(tmp_path / "mfd_scores.jsonl")}
    selected = lines(tmp_path / "selected.jsonl")
    pairs = lines(tmp_path / "pairs.jsonl")
    # sampled from a teacher one step from its random start: 16 tokens of noise per answer, none empty
    assert len(answers) == len(curated) and scores.keys() == {r["id"] for r in answers} == {r["id"] for r in curated}
    assert len(selected) == len(curated) // 2  # --quantile 0.5 of distinct gaps
    assert min(scores[r["id"]] for r in selected) >= max(s for i, s in scores.items()
                                                          if i not in {r["id"] for r in selected})
    assert {r["id"] for r in pairs} <= {r["id"] for r in selected} and pairs
    assert all(set(r) >= {"prompt", "chosen", "rejected"} for r in pairs)
    dpkd = lines(tmp_path / "dpkd" / "metrics.jsonl")
    assert "rewards/accuracies" in dpkd[-1] and "eval/kl_teacher_student" in dpkd[-1]
    rows = {}
    for name in ("teacher", "student after KD (fkl)", "student after DPKD"):
        line = next(line for line in out.splitlines() if line.startswith(name))
        rows[name] = float(re.match(r".{24}\s+([\d.]+)%", line).group(1))
    assert all(0 <= v <= 100 for v in rows.values())
