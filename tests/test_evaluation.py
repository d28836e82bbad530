"""Held-out evaluation: batched greedy answers, exact match, response NLL and KL, against naive loops."""

import pytest
import torch

from distillzoo.models.causal_lm import tiny_qwen2
from distillzoo.teacher.evaluation import exact_match, greedy_answers, response_divergences, response_kl, response_nll
from distillzoo.data.shards import ConversationDataset
from helpers import naive_greedy, write_jsonl

RECORDS = [
    ("add", "What is 3 + 4?"), ("add", "计算 12 + 1"), ("words", "Write 42 in words."),
    ("words", "用中文写出 7"), ("sort", "Sort the digits: 9120"),
]


def peaked(seed, hidden=32):
    """A tiny Qwen2 whose lm_head is scaled up, so greedy decoding has clear winners (no near-ties)."""
    model = tiny_qwen2(hidden_size=hidden, num_layers=1, seed=seed).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    return model


def test_batched_left_padded_greedy_matches_one_prompt_at_a_time(tok):
    model = peaked(0)
    prompts = [tok.encode_prompt([{"role": "user", "content": p}], None) for _, p in RECORDS]
    assert len({len(p) for p in prompts}) > 1  # left padding is exercised
    got = greedy_answers(model, tok, prompts, max_new_tokens=5, batch_size=3)
    assert got == [naive_greedy(model, p, tok.im_end_id, 5) for p in prompts]


def test_greedy_stops_at_im_end(tok):
    model = peaked(1)
    prompt = tok.encode_prompt([{"role": "user", "content": "hi"}], None)
    first = naive_greedy(model, prompt, -1, 1)[0]
    with torch.no_grad():  # make <|im_end|> the second token's argmax: swap its lm_head row with the winner's
        hidden = model.model(input_ids=torch.tensor([prompt + [first]])).last_hidden_state[0, -1]
        winner = int((hidden @ model.lm_head.weight.T).argmax())
        w = model.lm_head.weight
        w[[winner, tok.im_end_id]] = w[[tok.im_end_id, winner]]
    assert greedy_answers(model, tok, [prompt], max_new_tokens=8) == [naive_greedy(model, prompt, tok.im_end_id, 8)]
    assert len(greedy_answers(model, tok, [prompt], max_new_tokens=8)[0]) == 1


def test_exact_match_counts_answers_equal_to_the_reference(tmp_path, tok):
    model = peaked(2)
    answers = [tok.decode(naive_greedy(model, tok.encode_prompt([{"role": "user", "content": p}], None),
                                       tok.im_end_id, 4)) for _, p in RECORDS]
    # records 0, 2 and 4 carry the model's own answer (with stray spaces), 1 and 3 a different one
    refs = [f" {answers[0]} ", "not it", answers[2], answers[3] + "x", answers[4]]
    path = write_jsonl(tmp_path / "eval.jsonl", [
        {"task": task, "messages": [{"role": "user", "content": p}, {"role": "assistant", "content": ref}]}
        for (task, p), ref in zip(RECORDS, refs)])
    result = exact_match(model, tok, path, system=None, max_new_tokens=4, batch_size=2)
    assert result["answers"] == answers
    assert result["exact_match"] == pytest.approx(3 / 5) and result["n"] == 5
    assert result["by_task"] == pytest.approx({"add": 1 / 2, "sort": 1.0, "words": 1 / 2})


