"""Several teachers (``teachers:``): routed by data stream, each example's loss is the loss against its stream's
own teacher alone; mixed by weight, the weighted sum of the losses against each; and the configs that cannot
work are refused by name."""

from __future__ import annotations

import json

import pytest
import torch

import distillzoo as dz
from distillzoo.data.tokenizer import load_tokenizer
from distillzoo.errors import ConfigError
from distillzoo.models.causal_lm import tiny_qwen2
from distillzoo.teacher.server import TeacherServer
from distillzoo.training.algorithm import Models, Run
from distillzoo.training.spec import resolve
from test_served_teacher import _start, _train_setup


@pytest.fixture()
def setup(tmp_path):
    """Two streams (arithmetic; words), a served teacher and a cached one of another model."""
    from helpers import write_jsonl

    from distillzoo.data.shards import ConversationDataset
    from distillzoo.teacher.cache import write_teacher_cache

    first = _train_setup(tmp_path)  # train.jsonl: the arithmetic stream
    words = [{"id": f"w{i}", "language": "zh" if i % 2 else "en",
              "messages": [{"role": "user", "content": f"spell {w}" if i % 2 == 0 else f"拼写 {w}"},
                           {"role": "assistant", "content": " ".join(w) + f" ({len(w)} 个字母)"}]}
             for i, w in enumerate(["cat", "house", "river", "tree", "stone", "light"])]
    write_jsonl(tmp_path / "words.jsonl", words)
    second = tiny_qwen2(hidden_size=48, num_layers=1, seed=5, tie_word_embeddings=True).eval()
    tok = load_tokenizer()
    write_teacher_cache(tmp_path / "words-cache", second,
                        ConversationDataset(tmp_path / "words.jsonl", "chat", tok, system=None),
                        k=8, dtype="float32", teacher_name="second", tokenizer_name=tok.name, pad_id=tok.pad_id,
                        progress=False)
    http = TeacherServer(first, tok, "first").http()
    url = _start(http)
    yield tmp_path, url
    http.shutdown()


def _config(root, url, teachers=None, teacher=None, name="run"):
    cfg = {"objective": {"name": "fkl"}, "seed": 0, "student": {"tiny": {"hidden_size": 32, "num_layers": 1}},
           "data": {"streams": [{"name": "arith", "path": str(root / "train.jsonl"), "format": "chat", "repeat": 1},
                                {"name": "words", "path": str(root / "words.jsonl"), "format": "chat", "repeat": 1}],
                    "system": None, "max_length": 64},
           "train": {"steps": 3, "batch_size": 6, "lr": 1e-2, "log_every": 1, "progress": False},
           "output_dir": str(root / name), "resume": "never"}
    if teachers is not None:
        cfg["teachers"] = teachers
    if teacher is not None:
        cfg["teacher"] = teacher
    return cfg


def _routed(root, url, **extra):
    return [{"name": "first", "server": url, "model": "first", "top_k": 8, "streams": ["arith"], **extra.get("a", {})},
            {"name": "second", "cache": str(root / "words-cache"), "top_k": 8, "streams": ["words"],
             **extra.get("b", {})}]


def _prepared(cfg):
    """The config's algorithm, prepared over a student as the loop prepares it, and the loss of a micro-batch."""
    spec = resolve(dz.load_config(cfg), "cfg.yaml")
    student = tiny_qwen2(hidden_size=32, num_layers=1, seed=0).train()
    run = Run(spec.config, "cfg.yaml", spec.tokenizer, torch.device("cpu"), 0, 1, spec.datasets, student=student,
              spec=spec)
    spec.algorithm.prepare(run)
    models = Models(student, None, None, spec.algorithm, False)

    def loss(examples):
        return sum(float(models(b).value.detach()) for b in spec.algorithm.micro_batches(run, examples, 0, len(examples)))

    return spec, loss


def _examples(spec):
    return [{**spec.datasets[k][i], "stream": name} for k, name in enumerate(("arith", "words"))
            for i in range(len(spec.datasets[k]))]


def test_routed_by_stream_each_example_is_distilled_from_its_stream_s_own_teacher(setup):
    root, url = setup
    spec, routed = _prepared(_config(root, url, _routed(root, url)))
    _, first = _prepared(_config(root, url, teacher={"server": url, "model": "first", "top_k": 8}))
    _, second = _prepared(_config(root, url, teacher={"cache": str(root / "words-cache"), "top_k": 8}))
    examples = _examples(spec)
    alone = {"arith": first, "words": second}
    for ex in examples:  # per sample: the routed loss is the loss against that stream's teacher alone
        want = alone[ex["stream"]]([ex])
        assert routed([ex]) == pytest.approx(want, rel=1e-6, abs=1e-6)
    mixed = examples[:3] + examples[-3:]  # one micro-batch of both streams: the sum of the two
    assert routed(mixed) == pytest.approx(first(mixed[:3]) + second(mixed[3:]), rel=1e-6)


def test_mixed_by_weight_the_loss_is_the_weighted_sum_against_each_teacher(setup):
    root, url = setup
    both = [{"name": "first", "server": url, "model": "first", "top_k": 8, "weight": 0.25},
            {"name": "again", "server": url, "model": "first", "top_k": 4, "weight": 0.75}]
    spec, mixed = _prepared(_config(root, url, both))
    _, k8 = _prepared(_config(root, url, teacher={"server": url, "model": "first", "top_k": 8}))
    _, k4 = _prepared(_config(root, url, teacher={"server": url, "model": "first", "top_k": 4}))
    examples = _examples(spec)[:5]
    assert mixed(examples) == pytest.approx(0.25 * k8(examples) + 0.75 * k4(examples), rel=1e-6)


