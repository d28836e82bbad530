"""configs/dolly_protocol: the papers' instruction-following protocol (teacher SFT on Dolly, then FKL, RKL, SKL,
SRKL, JSD and FKL+RKL compared by ROUGE-L over sampled answers), end to end on CPU with tiny models and a
50-record Dolly-format sample in place of the GPU models and the real split."""

import json
from pathlib import Path

import pytest
import yaml

import distillzoo as dz
from distillzoo.compare.runner import compare
from distillzoo.models.causal_lm import tiny_qwen2
from distillzoo.training.loop import train
from helpers import write_jsonl

ROOT = Path(__file__).resolve().parent.parent
PROTOCOL = ROOT / "configs" / "dolly_protocol"
COLOURS = ["red", "green", "blue", "yellow", "black"]


def dolly_sample(n=50):
    """Dolly-format records (instruction, optional context, response, category), as LMOps prepares the split."""
    rows = []
    for i in range(n):
        colour, k = COLOURS[i % 5], i % 7
        if i % 2:
            rows.append({"instruction": f"What colour is the ball in the text? ({i})", "category": "closed_qa",
                         "context": f"There are {k} boxes. The ball is {colour}.", "response": f"The ball is {colour}."})
        else:
            rows.append({"instruction": f"Name {k + 1} things that are {colour}.", "category": "brainstorming",
                         "context": "", "response": ", ".join([f"a {colour} thing"] * (k + 1))})
    return rows


def test_the_protocol_trains_a_teacher_then_compares_six_entrants_by_rouge_l_over_sampled_answers(tmp_path,
                                                                                                  monkeypatch):
    rows = dolly_sample()
    write_jsonl(tmp_path / "train.jsonl", rows[:40])
    write_jsonl(tmp_path / "valid.jsonl", rows[40:45])
    write_jsonl(tmp_path / "test.jsonl", rows[40:])
    tiny_qwen2(hidden_size=48, num_layers=1, seed=1).save_pretrained(tmp_path / "base-1.5b")
    tiny_qwen2(hidden_size=32, num_layers=1, seed=2).save_pretrained(tmp_path / "base-0.5b")
    monkeypatch.chdir(tmp_path)  # the configs' data/dolly/ and runs/dolly/ are relative to where they run
    (tmp_path / "data" / "dolly").mkdir(parents=True)
    for split in ("train", "valid", "test"):
        (tmp_path / "data" / "dolly" / f"{split}.jsonl").write_text((tmp_path / f"{split}.jsonl").read_text())

    # step 1: the teacher's SFT, as shipped but for the model path and the budget
    sft = dz.load_config(PROTOCOL / "teacher_sft.yaml", [f"student.path={tmp_path / 'base-1.5b'}", "train.steps=4",
                                                         "train.batch_size=4", "train.micro_batch_size=2",
                                                         "train.warmup_steps=1", "train.eval_every=4",
                                                         "train.checkpoint_every=0", "train.progress=false",
                                                         "data.max_length=64"])
    assert sft.objective.name == "ce" and sft.data.streams[0].format == "dolly"
    train(sft, where="teacher_sft.yaml")
    assert (tmp_path / "runs" / "dolly" / "teacher" / "final" / "config.json").is_file()

    # step 2: the comparison, as shipped but for the student path and the budget
    raw = yaml.safe_load((PROTOCOL / "compare.yaml").read_text(encoding="utf-8"))
    assert [e["name"] for e in raw["entrants"]] == ["fkl", "rkl", "skl", "srkl", "jsd", "fkl+rkl"]
    assert raw["decoding"]["samples"] == 5 and raw["decoding"]["temperature"] == 1.0
    raw["base"]["student"]["path"] = str(tmp_path / "base-0.5b")
    raw["base"]["data"]["max_length"] = 64
    raw["base"]["train"].update(steps=2, batch_size=4, micro_batch_size=2, warmup_steps=1, eval_every=2)
    raw["decoding"]["max_new_tokens"] = 6
    (tmp_path / "compare.yaml").write_text(yaml.safe_dump(raw))
    results = compare(tmp_path / "compare.yaml", say=lambda line: None)
    summary = results["summary"]
    assert summary["prompts"] == 10 and summary["order"][0] in summary["entrants"]
    for name, entry in summary["entrants"].items():
        assert 0 <= entry["rouge_l"]["lo"] <= entry["rouge_l"]["mean"] <= entry["rouge_l"]["hi"] <= 1, name
    assert len(summary["pairs"]["rouge_l"]) == 15  # every pair of the six, Holm-corrected
    assert results["decoding"].startswith("5 sampled answers per prompt (temperature 1")
    judged = json.loads((tmp_path / "runs" / "dolly" / "compare" / "runs" / "fkl" / "seed0-lr1e-05" / "result.json")
                        .read_text())["held_out"]
    assert all(len(a) == 5 for a in judged["prompts"]["answers"])
    assert judged["rouge_l/task=closed_qa"] == pytest.approx(
        sum(v for v, t in zip(judged["prompts"]["sums"]["rouge_l"], judged["prompts"]["groups"]["task"])
            if t == "closed_qa") / 5)
    report = (tmp_path / "runs" / "dolly" / "compare" / "report.md").read_text()
    assert "| entrant | lr | rank ROUGE-L |" in report and "task=brainstorming" in report
