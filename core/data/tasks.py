"""A generated instruction set that a tiny model learns on a CPU in minutes: the quickstart's data.

Four deterministic tasks, each asked in English and in Chinese (the Chinese text
uses Qwen ids above 65,535, which the int32 data path must keep):

    add      "What is 47 + 3?"             -> "50"       "计算 47 + 3"            -> "50"
    reverse  "Reverse the digits: 3815"    -> "5183"     "把数字倒过来：3815"       -> "5183"
    sort     "Sort the digits: 3815"       -> "1358"     "把数字从小到大排列：3815" -> "1358"
    words    "Write 42 in words."          -> "forty-two" "用中文写出 42"          -> "四十二"

Every answer is a function of the prompt, so exact match is a fair held-out
metric. The held-out split shares no prompt with the training split; for the
number-word tasks whole numbers are held out, so the model must compose
"forty" and "two" rather than recall "forty-two".

``write_task_files(out_dir)`` writes ``train.jsonl`` and ``eval.jsonl`` in the
chat format (``{"id", "messages"}``), and ``pairs.jsonl`` and ``eval_pairs.jsonl``,
preference records of each split's prompts (the correct reply chosen, a wrong one of
the same form rejected), and ``transfer.jsonl``, the first 200 training records: the
quickstart's students learn from these alone, as a student distils from a transfer set
far smaller than its teacher's data;
the repository ships the files it writes with the default arguments under
``data/quickstart/`` (a test checks they match).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from distillzoo.atomic import write_text_atomically

ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
        "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
ZH_DIGITS = "零一二三四五六七八九"

TASKS = ("add", "reverse", "sort", "words")
#: the transfer set's size: the training records a student distils from (the tasks take turns, so 50 of each),
#: while its teacher learnt from all of them
TRANSFER = 200
LANGUAGES = ("en", "zh")

PROMPTS = {
    ("add", "en"): "What is {a} + {b}?",
    ("add", "zh"): "计算 {a} + {b}",
    ("reverse", "en"): "Reverse the digits: {digits}",
    ("reverse", "zh"): "把数字倒过来：{digits}",
    ("sort", "en"): "Sort the digits: {digits}",
    ("sort", "zh"): "把数字从小到大排列：{digits}",
    ("words", "en"): "Write {n} in words.",
    ("words", "zh"): "用中文写出 {n}",
}


def english_number(n: int) -> str:
    """0..99 in English words: 42 -> 'forty-two'."""
    if not 0 <= n <= 99:
        raise ValueError(f"english_number takes 0..99, got {n}")
    if n < 20:
        return ONES[n]
    tens, ones = divmod(n, 10)
    return TENS[tens] + ("" if ones == 0 else "-" + ONES[ones])


def chinese_number(n: int) -> str:
    """0..99 in Chinese numerals: 10 -> '十', 42 -> '四十二', 40 -> '四十'."""
    if not 0 <= n <= 99:
        raise ValueError(f"chinese_number takes 0..99, got {n}")
    if n < 10:
        return ZH_DIGITS[n]
    tens, ones = divmod(n, 10)
    return ("" if tens == 1 else ZH_DIGITS[tens]) + "十" + ("" if ones == 0 else ZH_DIGITS[ones])


def answer(task: str, **args) -> str:
    """The one correct answer of a task instance."""
    if task == "add":
        return str(args["a"] + args["b"])
    if task == "reverse":
        return args["digits"][::-1]
    if task == "sort":
        return "".join(sorted(args["digits"]))
    if task == "words":
        return english_number(args["n"]) if args["language"] == "en" else chinese_number(args["n"])
    raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")


def _instance(task: str, rng: random.Random) -> dict:
    if task == "add":
        return {"a": rng.randint(0, 99), "b": rng.randint(1, 3)}
    if task in ("reverse", "sort"):
        return {"digits": "".join(rng.choice("0123456789") for _ in range(rng.randint(3, 4)))}
    return {"n": rng.randint(0, 99)}


def generate_tasks(n_train: int = 6000, n_eval: int = 50, seed: int = 0, held_out_numbers: int = 20
                   ) -> tuple[list[dict], list[dict]]:
    """``(train, eval)`` chat records, interleaving the tasks and languages; no prompt is in both.

    Train has ``n_train`` records in equal shares. Eval has ``n_eval`` distinct
    prompts of each arithmetic/digit task and language, and one number-word
    prompt per language for each of ``held_out_numbers`` numbers (0..99) that
    the train split never shows.
    """
    rng = random.Random(seed)
    held = sorted(rng.sample(range(100), held_out_numbers))
    kinds = [(task, lang) for task in TASKS for lang in LANGUAGES]
    held_prompts: set[str] = set()

    def record(task: str, lang: str, args: dict) -> dict:
        return {"task": task, "language": lang,
                "messages": [{"role": "user", "content": PROMPTS[task, lang].format(**args)},
                             {"role": "assistant", "content": answer(task, language=lang, **args)}]}

    def draw(task: str, lang: str, split: str) -> dict:
        for _ in range(10_000):
            args = _instance(task, rng)
            prompt = PROMPTS[task, lang].format(**args)
            if task == "words" and args["n"] in held or prompt in held_prompts:
                continue  # the eval split's numbers and prompts never reach train
            if split == "eval":
                held_prompts.add(prompt)
            return record(task, lang, args)
        raise ValueError(f"could not draw a new {task}/{lang} prompt; ask for fewer eval records")

    evals = [record("words", lang, {"n": n}) for n in held for lang in LANGUAGES]
    evals += [draw(task, lang, "eval") for _ in range(n_eval) for task, lang in kinds if task != "words"]
    train = [draw(*kinds[i % len(kinds)], "train") for i in range(n_train)]
    return ([{"id": f"{split}-{i:05d}-{r['task']}-{r['language']}", **r} for i, r in enumerate(records)]
            for split, records in (("train", train), ("eval", evals)))


def preference_pairs(records: list[dict], n: int = 2000) -> list[dict]:
    """Preference records (``{"id", "task", "language", "prompt", "chosen", "rejected"}``) from chat records.

    ``chosen`` is the record's correct reply; ``rejected`` is the reply of the next record of
    the same task and language, in file order, that differs from it. That reply is wrong for
    this prompt but has the right form (a number, digits, number words). The first ``n``
    records that have such a partner are used.
    """
    pairs = []
    for i, r in enumerate(records):
        if len(pairs) == n:
            break
        right = r["messages"][-1]["content"]
        wrong = next((o["messages"][-1]["content"] for o in records[i + 1:]
                      if (o["task"], o["language"]) == (r["task"], r["language"])
                      and o["messages"][-1]["content"] != right), None)
        if wrong is not None:
            pairs.append({"id": f"pair-{r['id']}", "task": r["task"], "language": r["language"],
                          "prompt": r["messages"][:-1], "chosen": right, "rejected": wrong})
    return pairs


def write_task_files(out_dir: str | Path, **kwargs) -> tuple[Path, Path, Path, Path, Path]:
    """Write ``train.jsonl`` and ``eval.jsonl`` (chat format), ``pairs.jsonl`` and ``eval_pairs.jsonl``
    (preference format, of each split), and ``transfer.jsonl`` (the first :data:`TRANSFER` training records)
    under ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, evals = generate_tasks(**kwargs)
    paths = []
    for name, records in (("train", train), ("eval", evals), ("pairs", preference_pairs(train)),
                          ("eval_pairs", preference_pairs(evals)), ("transfer", train[:TRANSFER])):
        path = out / f"{name}.jsonl"
        write_text_atomically(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        paths.append(path)
    return paths[0], paths[1], paths[2], paths[3], paths[4]


if __name__ == "__main__":  # python -m distillzoo.data.tasks [OUT_DIR]
    import sys

    for p in write_task_files(sys.argv[1] if len(sys.argv) > 1 else "data/quickstart"):
        print(p)