def test_exact_match_scores_every_answer_when_one_holds_an_id_the_tokenizer_cannot_decode(tmp_path, tok):
    from test_tokenizer_decode import UNDECODABLE, decoded_with_unknown, emitting_undecodable

    prompts = [tok.encode_prompt([{"role": "user", "content": p}], None) for _, p in RECORDS]
    model = emitting_undecodable(peaked(2), prompts[1], tok.im_end_id, at=1)
    expected = [naive_greedy(model, p, tok.im_end_id, 4) for p in prompts]  # one prompt at a time, no cache
    assert UNDECODABLE in expected[1][1:-1]
    answers = [decoded_with_unknown(ids) for ids in expected]
    # records 1 (the one holding the id) and 3 carry the model's answer, the others a different one
    refs = ["no", answers[1], "no", answers[3], "no"]
    path = write_jsonl(tmp_path / "eval.jsonl", [
        {"task": task, "messages": [{"role": "user", "content": p}, {"role": "assistant", "content": ref}]}
        for (task, p), ref in zip(RECORDS, refs)])
    result = exact_match(model, tok, path, system=None, max_new_tokens=4, batch_size=5)  # one batch
    assert result["answers"] == answers and "\ufffd" in answers[1]
    assert result["exact_match"] == pytest.approx(2 / 5) and result["n"] == 5
    assert result["by_task"] == pytest.approx({"add": 1 / 2, "sort": 0.0, "words": 1 / 2})


def answered(tmp_path, tok):
    """RECORDS' prompts with a reference reply each, as a tokenized dataset."""
    path = write_jsonl(tmp_path / "eval.jsonl", [
        {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}]}
        for (_, p), a in zip(RECORDS, ["7", "13", "forty-two", "七", "0129"])])
    return ConversationDataset(path, "chat", tok, system=None)


def test_response_nll_and_kl_match_the_full_logits(tmp_path, tok):
    student, teacher = peaked(3), peaked(4, hidden=48)
    dataset = answered(tmp_path, tok)
    nll = kl = 0.0
    tokens = 0
    with torch.no_grad():
        for item in dataset:  # one example at a time, no padding
            ids, mask = item["input_ids"].long()[None], item["loss_mask"][1:]
            log_q = torch.log_softmax(student(input_ids=ids).logits[0, :-1].double(), -1)[mask]
            log_p = torch.log_softmax(teacher(input_ids=ids).logits[0, :-1].double(), -1)[mask]
            nll -= float(log_q.gather(-1, ids[0, 1:][mask][:, None]).sum())
            kl += float((log_p.exp() * (log_p - log_q)).sum())
            tokens += int(mask.sum())
    assert response_nll(student, dataset, tok.pad_id, batch_size=2) == pytest.approx(nll / tokens, rel=1e-4)
    assert response_kl(teacher, student, dataset, tok.pad_id, batch_size=2) == pytest.approx(kl / tokens, rel=1e-3)


def test_response_divergences_take_nll_and_every_divergence_in_one_pass_equal_to_full_logits(tmp_path, tok):
    student, teacher = peaked(5), peaked(6, hidden=48)
    dataset = answered(tmp_path, tok)
    sums, tokens = dict.fromkeys(("ce", "fkl", "rkl", "tvd"), 0.0), 0
    with torch.no_grad():
        for item in dataset:  # one example at a time, whole rows in float64
            ids, mask = item["input_ids"].long()[None], item["loss_mask"][1:]
            log_q = torch.log_softmax(student(input_ids=ids).logits[0, :-1].double(), -1)[mask]
            log_p = torch.log_softmax(teacher(input_ids=ids).logits[0, :-1].double(), -1)[mask]
            p, q = log_p.exp(), log_q.exp()
            sums["ce"] -= float(log_q.gather(-1, ids[0, 1:][mask][:, None]).sum())
            sums["fkl"] += float((p * (log_p - log_q)).sum())
            sums["rkl"] += float((q * (log_q - log_p)).sum())
            sums["tvd"] += float(0.5 * (p - q).abs().sum())
            tokens += int(mask.sum())
    got = response_divergences(teacher, student, dataset, tok.pad_id, ("ce", "fkl", "rkl", "tvd"), batch_size=2)
    assert list(got) == ["ce", "fkl", "rkl", "tvd"]
    for name, total in sums.items():
        assert got[name] == pytest.approx(total / tokens, rel=1e-3), name
    # teacher-free names need no teacher
    assert response_divergences(None, student, dataset, tok.pad_id, ("ce",))["ce"] == pytest.approx(got["ce"], rel=1e-6)
