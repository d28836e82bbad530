"""distillzoo compare: fair by construction, resumable, and its files say what was measured."""

import csv
import json
import shutil

import pytest
import yaml

import distillzoo as dz
from distillzoo.compare.runner import compare, load_plan, run_config
from helpers import write_jsonl


def chat(n, offset=0):
    return [{"id": f"q{a}", "messages": [{"role": "user", "content": f"{a} + 1 = ?"},
                                         {"role": "assistant", "content": str(a + 1)}]}
            for a in range(offset, offset + n)]


def compare_config(tmp_path, entrants, seeds=(0, 1), **extra):
    train = write_jsonl(tmp_path / "train.jsonl", chat(8))
    held = write_jsonl(tmp_path / "held.jsonl", chat(4, offset=20))
    raw = {"base": {"student": {"tiny": {"hidden_size": 32, "num_layers": 1}},
                    "teacher": {"tiny": {"hidden_size": 48, "num_layers": 1, "seed": 7}},
                    "data": {"streams": [{"name": "s", "path": str(train), "format": "chat", "repeat": 1}], "system": None,
                             "max_length": 32},
                    "train": {"steps": 3, "batch_size": 2, "lr": 1e-3, "log_every": 1, "eval_every": 3}},
           "held_out": {"path": str(held), "format": "chat"}, "entrants": entrants, "seeds": list(seeds),
           "output_dir": str(tmp_path / "cmp"), **extra}
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_two_copies_of_one_objective_give_identical_numbers_and_a_rerun_skips_finished_runs(tmp_path):
    path = compare_config(tmp_path, [{"name": "fkl-a", "objective": {"name": "fkl"}},
                                     {"name": "fkl-b", "objective": {"name": "fkl"}}])
    results = compare(path, say=lambda line: None)
    runs = {(r["entrant"], r["seed"]): r for r in results["runs"]}
    assert sorted(runs) == [("fkl-a", 0), ("fkl-a", 1), ("fkl-b", 0), ("fkl-b", 1)]
    measured = [k for k in runs["fkl-a", 0] if k.startswith("held_out/") and "/" not in k.removeprefix("held_out/")]
    assert sorted(measured) == sorted(f"held_out/{m}" for m in ("rouge_l", "exact_match", "nll", "top1_agreement",
                                                                 "fkl", "rkl", "tvd", "length_ratio"))
    for seed in (0, 1):  # the comparison adds no noise: one objective twice is one result twice
        assert [runs["fkl-a", seed][k] for k in measured] == [runs["fkl-b", seed][k] for k in measured]
    assert runs["fkl-a", 0]["held_out/nll"] != runs["fkl-a", 1]["held_out/nll"]  # the seeds do differ
    summary = results["summary"]
    assert summary["entrants"]["fkl-a"]["nll"] == summary["entrants"]["fkl-b"]["nll"]
    nll = summary["entrants"]["fkl-a"]["nll"]
    assert nll["mean"] == pytest.approx((runs["fkl-a", 0]["held_out/nll"] + runs["fkl-a", 1]["held_out/nll"]) / 2)
    assert nll["lo"] <= nll["mean"] <= nll["hi"]
    pair = summary["pairs"]["nll"][0]  # equal runs: no difference, p = 1, never told apart, tied ranks
    assert (pair["diff"], pair["p"], pair["significant"]) == (0.0, 1.0, False)
    assert summary["ranks"]["nll"] == {"fkl-a": 1, "fkl-b": 1}
    out = tmp_path / "cmp"
    report = (out / "report.md").read_text()
    assert "| fkl-a |" in report and "| fkl-b |" in report and "| 1= |" in report
    assert "no pair of entrants differs significantly" in report
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 4 and float(rows[0]["held_out/nll"]) == pytest.approx(runs[rows[0]["entrant"], 0]["held_out/nll"])
    assert all(float(r["wall_s"]) > 0 and float(r["peak_rss_mib"]) > 50 and float(r["tokens_per_s"]) > 0 for r in rows)
    assert (out / "curves.png").stat().st_size > 5_000 and (out / "bars.png").stat().st_size > 5_000

    # an interrupted comparison: one run lost entirely, the others finished
    lost = out / "runs" / "fkl-b" / "seed1-lr0.001"
    shutil.rmtree(lost)
    kept = out / "runs" / "fkl-a" / "seed0-lr0.001" / "train.log"
    before = kept.stat().st_mtime_ns
    trained = []
    again = compare(path, say=trained.append)
    assert trained == ["train fkl-b seed 1 lr 0.001"] and kept.stat().st_mtime_ns == before
    assert [r["held_out/nll"] for r in again["runs"]] == [r["held_out/nll"] for r in results["runs"]]
    metrics_table = lambda text: text.split("## Cost")[0]  # noqa: E731  (the rerun run's wall time is its own)
    assert metrics_table((out / "report.md").read_text()) == metrics_table(report)


