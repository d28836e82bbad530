"""Hugging Face datasets as input: Parquet, Arrow, JSON and save_to_disk copies of JSONL records give the same
data everywhere JSONL is read (prepare, train, generate, score, cache-teacher, filter), with a column mapping."""

import json

import pytest

import distillzoo as dz
from distillzoo.cli import main
from distillzoo.data.shards import TokenShards, prepare_shards
from distillzoo.data.tables import read_rows
from helpers import write_jsonl

datasets = pytest.importorskip("datasets")

# dolly records as a user holds them: ids on some, a context on some (null elsewhere in a table), Chinese text
DOLLY = [
    {"id": "q0", "instruction": "What is 3 + 4?", "context": None, "response": "7"},
    {"id": None, "instruction": "计算 12 + 1", "context": "两个数", "response": "13"},
    {"id": "q2", "instruction": "Reverse the digits.", "context": "3815", "response": "5183"},
    {"id": None, "instruction": "Write 42 in words.", "context": None, "response": "forty-two"},
    {"id": "q4", "instruction": "用中文写出 7", "context": None, "response": "七"},
]
SHARD_FILES = ("tokens.bin", "loss_mask.bin", "index.npy", "ids.json")


def jsonl_copy(path, records):
    """The JSONL a user would write by hand: absent fields left out rather than null."""
    return write_jsonl(path, [{k: v for k, v in r.items() if v is not None} for r in records])


def copies(tmp_path, records, stem="data"):
    """The same records as JSONL, Parquet, Arrow, JSON lines, a JSON array and a save_to_disk directory."""
    ds = datasets.Dataset.from_list(records)
    out = {"jsonl": jsonl_copy(tmp_path / f"{stem}.jsonl", records), "parquet": tmp_path / f"{stem}.parquet",
           "json": tmp_path / f"{stem}.json", "json-array": tmp_path / f"{stem}-array.json",
           "datasets": tmp_path / f"{stem}-disk", "arrow": tmp_path / f"{stem}.arrow"}
    ds.to_parquet(str(out["parquet"]))
    ds.to_json(str(out["json"]))  # JSON lines, as datasets writes it
    ds.to_json(str(out["json-array"]), lines=False)
    ds.save_to_disk(str(out["datasets"]))
    out["arrow"].write_bytes((out["datasets"] / "data-00000-of-00001.arrow").read_bytes())
    return out


def shard_bytes(directory):
    return {name: (directory / name).read_bytes() for name in SHARD_FILES}


def test_every_copy_of_the_same_records_prepares_identical_shards(tmp_path, tok):
    expected = None
    for kind, path in copies(tmp_path, DOLLY).items():
        shards = prepare_shards(path, tmp_path / f"shards-{kind}", format="dolly", tokenizer=tok, system=None)
        assert shards.meta["examples"] == 5, kind
        got = shard_bytes(tmp_path / f"shards-{kind}")
        expected = expected or got
        assert got == expected, kind
    ids = json.loads(expected["ids.json"])
    assert ids[0] == "q0" and ids[2] == "q2" and len(ids[1]) == 16  # a missing id is a hash of the content, as in JSONL
    assert tok.decode(TokenShards(tmp_path / "shards-parquet")[1]["input_ids"].tolist()) == \
        "<|im_start|>user\n计算 12 + 1\n\n两个数<|im_end|>\n<|im_start|>assistant\n13<|im_end|>\n"


