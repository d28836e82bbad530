"""Scorers and data selection: mfd against a direct computation, filter by quantile/threshold, judges, plugins."""

import json
from pathlib import Path

import pytest
import torch

import distillzoo as dz
from distillzoo.models.causal_lm import tiny_qwen2
from distillzoo.cli import main
from distillzoo.teacher.scoring import filter_records, make_scorer, score_samples
from distillzoo.data.shards import ConversationDataset

QUICKSTART = Path(__file__).resolve().parent.parent / "data" / "quickstart" / "train.jsonl"
TEACHER = {"hidden_size": 48, "num_layers": 1, "seed": 1}
STUDENT = {"hidden_size": 32, "num_layers": 1, "seed": 2}


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """The first 24 records of the quickstart data (all 8 task/language kinds)."""
    path = tmp_path_factory.mktemp("scoring") / "sample.jsonl"
    path.write_text("".join(QUICKSTART.read_text(encoding="utf-8").splitlines(keepends=True)[:24]), encoding="utf-8")
    return path


def models():
    teacher = tiny_qwen2(**TEACHER, tie_word_embeddings=True).eval()
    with torch.no_grad():
        teacher.lm_head.weight.mul_(20)  # a confident teacher: gaps differ from sample to sample
    return teacher, tiny_qwen2(**STUDENT, tie_word_embeddings=True).eval()


def _replies(path, tok, teacher, student):
    """Per example: ``(example, reply token ids [n, 1], teacher log-probs [n, V], student log-probs [n, V])`` at its
    reply's positions, float64 from full logits, one example at a time."""
    for item in ConversationDataset(path, "chat", tok, system=None):
        ids = item["input_ids"].long()[None]
        mask = item["loss_mask"][1:]
        with torch.no_grad():
            log_p = torch.log_softmax(teacher(input_ids=ids).logits[0, :-1].double(), -1)[mask]
            log_q = torch.log_softmax(student(input_ids=ids).logits[0, :-1].double(), -1)[mask]
        yield item, ids[0, 1:][mask][:, None], log_p, log_q


def direct(path, tok, teacher, student, metric):
    """Per sample, from full logits one example at a time: mean over response tokens."""
    out = {}
    for item, y, log_p, log_q in _replies(path, tok, teacher, student):
        if metric == "nll_gap":
            values = log_p.gather(-1, y) - log_q.gather(-1, y)
        else:
            values = (log_p.exp() * (log_p - log_q)).sum(-1)
        out[item["id"]] = float(values.mean())
    return out


@pytest.mark.parametrize("metric", ["nll_gap", "kl"])
def test_mfd_is_the_per_token_teacher_student_gap(sample, tok, metric):
    teacher, student = models()
    got = score_samples(make_scorer({"name": "mfd", "metric": metric}), sample, "chat", tok, teacher=teacher,
                        student=student, system=None, batch_size=5)
    want = direct(sample, tok, teacher, student, metric)
    assert got.keys() == want.keys() and len(got) == 24
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-5)
    assert len({round(v, 3) for v in got.values()}) > 12  # the gaps really differ


def test_score_then_filter_keeps_the_samples_with_the_largest_gap(sample, tok, tmp_path, capsys):
    teacher, student = models()
    for name, model in (("teacher", teacher), ("student", student)):
        model.save_pretrained(tmp_path / name)
    cfg = {"teacher": {"path": str(tmp_path / "teacher")}, "student": {"path": str(tmp_path / "student")},
           "data": {"system": None},
           "score": {"data": str(sample), "out": str(tmp_path / "scores.jsonl"), "scorer": {"name": "mfd"},
                     "progress": False}}
    (tmp_path / "score.yaml").write_text(json.dumps(cfg))
    assert main(["score", str(tmp_path / "score.yaml")]) == 0
    assert "scored 24 samples with mfd" in capsys.readouterr().out
    assert main(["filter", str(sample), "--format", "chat", "--scores", str(tmp_path / "scores.jsonl"),
                 "--quantile", "0.75", "--out", str(tmp_path / "kept.jsonl"), "--report", str(tmp_path / "r.json")]) == 0
    gaps = direct(sample, tok, teacher, student, "nll_gap")
    top = sorted(gaps, key=gaps.get, reverse=True)[:6]
    kept = [json.loads(line) for line in (tmp_path / "kept.jsonl").read_text(encoding="utf-8").splitlines()]
    assert sorted(r["id"] for r in kept) == sorted(top)
    originals = {json.loads(line)["id"]: line for line in sample.read_text(encoding="utf-8").splitlines()}
    assert (tmp_path / "kept.jsonl").read_text(encoding="utf-8").splitlines() == \
        [originals[r["id"]] for r in kept]  # verbatim, in file order
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["kept"] == 6 and report["dropped"] == 18
    assert {d["id"] for d in report["dropped_samples"]} == set(gaps) - set(top)
    assert all(d["score"] < report["cut"] for d in report["dropped_samples"])


