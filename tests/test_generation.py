"""distillzoo generate: sampling, per-id seeds, resumable JSONL, pairs that dpkd trains on."""

import json
from pathlib import Path

import pytest
import torch

import distillzoo as dz
from distillzoo.models.causal_lm import tiny_qwen2
from distillzoo.data.records import read_records
from distillzoo.models.generation import Sampling, _pick, decode, sample_seed
from distillzoo.teacher.generate import generate_file
from helpers import naive_greedy, write_jsonl

PROMPTS = ["What is 3 + 4?", "计算 12 + 1", "Write 42 in words.", "用中文写出 7", "Sort the digits: 9120",
           "Reverse the digits: 381", "hello", "你好"]


def prompt_file(tmp_path, n=len(PROMPTS)):
    return write_jsonl(tmp_path / "prompts.jsonl", [
        {"id": f"p{i}", "messages": [{"role": "user", "content": p}, {"role": "assistant", "content": "ref"}]}
        for i, p in enumerate(PROMPTS[:n])])


def generators(n, seed=0):
    return [torch.Generator().manual_seed(sample_seed(seed, str(i))) for i in range(n)]


def frequencies(logits, sampling, n=6000):
    picks = _pick(logits.expand(n, -1).clone(), sampling, generators(n))
    return torch.bincount(picks, minlength=logits.shape[-1]).double() / n


def test_sampling_follows_temperature_top_k_and_top_p_by_hand():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()[None]
    # temperature 1: the probabilities themselves (6000 draws: 3 sigma < 0.02)
    assert frequencies(logits, Sampling(temperature=1.0)).tolist() == pytest.approx(probs.tolist(), abs=0.02)
    # temperature 0.5 squares and renormalises: p^2 / sum p^2
    sq = probs**2 / (probs**2).sum()
    assert frequencies(logits, Sampling(temperature=0.5)).tolist() == pytest.approx(sq.tolist(), abs=0.02)
    # top_k=2 keeps 0.5 and 0.3 -> 0.625, 0.375; top_p=0.75 keeps the smallest prefix reaching 0.75: the same two
    two = [0.625, 0.375, 0.0, 0.0]
    assert frequencies(logits, Sampling(top_k=2)).tolist() == pytest.approx(two, abs=0.02)
    assert frequencies(logits, Sampling(top_p=0.75)).tolist() == pytest.approx(two, abs=0.02)
    assert frequencies(logits, Sampling(top_p=0.8)).tolist() == pytest.approx([0.5 / 0.8, 0.3 / 0.8, 0, 0], abs=0.02)
    assert frequencies(logits, Sampling(top_p=0.81))[2] > 0  # 0.5 + 0.3 < 0.81: the third one joins
    assert frequencies(logits, Sampling(temperature=0)).tolist() == [1.0, 0, 0, 0]


def test_mixed_sampling_draws_from_the_weighted_mixture_by_hand():
    """MiniLLM's teacher-mixed sampling: (1 - w) q + w p, each at the temperature, over the shared vocab."""
    q = torch.tensor([0.5, 0.3, 0.15, 0.05])
    p = torch.tensor([0.1, 0.1, 0.2, 0.4, 0.2])  # one entry more: only the shared first four are compared
    n = 6000
    picks = _pick(q.log()[None].expand(n, -1).clone(), Sampling(temperature=1.0), generators(n),
                  (p.log()[None].expand(n, -1).clone(), 0.25))
    shared = p[:4] / p[:4].sum()
    want = 0.75 * q + 0.25 * shared
    assert (torch.bincount(picks, minlength=4).double() / n).tolist() == pytest.approx(want.tolist(), abs=0.02)


def test_mixed_decoding_at_weight_0_and_1_is_each_model_alone(tok):
    student = tiny_qwen2(hidden_size=32, num_layers=1, seed=0)
    teacher = tiny_qwen2(hidden_size=48, num_layers=1, seed=1)
    prompts = [tok.encode_prompt([{"role": "user", "content": p}], None) for p in PROMPTS[:4]]
    ids = [f"p{i}" for i in range(4)]
    sampling = Sampling(max_new_tokens=4, temperature=1.0, seed=3)
    assert decode(student, tok, prompts, sampling, ids=ids, mix=(teacher, 0.0)) == decode(student, tok, prompts,
                                                                                           sampling, ids=ids)
    assert decode(student, tok, prompts, sampling, ids=ids, mix=(teacher, 1.0)) == decode(teacher, tok, prompts,
                                                                                           sampling, ids=ids)
    halfway = decode(student, tok, prompts, sampling, ids=ids, mix=(teacher, 0.5))
    assert halfway != decode(student, tok, prompts, sampling, ids=ids)
    with pytest.raises(dz.ParameterError, match="mixed sampling needs temperature > 0"):
        decode(student, tok, prompts, Sampling(max_new_tokens=2, temperature=0), ids=ids, mix=(teacher, 0.5))


