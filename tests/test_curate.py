"""distillzoo curate: dedup against brute-force scans (exact, and near duplicates by pairwise Jaccard), n-gram
decontamination against a brute-force scan, the quality gates, malformed records refused or rejected with their
file and line, and a SIGKILLed run resumed to the uninterrupted run's output. English and Chinese rows throughout."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
import yaml

from distillzoo.curate.pipeline import curate
from distillzoo.curate.text import normalise, record_text, shingles, words
from distillzoo.errors import ConfigError, DataError, UnknownNameError

EN = ("river stone light cloud market garden window letter winter silver engine forest bridge paper music "
      "orange planet doctor mirror island candle village rocket harbor velvet meadow signal copper lantern "
      "thunder pencil violin desert castle feather glacier jungle marble needle ocean pepper quartz saddle").split()
ZH = [chr(c) for c in range(0x4E00, 0x4E00 + 400)]


def _text(rng: random.Random, n: int, language: str) -> str:
    if language == "en":
        return " ".join(rng.choice(EN) for _ in range(n))
    return "".join(rng.choice(ZH) for _ in range(n))


def _chat(i, prompt, reply, **extra) -> dict:
    return {"id": f"r{i}", "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}],
            **extra}


def _write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _section(tmp_path, data, stages, **extra) -> dict:
    return {"data": str(data), "format": "chat", "out": str(tmp_path / "out"), "stages": stages,
            "malformed": "refuse", "shard_size": 500, **extra}


def _dropped(tmp_path, label) -> dict[str, dict]:
    lines = (tmp_path / "out" / "dropped" / f"{label}.jsonl").read_text(encoding="utf-8").splitlines()
    return {d["id"]: d for d in map(json.loads, lines)}


def _near_rows(n: int = 2000, seed: int = 0):
    """Random bilingual rows of about 80 words, a tenth of them near copies (one word changed) of an earlier row,
    and a few exact copies in other case and spacing."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        if i > 20 and rng.random() < 0.1:
            source = rows[rng.randrange(len(rows))]
            prompt, reply = source["messages"][0]["content"], source["messages"][1]["content"]
            if rng.random() < 0.2:
                rows.append(_chat(i, "  " + prompt.upper(), reply.replace(" ", "   ")))  # the same, normalised
                continue
            language = "en" if " " in reply else "zh"
            if language == "en":
                w = reply.split()
                w[rng.randrange(len(w))] = rng.choice(EN)
                reply = " ".join(w)
            else:
                k = rng.randrange(len(reply))
                reply = reply[:k] + rng.choice(ZH) + reply[k + 1:]
            rows.append(_chat(i, prompt, reply))
        else:
            language = "en" if i % 2 else "zh"
            rows.append(_chat(i, _text(rng, 6, language), _text(rng, 80, language)))
    return rows


def _jaccard_pairs(rows, k: int, threshold: float) -> dict[tuple[int, int], float]:
    """Every pair (i < j) whose k-word shingle sets have Jaccard >= threshold, by brute force over the pairs that
    share a shingle (every other pair has Jaccard 0)."""
    sets = [shingles(record_text(r), k) for r in rows]
    index = defaultdict(set)
    for i, s in enumerate(sets):
        for shingle in s:
            index[shingle].add(i)
    pairs = {}
    for j, s in enumerate(sets):
        for i in {i for shingle in s for i in index[shingle] if i < j}:
            score = len(sets[i] & sets[j]) / len(sets[i] | sets[j])
            if score >= threshold:
                pairs[i, j] = score
    return pairs


def test_exact_dedup_drops_what_a_brute_force_scan_of_the_normalised_texts_drops(tmp_path):
    rows = _near_rows(600, seed=1)
    report = curate(_section(tmp_path, _write(tmp_path / "in.jsonl", rows), [{"name": "dedup", "near": False}]),
                    say=lambda line: None)
    first: dict[str, str] = {}
    want = {}
    for r in rows:
        key = normalise(record_text({"messages": r["messages"]}))
        if key in first:
            want[r["id"]] = first[key]
        else:
            first[key] = r["id"]
    got = _dropped(tmp_path, "00-dedup")
    assert want and {i: d["of"] for i, d in got.items()} == want
    assert report["output"] == len(rows) - len(want)
    kept = [json.loads(line)["id"] for line in (tmp_path / "out" / "curated.jsonl").read_text().splitlines()]
    assert kept == [r["id"] for r in rows if r["id"] not in want]  # in order, as read