def test_a_routed_run_logs_each_teacher_s_share_of_the_scored_tokens(setup):
    root, url = setup
    result = dz.train(dz.load_config(_config(root, url, _routed(root, url))))
    records = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3
    for r in records:  # every teacher's share on every step (0 where it scored nothing), summing to 1
        assert r["teachers/first"] + r["teachers/second"] == pytest.approx(1.0)
        assert 0 <= r["teachers/first"] <= 1
    assert any(0 < r["teachers/first"] < 1 for r in records)


@pytest.mark.parametrize("change, message", [
    ({"teacher": {"path": "x"}}, r"teachers: give teacher \(one\) or teachers \(several\), not both"),
    ({"teachers_b": {"streams": ["arith"]}}, r"each data stream needs exactly one teacher; stream 'arith' has "
                                             r"\['first', 'second'\], stream 'words' has none"),
    ({"teachers_b": {"cache": None, "path": "x"}}, r"teachers\[1\] \(second\): unknown key\(s\) \['path'\]"),
    ({"teachers_b": {"cache": None}}, r"teachers\[1\] \(second\): give one of server or cache \(got \[\]\); a teacher "
                                      r"model in process goes in teacher:"),
    ({"teachers_b": {"streams": None, "weight": 1.0}}, r"give every teacher streams .* or every teacher a weight"),
    ({"teachers_b": {"streams": ["nope"]}}, r"teachers\[1\] \(second\).streams: \['nope'\] name no stream"),
    ({"objective": {"name": "dpo"}}, r"teachers: algorithm 'preference' takes one teacher"),
])
def test_teachers_that_cannot_work_are_refused_by_name(setup, change, message):
    root, url = setup
    cfg = _config(root, url, _routed(root, url, b=change.get("teachers_b", {})))
    cfg.update({k: v for k, v in change.items() if k != "teachers_b"})
    with pytest.raises(ConfigError, match=message):
        resolve(dz.load_config(cfg), "cfg.yaml", read_data=False)


def test_routed_by_record_field_each_example_is_distilled_from_the_teacher_its_language_names(setup):
    root, url = setup
    by_language = [{"name": "first", "server": url, "model": "first", "top_k": 8, "route": {"language": "zh"}},
                   {"name": "second", "cache": str(root / "words-cache"), "top_k": 8, "route": {"language": ["en"]}}]

    def words_only(cfg):
        cfg["data"]["streams"] = cfg["data"]["streams"][1:]
        return cfg

    spec, routed = _prepared(words_only(_config(root, url, by_language)))
    _, first = _prepared(words_only(_config(root, url, teacher={"server": url, "model": "first", "top_k": 8})))
    _, second = _prepared(words_only(_config(root, url, teacher={"cache": str(root / "words-cache"), "top_k": 8})))
    examples = [{**spec.datasets[0][i], "stream": "words"} for i in range(len(spec.datasets[0]))]
    for i, ex in enumerate(examples):  # w1, w3, w5 are Chinese: the first teacher's; the others the second's
        want = (first if i % 2 else second)([ex])
        assert routed([ex]) == pytest.approx(want, rel=1e-6, abs=1e-6)
    assert first(examples[1:2]) != pytest.approx(second(examples[1:2]), rel=1e-3)  # the teachers do differ


def test_a_record_no_teacher_routes_is_refused_naming_its_file_and_line(setup):
    root, url = setup
    only_zh = [{"name": "first", "server": url, "model": "first", "top_k": 8, "route": {"language": "zh"}},
               {"name": "second", "cache": str(root / "words-cache"), "top_k": 8, "streams": ["arith"]}]
    with pytest.raises(ConfigError, match=r"words.jsonl:1 \(stream 'words', \{'language': 'en'\}\) is read by no "
                                          r"teacher; each record needs exactly one"):
        resolve(dz.load_config(_config(root, url, only_zh)), "cfg.yaml", read_data=False)


def test_a_route_reads_each_record_s_own_fields_when_streams_reuse_ids(tmp_path):
    from types import SimpleNamespace

    from helpers import write_jsonl

    from distillzoo.plugins.algorithms.teachers import Teacher, record_fields, routes

    def chat(i, language):
        return {"id": str(i), "language": language, "messages": [{"role": "user", "content": "q"},
                                                                 {"role": "assistant", "content": "答" if
                                                                  language == "zh" else "a"}]}

    write_jsonl(tmp_path / "a.jsonl", [chat(1, "zh"), chat(2, "en")])
    write_jsonl(tmp_path / "b.jsonl", [chat(1, "en"), chat(2, "zh")])  # the same ids, the other languages
    streams = [SimpleNamespace(name=n, path=str(tmp_path / f"{n}.jsonl"), format="chat", columns=None)
               for n in ("a", "b")]
    teachers = [Teacher("zh", object(), None, None, {"language": ("zh",)}),
                Teacher("en", object(), None, None, {"language": ("en",)})]
    fields = record_fields(teachers, streams, "cfg.yaml")
    examples = [{"stream": s, "id": i} for s in ("a", "b") for i in ("1", "2")]
    got = {t.name: [examples[r]["stream"] + examples[r]["id"] for r in rows] for t, rows, _ in
           routes(teachers, examples, fields)}
    assert got == {"zh": ["a1", "b2"], "en": ["a2", "b1"]}