def test_a_column_mapping_reads_a_dataset_whose_fields_are_named_differently(tmp_path, tok):
    renamed = [{"uid": r["id"], "question": r["instruction"], "input": r["context"], "answer": r["response"]}
               for r in DOLLY]
    path = copies(tmp_path, renamed, "renamed")["parquet"]
    columns = {"id": "uid", "instruction": "question", "context": "input", "response": "answer"}
    prepare_shards(path, tmp_path / "mapped", format="dolly", tokenizer=tok, system=None, columns=columns)
    prepare_shards(jsonl_copy(tmp_path / "dolly.jsonl", DOLLY), tmp_path / "plain", format="dolly",
                             tokenizer=tok, system=None)
    assert shard_bytes(tmp_path / "mapped") == shard_bytes(tmp_path / "plain")
    # the command line takes the same mapping
    assert main(["prepare", str(path), "--format", "dolly", "--out", str(tmp_path / "cli"), "--no-system",
                 *(f"--column={f}={c}" for f, c in columns.items())]) == 0
    assert shard_bytes(tmp_path / "cli") == shard_bytes(tmp_path / "plain")
    with pytest.raises(dz.DataError, match=r"renamed.parquet, row 0: no column 'prompt' \(mapped to field "
                                           r"'instruction' by columns\); the record has \['answer', 'input', "):
        list(read_rows(path, {"instruction": "prompt"}))


def test_a_bad_row_is_named_by_its_file_and_row_index(tmp_path, tok):
    bad = [dict(r) for r in DOLLY]
    bad[3]["response"] = "   "
    paths = copies(tmp_path, bad, "bad")
    for kind in ("parquet", "arrow", "json-array"):
        with pytest.raises(dz.DataError, match=rf"{paths[kind].name}, row 3: field 'response' is empty"):
            prepare_shards(paths[kind], tmp_path / f"out-{kind}", format="dolly", tokenizer=tok)
    with pytest.raises(dz.DataError, match=r"bad-disk, row 3: field 'response' is empty"):
        prepare_shards(paths["datasets"], tmp_path / "out-disk", format="dolly", tokenizer=tok)
    with pytest.raises(dz.DataError, match=r"bad.jsonl:4: field 'response' is empty"):  # JSONL keeps file:line
        prepare_shards(paths["jsonl"], tmp_path / "out-jsonl", format="dolly", tokenizer=tok)
    assert not list(tmp_path.glob("out-*"))  # nothing half-written


