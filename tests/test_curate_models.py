"""distillzoo curate's model stages: the keyword tagger on English and Chinese instructions, the teacher as a
classifier against a hand computation of the label log-probs on a tiny model, expand and rewrite against a
scripted server (the rows they write, their ids and provenance, exactly), the score stage as a gate, and the
report's distributions against counts made by hand."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

import distillzoo as dz
from distillzoo.curate.pipeline import Context, Row, curate
from distillzoo.errors import ConfigError
from distillzoo.hooks.manager import components
from distillzoo.models.causal_lm import tiny_qwen2
from helpers import write_jsonl

TEACHER = {"hidden_size": 32, "num_layers": 1, "seed": 3}


def _chat(i, prompt, reply, **extra):
    return {"id": f"r{i}", "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}],
            **extra}


def _section(tmp_path, data, stages, **extra):
    return {"data": str(data), "format": "chat", "out": str(tmp_path / "out"), "stages": stages,
            "malformed": "refuse", "shard_size": 3, **extra}


def _curated(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "out" / "curated.jsonl").read_text(encoding="utf-8").splitlines()]


def test_the_taxonomy_has_33_unique_task_types_ending_with_other():
    from distillzoo.plugins.curation_models import read_taxonomy

    types = read_taxonomy()
    assert len(types) == 33 and len({t["name"] for t in types}) == 33 and types[-1]["name"] == "other"
    assert all(t["keywords"] for t in types[:-1])


def test_the_keyword_tagger_labels_english_and_chinese_instructions_by_their_keywords(tmp_path):
    rows = [_chat(0, "Write a Python function that implements binary search.", "def f(): ..."),
            _chat(1, "请把下面这句话翻译成英文：今天天气很好。", "The weather is nice today."),
            _chat(2, "Solve the equation x + 3 = 5 and calculate x squared.", "x = 2, so 4."),
            _chat(3, "请帮我写一首关于秋天的诗。", "秋风起……"),
            _chat(4, "Hmm.", "ok")]
    data = write_jsonl(tmp_path / "in.jsonl", rows)
    report = curate(_section(tmp_path, data, [{"name": "tag"}]), say=lambda _: None)
    tags = {r["id"]: r["task"] for r in _curated(tmp_path)}
    assert tags == {"r0": "code_generation", "r1": "translation", "r2": "math", "r3": "creative_writing",
                    "r4": "other"}
    assert report["stages"][0]["tags"] == {"code_generation": 1, "creative_writing": 1, "math": 1, "other": 1,
                                           "translation": 1}
    assert report["distributions"]["after"]["task"] == report["stages"][0]["tags"]
    assert report["distributions"]["before"]["task"] == {"untagged": 5}


def test_the_model_tagger_picks_the_label_of_largest_log_prob_as_a_hand_computation_gives(tmp_path):
    from distillzoo.data.tokenizer import load_tokenizer
    from distillzoo.plugins.curation_models import CLASSIFY_TEMPLATE, read_taxonomy

    types = read_taxonomy()
    rows = [_chat(0, "Write a Python function that reverses a list.", "def r(x): return x[::-1]"),
            _chat(1, "请解释一下光合作用。", "光合作用是……")]
    data = write_jsonl(tmp_path / "in.jsonl", rows)
    cfg = dz.load_config({"teacher": {"tiny": TEACHER}, "curate": _section(tmp_path, data, [
        {"name": "tag", "tagger": "model"}])})
    curate(cfg.curate, cfg=cfg, say=lambda _: None)
    tag = components("curation_stages")["tag"].obj(tagger="model")
    tag.begin(Context(dict(cfg.curate), "<test>", cfg))
    tok, model = load_tokenizer(None), tag.tagger.model  # the model the config builds
    labels = ", ".join(t["en"] for t in types)
    want = {}
    for row in rows:  # each label alone: one forward of prompt + label, its tokens' log-probs summed
        ask = CLASSIFY_TEMPLATE.format(labels=labels, instruction=row["messages"][0]["content"])
        prompt = tok.encode_prompt([{"role": "user", "content": ask}], None)
        scores = []
        for t in types:
            label = tok.encode(t["en"])
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([prompt + label])).logits[0].double()
            logp = torch.log_softmax(logits, -1)
            scores.append(sum(float(logp[len(prompt) - 1 + j, label[j]]) for j in range(len(label))))
        want[row["id"]] = scores
    for row in rows:
        got = tag.tagger.logprobs(Row("x:1", row, row))
        assert got == pytest.approx(want[row["id"]], abs=1e-4)
    tags = {r["id"]: r["task"] for r in _curated(tmp_path)}
    assert tags == {i: types[max(range(33), key=lambda k: want[i][k])]["name"] for i in want}


class ScriptedServer:
    """A teacher server whose generations are written from the prompt: an instruction request is answered
    ``NEW(<mode>): <the instruction's first word>``, a question about an answer ``ASK: <its first word>``, any
    other prompt ``ANSWER: <the last user turn>``, and a rewrite ``REWRITE[<style>]``."""

    def __new__(cls, tok):
        from distillzoo.teacher.server import TeacherServer

        class Server(TeacherServer):
            def completions(self, body):
                if body.get("prompt_logprobs") is not None:
                    return super().completions(body)
                text = self.tokenizer.decode(body["prompt"])
                user = text.rsplit("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]
                if "same kind of task" in user or "任务类型" in user:
                    mode = "language" if ("in Chinese" in user or "用英文" in user) else "same_task"
                    first = user.split("\n\n")[1].split()[0][:6]
                    answer = f"NEW({mode}): {first}"
                elif "follow-up" in user or "追问" in user:
                    answer = "ASK: " + user.split("assistant: ", 1)[1].split()[0]
                elif "Rewrite the answer" in user or "改写" in user:
                    style = user.split("below ", 1)[1].split(".")[0] if "below " in user else user.split("要求：")[1][:8]
                    answer = f"REWRITE[{style}]"
                else:
                    answer = f"ANSWER: {user}"
                ids = self.tokenizer.encode(answer)
                return {"choices": [{"index": 0, "text": answer, "token_ids": ids, "finish_reason": "stop"}]}

        return Server(tiny_qwen2(**TEACHER), tok, "scripted")


@pytest.fixture
def server():
    from distillzoo.data.tokenizer import load_tokenizer

    http = ScriptedServer(load_tokenizer(None)).http()
    threading.Thread(target=http.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{http.server_address[1]}"
    http.shutdown()


def test_expand_then_dedup_then_rewrite_write_chat_rows_keeping_ids_and_provenance(tmp_path, server):
    from distillzoo.plugins.curation_models import STYLES, STYLES_ZH

    rows = [_chat(0, "Solve 2 + 2.", "4", task="math"), _chat(1, "写一首诗。", "春天……", task="creative_writing"),
            _chat(2, "Solve 2 + 3.", "5", task="math")]
    data = write_jsonl(tmp_path / "in.jsonl", rows)
    cfg = dz.load_config({"teacher": {"server": server, "model": "scripted"}, "curate": _section(tmp_path, data, [
        {"name": "expand", "modes": ["same_task", "language", "follow_up"], "temperature": 0},
        {"name": "dedup", "near": False}, {"name": "rewrite", "style": "task_aware"}])})
    report = curate(cfg.curate, cfg=cfg, say=lambda _: None)
    out = {r["id"]: r for r in _curated(tmp_path)}
    # r0 and r2 give the same same_task and language instructions and answers: dedup drops r2's copies
    assert list(out) == ["r0", "r0-same_task-0", "r0-language-0", "r0-follow_up-0", "r1", "r1-same_task-0",
                         "r1-language-0", "r1-follow_up-0", "r2", "r2-follow_up-0"]
    assert report["stages"][0]["added"] == 9 and report["stages"][1]["dropped"] == 2
    assert report["output"] == 10 and report["input"] == 3
    new = out["r0-language-0"]
    # a row in Chinese now: rewritten through the Chinese template
    assert new["messages"][:2] == [{"role": "user", "content": "NEW(language): Solve"},
                                   {"role": "assistant", "content": "REWRITE[" + STYLES_ZH["reasoning"][:8] + "]"}]
    assert out["r0-same_task-0"]["messages"][1]["content"] == "REWRITE[" + STYLES["reasoning"].split(".")[0] + "]"
    assert new["language"] == "zh" and new["task"] == "math"
    assert new["provenance"] == [{"stage": "expand", "mode": "language", "from": "r0", "model": "teacher"},
                                 {"stage": "rewrite", "style": "reasoning", "model": "teacher",
                                  "replaced_chars": len("ANSWER: NEW(language): Solve")}]
    follow = out["r1-follow_up-0"]["messages"]
    assert [m["role"] for m in follow] == ["user", "assistant", "user", "assistant"]
    assert follow[:3] == [{"role": "user", "content": "写一首诗。"}, {"role": "assistant", "content": "春天……"},
                          {"role": "user", "content": "ASK: 春天……"}]
    assert out["r1"]["messages"][-1]["content"] == "REWRITE[" + STYLES_ZH["writing"][:8] + "]"
    assert out["r1-language-0"]["language"] == "en"
    dropped = {json.loads(line)["id"] for line in (tmp_path / "out" / "dropped" / "01-dedup.jsonl").read_text().splitlines()}
    assert dropped == {"r2-same_task-0", "r2-language-0"}


def test_rewrite_by_a_tiny_model_in_process_keeps_ids_and_the_prompt(tmp_path):
    rows = [_chat(0, "Explain rain.", "Water falls."), _chat(1, "解释一下雨。", "水落下。")]
    data = write_jsonl(tmp_path / "in.jsonl", rows)
    cfg = dz.load_config({"student": {"tiny": TEACHER}, "curate": _section(tmp_path, data, [
        {"name": "rewrite", "model": "student", "style": "concise", "max_new_tokens": 4}])})
    curate(cfg.curate, cfg=cfg, say=lambda _: None)
    out = _curated(tmp_path)
    assert [r["id"] for r in out] == ["r0", "r1"]
    for before, after in zip(rows, out):
        assert after["messages"][0] == before["messages"][0]
        if after["messages"][1]["content"] != before["messages"][1]["content"]:
            assert after["provenance"][-1]["model"] == "student" and after["provenance"][-1]["style"] == "concise"


def test_the_score_stage_gates_by_a_judge_and_writes_each_score(tmp_path):
    rows = [_chat(i, f"q{i}" if i % 2 else f"问题{i}", ("x" if i % 2 else "答") * (i + 1)) for i in range(6)]
    data = write_jsonl(tmp_path / "in.jsonl", rows)
    report = curate(_section(tmp_path, data, [{"name": "score", "min": 3, "max": 5, "scorer": {
        "name": "judge", "judge": "helpers:answer_length_judge"}}]), say=lambda _: None)
    out = _curated(tmp_path)
    assert [(r["id"], r["score"]) for r in out] == [("r2", 3.0), ("r3", 4.0), ("r4", 5.0)]
    assert report["stages"][0]["reasons"] == {"score below min": 2, "score above max": 1}
    assert report["distributions"]["after"]["score"] == {"3..3.2": 1, "4..4.2": 1, "4.8..5": 1}


def test_the_report_counts_languages_and_lengths_before_and_after_and_draws_them(tmp_path):
    rows = [_chat(0, "hello there", "a" * 10), _chat(1, "你好", "b" * 150), _chat(2, "hello there", "a" * 10),
            _chat(3, "olá, tudo bem", "c" * 600, language="pt")]
    data = write_jsonl(tmp_path / "in.jsonl", rows)
    report = curate(_section(tmp_path, data, [{"name": "dedup", "near": False}]), say=lambda _: None)
    before, after = report["distributions"]["before"], report["distributions"]["after"]
    assert before["language"] == {"en": 2, "pt": 1, "zh": 1} and after["language"] == {"en": 1, "pt": 1, "zh": 1}
    assert before["length"] == {"0-49": 2, "100-199": 1, "500-999": 1}
    assert after["length"] == {"0-49": 1, "100-199": 1, "500-999": 1}
    png = tmp_path / "out" / "distributions.png"
    assert report["plot"] == "distributions.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert "| en | 2 | 50.0% | 1 | 33.3% |" in md


def test_a_rerun_with_another_model_is_refused_and_a_chat_only_stage_refuses_other_formats(tmp_path):
    data = write_jsonl(tmp_path / "in.jsonl", [_chat(0, "q", "a"), _chat(1, "问", "答")])
    section = _section(tmp_path, data, [{"name": "tag", "tagger": "model"}])
    cfg = dz.load_config({"teacher": {"tiny": TEACHER}, "curate": section})
    curate(cfg.curate, cfg=cfg, say=lambda _: None)
    other = dz.load_config({"teacher": {"tiny": {**TEACHER, "seed": 4}}, "curate": section})
    with pytest.raises(ConfigError, match=r"holds a curation of another models \(model changed\)"):
        curate(other.curate, cfg=other, say=lambda _: None)
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"id": "p", "prompt": "q", "chosen": "a", "rejected": "b"}])
    cfg = dz.load_config({"teacher": {"tiny": TEACHER}, "curate": {**_section(tmp_path, pairs, [
        {"name": "rewrite"}]), "format": "preference", "out": str(tmp_path / "o2")}})
    with pytest.raises(ConfigError, match=r"rewrite writes chat records, and curate.format is 'preference'"):
        curate(cfg.curate, cfg=cfg, say=lambda _: None)
    with pytest.raises(ConfigError, match=r"reads the config's 'teacher' model, and the config gives none"):
        curate(_section(tmp_path, data, [{"name": "expand"}]) | {"out": str(tmp_path / "o3")}, say=lambda _: None)


def test_model_stages_under_torchrun_write_what_one_process_writes(tmp_path):
    """Two gloo processes: each tags and expands every other record of a shard, rank 0 writes; the outputs equal
    a single process's byte for byte."""
    import subprocess
    import sys

    import yaml

    rows = [_chat(i, f"Please calculate {i} + {i} and explain." if i % 2 else f"请把第{i}句话翻译成英文。", f"a{i}")
            for i in range(7)]
    data = write_jsonl(tmp_path / "in.jsonl", rows)

    def config(name):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"teacher": {"tiny": TEACHER}, "seed": 0, "curate": {
            **_section(tmp_path, data, [{"name": "tag", "tagger": "model"},
                                        {"name": "expand", "modes": ["same_task"], "max_new_tokens": 5},
                                        {"name": "dedup"}]), "out": str(tmp_path / name)}}), encoding="utf-8")
        return str(path)

    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "distillzoo", "curate", config("one")], capture_output=True,
                         text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "distillzoo",
                          "curate", config("two")], capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]

    def files(out):
        root = tmp_path / out
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
                if p.is_file() and p.name not in ("manifest.json", "distributions.png")}

    a, b = files("one"), files("two")
    assert a.keys() == b.keys() and "curated.jsonl" in a
    for name in a:
        if name == "report.json":
            assert json.loads(a[name]) == json.loads(b[name])
        else:
            assert a[name] == b[name].replace(b"/two/", b"/one/"), name
    curated = [json.loads(line) for line in a["curated.jsonl"].decode().splitlines()]
    assert len(curated) > len(rows) and all("task" in r for r in curated)
