"""distillzoo compare's bookkeeping: a rerun reuses only the runs trained under the config it is given and refuses
the others before anything trains, judgements are keyed by the split's content, and learning rates and seeds are
read, checked and named unambiguously.

One comparison (one entrant, one seed, 4 steps) is trained once for the module; each test that reruns it works on a
copy (relative paths, so a copy is the same comparison). The report's statistics are tested in test_compare.py;
here they are stubbed, so these tests are about the runs' files alone.
"""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml

import distillzoo as dz
from distillzoo.compare import plan as plan_module
from distillzoo.compare import runner
from distillzoo.compare.forkserver import ForkServer
from distillzoo.compare.plan import differences, load_plan, lr_name, run_config, run_definition, run_dir, split_key
from distillzoo.config import load_config
from helpers import write_jsonl

RUN = Path("cmp/runs/fkl/seed0-lr0.001")


def chat(n, offset=0):
    return [{"id": f"q{a}", "messages": [{"role": "user", "content": f"{a} + 1 = ?"},
                                         {"role": "assistant", "content": str(a + 1)}]}
            for a in range(offset, offset + n)]


def base_raw(entrants=None, seeds=(0,), **extra):
    """A compare config with paths relative to the working directory (train.jsonl, held.jsonl, cmp/)."""
    return {"base": {"student": {"tiny": {"hidden_size": 32, "num_layers": 1}},
                     "teacher": {"tiny": {"hidden_size": 48, "num_layers": 1, "seed": 7}},
                     "data": {"streams": [{"name": "s", "path": "train.jsonl", "format": "chat", "repeat": 1}],
                              "system": None, "max_length": 32},
                     "train": {"steps": 4, "batch_size": 2, "lr": 1e-3, "log_every": 1, "eval_every": 4}},
            "held_out": {"path": "held.jsonl", "format": "chat"},
            "entrants": entrants or [{"name": "fkl", "objective": {"name": "fkl"}}], "seeds": list(seeds),
            "output_dir": "cmp", **extra}


def write_data(root: Path) -> None:
    write_jsonl(root / "train.jsonl", chat(8))
    write_jsonl(root / "held.jsonl", chat(4, offset=20))
    write_jsonl(root / "val.jsonl", chat(4, offset=30))


def stub_report(mp) -> None:
    mp.setattr(runner, "summarise", lambda rows, names: {})
    mp.setattr(runner, "report", lambda plan, results: "report\n")
    mp.setattr(runner, "write_plots", lambda plan, results: None)


def forbid_training(mp) -> None:
    """Starting the fork server (the first thing any training or judging does) fails the test."""
    def refuse(self):
        raise AssertionError("the fork server was started: something was about to train or judge")
    mp.setattr(ForkServer, "_start", refuse)