def test_near_dedup_finds_the_pairs_above_the_threshold_that_brute_force_jaccard_finds(tmp_path):
    rows = _near_rows(2000)
    threshold = 0.8
    curate(_section(tmp_path, _write(tmp_path / "in.jsonl", rows), [{"name": "dedup", "threshold": threshold}]),
           say=lambda line: None)
    got = _dropped(tmp_path, "00-dedup")
    position = {r["id"]: n for n, r in enumerate(rows)}
    truth = _jaccard_pairs(rows, 5, threshold)
    assert len(truth) > 150 and any(" " not in rows[j]["messages"][1]["content"] for _, j in truth)  # Chinese too
    recall = sum(rows[j]["id"] in got for _, j in truth) / len(truth)
    reported = [(position[d["of"]], position[i]) for i, d in got.items()]
    precision = sum((a, b) in truth for a, b in reported) / len(reported)
    assert recall >= 0.95 and precision >= 0.99, (recall, precision)


def test_decontamination_drops_what_a_brute_force_13_gram_scan_drops(tmp_path):
    rng = random.Random(3)
    evals = [_chat(f"e{i}", _text(rng, 5, lang), _text(rng, 40, lang)) for i, lang in enumerate(["en", "zh"] * 10)]
    rows = []
    for i in range(300):
        lang = "en" if i % 2 else "zh"
        reply = _text(rng, 50, lang)
        if i % 7 == 0:  # a span of an evaluation reply of its language inside, of 13 words or of 12
            source = words(evals[2 * rng.randrange(len(evals) // 2) + (lang == "zh")]["messages"][1]["content"])
            n = 13 if (i // 7) % 4 < 2 else 12  # both lengths in both languages
            start = rng.randrange(len(source) - n)
            span = source[start:start + n]
            reply = reply + (" " if lang == "en" else "") + (" ".join(span) if lang == "en" else "".join(span))
        rows.append(_chat(i, _text(rng, 5, lang), reply))
    eval_file = _write(tmp_path / "eval.jsonl", evals)
    curate(_section(tmp_path, _write(tmp_path / "in.jsonl", rows), [{"name": "decontaminate"}],
                    eval=[{"path": str(eval_file), "format": "chat"}]), say=lambda line: None)

    def grams(r):
        w = words(record_text(r))
        return [w[i:i + 13] for i in range(len(w) - 12)]

    eval_grams = [g for e in evals for g in grams(e)]
    want = {r["id"] for r in rows if any(g in eval_grams for g in grams(r))}
    got = _dropped(tmp_path, "00-decontaminate")
    assert len(want) >= 20 and set(got) == want
    assert {rows[int(i[1:])]["messages"][0]["content"].isascii() for i in want} == {True, False}  # en and zh
    assert all(len(d["ngram"].split()) == 13 and d["eval"].startswith(str(eval_file)) for d in got.values())


def test_quality_gates_drop_short_long_and_repetitive_replies(tmp_path):
    rows = [_chat(0, "q", "a fine answer with several different words in it"),
            _chat(1, "q", "ok"), _chat(2, "q", "x" * 150),
            _chat(3, "q", "line one\nline two\nline one\nline one"),
            _chat(4, "q", " ".join(["buy it"] * 12)),  # 24 words: one bigram is all of them
            _chat(5, "问", "这是一个很好的回答，内容丰富而且没有重复的句子。")]
    data = _write(tmp_path / "in.jsonl", rows)
    curate(_section(tmp_path, data, [{"name": "quality", "min_chars": 3, "max_chars": 100, "min_words_for_bigrams": 20}]),
           say=lambda line: None)
    got = {i: d["reason"] for i, d in _dropped(tmp_path, "00-quality").items()}
    assert got == {"r1": "too short", "r2": "too long", "r3": "repeated lines", "r4": "a repeated bigram"}


def _malformed(tmp_path) -> Path:
    good = [_chat(i, f"q{i}", f"answer {i}") for i in range(5)] + [_chat(9, "问题", "回答")]
    lines = [json.dumps(r, ensure_ascii=False).encode() for r in good]
    lines.insert(1, b'{"id": "bad", "messages": [')                      # line 2: not JSON
    lines.insert(3, b'{"id": "latin", "text": "caf\xe9"}')                # line 4: not UTF-8
    lines.insert(5, json.dumps({"id": "nomsg", "text": "hi"}).encode())  # line 6: no messages
    lines.append(json.dumps(_chat(2, "again", "twice")).encode())         # line 10: id r2 again
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_malformed_records_are_refused_naming_the_first_before_anything_is_written(tmp_path):
    data = _malformed(tmp_path)
    with pytest.raises(DataError, match=rf"{data}:2: not JSON .*nothing was written"):
        curate(_section(tmp_path, data, [{"name": "dedup"}]), say=lambda line: None)
    assert not (tmp_path / "out" / "curated.jsonl").exists() and not (tmp_path / "out" / "stages").exists()


def test_malformed_records_are_rejected_with_file_line_and_reason_and_every_record_is_counted(tmp_path):
    data = _malformed(tmp_path)
    report = curate(_section(tmp_path, data, [{"name": "dedup"}], malformed="reject"), say=lambda line: None)
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert [(r["where"].rsplit(":", 1)[1], r["reason"].split(" (")[0].split(":")[0]) for r in rejects] == [
        ("2", "not JSON"), ("4", "not UTF-8"), ("6", "not a 'chat' record"), ("10", "id 'r2' was used before, at "
                                                                                 f"{data}")]
    assert report["input"] == 10 and report["malformed"] == 4 and report["output"] == 6
    out = [json.loads(line)["id"] for line in (tmp_path / "out" / "curated.jsonl").read_text().splitlines()]
    assert out == ["r0", "r1", "r2", "r3", "r4", "r9"]


def test_a_rerun_with_another_config_is_refused(tmp_path):
    data = _write(tmp_path / "in.jsonl", [_chat(0, "q", "a"), _chat(1, "问", "答")])
    curate(_section(tmp_path, data, [{"name": "dedup"}]), say=lambda line: None)
    with pytest.raises(ConfigError, match=r"holds a curation of another curate \(config changed\)"):
        curate(_section(tmp_path, data, [{"name": "dedup", "threshold": 0.9}]), say=lambda line: None)


def test_an_unknown_stage_is_refused_with_the_available_ones(tmp_path):
    data = _write(tmp_path / "in.jsonl", [_chat(0, "q", "a"), _chat(1, "问", "答")])
    with pytest.raises(UnknownNameError, match=r"curate.stages\[0\].name: unknown stage 'dedupe'. Available: "
                                          r"balance, decontaminate, dedup, expand, quality, rewrite, score, tag. Did you mean 'dedup'"):
        curate(_section(tmp_path, data, [{"name": "dedupe"}]), say=lambda line: None)


def test_a_sigkilled_curation_rerun_neither_loses_nor_repeats_a_record(tmp_path):
    rows = _near_rows(4000, seed=5)
    data = _write(tmp_path / "in.jsonl", rows)
    stages = [{"name": "dedup", "threshold": 0.8}, {"name": "quality", "min_chars": 1}]

    def config(name):
        section = {**_section(tmp_path, data, stages), "out": str(tmp_path / name), "shard_size": 100}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"curate": section}))
        return path

    whole, killed = config("whole"), config("killed")
    assert subprocess.run([sys.executable, "-m", "distillzoo", "curate", str(whole)], capture_output=True).returncode == 0
    child = subprocess.Popen([sys.executable, "-m", "distillzoo", "curate", str(killed)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (tmp_path / "killed" / "stages" / "00-dedup" / "shard-00003").exists():
        assert child.poll() is None and time.time() < deadline, "the run ended before it could be killed mid-stage"
        time.sleep(0.005)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not (tmp_path / "killed" / "curated.jsonl").exists()
    done = subprocess.run([sys.executable, "-m", "distillzoo", "curate", str(killed)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    for name in ("curated.jsonl", "dropped/00-dedup.jsonl", "dropped/01-quality.jsonl", "report.json"):
        assert (tmp_path / "killed" / name).read_text() == (tmp_path / "whole" / name).read_text(), name
    ids = [json.loads(line)["id"] for line in (tmp_path / "killed" / "curated.jsonl").read_text().splitlines()]
    dropped = [json.loads(line)["id"] for line in (tmp_path / "killed" / "dropped" / "00-dedup.jsonl").read_text()
               .splitlines()]
    assert len(set(ids)) == len(ids) and sorted(ids + dropped, key=lambda i: int(i[1:])) == [r["id"] for r in rows]


def _langs(n_en: int, n_zh: int, seed: int = 0):
    rng = random.Random(seed)
    rows = [_chat(i, "q", _text(rng, rng.choice([3, 30, 300]), "en"), language="en") for i in range(n_en)]
    rows += [_chat(n_en + i, "问", _text(rng, rng.choice([3, 30, 300]), "zh"), language="zh") for i in range(n_zh)]
    rng.shuffle(rows)
    return rows


def test_balance_reaches_its_target_shares_within_sampling_error(tmp_path):
    from scipy.stats import chisquare

    rows = _langs(600, 240)
    weights = {"en": 0.55, "zh": 0.45}
    report = curate(_section(tmp_path, _write(tmp_path / "in.jsonl", rows),
                             [{"name": "balance", "by": "language", "weights": weights, "seed": 3}], shard_size=100),
                    say=lambda line: None)
    kept = [json.loads(line) for line in (tmp_path / "out" / "curated.jsonl").read_text().splitlines()]
    counts = {lang: sum(r["language"] == lang for r in kept) for lang in weights}
    assert counts["zh"] == 240  # the scarce bucket is kept whole; the other is cut to its share
    total = sum(counts.values())
    _, p = chisquare([counts[k] for k in weights], [weights[k] * total for k in weights])
    assert p > 0.05, (counts, p)
    buckets = report["stages"][0]["buckets"]
    assert buckets["en"]["in"] == 600 and buckets["en"]["kept"] == counts["en"] and buckets["zh"]["target_share"] == 0.45


def test_balance_by_language_and_length_with_a_cap_is_deterministic_by_seed(tmp_path):
    rows = _langs(400, 400, seed=1)
    stage = {"name": "balance", "by": ["language", "length"], "cap": 50, "length_edges": [20, 200]}

    def run(name, seed):
        section = {**_section(tmp_path, _write(tmp_path / "in.jsonl", rows), [{**stage, "seed": seed}]),
                   "out": str(tmp_path / name)}
        report = curate(section, say=lambda line: None)
        ids = [json.loads(line)["id"] for line in (tmp_path / name / "curated.jsonl").read_text().splitlines()]
        return report, ids

    report, first = run("a", 0)
    _, again = run("b", 0)
    _, other = run("c", 1)
    assert first == again and first != other
    buckets = report["stages"][0]["buckets"]
    assert len(buckets) == 6 and all(b["kept"] == min(b["in"], 50) for b in buckets.values())
    assert set(buckets) == {f"{lang}/{span}" for lang in ("en", "zh") for span in ("0-19", "20-199", "200+")}


def test_balance_refuses_a_bucket_its_weights_do_not_name(tmp_path):
    from distillzoo.errors import ParameterError

    rows = _langs(10, 10)
    with pytest.raises(ParameterError, match=r"the data has buckets \['zh'\] that weights does not name"):
        curate(_section(tmp_path, _write(tmp_path / "in.jsonl", rows),
                        [{"name": "balance", "weights": {"en": 1.0}}]), say=lambda line: None)


def test_quality_keeps_the_languages_it_is_given_and_names_the_one_it_found(tmp_path):
    rows = [_chat(0, "Please explain", "The weather today is sunny and warm, a fine day for a long walk."),
            _chat(1, "请解释一下", "今天天气晴朗温暖，非常适合出去散步，我们一起去公园吧。"),
            _chat(2, "Expliquez", "Le temps est ensoleillé et chaud aujourd'hui, parfait pour une promenade."),
            _chat(3, "Erklären", "Das Wetter ist heute sonnig und warm, ideal für einen langen Spaziergang."),
            _chat(4, "q", "96")]  # too short to tell: kept
    curate(_section(tmp_path, _write(tmp_path / "in.jsonl", rows),
                    [{"name": "quality", "languages": ["en", "zh"], "language_accuracy": "low"}]),
           say=lambda line: None)
    got = {i: (d["reason"], d["language"]) for i, d in _dropped(tmp_path, "00-quality").items()}
    assert got == {"r2": ("another language", "fr"), "r3": ("another language", "de")}
