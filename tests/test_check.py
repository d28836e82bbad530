"""`distillzoo check` runs everything `train` checks before a model loads, and `train` refuses the same.

Each bad config below is refused by `check` with the file, row or key named, and by `train` with the
same message before any model is built (the ``no_models`` fixture fails a test that builds one).
"""

import json
import shutil
from pathlib import Path

import pytest

import distillzoo as dz
from distillzoo.cli import main
from helpers import write_jsonl

ROOT = Path(__file__).resolve().parents[1]
STUDENT = {"hidden_size": 32, "num_layers": 1, "num_heads": 4, "num_kv_heads": 2, "seed": 0}


def chat(n: int = 6) -> list[dict]:
    return [{"id": f"s{i}", "messages": [{"role": "user", "content": f"{i} + 1 = ?"},
                                         {"role": "assistant", "content": str(i + 1)}]} for i in range(n)]


def config(tmp_path: Path, data: Path, **changes) -> dict:
    raw = {"objective": {"name": "ce"}, "student": {"tiny": dict(STUDENT)},
           "data": {"streams": [{"name": "s", "path": str(data), "format": "chat", "repeat": 1}], "system": None},
           "train": {"steps": 1, "batch_size": 2, "progress": False}, "output_dir": str(tmp_path / "run")}
    raw.update(changes)
    return raw


def refused_alike(tmp_path: Path, raw: dict, capsys) -> str:
    """`check`'s message for a bad config, asserted to be what `train` raises before a model loads."""
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(raw), encoding="utf-8")
    assert main(["check", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("distillzoo check: error: "), err
    message = err.removeprefix("distillzoo check: error: ").strip()
    with pytest.raises(dz.DistillzooError) as raised:
        dz.train(dz.load_config(path), where=str(path))
    assert str(raised.value) == message
    return message


def test_non_utf8_jsonl_names_its_line(tmp_path, capsys, no_models):
    data = write_jsonl(tmp_path / "train.jsonl", chat())
    data.write_bytes(data.read_bytes().replace(b'"3 + 1', b'"\xff3 + 1'))
    message = refused_alike(tmp_path, config(tmp_path, data), capsys)
    assert f"{data}:4: not UTF-8 (byte" in message


def test_a_table_missing_a_column_names_its_row(tmp_path, capsys, no_models):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"id": r["id"], "conversation": r["messages"]} for r in chat()]  # no "messages" column
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    message = refused_alike(tmp_path, config(tmp_path, tmp_path / "train.parquet"), capsys)
    assert f"{tmp_path / 'train.parquet'}, row 0: " in message and "messages" in message


def test_a_damaged_parquet_page_names_the_file_and_its_rows(tmp_path, capsys, no_models):
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = tmp_path / "good.parquet"
    long_chat = [{**r, "messages": [{"role": "user", "content": "question " * 40}, r["messages"][1]]}
                 for r in chat(300)]
    pq.write_table(pa.Table.from_pylist(long_chat), good, compression="snappy", row_group_size=100)
    damaged = bytearray(good.read_bytes())
    damaged[200:600] = bytes((b * 7 + 13) % 256 for b in damaged[200:600])  # inside row group 0's pages
    (tmp_path / "train.parquet").write_bytes(bytes(damaged))
    message = refused_alike(tmp_path, config(tmp_path, tmp_path / "train.parquet"), capsys)
    assert message.startswith(f"{tmp_path / 'train.parquet'}, rows 0-99 (row group 0): the Parquet data cannot be read")


def test_a_truncated_parquet_file_is_named(tmp_path, capsys, no_models):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(chat()), tmp_path / "good.parquet")
    (tmp_path / "train.parquet").write_bytes((tmp_path / "good.parquet").read_bytes()[:-40])
    message = refused_alike(tmp_path, config(tmp_path, tmp_path / "train.parquet"), capsys)
    assert message.startswith(f"{tmp_path / 'train.parquet'}: not a readable Parquet file")