def test_every_entrant_gets_the_same_start_data_and_schedule_and_no_clipping(tmp_path):
    path = compare_config(tmp_path, [{"name": "a", "objective": {"name": "fkl"}},
                                     {"name": "b", "objectives": [{"name": "ce", "weight": 0.5},
                                                                  {"name": "rkl", "weight": 0.5}], "lr": 3e-3}])
    plan = load_plan(path)
    a, b = (run_config(plan, e, 1, e.lrs[0]) for e in plan.entrants)
    assert a["student"] == b["student"] and a["student"]["tiny"]["seed"] == 1 and a["seed"] == b["seed"] == 1
    assert a["data"] == b["data"] and a["data"]["eval"]["path"] == plan.held_out["path"]
    assert {k: v for k, v in a["train"].items() if k != "lr"} == {k: v for k, v in b["train"].items() if k != "lr"}
    assert a["train"]["max_grad_norm"] is None and (a["train"]["lr"], b["train"]["lr"]) == (1e-3, 3e-3)


@pytest.mark.parametrize("change, message", [
    (lambda r: r["base"].update(objective={"name": "fkl"}), r"base.objective: each entrant brings its own"),
    (lambda r: r["entrants"].append({"name": "a", "objective": {"name": "rkl"}}), r"'a' is used twice"),
    (lambda r: r["entrants"].append({"name": "z", "objective": {"name": "fkll"}}),
     r"entrant 'z': .*unknown objective 'fkll'.*Did you mean 'fkl'"),
    (lambda r: r["entrants"][0].update(lr=[1e-3, 3e-3]), r"validation: entrants \['a'\] have a learning-rate grid"),
    (lambda r: r["base"].pop("teacher"), r"base.teacher: compare needs a teacher model"),
    (lambda r: r.update(seeds=[0, 0]), r"seeds must be a non-empty list of distinct integers"),
    (lambda r: r.update(extra=1), r"unknown key\(s\) \['extra'\]"),
    (lambda r: r["base"]["data"]["streams"][0].update(path="missing.jsonl"), r"entrant 'a': .*missing.jsonl"),
])
def test_a_bad_compare_config_is_refused_before_anything_trains(tmp_path, no_models, change, message):
    path = compare_config(tmp_path, [{"name": "a", "objective": {"name": "fkl"}}])
    raw = yaml.safe_load(path.read_text())
    change(raw)
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(dz.ConfigError, match=message):
        compare(path, say=lambda line: None)
    assert not (tmp_path / "cmp").exists()


def test_a_run_stopped_after_its_final_save_but_before_its_cost_is_trained_again(tmp_path):
    path = compare_config(tmp_path, [{"name": "fkl", "objective": {"name": "fkl"}}], seeds=[0])
    first = compare(path, say=lambda line: None)["runs"][0]
    run = tmp_path / "cmp" / "runs" / "fkl" / "seed0-lr0.001"
    (run / "cost.json").unlink()  # what a kill between the final save and the cost leaves
    said = []
    again = compare(path, say=said.append)["runs"][0]
    assert said == ["train fkl seed 0 lr 0.001"]  # not refused as a finished run: measured again, from scratch
    assert json.loads((run / "cost.json").read_text())["resumed"] is False
    assert {k: v for k, v in again.items() if k.startswith("held_out/")} == \
        {k: v for k, v in first.items() if k.startswith("held_out/")}


def test_exact_match_is_reported_per_task_and_the_tasks_add_up_to_the_whole(tmp_path):
    held = [dict(r, task="plus-one" if i % 2 else "other") for i, r in enumerate(chat(6, offset=20))]
    path = compare_config(tmp_path, [{"name": "ce", "objective": {"name": "ce"}}], seeds=[0])
    raw = yaml.safe_load(path.read_text())
    raw["held_out"]["path"] = str(write_jsonl(tmp_path / "tasks.jsonl", held))
    path.write_text(yaml.safe_dump(raw))
    run = compare(path, say=lambda line: None)["runs"][0]
    by_task = {k.rpartition("=")[2]: v for k, v in run.items() if k.startswith("held_out/exact_match/task=")}
    assert sorted(by_task) == ["other", "plus-one"]
    assert run["held_out/exact_match"] == pytest.approx((by_task["other"] * 3 + by_task["plus-one"] * 3) / 6)
    report = (tmp_path / "cmp" / "report.md").read_text()
    section = report.split("## exact match per task and language")[1]
    assert "task=other" in section and "| ce | " in section