@pytest.mark.parametrize("bad, message", [
    ({"temperature": -1}, "temperature must be >= 0"), ({"top_p": 0}, r"top_p must be in \(0, 1\]"),
    ({"top_k": -2}, "top_k must be >= 0"), ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
])
def test_bad_sampling_parameters(bad, message):
    with pytest.raises(dz.ParameterError, match=message):
        Sampling(**bad)


def test_a_sample_s_answer_depends_on_its_id_not_on_its_batch(tok):
    model = tiny_qwen2(hidden_size=32, num_layers=1, seed=0)  # near-uniform over 151,936: every draw counts
    prompts = [tok.encode_prompt([{"role": "user", "content": p}], None) for p in PROMPTS]
    ids = [f"p{i}" for i in range(len(prompts))]
    sampling = Sampling(max_new_tokens=5, temperature=1.0, seed=7)
    together = decode(model, tok, prompts, sampling, ids=ids, batch_size=8)
    alone = [decode(model, tok, [p], sampling, ids=[i])[0] for p, i in zip(prompts, ids)]
    assert together == alone
    assert len({tuple(a) for a, _ in together}) == len(prompts)  # sampled, not collapsed
    assert all(reason == "length" for _, reason in together)
    other_seed = decode(model, tok, prompts, Sampling(max_new_tokens=5, seed=8), ids=ids)
    assert other_seed != together


def test_decoding_uses_the_current_cache_api_and_matches_a_no_cache_reference(tok):
    import warnings

    model = peaked(0)
    prompts = [tok.encode_prompt([{"role": "user", "content": p}], None) for p in PROMPTS[:3]]  # lengths differ
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # transformers' past_key_values FutureWarning included
        got = decode(model, tok, prompts, Sampling(max_new_tokens=4, temperature=0.0), batch_size=3)
    assert [a for a, _ in got] == [naive_greedy(model, p, tok.im_end_id, 4) for p in prompts]


def peaked(seed, hidden=32):
    model = tiny_qwen2(hidden_size=hidden, num_layers=1, seed=seed).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    return model


def lines(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def test_responses_are_chat_records_and_an_interrupted_run_resumes_without_loss_or_duplicates(tmp_path, tok):
    data = prompt_file(tmp_path)
    model = peaked(0)
    sampling = Sampling(max_new_tokens=4, temperature=0.7, seed=1)
    whole = tmp_path / "whole.jsonl"
    report = generate_file({"responses": model}, tok, data, "chat", whole, sampling, system=None, batch_size=3,
                           progress=False)
    assert report == {"written": 8, "already_done": 0, "empty": [], "total": 8}
    records = lines(whole)
    assert [r["id"] for r in records] == [f"p{i}" for i in range(8)]
    assert [r["messages"][0]["content"] for r in records] == PROMPTS
    assert [r["id"] for _, r in read_records(whole, "chat")] == [r["id"] for r in records]  # trainable as chat

    # a run killed mid-write: three whole lines and half of the fourth
    cut = tmp_path / "cut.jsonl"
    text = whole.read_text(encoding="utf-8").splitlines(keepends=True)
    cut.write_text("".join(text[:3]) + text[3][:10], encoding="utf-8")
    report = generate_file({"responses": model}, tok, data, "chat", cut, sampling, system=None, batch_size=3,
                           progress=False)
    assert report["written"] == 5 and report["already_done"] == 3
    assert sorted(lines(cut), key=lambda r: r["id"]) == records
    again = generate_file({"responses": model}, tok, data, "chat", cut, sampling, system=None, progress=False)
    assert again["written"] == 0 and len(lines(cut)) == 8


def test_an_output_that_is_not_ours_is_refused_not_appended_to(tmp_path, tok):
    out = tmp_path / "out.jsonl"
    out.write_text("not json\n")
    with pytest.raises(dz.DataError, match=r"out.jsonl:1: not a generated record"):
        generate_file({"responses": peaked(0)}, tok, prompt_file(tmp_path), "chat", out, progress=False)
    assert out.read_text() == "not json\n"


def test_repeated_ids_are_refused_with_file_and_line(tmp_path, tok):
    path = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "messages": [{"role": "user", "content": "x"},
                                                                      {"role": "assistant", "content": "y"}]}] * 2)
    with pytest.raises(dz.DataError, match=r"p.jsonl:2: sample id 'a' repeats .*p.jsonl:1"):
        generate_file({"responses": peaked(0)}, tok, path, "chat", tmp_path / "o.jsonl", progress=False)