def test_filter_by_threshold_and_its_refusals(sample, tmp_path):
    ids = [json.loads(line)["id"] for line in sample.read_text(encoding="utf-8").splitlines()]
    scores = {i: float(n) for n, i in enumerate(ids)}
    result = filter_records(sample, "chat", scores, tmp_path / "out.jsonl", threshold=20)
    assert result["kept"] == 4 and [d["id"] for d in result["dropped_samples"]] == ids[:20]
    with pytest.raises(dz.ConfigError, match="exactly one of a threshold or a quantile"):
        filter_records(sample, "chat", scores, tmp_path / "x.jsonl", threshold=1, quantile=0.5)
    del scores[ids[3]]
    with pytest.raises(dz.DataError, match=r"sample.jsonl:4: sample '.*' has no score \(1 of 24"):
        filter_records(sample, "chat", scores, tmp_path / "x.jsonl", threshold=1)
    assert not (tmp_path / "x.jsonl").exists()


def test_a_judge_is_any_callable_named_by_import_path(sample, tok):
    scores = score_samples(make_scorer({"name": "judge", "judge": "helpers:answer_length_judge"}), sample, "chat", tok)
    answers = {json.loads(line)["id"]: json.loads(line)["messages"][-1]["content"]
               for line in sample.read_text(encoding="utf-8").splitlines()}
    assert scores == {i: float(len(a)) for i, a in answers.items()}
    with pytest.raises(dz.ParameterError, match="judge: cannot import nowhere:judge"):
        make_scorer({"name": "judge", "judge": "nowhere:judge"})


@pytest.mark.parametrize("scorer, drop, message", [
    ({"name": "mfdd"}, None, r"unknown scorer 'mfdd'.*Did you mean 'mfd'"),
    ({"name": "mfd", "metric": "l2"}, None, r"metric 'l2' is not one of \['nll_gap', 'kl'\]"),
    ({"name": "mfd"}, "teacher", r"teacher: scorer 'mfd' needs the teacher"),
])
def test_bad_score_configs_fail_before_any_model_loads(sample, tmp_path, monkeypatch, scorer, drop, message):
    import distillzoo.models.causal_lm as causal_lm  # where models are built
    from distillzoo.teacher.scoring import score_from_config

    monkeypatch.setattr(causal_lm, "tiny_qwen2", lambda **kw: (_ for _ in ()).throw(AssertionError("model built")))
    raw = {"teacher": {"tiny": TEACHER}, "student": {"tiny": STUDENT},
           "score": {"data": str(sample), "out": str(tmp_path / "s.jsonl"), "scorer": scorer}}
    if drop:
        raw.pop(drop)
    with pytest.raises(dz.DistillzooError, match=message):
        score_from_config(dz.load_config(raw), where="s.yaml")


def test_filter_keeps_records_whole_when_they_hold_a_line_separator(tmp_path):
    records = [{"id": f"r{i}", "messages": [{"role": "user", "content": f"q{i}\u2028more"},
                                            {"role": "assistant", "content": "a"}]} for i in range(3)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records) + "\n", encoding="utf-8")
    filter_records(data, "chat", {"r0": 0.0, "r1": 2.0, "r2": 1.0}, tmp_path / "out.jsonl", threshold=1.0)
    kept = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text(encoding="utf-8").split("\n") if line]
    assert kept == [records[1], records[2]]


def direct_sparse_kl(path, tok, teacher, student, k):
    """Per sample, mean over response tokens of the top-k teacher's KL with its tail bucket, from float64 logits:
    sum over the top k of p (log p - log q), plus p_tail (log p_tail - log q_tail), each tail 1 - the top k's mass."""
    out = {}
    for item, _, log_p, log_q in _replies(path, tok, teacher, student):
        top = log_p.topk(k, -1)
        p, q = top.values.exp(), log_q.gather(-1, top.indices).exp()
        p_tail, q_tail = 1 - p.sum(-1), 1 - q.sum(-1)
        values = (p * (p.log() - q.log())).sum(-1) + torch.where(p_tail > 0, p_tail * (p_tail.log() - q_tail.log()), 0)
        out[item["id"]] = float(values.mean())
    return out


