"""The example algorithm package (MiniLLM), pip-installed into a throwaway directory, chosen by name in a config."""

import json
import math
from pathlib import Path

import pytest

from helpers import install_into, run_installed

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "distillzoo-minillm"
STUDENT = {"hidden_size": 32, "num_layers": 1, "seed": 0}
TEACHER = {"hidden_size": 48, "num_layers": 1, "seed": 1}


run = run_installed


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    return install_into(tmp_path_factory.mktemp("site"), EXAMPLE)


def write_config(tmp_path, teacher_mix, steps=1):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{a}", "messages": [
        {"role": "user", "content": f"{a} + 1 = ?"}, {"role": "assistant", "content": str(a + 1)}]}) + "\n"
        for a in range(8)))
    cfg = {"objective": {"name": "rkl"}, "algorithm": {"name": "minillm", "teacher_mix": teacher_mix,
                                                       "max_new_tokens": 4},
           "seed": 3, "student": {"tiny": STUDENT}, "teacher": {"tiny": TEACHER},
           "data": {"streams": [{"name": "q", "path": str(data), "format": "chat", "repeat": 1}], "system": None},
           "train": {"steps": steps, "batch_size": 4, "micro_batch_size": 2, "lr": 1e-3, "log_every": 1,
                     "progress": False, "precision": "fp32"},
           "output_dir": str(tmp_path / "run"), "resume": "never"}
    path = tmp_path / "minillm.yaml"
    path.write_text(json.dumps(cfg))
    return path, data


# Independently of the plugin's code: the same first batch and samples (distillzoo's decode, seeded as the
# algorithm documents), then MiniLLM's surrogate from full float64 logits, one sample at a time, and autograd.
PROBE = """
import copy, json, sys, torch
import distillzoo as dz
from distillzoo.models.causal_lm import tiny_qwen2
from distillzoo.models.generation import Sampling, decode
from distillzoo.data.shards import ConversationDataset
from distillzoo.training.streams import MixedStreams, Stream
from distillzoo import train

cfg_path, data, a = sys.argv[1], sys.argv[2], float(sys.argv[3])
result = train(dz.load_config(cfg_path))
logged = json.loads((result.output_dir / "metrics.jsonl").read_text().splitlines()[0])
tok = dz.load_tokenizer()
examples = MixedStreams([Stream("q", ConversationDataset(data, "chat", tok, system=None), repeat=1)], seed=3).take(4)
student = tiny_qwen2(**STUDENT, tie_word_embeddings=True)
teacher = tiny_qwen2(**TEACHER, tie_word_embeddings=True)
prompts = [ex["input_ids"][:ex["loss_mask"].tolist().index(True)].tolist() for ex in examples]
samples = decode(student, tok, prompts, Sampling(4, 1.0, seed=3 * 1_000_003), ids=[ex["id"] for ex in examples],
                 mix=(teacher, a) if a else None)
s64, t64 = copy.deepcopy(student).double(), copy.deepcopy(teacher).double()
total, n, rkl, reward = 0.0, 0, 0.0, 0.0
for prompt, (answer, finish) in zip(prompts, samples):
    reply = answer + ([tok.im_end_id] if finish == "stop" else [])
    ids = torch.tensor([prompt + reply])
    scored = slice(len(prompt) - 1, len(prompt) - 1 + len(reply))
    log_q_all = torch.log_softmax(s64(input_ids=ids).logits[0, scored], -1)
    with torch.no_grad():
        log_p_all = torch.log_softmax(t64(input_ids=ids).logits[0, scored], -1)
    target = torch.tensor(reply)[:, None]
    log_q, log_p = log_q_all.gather(1, target)[:, 0], log_p_all.gather(1, target)[:, 0]
    single = (log_q_all.exp() * (log_q_all - log_p_all)).sum(-1)          # KL(q_t || p_t)
    r = (log_p - log_q).detach()
    future = torch.stack([r[t + 1:].mean() if t + 1 < len(reply) else r.new_zeros(()) for t in range(len(reply))])
    w = (log_q.detach().exp() / ((1 - a) * log_q.detach().exp() + a * log_p.exp()))
    total = total + (w * single - w * future * log_q).sum()
    n += len(reply)
    rkl += float(single.sum())
    reward += float(r.sum())
loss = total / n
loss.backward()
grad_norm = float(torch.sqrt(sum((p.grad ** 2).sum() for p in s64.parameters())))
print(json.dumps({"logged": logged, "loss": float(loss), "grad_norm": grad_norm, "rkl": rkl / n,
                  "reward": reward / n, "tokens": n}))
"""


@pytest.mark.slow
def test_listed_with_its_package(installed, tmp_path):
    out = run(["-m", "distillzoo", "algorithms"], tmp_path, installed)
    rows = {line.split()[0]: line.split()[1:3] for line in out.splitlines()[1:]}
    assert rows["minillm"] == ["distillzoo-minillm", "instruction"]
    assert rows["distill"] == ["distillzoo", "instruction"]
    plugins = {p["name"]: p for p in json.loads(run(["-m", "distillzoo", "plugins"], tmp_path, installed))}
    assert plugins["minillm"]["algorithms"] == ["minillm"] and plugins["minillm"]["package"] == "distillzoo-minillm"


@pytest.mark.slow
@pytest.mark.parametrize("teacher_mix", [0.0, 0.5])
def test_first_step_is_minillm_s_surrogate_and_gradient_from_full_logits(installed, tmp_path, teacher_mix):
    cfg, data = write_config(tmp_path, teacher_mix)
    probe = tmp_path / "probe.py"
    probe.write_text(f"STUDENT = {STUDENT!r}\nTEACHER = {TEACHER!r}\n" + PROBE)
    got = json.loads(run([str(probe), str(cfg), str(data), str(teacher_mix)], tmp_path, installed).splitlines()[-1])
    logged = got["logged"]
    assert logged["tokens"] == got["tokens"]
    # the surrogate is a small difference of per-token terms of about 10 (fp32 against float64): ~1e-6 apart
    assert logged["loss"] == pytest.approx(got["loss"], rel=1e-5, abs=1e-5)
    assert logged["grad_norm"] == pytest.approx(got["grad_norm"], rel=1e-4)
    assert logged["rkl"] == pytest.approx(got["rkl"], rel=1e-5)
    assert logged["reward"] == pytest.approx(got["reward"], rel=1e-4)


@pytest.mark.slow
def test_distillzoo_train_selects_it_by_name(installed, tmp_path):
    cfg, _ = write_config(tmp_path, 0.2, steps=3)
    out = run(["-m", "distillzoo", "train", str(cfg)], tmp_path, installed)
    assert "trained 3 steps" in out
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in rows)


@pytest.mark.slow
def test_its_own_tests_pass(installed, tmp_path):
    out = run(["-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(EXAMPLE),
               "-c", str(EXAMPLE / "pyproject.toml"), str(EXAMPLE / "tests")], tmp_path, installed)
    assert "5 passed" in out