def test_pairs_are_preference_records_that_dpkd_trains_on(tmp_path, tok):
    teacher, student = peaked(1, hidden=48), peaked(2)
    out = tmp_path / "pairs.jsonl"
    report = generate_file({"chosen": teacher, "rejected": student}, tok, prompt_file(tmp_path), "chat", out,
                           Sampling(max_new_tokens=3, temperature=0), mode="pairs", system=None, progress=False)
    written = lines(out)
    assert report["written"] == len(written) > 0 and report["written"] + len(report["empty"]) == 8
    for r in written:  # against one-prompt, uncached argmax loops
        prompt = tok.encode_prompt(r["prompt"], None)
        assert r["chosen"] == tok.decode(naive_greedy(teacher, prompt, tok.im_end_id, 3))
        assert r["rejected"] == tok.decode(naive_greedy(student, prompt, tok.im_end_id, 3))

    data = dz.PreferenceDataset(out, max_length=64)
    batch = dz.collate_preference([data[i] for i in range(len(data))], data.tokenizer.pad_id)
    dpkd = dz.build_objective(dz.load_config({"objective": {"name": "dpkd", "beta": 0.5}}))
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    losses = []
    for _ in range(4):
        step = dz.preference_step(dpkd, student, batch, reference=teacher)
        optimizer.zero_grad()
        step.loss.backward()
        optimizer.step()
        losses.append(step.loss.item())
    assert losses[-1] < losses[0]


def test_an_answer_holding_an_id_the_tokenizer_cannot_decode_is_written_with_the_rest_of_its_batch(tmp_path, tok):
    from test_tokenizer_decode import UNDECODABLE, decoded_with_unknown, emitting_undecodable

    data = prompt_file(tmp_path)
    prompts = [tok.encode_prompt([{"role": "user", "content": p}], None) for p in PROMPTS]
    model = emitting_undecodable(peaked(0), prompts[0], tok.im_end_id, at=1)
    expected = [naive_greedy(model, p, tok.im_end_id, 4) for p in prompts]  # one prompt at a time, no cache
    assert UNDECODABLE in expected[0][1:-1]
    out = tmp_path / "out.jsonl"
    report = generate_file({"responses": model}, tok, data, "chat", out, Sampling(max_new_tokens=4, temperature=0),
                           system=None, batch_size=8, progress=False)  # the whole file is one batch
    assert report == {"written": 8, "already_done": 0, "empty": [], "total": 8}
    records = lines(out)
    assert [r["id"] for r in records] == [f"p{i}" for i in range(8)]
    assert [r["messages"][-1]["content"] for r in records] == [decoded_with_unknown(ids) for ids in expected]
    assert "\ufffd" in records[0]["messages"][-1]["content"]


def generate_config(tmp_path, **generate):
    return {"seed": 3, "teacher": {"tiny": {"hidden_size": 48, "num_layers": 1, "seed": 1}},
            "student": {"tiny": {"hidden_size": 32, "num_layers": 1, "seed": 2}},
            "data": {"system": None},
            "generate": {"prompts": str(prompt_file(tmp_path)), "out": str(tmp_path / "out.jsonl"),
                         "max_new_tokens": 3, "progress": False, **generate}}


