"""Bad values and damaged inputs: a clear error naming what and where, before any model loads, nothing lost."""

import json
import re
import shutil

import numpy as np
import pytest

import distillzoo as dz
from distillzoo.cli import main
from distillzoo.data.records import read_records
from distillzoo.data.shards import TokenShards, prepare_shards
from distillzoo import train
from helpers import write_jsonl

STUDENT = {"hidden_size": 32, "num_layers": 1, "seed": 0}
TEACHER = {"hidden_size": 48, "num_layers": 1, "seed": 1}


def chat(n=6):
    return [{"id": f"q{a}", "messages": [{"role": "user", "content": f"{a} + 1 = ?"},
                                         {"role": "assistant", "content": str(a + 1)}]} for a in range(n)]


def config(tmp_path, **train_kw):
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(tmp_path / "train.jsonl", chat())
    return {"objective": {"name": "fkl"}, "student": {"tiny": dict(STUDENT)}, "teacher": {"tiny": dict(TEACHER)},
            "data": {"streams": [{"name": "s", "path": str(data), "format": "chat", "repeat": 1}], "system": None},
            "train": {"steps": 2, "batch_size": 2, "lr": 1e-3, "log_every": 1, "progress": False, **train_kw},
            "output_dir": str(tmp_path / "run"), "resume": "never"}


# ---------------------------------------------------------------------------- values the schema types but cannot bound
@pytest.mark.parametrize("change, message", [
    (lambda c: c["train"].update(lr=-1e-3), r"train.lr: -0.001 is not valid; it must be a finite number > 0"),
    (lambda c: c["train"].update(weight_decay=-0.1), r"train.weight_decay: -0.1 is not valid; it must be a finite "
                                                      r"number >= 0"),
    (lambda c: c["train"].update(micro_batch_size=-1), r"train.micro_batch_size: -1 is not valid; it must be an "
                                                       r"integer >= 1, or null"),
    (lambda c: c["train"].update(min_lr_ratio=1.5), r"train.min_lr_ratio: 1.5 is not valid; it must be in \[0, 1\]"),
    (lambda c: c["train"].update(max_grad_norm=0.0), r"train.max_grad_norm: 0.0 is not valid"),
    (lambda c: c["data"].update(max_length=-2), r"data.max_length: -2 is not valid; it must be an integer >= 1"),
    (lambda c: (c.pop("objective"), c.update(objectives=[{"name": "ce", "weight": 1.0}, {"name": "fkl", "weight": 0}])),
     r"bad.yaml:1: objectives\[1\].weight must be a finite number > 0, got 0"),
    (lambda c: (c.pop("objective"), c.update(objectives=[{"name": "fkl", "weight": -0.5}])),
     r"objectives\[0\].weight must be a finite number > 0, got -0.5"),
    (lambda c: c["teacher"]["tiny"].update(vocab_size=1000),
     r"teacher: its vocab has 1,000 entries \(teacher.tiny.vocab_size\) but the tokenizer has 151,851 ids"),
    (lambda c: c["data"].update(streams={"s": c["data"]["streams"][0]}), r"data.streams must be a list, got a mapping"),
])
def test_wrong_values_fail_in_check_and_in_train_before_any_model(tmp_path, no_models, capsys, change, message):
    raw = config(tmp_path)
    change(raw)
    path = tmp_path / "bad.yaml"
    path.write_text(json.dumps(raw))
    assert main(["check", str(path)]) == 2
    assert re.search(message, capsys.readouterr().err), message
    with pytest.raises(dz.DistillzooError, match=message):
        train(dz.load_config(path), where=str(path))


def test_check_runs_every_validation_train_runs_before_a_model(tmp_path, no_models, capsys):
    raw = config(tmp_path)
    raw["data"]["streams"][0]["path"] = str(tmp_path / "missing.jsonl")
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(raw))
    assert main(["check", str(path)]) == 2
    assert "data.streams[0].path: '" in capsys.readouterr().err
    raw = config(tmp_path)
    raw.pop("student")
    path.write_text(json.dumps(raw))
    assert main(["check", str(path)]) == 2
    assert "student: give exactly one of student.path" in capsys.readouterr().err
    path.write_text(json.dumps(config(tmp_path)))
    assert main(["check", str(path)]) == 0
    assert "# checked for: train" in capsys.readouterr().out


def test_negative_max_length_is_refused_where_data_is_tokenized(tmp_path, tok):
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "q"},
                                                            {"role": "assistant", "content": "96"}]}])
    with pytest.raises(dz.DataError, match=r"max_length must be a positive number of tokens \(or None\), got -3"):
        prepare_shards(data, tmp_path / "out", format="chat", tokenizer=tok, max_length=-3)
    assert not (tmp_path / "out").exists()
    with pytest.raises(dz.DataError, match=r"max_length must be a positive number of tokens"):
        dz.PreferenceDataset(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}]),
                             tok, max_length=-1)


