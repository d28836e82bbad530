"""The offline top-k teacher cache: exact top-k and tail, training by sample id, refusals, resuming."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import distillzoo as dz
import distillzoo.teacher.cache as tc
from distillzoo.models.causal_lm import load_causal_lm, tiny_qwen2
from distillzoo.data.shards import ConversationDataset
from distillzoo.teacher.cache import TeacherCache, teacher_topk, write_teacher_cache
from distillzoo import train
from helpers import assert_trained_alike, write_jsonl

V = 151_936


def records():
    return [{"id": f"s{a}-{b}", "messages": [{"role": "user", "content": f"{a} + {b} = ?"},
                                             {"role": "assistant", "content": str(a + b)}]}
            for a in range(4) for b in range(3)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A peaked tiny teacher saved as a model directory, and the data in file order and reversed."""
    root = tmp_path_factory.mktemp("cache")
    teacher = tiny_qwen2(hidden_size=48, num_layers=1, seed=1, tie_word_embeddings=True)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(30)  # tied: the embedding too; a peaked teacher, as a trained one is
    teacher.save_pretrained(root / "teacher")
    data = write_jsonl(root / "train.jsonl", records())
    reversed_data = write_jsonl(root / "reversed.jsonl", records()[::-1])
    return root, data, reversed_data


def cache_of(root, data_path, tok, k, dtype="float32", name="c", **kwargs):
    teacher = load_causal_lm(str(root / "teacher"))
    dataset = ConversationDataset(data_path, "chat", tok, system=None)
    return write_teacher_cache(root / name, teacher, dataset, k=k, dtype=dtype, teacher_name="t",
                               tokenizer_name=tok.name, pad_id=tok.pad_id, progress=False, **kwargs)


def test_top_k_and_tail_are_those_of_the_full_softmax():
    torch.manual_seed(0)
    hidden, weight = torch.randn(5, 16), torch.randn(1000, 16)
    ids, logprobs, tail = teacher_topk(hidden, weight, k=7, temperature=2.0, chunk_rows=2)
    full = torch.log_softmax((hidden.double() @ weight.double().T) / 2.0, -1)
    want = full.topk(7, dim=-1)
    assert torch.equal(ids.long(), want.indices) and ids.dtype == torch.int32
    torch.testing.assert_close(logprobs.double(), want.values, rtol=0, atol=1e-5)
    torch.testing.assert_close(tail.double(), torch.log1p(-want.values.exp().sum(-1)), rtol=0, atol=1e-5)
    assert teacher_topk(hidden, weight, k=1000)[2].isneginf().all()  # k = V: no tail


def config(root, **teacher):
    return {
        "objective": {"name": "fkl"}, "seed": 0,
        "student": {"tiny": {"hidden_size": 32, "num_layers": 1, "seed": 0}},
        "teacher": teacher,
        "data": {"streams": [{"name": "arith", "path": str(root / "train.jsonl"), "format": "chat", "repeat": 2}],
                 "system": None, "max_length": 64},
        "train": {"steps": 4, "batch_size": 4, "lr": 1e-2, "log_every": 1, "progress": False},
        "output_dir": str(root / f"run-{len(list(root.glob('run-*')))}"), "resume": "never",
    }


def losses(result):
    return [json.loads(line)["loss"] for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]


def weights(result):
    return load_file(result.output_dir / "final" / "model.safetensors")


def test_training_from_a_full_vocab_cache_equals_training_with_the_live_teacher(setup, tok):
    """k = V: the sparse teacher is the dense one. The cache is built from the data in reversed order and the
    stream shuffles it again: only reading by sample id lines the teacher up with each example."""
    root, _, reversed_data = setup
    cache_of(root, reversed_data, tok, k=V, name="full")
    live = train(dz.load_config(config(root, path=str(root / "teacher"))))
    cached = train(dz.load_config(config(root, cache=str(root / "full"), top_k=V)))
    assert losses(cached) == pytest.approx(losses(live), rel=1e-5)
    # the live teacher takes the CPU's column path and the cache the sparse row path: the same fp32 sums in
    # other orders (measured: 1 weight of 2048 beyond 1e-5). A teacher lined up with the wrong example moves
    # most weights by about the learning rate.
    assert_trained_alike(weights(live), weights(cached), lr=1e-2)


def test_a_top_32_bf16_cache_is_close_to_the_live_teacher(setup, tok):
    root, data, _ = setup
    cache = cache_of(root, data, tok, k=32, dtype="bfloat16", name="k32")
    tokens = sum(int(s.offsets[-1]) for s in cache.shards)
    assert sum(f.stat().st_size for f in (root / "k32").rglob("*.bin")) == tokens * (32 * (4 + 2) + 4)
    live = losses(train(dz.load_config(config(root, path=str(root / "teacher")))))
    cached = losses(train(dz.load_config(config(root, cache=str(root / "k32")))))
    # measured: within 5e-4 (the peaked teacher keeps nearly all its mass in the top 32; bf16 log-probs round)
    assert cached == pytest.approx(live, rel=2e-3)
    print(f"k=32 bf16 vs live teacher, per-step loss: {cached} vs {live}")


