"""distillzoo compare with ``serve_teacher``: the teacher is served once by ``distillzoo serve`` for every entrant,
each run trains on its top-k, the judge still reads the teacher model, and a rerun reuses the runs."""

import json
import socket
from pathlib import Path

import pytest
import yaml

from distillzoo.compare import runner
from distillzoo.errors import ConfigError
from test_compare_bookkeeping import base_raw, stub_report, write_data


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_teacher_serves_one_teacher_for_every_entrant(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_data(tmp_path)
    stub_report(monkeypatch)
    port = _free_port()
    entrants = [{"name": "fkl", "objective": {"name": "fkl"}}, {"name": "rkl", "objective": {"name": "rkl"}}]
    Path("cmp.yaml").write_text(yaml.safe_dump(base_raw(entrants, serve_teacher={"top_k": 8, "port": port})))
    said = []
    results = runner.compare("cmp.yaml", say=said.append)
    assert said.count(f"serving the teacher at http://127.0.0.1:{port} for every entrant") == 1
    assert [line for line in said if line.startswith("train ")] == ["train fkl seed 0 lr 0.001",
                                                                     "train rkl seed 0 lr 0.001"]
    for name in ("fkl", "rkl"):
        run = tmp_path / "cmp" / "runs" / name / "seed0-lr0.001"
        cfg = yaml.safe_load((run / "compare_run.yaml").read_text())
        teacher = cfg["teacher"]
        assert teacher["server"] == f"http://127.0.0.1:{port}" and teacher["top_k"] == 8
        assert teacher["model"].startswith("compare-teacher-")  # named by the teacher: a new one, a new definition
        assert len((run / "metrics.jsonl").read_text().splitlines()) == 4
        judged = json.loads((run / "result.json").read_text())["held_out"]
        assert judged["fkl"] > 0 and 0 <= judged["top1_agreement"] <= 1  # the judge read the teacher model
    assert len(results["runs"]) == 2
    again = []
    runner.compare("cmp.yaml", say=again.append)  # reused: nothing trains, no server starts
    assert not any(line.startswith(("train ", "serving")) for line in again)


@pytest.mark.parametrize("section, message", [
    ({"port": 8000}, r"serve_teacher: give \{top_k: K, port: P\}"),
    ({"top_k": 0}, r"serve_teacher.top_k: an integer in \[1, 64\]"),
    ({"top_k": 8, "port": "x"}, r"serve_teacher.port: a port number"),
])
def test_a_bad_serve_teacher_section_is_refused(tmp_path, monkeypatch, section, message):
    monkeypatch.chdir(tmp_path)
    write_data(tmp_path)
    Path("cmp.yaml").write_text(yaml.safe_dump(base_raw(serve_teacher=section)))
    with pytest.raises(ConfigError, match=message):
        runner.compare("cmp.yaml", say=lambda line: None)


def test_an_entrant_that_cannot_read_a_top_k_teacher_is_refused_before_anything_trains(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_data(tmp_path)
    entrants = [{"name": "fkl", "objective": {"name": "fkl"}},
                {"name": "mixed", "objectives": [{"name": "fkl", "weight": 0.5, "temperature": 2.0},
                                                 {"name": "ce", "weight": 0.5}]}]
    Path("cmp.yaml").write_text(yaml.safe_dump(base_raw(entrants, serve_teacher={"top_k": 8})))
    with pytest.raises(ConfigError, match=r"entrant 'mixed'.*objective temperature 2.0: a server's prompt_logprobs"):
        runner.compare("cmp.yaml", say=lambda line: None)
    assert not (tmp_path / "cmp" / "runs").exists()


def test_the_served_teacher_s_name_and_so_every_run_s_definition_follow_the_teacher():
    from types import SimpleNamespace

    from distillzoo.compare.plan import served_name

    one = served_name(SimpleNamespace(base={"teacher": {"tiny": {"hidden_size": 48, "seed": 7}}}))
    same = served_name(SimpleNamespace(base={"teacher": {"tiny": {"seed": 7, "hidden_size": 48}}}))
    other = served_name(SimpleNamespace(base={"teacher": {"tiny": {"hidden_size": 48, "seed": 8}}}))
    assert one == same != other and one.startswith("compare-teacher-")