# ---------------------------------------------------------------------------- damaged inputs
def test_non_utf8_jsonl_names_the_line_and_byte(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(chat(1)[0]).encode() + b"\n" + '{"instruction": "caf\xe9"}\n'.encode("latin-1"))
    # '{"instruction": "caf' is 20 bytes: the 21st is latin-1's e-acute, which UTF-8 cannot start a character with
    with pytest.raises(dz.DataError, match=re.escape(f"{path}:2: not UTF-8 (byte 21 of the line, b'\\xe9\"}}\\n'")):
        list(read_records(path, "chat"))


@pytest.fixture
def shards(tmp_path, tok):
    prepare_shards(write_jsonl(tmp_path / "d.jsonl", chat()), tmp_path / "ok", format="chat", tokenizer=tok)

    def damaged(name):
        target = tmp_path / name
        shutil.copytree(tmp_path / "ok", target)
        return target
    return damaged


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "tokens.bin").write_bytes((d / "tokens.bin").read_bytes()[:-6]),
     r"tokens.bin is [\d,]+ bytes; [\d,]+ expected for \d+ tokens \(int32\): truncated or damaged"),
    (lambda d: (d / "index.npy").write_bytes((d / "index.npy").read_bytes()[:-5]), r"index.npy: unreadable"),
    (lambda d: (d / "meta.json").write_text('{"distillzoo_shards": 1, "dtype": "int32", '),
     r"meta.json: not valid JSON"),
    (lambda d: (d / "ids.json").write_text(json.dumps(json.loads((d / "ids.json").read_text())[:-1])),
     r"ids.json: 5 sample ids for 6 examples"),
    (lambda d: np.memmap(d / "tokens.bin", dtype=np.int32, mode="r+").__setitem__(7, 200_000),
     r"tokens.bin: token id 200000 \(example 0, token 7\) is outside the vocab \[0, 151851\)"),
])
def test_a_damaged_prepared_directory_names_the_file(shards, damage, message):
    directory = shards("bad")
    damage(directory)
    with pytest.raises(dz.DataError, match=message):
        TokenShards(directory)


def test_filter_refuses_to_overwrite_its_input_and_a_non_finite_threshold(tmp_path):
    from distillzoo.teacher.scoring import filter_records, write_scores

    data = write_jsonl(tmp_path / "d.jsonl", chat(4))
    before = data.read_bytes()
    scores = {f"q{a}": float(a) for a in range(4)}
    write_scores(tmp_path / "s.jsonl", scores)
    with pytest.raises(dz.ConfigError, match=r"filter: --out '.*d.jsonl' is the input file"):
        filter_records(data, "chat", scores, data, threshold=1.0)
    assert data.read_bytes() == before
    for bad in ("nan", "inf"):
        code = main(["filter", str(data), "--format", "chat", "--scores", str(tmp_path / "s.jsonl"), "--threshold",
                     bad, "--out", str(tmp_path / "kept.jsonl")])
        assert code == 2 and not (tmp_path / "kept.jsonl").exists()


# ---------------------------------------------------------------------------- non-finite values
@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
@pytest.mark.parametrize("poison, what", [(float("nan"), "NaN"), (float("inf"), r"\+inf"),
                                          ("all", r"-inf everywhere \(no mass at all\)")])
@pytest.mark.parametrize("name", ["fkl", "jsd", "tvd"])
def test_a_teacher_row_that_is_no_distribution_is_refused_in_every_backend(monkeypatch, backend, poison, what, name):
    """A NaN, +inf or all -inf teacher row is an error naming the row, not a loss of 0 with a NaN student gradient."""
    import torch

    monkeypatch.setenv("DISTILLZOO_BACKEND", backend)
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(5, 64, generator=g, requires_grad=True), torch.randn(5, 64, generator=g)
    if poison == "all":
        teacher[3] = float("-inf")
    else:
        teacher[3, 17] = poison
    labels = torch.tensor([1, 2, -100, 4, 5])
    with pytest.raises(dz.NonFiniteError, match=rf"{name}: the teacher's logits at row 3 are {what}") as err:
        dz.objective(name)(student, teacher, labels)
    assert err.value.row == 3
    hs, ws = torch.randn(5, 8, generator=g), torch.randn(64, 8, generator=g)
    ht, wt = torch.randn(5, 8, generator=g), torch.randn(64, 8, generator=g)
    ht[3] = float("nan")
    with pytest.raises(dz.NonFiniteError, match=rf"{name}: the teacher's logits at row 3 are NaN"):
        dz.objective(name).from_hidden(hs, ws, ht, wt, labels)
    labels[2] = 0  # the masked row is not scored, so a teacher row there may be anything
    teacher = torch.randn(5, 64, generator=g)
    teacher[2] = float("nan")
    dz.objective(name)(student, teacher, torch.tensor([1, 2, -100, 4, 5])).backward()
    assert torch.isfinite(student.grad).all()


def test_a_sparse_teacher_that_is_no_distribution_is_refused():
    import torch

    ids = torch.arange(4).repeat(3, 1)
    logprobs = torch.log(torch.full((3, 4), 0.2))
    logprobs[1, 2] = float("nan")
    with pytest.raises(dz.NonFiniteError, match=r"fkl: the sparse teacher at row 1 is not a distribution"):
        dz.objective("fkl")(torch.randn(3, 10), dz.SparseTeacher(ids, logprobs), torch.tensor([0, 1, 2]))