def test_a_negative_seed_is_refused(tmp_path, capsys, no_models):
    data = write_jsonl(tmp_path / "train.jsonl", chat())
    message = refused_alike(tmp_path, config(tmp_path, data, seed=-1), capsys)
    assert message.endswith("seed: -1 is not valid; it must be an integer in [0, 2**32) (numpy's seed range)")


@pytest.mark.parametrize("tiny, expected", [
    ({"hiden_size": 32}, r"student.tiny.hiden_size: unknown argument 'hiden_size'; a tiny model takes \[.*\]. "
                         r"Did you mean 'hidden_size'\?"),
    ({"hidden_size": 30, "num_heads": 4}, r"student.tiny.num_heads: 4 heads do not divide hidden_size 30"),
    ({"num_layers": 0}, r"student.tiny.num_layers: 0 must be an integer >= 1"),
])
def test_a_bad_tiny_argument_is_named(tmp_path, capsys, no_models, tiny, expected):
    import re

    data = write_jsonl(tmp_path / "train.jsonl", chat())
    message = refused_alike(tmp_path, config(tmp_path, data, student={"tiny": tiny}), capsys)
    assert re.search(expected, message), message


@pytest.mark.parametrize("targets, expected", [
    (["q_projj"], "the student has no module named 'q_projj', so it would get no adapter. Its module names end in: "),
    (["q_proj", "v_projj"], "the student has no module named 'v_projj'"),
    ("attn\\.q_pro", "the regular expression 'attn\\\\.q_pro' matches none of the student's module names"),
    (["self_attn"], "'model.layers.0.self_attn' is a Qwen2Attention, which peft cannot adapt"),
])
def test_lora_target_modules_the_student_lacks_are_refused(tmp_path, capsys, no_models, targets, expected):
    data = write_jsonl(tmp_path / "train.jsonl", chat())
    student = {"tiny": dict(STUDENT), "lora": {"r": 4, "target_modules": targets}}
    message = refused_alike(tmp_path, config(tmp_path, data, student=student), capsys)
    assert f"student.lora.target_modules: {expected}" in message
    if targets == ["q_projj"]:
        assert "Did you mean 'q_proj'?" in message and "v_proj" in message


def lora_targets(tmp_path, targets) -> list[str]:
    """The modules peft adapted in a run with ``target_modules`` as given."""
    tmp_path.mkdir()
    data = write_jsonl(tmp_path / "train.jsonl", chat())
    student = {"tiny": {**STUDENT, "tie_word_embeddings": False}, "lora": {"r": 4, "target_modules": targets}}
    from distillzoo.training.spec import resolve

    spec = resolve(dz.load_config(config(tmp_path, data, student=student, resume="never")))
    from distillzoo.models.causal_lm import model_from_config
    from distillzoo.training import lora

    model = lora.apply(model_from_config(spec.student, "student"), spec.lora, 0)
    return sorted({name.rpartition(".lora_A")[0].rpartition(".")[2] for name, _ in model.named_parameters()
                   if ".lora_A" in name})


def test_peft_s_string_forms_are_taken_whole(tmp_path):
    # all-linear: every linear layer of the decoder, never the lm_head; a regex: the modules it matches in full
    assert lora_targets(tmp_path / "a", "all-linear") == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj",
                                                           "up_proj", "v_proj"]
    assert lora_targets(tmp_path / "b", r".*\.(q|v)_proj") == ["q_proj", "v_proj"]
    assert lora_targets(tmp_path / "c", ["q_proj"]) == ["q_proj"]