def test_mfd_reads_a_served_teacher_s_log_probs_and_top_k(sample, tok, tmp_path):
    import threading

    from distillzoo.teacher.served import ServedTeacher
    from distillzoo.teacher.scoring import score_from_config
    from distillzoo.teacher.server import TeacherServer

    teacher, student = models()
    http = TeacherServer(teacher, tok, "t").http()
    threading.Thread(target=http.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{http.server_address[1]}"
    try:
        gaps = score_samples(make_scorer({"name": "mfd"}), sample, "chat", tok, teacher=ServedTeacher(url, "t", top_k=1),
                             student=student, system=None, batch_size=5)
        kls = score_samples(make_scorer({"name": "mfd", "metric": "kl"}), sample, "chat", tok,
                            teacher=ServedTeacher(url, "t", top_k=8), student=student, system=None, batch_size=5)
        student.save_pretrained(tmp_path / "student")
        cfg = {"teacher": {"server": url, "model": "t"}, "student": {"path": str(tmp_path / "student")},
               "data": {"system": None},
               "score": {"data": str(sample), "format": "chat", "out": str(tmp_path / "scores.jsonl"),
                         "scorer": {"name": "mfd"}, "progress": False}}
        from_config = score_from_config(dz.load_config(cfg))
    finally:
        http.shutdown()
    want = direct(sample, tok, teacher, student, "nll_gap")
    want_kl = direct_sparse_kl(sample, tok, teacher, student, 8)
    assert gaps.keys() == want.keys() == kls.keys() == from_config.keys() and len(gaps) == 24
    for key in want:
        assert gaps[key] == pytest.approx(want[key], rel=1e-4, abs=1e-5)
        assert from_config[key] == pytest.approx(want[key], rel=1e-4, abs=1e-5)
        assert kls[key] == pytest.approx(want_kl[key], rel=1e-4, abs=1e-5)


def test_judge_teacher_rates_each_sample_by_the_number_a_served_judge_answers(sample, tok, tmp_path):
    import threading

    from distillzoo.data.records import read_records
    from distillzoo.errors import DataError
    from distillzoo.teacher.scoring import score_from_config
    from distillzoo.teacher.server import TeacherServer

    teacher, _ = models()

    class RatingServer(TeacherServer):
        """Answers a generation request with the length of the response it is asked to rate, mod 9, plus 1."""
        asked: list[str] = []

        def completions(self, body):
            if body.get("prompt_logprobs") is not None:
                return super().completions(body)
            text = self.tokenizer.decode(body["prompt"])
            self.asked.append(text)
            response = text.split("Response:\n", 1)[1].split("<|im_end|>", 1)[0]
            answer = "blank" if "nothing" in response else f"Score: {len(response) % 9 + 1}"
            ids = self.tokenizer.encode(answer)
            return {"choices": [{"index": 0, "text": answer, "token_ids": ids, "finish_reason": "stop"}]}

    server = RatingServer(teacher, tok, "judge")
    http = server.http()
    threading.Thread(target=http.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{http.server_address[1]}"
    cfg = {"teacher": {"server": url, "model": "judge"}, "data": {"system": None},
           "score": {"data": str(sample), "format": "chat", "out": str(tmp_path / "scores.jsonl"),
                     "scorer": {"name": "judge", "judge": "teacher"}, "progress": False}}
    try:
        scores = score_from_config(dz.load_config(cfg))
        blank = tmp_path / "blank.jsonl"
        blank.write_text(json.dumps({"id": "b", "messages": [{"role": "user", "content": "say it"},
                                                              {"role": "assistant", "content": "nothing"}]}) + "\n")
        with pytest.raises(DataError, match=r"judge: sample 'b': the teacher's answer 'blank' holds no number"):
            score_from_config(dz.load_config({**cfg, "score": {**cfg["score"], "data": str(blank),
                                                               "out": str(tmp_path / "b.jsonl")}}))
    finally:
        http.shutdown()
    records = {str(f["id"]): f["messages"] for _, f in read_records(sample, "chat")}
    assert len(scores) == 24
    for sample_id, messages in records.items():
        assert scores[sample_id] == len(messages[-1]["content"]) % 9 + 1
    assert all("Rate how correct" in text and "Instruction:\n" in text for text in server.asked)