@pytest.mark.parametrize("change, message", [
    (lambda c: c["teacher"].update(top_k=8), r"teacher.cache: teacher cache .* does not match: k: 32 in the cache, 8"),
    (lambda c: c.update(objective={"name": "fkl", "temperature": 2.0}), r"temperature: 1.0 in the cache, 2.0 in this run"),
    (lambda c: c.update(objective={"name": "dpkd_token"}), r"dpkd_token.*cannot take a top-k \(sparse\) teacher"),
    (lambda c: c["student"]["tiny"].update(vocab_size=152_064),  # a student whose head the cache does not fit
     r"teacher.cache: teacher cache .* does not match: vocab_size: 151936 in the cache, 152064 in this run"),
])
def test_a_cache_that_disagrees_with_the_config_is_refused_before_any_model_loads(setup, tok, monkeypatch, change,
                                                                                   message):
    import distillzoo.models.causal_lm as causal_lm  # where models are built

    root, data, _ = setup
    if not (root / "k32b").exists():
        cache_of(root, data, tok, k=32, dtype="bfloat16", name="k32b")
    monkeypatch.setattr(causal_lm, "tiny_qwen2", lambda **kw: (_ for _ in ()).throw(AssertionError("model built")))
    raw = config(root, cache=str(root / "k32b"), top_k=32)
    change(raw)
    with pytest.raises(dz.ConfigError, match=message):
        train(dz.load_config(raw), where="run.yaml")


