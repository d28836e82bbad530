"""The quickstart's generated task set: answers, splits, the bundled files, Qwen ids above 65,535."""

import json
from pathlib import Path

import pytest

import distillzoo as dz

from distillzoo.data.records import data_format
from distillzoo.data.tasks import chinese_number, english_number, generate_tasks, preference_pairs, write_task_files

BUNDLED = Path(__file__).resolve().parent.parent / "data" / "quickstart"


@pytest.mark.parametrize("n, en, zh", [
    (0, "zero", "零"), (7, "seven", "七"), (10, "ten", "十"), (13, "thirteen", "十三"), (20, "twenty", "二十"),
    (42, "forty-two", "四十二"), (90, "ninety", "九十"), (99, "ninety-nine", "九十九"),
])
def test_number_words_by_hand(n, en, zh):
    assert english_number(n) == en and chinese_number(n) == zh


def test_number_words_refuse_what_they_cannot_say():
    for bad in (-1, 100):
        with pytest.raises(ValueError, match="0..99"):
            english_number(bad)
        with pytest.raises(ValueError, match="0..99"):
            chinese_number(bad)


def _prompt(r):
    return r["messages"][0]["content"]


def _answer_again(record) -> str:
    """Recompute the answer from the prompt text alone (independently of the generator's arguments)."""
    prompt, task, lang = _prompt(record), record["task"], record["language"]
    if task == "add":
        a, b = prompt.removeprefix("What is ").removeprefix("计算 ").rstrip("?").split(" + ")
        return str(int(a) + int(b))
    digits = prompt.split(":")[-1].split("：")[-1].strip()
    if task == "reverse":
        return "".join(reversed(digits))
    if task == "sort":
        return "".join(sorted(digits))
    n = int("".join(c for c in prompt if c.isdigit()))
    return english_number(n) if lang == "en" else chinese_number(n)


def test_every_answer_follows_from_its_prompt_and_splits_share_no_prompt():
    train, held_out = generate_tasks(n_train=800, n_eval=10, seed=3)
    for record in train + held_out:
        assert record["messages"][1]["content"] == _answer_again(record), record
    assert not {_prompt(r) for r in train} & {_prompt(r) for r in held_out}
    assert len({_prompt(r) for r in held_out}) == len(held_out)
    words_train = {int("".join(c for c in _prompt(r) if c.isdigit())) for r in train if r["task"] == "words"}
    words_eval = {int("".join(c for c in _prompt(r) if c.isdigit())) for r in held_out if r["task"] == "words"}
    assert len(words_eval) == 20 and not words_train & words_eval  # whole numbers are held out
    kinds = [(r["task"], r["language"]) for r in train]
    assert {kinds.count(k) for k in set(kinds)} == {100}  # 8 kinds in equal shares


def test_generation_is_deterministic_and_the_bundled_files_are_its_output(tmp_path):
    train, eval_path, pairs, eval_pairs, transfer = write_task_files(tmp_path)
    assert transfer.read_bytes() == (BUNDLED / "transfer.jsonl").read_bytes()
    assert transfer.read_text(encoding="utf-8").splitlines() == train.read_text(encoding="utf-8").splitlines()[:200]
    assert train.read_bytes() == (BUNDLED / "train.jsonl").read_bytes()
    assert eval_path.read_bytes() == (BUNDLED / "eval.jsonl").read_bytes()
    assert pairs.read_bytes() == (BUNDLED / "pairs.jsonl").read_bytes()
    assert eval_pairs.read_bytes() == (BUNDLED / "eval_pairs.jsonl").read_bytes()
    assert generate_tasks(n_train=50, seed=1) != generate_tasks(n_train=50, seed=2)


def test_the_chinese_half_uses_qwen_ids_above_65535(tok):
    records = [json.loads(line) for line in (BUNDLED / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    zh = [r for r in records if r["language"] == "zh"]
    ids = {i for r in zh for m in r["messages"] for i in tok.encode(m["content"])}
    assert max(ids) > 65_535
    assert len(records) == 6000 and len(zh) == 3000


def test_preference_pairs_choose_the_right_answer_over_a_wrong_one_of_the_same_task():
    train, _ = generate_tasks(n_train=400, n_eval=5, seed=3)
    pairs = preference_pairs(train, n=300)
    assert len(pairs) == 300
    by_id = {r["id"]: r for r in train}
    answers = {(r["task"], r["language"]): set() for r in train}
    for r in train:
        answers[r["task"], r["language"]].add(r["messages"][1]["content"])
    for p in pairs:
        source = by_id[p["id"].removeprefix("pair-")]
        assert p["prompt"] == source["messages"][:1] and p["chosen"] == _answer_again(source)
        assert p["rejected"] != p["chosen"] and p["rejected"] in answers[p["task"], p["language"]]
    fields = [data_format("preference")(p) for p in pairs[:5]]  # the preference format reads them
    assert [f["chosen"] for f in fields] == [p["chosen"] for p in pairs[:5]]