def fixtures(tmp_path: Path) -> dict[str, str]:
    """What the bundled configs read from runs/ (written by the quickstart and the recipe's earlier stages):
    a saved tiny teacher and student, teacher answers, selected records, preference pairs."""
    from distillzoo.models.causal_lm import tiny_qwen2

    model = tmp_path / "model"
    tiny_qwen2(hidden_size=32, num_layers=1, tie_word_embeddings=True).save_pretrained(model)
    records = tmp_path / "answers.jsonl"
    shutil.copy(ROOT / "data/quickstart/eval.jsonl", records)
    pairs = tmp_path / "pairs.jsonl"
    shutil.copy(ROOT / "data/quickstart/eval_pairs.jsonl", pairs)
    dolly = write_jsonl(tmp_path / "dolly.jsonl", [{"instruction": f"Say {i}.", "context": "", "response": str(i)}
                                                   for i in range(4)])
    return {"model": str(model), "records": str(records), "pairs": str(pairs), "dolly": str(dolly),
            "out": str(tmp_path / "out")}


BUNDLED = {  # each config with overrides for what it reads from runs/ (see fixtures)
    "configs/quickstart_teacher.yaml": ["output_dir={out}/teacher"],
    "configs/quickstart.yaml": ["teacher.path={model}", "output_dir={out}/student"],
    "configs/distilqwen2/0_curate.yaml": ["curate.out={out}/curated"],
    "configs/distilqwen2/1_teacher_answers.yaml": ["teacher.path={model}", "generate.out={out}/answers.jsonl"],
    "configs/distilqwen2/2_mfd_scores.yaml": ["teacher.path={model}", "score.data={records}",
                                              "score.out={out}/scores.jsonl"],
    "configs/distilqwen2/4_kd.yaml": ["teacher.path={model}", "data.streams.0.path={records}", "output_dir={out}/kd"],
    "configs/distilqwen2/5_pairs.yaml": ["teacher.path={model}", "student.path={model}", "generate.prompts={records}",
                                         "generate.out={out}/pairs.jsonl"],
    "configs/distilqwen2/6_dpkd.yaml": ["teacher.path={model}", "student.path={model}", "data.streams.0.path={pairs}",
                                        "output_dir={out}/dpkd"],
    "configs/dolly_protocol/teacher_sft.yaml": ["student.path={model}", "data.streams.0.path={dolly}",
                                                "data.eval.path={dolly}", "output_dir={out}/dolly-teacher"],
}


def test_every_bundled_config_passes_check(tmp_path, capsys, monkeypatch):
    found = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yaml")) \
        + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "examples").rglob("*.yaml"))
    comparisons = {"configs/compare_quickstart.yaml",  # tests/test_example_plugin.py (it has the renyi entrant)
                   "configs/dolly_protocol/compare.yaml"}  # tests/test_dolly_protocol.py
    assert set(found) == set(BUNDLED) | comparisons  # every one of them is covered
    paths = fixtures(tmp_path)
    monkeypatch.chdir(ROOT)  # their data paths are the repository's
    for name, overrides in BUNDLED.items():
        code = main(["check", name, *[o.format(**paths) for o in overrides]])
        out, err = capsys.readouterr()
        assert code == 0, (name, err)
        assert "# checked for: " in out, name


def test_an_output_dir_holding_another_run_is_refused_before_any_model(tmp_path, capsys, monkeypatch):
    import distillzoo.models.causal_lm as causal_lm

    data = write_jsonl(tmp_path / "train.jsonl", chat())
    dz.train(dz.load_config(config(tmp_path, data, train={"steps": 2, "batch_size": 2, "progress": False,
                                                          "checkpoint_every": 1})))
    capsys.readouterr()
    monkeypatch.setattr(causal_lm, "tiny_qwen2", lambda **kw: (_ for _ in ()).throw(AssertionError("model built")))
    other = config(tmp_path, data, objective={"name": "fkl"}, teacher={"tiny": dict(STUDENT)},
                   train={"steps": 2, "batch_size": 2, "progress": False, "checkpoint_every": 1})
    message = refused_alike(tmp_path, other, capsys)
    assert "resume: cannot resume from step-00000001: " in message
    assert "holds a run with another config (objective.name: 'ce' there, 'fkl' here" in message