def test_another_tokenizer_s_cache_is_refused(setup, tok):
    root, data, _ = setup
    shutil.copytree(root / "k32", root / "other-tok") if (root / "k32").exists() else cache_of(
        root, data, tok, k=32, name="other-tok")
    manifest = json.loads((root / "other-tok" / "manifest.json").read_text())
    manifest["tokenizer"] = "some/other-tokenizer"
    (root / "other-tok" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(dz.ConfigError, match=r"tokenizer: 'some/other-tokenizer' in the cache, 'qwen"):
        train(dz.load_config(config(root, cache=str(root / "other-tok"))))


def test_a_truncated_shard_is_refused_naming_the_file(setup, tok, tmp_path):
    root, data, _ = setup
    cache_of(root, data, tok, k=8, name="trunc", shard_size=5)
    victim = root / "trunc" / "shard-00001" / "logprobs.bin"
    victim.write_bytes(victim.read_bytes()[:-6])
    with pytest.raises(dz.DataError, match=r"shard-00001/logprobs.bin is [\d,]+ bytes; [\d,]+ expected .* truncated"):
        TeacherCache(root / "trunc")
    with pytest.raises(dz.ConfigError, match=r"teacher.cache: .*shard-00001/logprobs.bin"):
        train(dz.load_config(config(root, cache=str(root / "trunc"))))


def test_an_interrupted_cache_run_resumes_to_the_same_files(setup, tok, monkeypatch):
    root, data, _ = setup
    straight = cache_of(root, data, tok, k=8, name="straight", shard_size=4, batch_size=2)
    real, calls = tc.teacher_topk, []

    def dies_in_the_second_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # two batches per shard: the second shard's first batch
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(tc, "teacher_topk", dies_in_the_second_shard)
    with pytest.raises(KeyboardInterrupt):
        cache_of(root, data, tok, k=8, name="killed", shard_size=4, batch_size=2)
    monkeypatch.setattr(tc, "teacher_topk", real)
    assert sorted(p.name for p in (root / "killed").iterdir()) == ["manifest.json", "shard-00000"]
    with pytest.raises(dz.DataError, match=r"4 of 12 samples cached; the run was interrupted"):
        TeacherCache(root / "killed")
    with pytest.raises(dz.DataError, match=r"built differently \(k: 8 there, 16 now\)"):
        cache_of(root, data, tok, k=16, name="killed", shard_size=4, batch_size=2)
    resumed = cache_of(root, data, tok, k=8, name="killed", shard_size=4, batch_size=2)
    assert len(resumed) == len(straight) == 12
    for f in sorted((root / "straight").rglob("*")):
        if f.is_file():
            assert (root / "killed" / f.relative_to(root / "straight")).read_bytes() == f.read_bytes(), f


def test_the_cli_reports_bytes_per_token(setup, tok, capsys):
    from distillzoo.cli import main

    root, data, _ = setup
    out = root / "cli"
    assert main(["cache-teacher", str(root / "teacher"), str(data), "--format", "chat", "--no-system", "--k", "8",
                 "--out", str(out), "--no-progress"]) == 0
    said, err = capsys.readouterr()
    assert err == "" and len(said.splitlines()) == 1  # its own line only: no bar, no transformers output
    tokens = sum(int(s.offsets[-1]) for s in TeacherCache(out).shards)
    assert f"for 12 samples, {tokens} response tokens, {8 * 6 + 4} bytes per token" in said
    ids, logprobs, tail = TeacherCache(out).get("s3-2")
    assert ids.shape == (2, 8) and logprobs.dtype == torch.float32  # "5" and <|im_end|>
    assert math.isclose(float(torch.logsumexp(torch.cat([logprobs[0], tail[:1]]), 0)), 0.0, abs_tol=1e-2)


def test_a_damaged_or_old_manifest_is_refused_naming_the_file(setup, tok):
    root, data, _ = setup
    cache_of(root, data, tok, k=8, name="manifest")
    manifest_path = root / "manifest" / "manifest.json"
    good = json.loads(manifest_path.read_text())
    for text, message in [
        (json.dumps(good)[:-9], r"manifest.json: not valid JSON"),
        (json.dumps({k: v for k, v in good.items() if k != "k"}), r"manifest.json: missing field\(s\) \['k'\]"),
        (json.dumps({**good, "distillzoo_teacher_cache": 1}), r"format 1, without token fingerprints: rebuild it"),
        (json.dumps({**good, "dtype": "int8"}), r"dtype 'int8' is not one of"),
    ]:
        manifest_path.write_text(text)
        with pytest.raises(dz.DataError, match=message):
            TeacherCache(root / "manifest")
    manifest_path.write_text(json.dumps(good))


def test_a_cached_value_that_is_not_a_log_prob_is_refused_naming_the_sample(setup, tok):
    """A NaN in the cache is refused naming its shard, sample and token; no NaN student is trained or saved."""
    root, data, _ = setup
    cache = cache_of(root, data, tok, k=8, name="nan")
    shard, j = cache.where["s2-1"]
    logprobs = np.memmap(shard.path / "logprobs.bin", dtype=np.float32, mode="r+", shape=(int(shard.offsets[-1]), 8))
    logprobs[int(shard.offsets[j]) + 1, 3] = np.nan
    logprobs.flush()
    raw = config(root, cache=str(root / "nan"))
    with pytest.raises(dz.DataError, match=r"shard-00000: sample 's2-1', response token 1: the cached teacher is not a "
                                           r"distribution"):
        train(dz.load_config(raw))
    assert not (Path(raw["output_dir"]) / "final").exists()


def test_data_edited_under_the_same_ids_is_refused_by_the_token_fingerprint(setup, tok, tmp_path):
    root, data, _ = setup
    cache_of(root, data, tok, k=8, name="stale")
    edited = records()
    edited[5]["messages"][1]["content"] = "41"  # another answer under the same id
    write_jsonl(tmp_path / "edited.jsonl", edited)
    raw = config(root, cache=str(root / "stale"))
    raw["data"]["streams"][0]["path"] = str(tmp_path / "edited.jsonl")
    with pytest.raises(dz.DataError, match=rf"sample '{edited[5]['id']}': its tokens differ from those the teacher "
                                           r"cache .* was built from"):
        train(dz.load_config(raw))
    with pytest.raises(dz.DataError, match=r"holds other samples than this data's 0th shard"):
        cache_of(root, tmp_path / "edited.jsonl", tok, k=8, name="stale")  # resuming the cache on edited data


def test_a_cache_run_killed_mid_shard_leaves_a_temporary_that_the_resume_sweeps(setup, tok, tmp_path):
    import subprocess
    import sys

    root, data, _ = setup
    straight = cache_of(root, data, tok, k=8, name="straight-kill", shard_size=4, batch_size=2)
    out = tmp_path / "killed"
    script = tmp_path / "killed.py"
    script.write_text(f"""
import os, signal
import numpy as np
import distillzoo as dz
from distillzoo.models.causal_lm import load_causal_lm
from distillzoo.data.shards import ConversationDataset
from distillzoo.teacher.cache import write_teacher_cache
real, calls = np.save, []
def save(*args, **kwargs):  # SIGKILL while the second shard is half written (the first is complete)
    calls.append(1)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    real(*args, **kwargs)
np.save = save
tok = dz.load_tokenizer()
write_teacher_cache({str(out)!r}, load_causal_lm({str(root / 'teacher')!r}),
                    ConversationDataset({str(data)!r}, "chat", tok, system=None), k=8, dtype="float32",
                    teacher_name="t", tokenizer_name=tok.name, pad_id=tok.pad_id, progress=False,
                    shard_size=4, batch_size=2)
""")
    child = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert child.returncode == -9, child.stderr[-2000:]
    stale = sorted(p.name for p in out.iterdir() if p.name.startswith("."))
    assert len(stale) == 1 and stale[0].startswith(".shard-00001.") and stale[0].endswith(".tmp")
    with pytest.raises(dz.DataError, match=r"4 of 12 samples cached; the run was interrupted"):
        TeacherCache(out)
    shutil.copytree(out, root / "killed-resume")
    resumed = cache_of(root, data, tok, k=8, name="killed-resume", shard_size=4, batch_size=2)
    assert len(resumed) == len(straight) == 12
    assert sorted(p.name for p in (root / "killed-resume").iterdir()) == sorted(
        p.name for p in (root / "straight-kill").iterdir())  # no temporary left
    for f in sorted((root / "straight-kill").rglob("*")):
        if f.is_file():
            assert (root / "killed-resume" / f.relative_to(root / "straight-kill")).read_bytes() == f.read_bytes(), f