def test_the_cli_answers_then_a_rerun_finds_everything_done(tmp_path, capsys):
    from distillzoo.cli import main

    path = tmp_path / "gen.yaml"
    path.write_text(json.dumps(generate_config(tmp_path, temperature=0.0)))
    assert main(["generate", str(path)]) == 0
    first = capsys.readouterr().out
    written = lines(tmp_path / "out.jsonl")
    assert f"wrote {len(written)} of 8 (0 already there" in first
    assert main(["generate", str(path)]) == 0
    assert f"wrote 0 of 8 ({len(written)} already there" in capsys.readouterr().out
    assert lines(tmp_path / "out.jsonl") == written


@pytest.mark.parametrize("change, message", [
    (lambda g, c: g.update(mode="triples"), r"generate.mode: 'triples' is not one of \['responses', 'pairs'\]"),
    (lambda g, c: g.update(prompts="/nope.jsonl"), r"generate.prompts: '/nope.jsonl' is not a records file \(JSONL, JSON, Parquet, Arrow\)"),
    (lambda g, c: g.update(format="dolyy"), r"generate.format: unknown data format 'dolyy'"),
    (lambda g, c: g.update(top_p=1.5), r"generate: top_p must be in \(0, 1\]"),
    (lambda g, c: (g.update(mode="pairs"), c.pop("student")), r"student: generate \(mode pairs\) needs the student"),
    (lambda g, c: g.update(model="judge"), r"generate.model: 'judge' is not one of"),
])
def test_bad_generate_configs_fail_before_any_model_is_loaded(tmp_path, monkeypatch, change, message):
    import distillzoo.models.causal_lm as causal_lm  # where models are built
    from distillzoo.teacher.generate import generate_from_config

    def no_models(*args, **kwargs):
        raise AssertionError("a model was built before the config was checked")

    monkeypatch.setattr(causal_lm, "tiny_qwen2", no_models)
    raw = generate_config(tmp_path)
    change(raw["generate"], raw)
    path = tmp_path / "bad.yaml"
    path.write_text(json.dumps(raw))
    with pytest.raises(dz.ConfigError, match=message):
        generate_from_config(dz.load_config(path), where=str(path))


def test_a_reply_holding_a_line_separator_does_not_break_the_resume(tmp_path):
    """json.dumps(ensure_ascii=False) leaves U+2028 raw; str.splitlines would cut the record there."""
    from distillzoo.teacher.parts import finished_ids

    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"id": "a", "messages": [{"role": "assistant", "content": "x\u2028y"}]},
                              ensure_ascii=False) + "\n" + '{"id": "b", "mess', encoding="utf-8")
    assert finished_ids(out) == {"a"}
    assert out.read_text(encoding="utf-8").count("\n") == 1 and "\u2028" in out.read_text(encoding="utf-8")


def test_parts_of_an_interrupted_run_are_resumed_only_with_the_same_model_and_sampling(tmp_path, tok, monkeypatch):
    import distillzoo.teacher.generate as generation

    data, out = prompt_file(tmp_path), tmp_path / "out.jsonl"
    sampling = Sampling(max_new_tokens=4, temperature=0.7, seed=1)
    real = generation.decode
    calls = []

    def dies_on_the_third_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as a kill would: two batches are in the part, none in out.jsonl
        return real(*args, **kwargs)

    monkeypatch.setattr(generation, "decode", dies_on_the_third_batch)
    with pytest.raises(KeyboardInterrupt):
        generate_file({"responses": peaked(0)}, tok, data, "chat", out, sampling, system=None, batch_size=2,
                      progress=False)
    monkeypatch.setattr(generation, "decode", real)
    assert not out.exists() and len(lines(tmp_path / "out.jsonl.part-0")) == 4
    for model, other in ((peaked(1), sampling), (peaked(0), Sampling(max_new_tokens=4, temperature=0.7, seed=2))):
        with pytest.raises(dz.DataError, match=r"out.jsonl: the parts out.jsonl.part-0 were written by an interrupted "
                                               r"run with other settings \((models|sampling)"):
            generate_file({"responses": model}, tok, data, "chat", out, other, system=None, progress=False)
    report = generate_file({"responses": peaked(0)}, tok, data, "chat", out, sampling, system=None, batch_size=2,
                           progress=False)
    assert report["already_done"] == 4 and report["written"] == 4
    whole = tmp_path / "whole.jsonl"
    generate_file({"responses": peaked(0)}, tok, data, "chat", whole, sampling, system=None, progress=False)
    assert out.read_bytes() == whole.read_bytes()  # finished as if never interrupted
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "prompts.jsonl", "whole.jsonl"]