@pytest.mark.parametrize("label", [-1, 64, 10_000])
def test_labels_outside_the_vocab_are_not_counted_as_tokens(label):
    import torch

    with pytest.raises(dz.ParameterError, match=rf"fkl: label {label} is outside the compared vocab \[0, 64\) at row "
                                                r"1, and is not ignore_index \(-100\)"):
        dz.objective("fkl")(torch.randn(3, 64), torch.randn(3, 64), torch.tensor([0, label, -100]))


def saved_tiny(path, poison_row=None, **kw):
    import torch
    from distillzoo.models.causal_lm import tiny_qwen2

    model = tiny_qwen2(**kw, tie_word_embeddings=True)
    if poison_row is not None:
        with torch.no_grad():
            model.lm_head.weight[poison_row] = float("nan")  # that vocab entry's logit is NaN on every token
    model.save_pretrained(path)
    return str(path)


def test_a_nan_teacher_stops_training_naming_the_sample_and_nothing_is_saved(tmp_path, capsys):
    raw = config(tmp_path, steps=3, checkpoint_every=1)
    raw["teacher"] = {"path": saved_tiny(tmp_path / "teacher", poison_row=77, **TEACHER)}
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(raw))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert re.search(r"the teacher model, sample 'q\d', scored token 0 \(position \d+\): fkl: the teacher's logits at "
                     r"row \d+ are NaN", err), err
    assert not (tmp_path / "run" / "final").exists() and not (tmp_path / "run" / "checkpoints").exists()


def test_a_diverging_student_stops_before_its_weights_turn_nan(tmp_path, capsys):
    """A NaN loss stops the run (exit code 2) before the student is updated or saved: no exit 0 with NaN weights."""
    import torch
    from safetensors.torch import load_file

    good = config(tmp_path / "good", steps=2, checkpoint_every=1)
    good["student"] = {"path": saved_tiny(tmp_path / "student", **STUDENT)}
    assert main(["train", json_file(tmp_path / "good.yaml", good)]) == 0
    raw = config(tmp_path, steps=3, checkpoint_every=1)
    raw["student"] = {"path": saved_tiny(tmp_path / "nan-student", poison_row=5, **STUDENT)}
    assert main(["train", json_file(tmp_path / "run.yaml", raw)]) == 2
    err = capsys.readouterr().err
    assert re.search(r"step 1: the loss is nan and the gradient norm nan; the student was not updated and nothing more "
                     r"is saved \(no checkpoint yet\)\. This step's samples on this rank: \['q\d', 'q\d'\]", err), err
    assert not (tmp_path / "run" / "final").exists()
    weights = load_file(tmp_path / "good" / "run" / "final" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())


def json_file(path, raw):
    path.write_text(json.dumps(raw))
    return str(path)


# ---------------------------------------------------------------------------- writers killed mid-write
KILLED_IN_NP_SAVE = """
import os, signal, sys
import numpy as np
np.save = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)  # index.npy is written inside the atomic write
{call}
"""


def killed_mid_write(tmp_path, call):
    import subprocess
    import sys

    script = tmp_path / "killed.py"
    script.write_text(KILLED_IN_NP_SAVE.format(call=call))
    child = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert child.returncode == -9, child.stderr[-2000:]


def test_a_prepare_killed_mid_write_keeps_the_old_output_and_the_next_one_sweeps_its_temporary(tmp_path, tok):
    data = write_jsonl(tmp_path / "d.jsonl", chat())
    straight = prepare_shards(data, tmp_path / "straight", format="chat", tokenizer=tok, system=None)
    old = prepare_shards(write_jsonl(tmp_path / "old.jsonl", chat(3)), tmp_path / "out", format="chat", tokenizer=tok)
    before = {f.name: f.read_bytes() for f in (tmp_path / "out").iterdir()}
    killed_mid_write(tmp_path, f"from distillzoo.data.shards import prepare_shards\n"
                               f"prepare_shards({str(data)!r}, {str(tmp_path / 'out')!r}, format='chat', "
                               f"overwrite=True, system=None)")
    stale = [p.name for p in tmp_path.glob(".out.*.tmp")]
    assert len(stale) == 1 and (tmp_path / stale[0] / "tokens.bin").exists()  # what SIGKILL leaves
    assert {f.name: f.read_bytes() for f in (tmp_path / "out").iterdir()} == before  # the old output is intact
    assert len(TokenShards(tmp_path / "out")) == len(old) == 3
    redone = prepare_shards(data, tmp_path / "out", format="chat", tokenizer=tok, overwrite=True, system=None)
    assert not list(tmp_path.glob(".out.*")), "the killed run's temporary was not swept"
    assert len(redone) == len(straight) == 6
    for f in (tmp_path / "straight").iterdir():
        if f.name != "meta.json":  # meta.json names the source file
            assert (tmp_path / "out" / f.name).read_bytes() == f.read_bytes(), f.name