def files(root: Path) -> dict:
    """Every file under ``root``: {relative path: (bytes, mtime_ns)}."""
    return {p.relative_to(root).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        stub_report(mp)
        write_data(root)
        Path("compare.yaml").write_text(yaml.safe_dump(base_raw()))
        said = []
        results = runner.compare("compare.yaml", say=said.append)
    assert said == ["train fkl seed 0 lr 0.001"]
    return root, results


@pytest.fixture
def work(trained, tmp_path, monkeypatch):
    """A copy of the trained comparison (mtimes kept) as the working directory; returns its first results."""
    root, results = trained
    shutil.copytree(root, tmp_path / "w")
    monkeypatch.chdir(tmp_path / "w")
    stub_report(monkeypatch)
    return results


def edit(change) -> None:
    raw = yaml.safe_load(Path("compare.yaml").read_text())
    change(raw)
    Path("compare.yaml").write_text(yaml.safe_dump(raw))


def test_the_run_directory_holds_its_definition_and_its_judgement_is_keyed_by_the_split(work):
    plan = load_plan("compare.yaml")
    stored = json.loads((RUN / "definition.json").read_text())
    assert stored == run_definition(plan, plan.entrants[0], 0, 1e-3)
    assert set(stored) == {"format", "sha256", "config"} and stored["format"] == 1
    text = json.dumps(stored["config"], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert stored["sha256"] == hashlib.sha256(text.encode()).hexdigest()
    assert stored["config"]["train"]["steps"] == 4 and stored["config"]["objective"] == {"name": "fkl"}
    assert stored["config"]["train"]["warmup_steps"] == 0  # resolved: the defaults are part of it
    judged = json.loads((RUN / "result.json").read_text())["held_out"]
    assert judged["split"] == {"path": "held.jsonl", "format": "chat", "columns": None,
                               "sha256": hashlib.sha256(Path("held.jsonl").read_bytes()).hexdigest(),
                               "decoding": {"samples": 1, "temperature": 0.0, "top_p": 1.0, "max_new_tokens": None,
                                            "seed": 0}}  # how the answers were drawn is part of the key
    assert "held_out/split" not in work["runs"][0]  # the key is bookkeeping, not a metric


@pytest.mark.parametrize("change, differs", [
    (lambda r: r["base"]["train"].update(steps=8), "train.steps: 4 -> 8"),
    (lambda r: r["base"]["data"].update(max_length=16), "data.max_length: 32 -> 16"),
    (lambda r: r["entrants"][0]["objective"].update(temperature=2.0), "objective.temperature: (absent) -> 2.0"),
    (lambda r: r["entrants"][0].update(objective={"name": "rkl"}), 'objective.name: "fkl" -> "rkl"'),
    (lambda r: r["base"]["train"].update(log_every=2), "train.log_every: 1 -> 2"),  # nothing is left out
])
def test_a_rerun_under_a_changed_config_is_refused_and_nothing_is_trained_or_deleted(work, monkeypatch, change,
                                                                                     differs):
    before = files(Path("cmp"))
    edit(change)
    forbid_training(monkeypatch)
    with pytest.raises(dz.ConfigError) as refused:
        runner.compare("compare.yaml", say=lambda line: pytest.fail(f"said {line!r}"))
    message = str(refused.value)
    assert f"\n  {RUN}: {differs}\n" in message  # the run directory, then exactly the keys that differ
    assert "nothing was trained, changed or deleted" in message
    assert "give it a new output_dir" in message and "delete that run directory" in message
    assert files(Path("cmp")) == before  # byte for byte, and untouched


def test_a_run_directory_without_a_definition_is_refused(work, monkeypatch):
    (RUN / "definition.json").unlink()  # what a comparison from before definition.json leaves
    before = files(Path("cmp"))
    forbid_training(monkeypatch)
    with pytest.raises(dz.ConfigError, match=r"  cmp/runs/fkl/seed0-lr0\.001: holds files but no definition\.json"):
        runner.compare("compare.yaml", say=lambda line: None)
    assert files(Path("cmp")) == before


def test_an_added_entrant_is_trained_and_the_unchanged_runs_are_reused(work):
    before = files(RUN)
    edit(lambda r: r["entrants"].append({"name": "rkl", "objective": {"name": "rkl"}}))
    said = []
    results = runner.compare("compare.yaml", say=said.append)
    assert said == ["train rkl seed 0 lr 0.001"]
    assert files(RUN) == before  # neither trained nor judged again: cost.json, result.json, final/ untouched
    assert not (RUN / "judge.log").exists()
    rows = {r["entrant"]: r for r in results["runs"]}
    assert {k: v for k, v in rows["fkl"].items() if k != "tuning"} == \
        {k: v for k, v in work["runs"][0].items() if k != "tuning"}
    new = json.loads(Path("cmp/runs/rkl/seed0-lr0.001/definition.json").read_text())
    old = json.loads((RUN / "definition.json").read_text())
    # the same budget by construction: the two runs differ in their objective (and where they are) alone
    assert differences(old["config"], new["config"]) == [
        'objective.name: "fkl" -> "rkl"', 'output_dir: "cmp/runs/fkl/seed0-lr0.001" -> "cmp/runs/rkl/seed0-lr0.001"']


def test_a_held_out_file_changed_in_place_is_judged_again(work):
    old = json.loads((RUN / "result.json").read_text())["held_out"]
    cost = (RUN / "cost.json").read_bytes()
    write_jsonl(Path("held.jsonl"), chat(4, offset=40))  # the same path, other records
    said = []
    results = runner.compare("compare.yaml", say=said.append)
    assert said == []  # judging is redone, training is not
    assert (RUN / "cost.json").read_bytes() == cost and (RUN / "judge.log").exists()
    new = json.loads((RUN / "result.json").read_text())["held_out"]
    assert new["split"]["sha256"] == hashlib.sha256(Path("held.jsonl").read_bytes()).hexdigest() \
        != old["split"]["sha256"]
    assert {k: v for k, v in new.items() if k != "split"} != {k: v for k, v in old.items() if k != "split"}
    row, first = results["runs"][0], work["runs"][0]
    assert "held_out/nll" in row and row["held_out/nll"] != first["held_out/nll"]
    assert row["held_out/nll"] == new["nll"]


def test_a_stale_judgement_is_not_reported_and_a_legacy_one_is_judged_again():
    key = {"path": "h.jsonl", "format": "chat", "columns": None, "sha256": "a" * 64}
    done = {"held_out": {"nll": 1.0, "split": key}, "validation": {"nll": 2.0}}  # the second: an older layout
    assert runner._judged(done, {"held_out": key, "validation": key}) == {"held_out": done["held_out"]}
    assert runner._judged(done, {"held_out": {**key, "sha256": "b" * 64}}) == {}


# ------------------------------------------------------------------ the plan alone: nothing trains

@pytest.fixture
def here(tmp_path, monkeypatch, no_models):
    monkeypatch.chdir(tmp_path)
    write_data(tmp_path)
    forbid_training(monkeypatch)
    return tmp_path


def test_a_rate_in_yaml_1_1_exponent_notation_is_read_as_a_train_config_reads_it(here):
    raw = base_raw([{"name": "a", "objective": {"name": "fkl"}, "lr": "LRS"}, {"name": "b", "objective": {"name": "ce"}}],
                   validation={"path": "val.jsonl", "format": "chat"}, lr_grid="GRID")
    text = yaml.safe_dump(raw).replace("lr: LRS", "lr: [1e-3, 3E-3, 1.0e-2]").replace("lr_grid: GRID",
                                                                                          "lr_grid: 2e-4")
    Path("compare.yaml").write_text(text)
    assert yaml.safe_load(text)["entrants"][0]["lr"][:2] == ["1e-3", "3E-3"]  # PyYAML (YAML 1.1): strings
    assert load_config({"objective": {"name": "fkl"}, "train": {"lr": "1e-3"}}).train.lr == 0.001  # train reads 0.001
    plan = load_plan("compare.yaml")
    assert plan.entrants[0].lrs == [0.001, 0.003, 0.01] and plan.entrants[1].lrs == [0.0002]
    assert all(type(lr) is float for e in plan.entrants for lr in e.lrs)
    assert run_config(plan, plan.entrants[0], 0, plan.entrants[0].lrs[0])["train"]["lr"] == 0.001
    assert run_dir(plan, plan.entrants[0], 0, 0.001).name == "seed0-lr0.001"


@pytest.mark.parametrize("value", ["abc", True, 0, "-1e-3", "nan", [], {"a": 1}])
def test_a_rate_that_is_no_number_is_refused(here, value):
    Path("compare.yaml").write_text(yaml.safe_dump(base_raw(lr_grid=value)))
    with pytest.raises(dz.ConfigError, match=r"lr_grid must be a learning rate > 0 or a non-empty list of them"):
        load_plan("compare.yaml")


def test_rates_that_print_alike_get_their_own_run_directories(here):
    assert f"{1e-3:g}" == f"{0.0010000001:g}"  # what named them before: one directory for two rates
    Path("compare.yaml").write_text(yaml.safe_dump(base_raw(lr_grid=[1e-3, 0.0010000001],
                                                            validation={"path": "val.jsonl", "format": "chat"})))
    plan = load_plan("compare.yaml")
    e = plan.entrants[0]
    names = [run_dir(plan, e, 0, lr).name for lr in e.lrs]
    assert names == ["seed0-lr0.001", "seed0-lr0.0010000001"]
    assert len(plan.definitions) == 2  # two runs, two definitions
    for lr in (3e-3, 1e-3, 1e-4, 5e-5, 1e-5, 2.5e-4, 1.0, 1 / 3, 0.0010000001, 1e-3 + 1e-18, 7e-3 * (1 + 2**-52)):
        assert float(lr_name(lr)) == lr  # the name reads back as the rate: distinct rates, distinct names
    assert [lr_name(lr) for lr in (3e-3, 1e-4, 1e-5, 1.0)] == ["0.003", "0.0001", "1e-05", "1"]  # readable


@pytest.mark.parametrize("where, raw, message", [
    ("lr_grid", {"lr_grid": ["1e-3", 0.001]}, r"lr_grid: '1e-3' and 0\.001 are one learning rate \(0\.001\) given twice"),
    ("entrant", {"entrants": [{"name": "a", "objective": {"name": "fkl"}, "lr": [3e-3, 0.003]}]},
     r"entrants\[0\]\.lr: 0\.003 and 0\.003 are one learning rate"),
])
def test_a_rate_given_twice_in_a_grid_is_refused(here, where, raw, message):
    Path("compare.yaml").write_text(yaml.safe_dump({**base_raw(validation={"path": "val.jsonl", "format": "chat"}),
                                                    **raw}))
    with pytest.raises(dz.ConfigError, match=message):
        load_plan("compare.yaml")


@pytest.mark.parametrize("seeds, message", [
    ([0, -1], r"seeds\[1\]: -1 is not a seed: a seed is an integer in \[0, 2\*\*32\)"),
    ([2**32], r"seeds\[0\]: 4294967296 is not a seed"),
    ([0, "1"], r"seeds\[1\]: '1' is not a seed"),
    ([1, 1], r"seeds must be a non-empty list of distinct integers"),
])
def test_a_bad_seed_is_refused_before_any_config_is_resolved(here, monkeypatch, seeds, message):
    monkeypatch.setattr(plan_module, "load_config", lambda *a, **k: pytest.fail("a run config was resolved"))
    Path("compare.yaml").write_text(yaml.safe_dump(base_raw(seeds=seeds)))
    with pytest.raises(dz.ConfigError, match=message):
        runner.compare("compare.yaml", say=lambda line: None)
    assert not Path("cmp").exists()


def test_every_run_of_every_seed_is_resolved_reading_the_data_once_and_all_share_one_budget(here, monkeypatch):
    calls = []
    resolve = plan_module.resolve
    monkeypatch.setattr(plan_module, "resolve", lambda cfg, **kw: calls.append((cfg.seed, kw["read_data"]))
                        or resolve(cfg, **kw))
    entrants = [{"name": "a", "objective": {"name": "fkl"}, "lr": [1e-3, 3e-3]},
                {"name": "b", "objectives": [{"name": "ce", "weight": 0.5}, {"name": "rkl", "weight": 0.5}]}]
    Path("compare.yaml").write_text(yaml.safe_dump(base_raw(entrants, seeds=[0, 1, 2],
                                                            validation={"path": "val.jsonl", "format": "chat"})))
    plan = load_plan("compare.yaml")
    runs = [("a", s, lr) for lr in (1e-3, 3e-3) for s in (0, 1, 2)] + [("b", s, 1e-3) for s in (0, 1, 2)]
    assert sorted(plan.definitions) == sorted(runs) and len(calls) == 9
    assert [read for _, read in calls] == [True] + [False] * 8  # the records are read once
    assert sorted(seed for seed, _ in calls) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    a0, b2 = plan.definitions["a", 0, 3e-3]["config"], plan.definitions["b", 2, 1e-3]["config"]
    assert a0["train"] == {**b2["train"], "lr": 3e-3} and a0["data"] == b2["data"]  # the same steps and schedule

    def unfair(plan, entrant, seed, lr):  # a run_config that gave one entrant another budget
        cfg = run_config(plan, entrant, seed, lr)
        if entrant.name == "b":
            cfg["train"]["steps"] = 5
        return cfg
    monkeypatch.setattr(plan_module, "run_config", unfair)
    with pytest.raises(dz.DistillzooError, match=r"differ in train\.steps, which compare fixes for every run"):
        load_plan("compare.yaml")


def test_a_missing_validation_split_is_refused_before_the_grid_trains(here):
    Path("compare.yaml").write_text(yaml.safe_dump(base_raw(lr_grid=[1e-3, 3e-3],
                                                            validation={"path": "nope.jsonl", "format": "chat"})))
    with pytest.raises(dz.ConfigError, match=r"validation\.path: 'nope\.jsonl' is no records file"):
        load_plan("compare.yaml")


def test_the_key_of_a_directory_split_is_its_files_content_in_sorted_order(tmp_path):
    def dataset(where, order):
        where.mkdir()
        for name in order:
            (where / name).write_text({"state.json": "{}", "data-00000-of-00001.arrow": "rows"}[name])
        return {"path": str(where), "format": "chat"}

    one = split_key(dataset(tmp_path / "one", ["state.json", "data-00000-of-00001.arrow"]))
    two = split_key(dataset(tmp_path / "two", ["data-00000-of-00001.arrow", "state.json"]))
    assert one["sha256"] == two["sha256"] and one["path"] != two["path"]
    (tmp_path / "two" / "data-00000-of-00001.arrow").write_text("other rows")
    assert split_key({"path": str(tmp_path / "two"), "format": "chat"})["sha256"] != one["sha256"]
    (tmp_path / "f.jsonl").write_bytes(b"x\n")
    assert split_key({"path": str(tmp_path / "f.jsonl"), "format": "chat", "columns": {"instruction": "q"}}) == {
        "path": str(tmp_path / "f.jsonl"), "format": "chat", "columns": {"instruction": "q"},
        "sha256": hashlib.sha256(b"x\n").hexdigest()}
    with pytest.raises(dz.ConfigError, match=r"held_out\.path: .*gone.* does not exist"):
        split_key({"path": str(tmp_path / "gone"), "format": "chat"}, "held_out")