def test_a_dataset_dict_and_a_damaged_file_are_refused_naming_what_to_give(tmp_path):
    ds = datasets.Dataset.from_list(DOLLY)
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(dz.DataError, match=r"dd is a DatasetDict with splits \['(train|test)', '(train|test)'\]; give "
                                           r"one split's directory"):
        list(read_rows(tmp_path / "dd"))
    (tmp_path / "torn.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(dz.DataError, match=r"torn.parquet: not a readable Parquet file"):
        list(read_rows(tmp_path / "torn.parquet"))


def chat_records(n=6):
    return [{"id": f"c{i}", "messages": [{"role": "user", "content": f"{i} + 1 = ?"},
                                         {"role": "assistant", "content": str(i + 1)}]} for i in range(n)]


def run_config(tmp_path, train_path, eval_path, name, **stream):
    return {"objective": {"name": "fkl"},
            "student": {"tiny": {"hidden_size": 32, "num_layers": 1, "seed": 0}},
            "teacher": {"tiny": {"hidden_size": 48, "num_layers": 1, "seed": 1}},
            "data": {"streams": [{"name": "s", "path": str(train_path), "format": "chat", "repeat": 1, **stream}],
                     "eval": {"name": "held", "path": str(eval_path), "format": "chat", **stream}, "system": None},
            "train": {"steps": 3, "batch_size": 2, "lr": 1e-3, "log_every": 1, "eval_every": 3, "progress": False},
            "output_dir": str(tmp_path / name)}


def test_training_streams_and_eval_from_parquet_and_save_to_disk_equal_training_from_jsonl(tmp_path):
    from distillzoo import train

    paths = copies(tmp_path, chat_records())
    renamed = copies(tmp_path, [{"key": r["id"], "conversation": r["messages"]} for r in chat_records()], "renamed")
    runs = {"jsonl": run_config(tmp_path, paths["jsonl"], paths["jsonl"], "jsonl"),
            "tables": run_config(tmp_path, paths["parquet"], paths["datasets"], "tables"),
            "mapped": run_config(tmp_path, renamed["datasets"], renamed["parquet"], "mapped",
                                 columns={"id": "key", "messages": "conversation"})}
    metrics = {}
    for name, cfg in runs.items():
        train(dz.load_config(cfg))
        metrics[name] = [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}
                         for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    assert metrics["tables"] == metrics["jsonl"] == metrics["mapped"] and "eval/nll" in metrics["jsonl"][-1]


def test_a_datasets_directory_without_a_format_is_refused_naming_the_key(tmp_path, no_models):
    paths = copies(tmp_path, chat_records())
    cfg = run_config(tmp_path, paths["datasets"], paths["jsonl"], "run")
    del cfg["data"]["streams"][0]["format"]
    with pytest.raises(dz.ConfigError, match=r"data.streams\[0\].format: .*data-disk holds records \(datasets\); "
                                             r"name their format"):
        dz.train(dz.load_config(cfg))


def test_generate_score_cache_teacher_and_filter_read_datasets_as_they_read_jsonl(tmp_path, tok, capsys):
    from distillzoo.models.causal_lm import tiny_qwen2

    paths = copies(tmp_path, chat_records())
    teacher_dir = tmp_path / "teacher"
    tiny_qwen2(hidden_size=48, num_layers=1, seed=3).save_pretrained(teacher_dir)
    student_dir = tmp_path / "student"
    tiny_qwen2(hidden_size=32, num_layers=1, seed=4).save_pretrained(student_dir)
    outputs = {}
    for kind in ("jsonl", "parquet", "datasets"):
        base = {"teacher": {"path": str(teacher_dir)}, "student": {"path": str(student_dir)},
                "data": {"system": None}}
        gen = {**base, "generate": {"prompts": str(paths[kind]), "format": "chat", "out": str(tmp_path / f"gen-{kind}"),
                                    "max_new_tokens": 4, "temperature": 1.0, "progress": False}}
        (tmp_path / f"gen-{kind}.yaml").write_text(json.dumps(gen))
        assert main(["generate", str(tmp_path / f"gen-{kind}.yaml")]) == 0
        score = {**base, "score": {"data": str(paths[kind]), "format": "chat", "out": str(tmp_path / f"score-{kind}"),
                                   "scorer": {"name": "mfd"}, "progress": False}}
        (tmp_path / f"score-{kind}.yaml").write_text(json.dumps(score))
        assert main(["score", str(tmp_path / f"score-{kind}.yaml")]) == 0
        assert main(["cache-teacher", str(teacher_dir), str(paths[kind]), "--format", "chat", "--no-system", "--k", "4",
                     "--out", str(tmp_path / f"cache-{kind}")]) == 0
        assert main(["filter", str(paths[kind]), "--format", "chat", "--scores", str(tmp_path / f"score-{kind}"),
                     "--quantile", "0.5", "--out", str(tmp_path / f"kept-{kind}.jsonl")]) == 0
        cache = tmp_path / f"cache-{kind}"
        outputs[kind] = {"generated": (tmp_path / f"gen-{kind}").read_text(),
                         "scores": (tmp_path / f"score-{kind}").read_text(),
                         "cache": {p.relative_to(cache).as_posix(): p.read_bytes() for p in sorted(cache.rglob("*"))
                                   if p.is_file() and p.name != "manifest.json"},
                         "kept": [json.loads(line) for line in (tmp_path / f"kept-{kind}.jsonl").read_text().splitlines()]}
    capsys.readouterr()
    assert len(outputs["jsonl"]["generated"].splitlines()) == 6 and len(outputs["jsonl"]["kept"]) == 3
    for kind in ("parquet", "datasets"):
        for what in ("generated", "scores", "cache", "kept"):
            assert outputs[kind][what] == outputs["jsonl"][what], (kind, what)
