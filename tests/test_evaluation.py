"""Held-out evaluation: ROUGE-L, exact match, teacher-forced metrics and sampled answers, each against an
independent computation (rouge-score itself, a hand LCS, naive full-logit loops, one-prompt greedy decoding)."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from distillzoo.errors import DataError, ParameterError
from distillzoo.models.causal_lm import tiny_qwen2
from distillzoo.teacher.evaluation import Decoding, evaluate, read_split, token_metrics
from distillzoo.teacher.rouge import CJKTokenizer, rouge_l
from helpers import naive_greedy, write_jsonl

RECORDS = [
    ("add", "en", "What is 3 + 4?"), ("add", "zh", "计算 12 + 1"), ("words", "en", "Write 42 in words."),
    ("words", "zh", "用中文写出 7"), ("sort", "en", "Sort the digits: 9120"),
]


def peaked(seed, hidden=32):
    """A tiny Qwen2 whose lm_head is scaled up, so greedy decoding has clear winners (no near-ties)."""
    model = tiny_qwen2(hidden_size=hidden, num_layers=1, seed=seed).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    return model


def records_file(tmp_path, refs, name="eval.jsonl"):
    return write_jsonl(tmp_path / name, [
        {"id": f"r{i}", "task": task, "language": lang,
         "messages": [{"role": "user", "content": p}, {"role": "assistant", "content": ref}]}
        for i, ((task, lang, p), ref) in enumerate(zip(RECORDS, refs))])


def lcs(a, b):
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


# ---------------------------------------------------------------------------- ROUGE-L


@pytest.mark.parametrize("answer, reference", [
    ("The cats are running in the garden.", "A cat runs through the gardens!"),
    ("forty-two", "forty two"), ("42", "42"), ("", "something"), ("Paris is the capital of France", "paris"),
    ("It's raining; take an umbrella, please.", "Please take the umbrella because it is raining"),
])
def test_rouge_l_equals_rouge_score_on_english_text(answer, reference):
    from rouge_score import rouge_scorer

    expected = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(reference, answer)["rougeL"].fmeasure
    assert rouge_l(answer, reference) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("answer, reference", [
    ("我不喜欢苹果", "我喜欢吃苹果"), ("四十三", "四十二"), ("二十七", "二十七"), ("五", "十五"), ("猫", "狗"),
])
def test_rouge_l_on_chinese_is_the_f_measure_of_the_character_lcs(answer, reference):
    common = lcs(list(answer), list(reference))
    precision, recall = common / len(answer), common / len(reference)
    expected = 0.0 if common == 0 else 2 * precision * recall / (precision + recall)
    assert rouge_l(answer, reference) == pytest.approx(expected)
    from rouge_score import rouge_scorer  # why the tokenizer is needed: rouge-score's own drops every Han character

    assert rouge_scorer.RougeScorer(["rougeL"]).score(reference, reference)["rougeL"].fmeasure == 0.0


def test_mixed_text_keeps_english_words_and_chinese_characters_in_order():
    assert CJKTokenizer().tokenize("答案是 42，Running cats 五") == ["答", "案", "是", "42", "run", "cat", "五"]
    # hand LCS of [我, 有, 3, cat] and [我, 有, 3, dog]: 3 of 4 tokens each side
    assert rouge_l("我有 3 cats", "我有 3 dogs") == pytest.approx(0.75)


# ---------------------------------------------------------------------------- answers


def test_exact_match_rouge_and_length_score_each_greedy_answer_per_task_and_language(tmp_path, tok):
    model = peaked(2)
    answers = [naive_greedy(model, tok.encode_prompt([{"role": "user", "content": p}], None), tok.im_end_id, 4)
               for _, _, p in RECORDS]
    texts = [tok.decode(a) for a in answers]
    # records 0, 2 and 4 carry the model's own answer (with stray spaces), 1 and 3 a different one
    refs = [f" {texts[0]} ", "not it", texts[2], texts[3] + "x", texts[4]]
    prompts = read_split(records_file(tmp_path, refs), "chat", tok, system=None)
    assert len({len(tok.encode_prompt(p.messages, None)) for p in prompts}) > 1  # left padding is exercised
    scores = evaluate(model, tok, prompts, system=None, decoding=Decoding(max_new_tokens=4), batch_size=2)
    assert [a[0] for a in scores.answers] == texts
    assert scores.sums["exact_match"].tolist() == [1, 0, 1, 0, 1]
    assert scores.sums["rouge_l"] == pytest.approx([rouge_l(t, r) for t, r in zip(texts, refs)])
    assert scores.sums["length_ratio"] == pytest.approx([len(a) / len(tok.encode(r)) for a, r in zip(answers, refs)])
    summary = scores.summary()
    assert summary["exact_match"] == pytest.approx(3 / 5) and summary["n"] == 5
    assert {k: v["exact_match"] for k, v in summary["by_task"].items()} == pytest.approx(
        {"add": 1 / 2, "sort": 1.0, "words": 1 / 2})
    assert {k: (v["exact_match"], v["n"]) for k, v in summary["by_language"].items()} == {"en": (1.0, 3),
                                                                                         "zh": (0.0, 2)}


def test_sampled_answers_are_several_per_prompt_reproducible_and_averaged(tmp_path, tok):
    model = tiny_qwen2(hidden_size=32, num_layers=1, seed=7).eval()  # not peaked: samples differ
    prompts = read_split(records_file(tmp_path, ["7", "13", "forty-two", "七", "0129"]), "chat", tok, system=None)
    decoding = Decoding(samples=3, temperature=1.0, max_new_tokens=3, seed=11)
    a = evaluate(model, tok, prompts, system=None, decoding=decoding, batch_size=4)
    b = evaluate(model, tok, prompts, system=None, decoding=decoding, batch_size=2)
    assert a.answers == b.answers and all(len(x) == 3 for x in a.answers)
    assert any(len(set(x)) > 1 for x in a.answers)
    for i, p in enumerate(prompts):
        assert a.sums["rouge_l"][i] == pytest.approx(np.mean([rouge_l(x, p.reference) for x in a.answers[i]]))
    other = evaluate(model, tok, prompts, system=None, decoding=Decoding(3, 1.0, max_new_tokens=3, seed=12))
    assert other.answers != a.answers


# ---------------------------------------------------------------------------- teacher-forced


def test_nll_agreement_and_divergences_equal_full_logit_loops_and_nll_is_token_weighted(tmp_path, tok):
    student, teacher = peaked(5), peaked(6, hidden=48)
    refs = ["7", "13", "forty-two and some more words", "七", "0129"]
    prompts = read_split(records_file(tmp_path, refs), "chat", tok, system=None, max_length=20)
    per_prompt = {k: [] for k in ("nll", "fkl", "rkl", "tvd", "top1_agreement")}
    tokens = []
    with torch.no_grad():
        for p in prompts:  # one example at a time, whole rows in float64
            ids, mask = p.forced["input_ids"].long()[None], p.forced["loss_mask"][1:]
            log_q = torch.log_softmax(student(input_ids=ids).logits[0, :-1].double(), -1)[mask]
            log_p = torch.log_softmax(teacher(input_ids=ids).logits[0, :-1].double(), -1)[mask]
            q, pt = log_q.exp(), log_p.exp()
            per_prompt["nll"].append(-float(log_q.gather(-1, ids[0, 1:][mask][:, None]).sum()))
            per_prompt["fkl"].append(float((pt * (log_p - log_q)).sum()))
            per_prompt["rkl"].append(float((q * (log_q - log_p)).sum()))
            per_prompt["tvd"].append(float(0.5 * (pt - q).abs().sum()))
            per_prompt["top1_agreement"].append(float((log_q.argmax(-1) == log_p.argmax(-1)).sum()))
            tokens.append(int(mask.sum()))
    assert tokens[2] < len(tok.encode(refs[2])) + 1  # the long reply is cut at max_length, as data.eval cuts it
    scores = evaluate(student, tok, prompts, teacher=teacher, system=None, generate=False, batch_size=2)
    assert scores.tokens.tolist() == tokens
    for name, values in per_prompt.items():
        assert scores.sums[name] == pytest.approx(values, rel=1e-3, abs=1e-4), name
        assert scores.mean(name) == pytest.approx(sum(values) / sum(tokens), rel=1e-3, abs=1e-5)
    assert scores.mean("top1_agreement") < 1
    rows = token_metrics(torch.randn(7, 16), torch.randn(50, 16), torch.tensor([1, 2, -100, 3, 4, 5, 6]),
                         torch.randn(7, 8), torch.randn(60, 8), rows=2)  # chunked over rows, vocab cut to 50
    assert {k: v.shape for k, v in rows.items()} == dict.fromkeys(rows, torch.Size([6]))


def test_the_nll_is_the_trainers_final_eval_nll_with_replies_beyond_max_length(tmp_path, tok):
    import distillzoo as dz
    from distillzoo.models.causal_lm import load_causal_lm
    from distillzoo.training.loop import train
    from test_trainer import config, metrics

    cfg = config(tmp_path, eval_every=4, checkpoint_every=0)
    long = write_jsonl(tmp_path / "long.jsonl", [
        {"id": f"l{i}", "messages": [{"role": "user", "content": f"Count to {i}"},
                                     {"role": "assistant", "content": " ".join(str(j) for j in range(40))}]}
        for i in range(3)])
    cfg["data"].update(eval={"name": "long", "path": str(long), "format": "chat"}, max_length=24)
    cfg["data"]["system"] = None
    train(dz.load_config(cfg))
    last = metrics(tmp_path / "run")[-1]
    prompts = read_split(long, "chat", tok, system=None, max_length=24)
    scores = evaluate(load_causal_lm(str(tmp_path / "run" / "final")), tok, prompts, system=None, generate=False)
    assert scores.mean("nll") == pytest.approx(last["eval/nll"], rel=1e-4)


# ---------------------------------------------------------------------------- the trainer's eval_answers


def test_the_trainer_scores_the_students_answers_at_each_evaluation(tmp_path, tok):
    import distillzoo as dz
    from distillzoo.models.causal_lm import load_causal_lm
    from distillzoo.training.loop import train
    from test_trainer import config, metrics

    cfg = config(tmp_path, eval_every=4, checkpoint_every=0, eval_answers={"max_new_tokens": 4})
    train(dz.load_config(cfg))
    rows = [r for r in metrics(tmp_path / "run") if "eval/rouge_l" in r]
    assert [r["step"] for r in rows] == [4, 8]
    spec_system = dz.load_config(cfg).data.system
    prompts = read_split(cfg["data"]["eval"]["path"], "chat", tok, system=spec_system, max_length=64)
    final = evaluate(load_causal_lm(str(tmp_path / "run" / "final")), tok, prompts, system=spec_system,
                     decoding=Decoding(max_new_tokens=4), forced=False)
    for metric in ("rouge_l", "exact_match", "length_ratio"):
        assert rows[-1][f"eval/{metric}"] == pytest.approx(final.mean(metric)), metric


@pytest.mark.parametrize("answers, message", [
    ({"samples": 2}, "train.eval_answers: 2 samples at temperature 0"),
    ({"beams": 2}, "train.eval_answers: unknown key(s) ['beams']"),
    ({"temperature": -1}, "train.eval_answers: temperature must be >= 0"),
])
def test_bad_eval_answers_are_refused_naming_the_key(tmp_path, answers, message):
    import distillzoo as dz
    from distillzoo.errors import ConfigError
    from distillzoo.training.spec import resolve
    from test_trainer import config

    with pytest.raises(ConfigError, match=re.escape(message)):
        resolve(dz.load_config(config(tmp_path, eval_every=4, eval_answers=answers)), read_data=False)
    cfg = config(tmp_path, eval_every=0, eval_answers={})
    with pytest.raises(ConfigError, match="train.eval_answers: .* train.eval_every is 0"):
        resolve(dz.load_config(cfg), read_data=False)
    cfg = config(tmp_path, eval_every=4, eval_answers={})
    cfg["data"]["eval"] = None
    with pytest.raises(ConfigError, match="train.eval_answers: .*give data.eval"):
        resolve(dz.load_config(cfg), read_data=False)


# ---------------------------------------------------------------------------- bad input and the command


def test_an_eval_set_without_references_or_a_student_that_is_not_a_model_is_refused(tmp_path, tok):
    from distillzoo.teacher.evaluation import load_model

    no_reply = write_jsonl(tmp_path / "q.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                                {"role": "assistant", "content": "ok"}]},
                                                  {"messages": [{"role": "user", "content": "only a question"}]}])
    with pytest.raises(DataError, match=r"q.jsonl:2: .*no assistant turn"):
        read_split(no_reply, "chat", tok)
    empty = write_jsonl(tmp_path / "e.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                             {"role": "assistant", "content": "  "}]}])
    with pytest.raises(DataError, match=r"e.jsonl:1: .*empty"):
        read_split(empty, "chat", tok)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not a model")
    with pytest.raises(DataError, match=r"student '.*notes' is not a model directory: it has no config.json "
                                        r"\(it holds \['readme.txt'\]\)"):
        load_model(tmp_path / "notes")
    with pytest.raises(DataError, match="is not a directory"):
        load_model(tmp_path / "missing")
    with pytest.raises(ParameterError, match="samples must be an integer >= 1"):
        Decoding(samples=0)


def test_distillzoo_eval_prints_the_table_and_writes_every_prompts_scores(tmp_path, tok):
    peaked(3).save_pretrained(tmp_path / "student")
    tiny_qwen2(hidden_size=48, num_layers=1, seed=4).save_pretrained(tmp_path / "teacher")
    data = records_file(tmp_path, ["7", "13", "forty-two", "七", "0129"])
    done = subprocess.run([sys.executable, "-m", "distillzoo", "eval", str(tmp_path / "student"), "--data", str(data),
                           "--teacher", str(tmp_path / "teacher"), "--no-system", "--samples", "2", "--temperature",
                           "1", "--out", str(tmp_path / "eval.json")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "eval.json").read_text(encoding="utf-8"))["held_out"]
    assert report["n"] == 5 and len(report["prompts"]["answers"][0]) == 2
    rouge_row = next(line for line in done.stdout.splitlines() if line.startswith("ROUGE-L"))
    assert rouge_row.split()[1] == f"{report['rouge_l'] * 100:.1f}%"
    assert "task=words" in done.stdout and "language=zh" in done.stdout
    assert report["rouge_l"] == pytest.approx(np.mean(report["prompts"]["sums"]["rouge_l"]))
    bad = subprocess.run([sys.executable, "-m", "distillzoo", "eval", str(tmp_path)], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "give --data FILE" in bad.stderr
