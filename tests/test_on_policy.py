"""On-policy mixing (GKD's lambda): with probability lambda a step trains on the student's own samples."""

import json
from pathlib import Path

import pytest
import torch

import distillzoo as dz
from distillzoo.models.causal_lm import tiny_qwen2
from distillzoo.models.generation import Sampling, decode
from distillzoo.data.shards import ConversationDataset
from distillzoo.training.streams import MixedStreams, Stream
from distillzoo.plugins.algorithms.distill import on_policy_step as _on_policy_step
from distillzoo import train
from helpers import write_jsonl

STUDENT = {"hidden_size": 32, "num_layers": 1, "seed": 0}
TEACHER = {"hidden_size": 48, "num_layers": 1, "seed": 1}


def records():
    return [{"id": f"q{a}", "messages": [{"role": "user", "content": f"{a} + 1 = ?"},
                                         {"role": "assistant", "content": str(a + 1)}]} for a in range(8)]


def config(tmp_path, objective="fkl", **train_kw):
    data = write_jsonl(tmp_path / "train.jsonl", records())
    return {"objective": {"name": objective}, "seed": 5,
            "algorithm": {"name": "distill", "on_policy": 1.0, "max_new_tokens": 3},
            "student": {"tiny": STUDENT}, "teacher": {"tiny": TEACHER},
            "data": {"streams": [{"name": "q", "path": str(data), "format": "chat", "repeat": 1}], "system": None},
            "train": {"steps": 1, "batch_size": 4, "lr": 1e-2, "log_every": 1, "progress": False, **train_kw},
            "output_dir": str(tmp_path / "run"), "resume": "never"}


def first_loss(run):
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[0])


def test_the_first_on_policy_step_is_the_teacher_s_kl_on_the_student_s_samples(tmp_path, tok):
    result = train(dz.load_config(config(tmp_path)))
    logged = first_loss(result.output_dir)

    # independently: the same first batch, the initial student's samples, the KL from full logits
    dataset = ConversationDataset(tmp_path / "train.jsonl", "chat", tok, system=None)
    examples = MixedStreams([Stream("q", dataset, repeat=1)], seed=5).take(4)
    student = tiny_qwen2(**STUDENT, tie_word_embeddings=True)
    teacher = tiny_qwen2(**TEACHER, tie_word_embeddings=True)
    by_id = {r["id"]: r for r in records()}
    prompts = [tok.encode_prompt(by_id[ex["id"]]["messages"][:1], None) for ex in examples]
    samples = decode(student, tok, prompts, Sampling(3, 1.0, seed=5 * 1_000_003 + 0), ids=[ex["id"] for ex in examples])
    total, count = 0.0, 0
    with torch.no_grad():
        for prompt, (answer, finish) in zip(prompts, samples):
            reply = answer + ([tok.im_end_id] if finish == "stop" else [])
            ids = torch.tensor([prompt + reply])
            scored = slice(len(prompt) - 1, len(prompt) - 1 + len(reply))
            log_q = torch.log_softmax(student(input_ids=ids).logits[0, scored].double(), -1)
            log_p = torch.log_softmax(teacher(input_ids=ids).logits[0, scored].double(), -1)
            total += float((log_p.exp() * (log_p - log_q)).sum())
            count += len(reply)
    assert logged["tokens"] == count
    assert logged["loss"] == pytest.approx(total / count, rel=1e-4)


def test_lambda_picks_steps_alike_on_every_rank_and_in_proportion():
    picks = [bool(_on_policy_step(3, step, 0.3)) for step in range(2000)]
    assert picks == [bool(_on_policy_step(3, step, 0.3)) for step in range(2000)]  # a function of (seed, step)
    assert sum(picks) / len(picks) == pytest.approx(0.3, abs=0.04)
    assert not any(_on_policy_step(3, step, 0.0) for step in range(200))


@pytest.mark.parametrize("objective", ["fkl", "rkl", "jsd", "skl", "srkl", "tvd", "dpkd_token", "ce"])
def test_every_logit_objective_trains_on_policy(tmp_path, objective):
    result = train(dz.load_config(config(tmp_path, objective, steps=2)))
    rows = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert all(r["tokens"] <= 4 * 4 for r in rows)  # at most 3 sampled tokens + <|im_end|> per example


@pytest.mark.parametrize("change, message", [
    (lambda c: c["algorithm"].update(on_policy=1.5),
     r"algorithm.on_policy \(algorithm 'distill'\): parameter 'on_policy' = 1.5 is out of range \[0, 1\]"),
    (lambda c: c["algorithm"].update(temperature=-1.0),
     r"algorithm.temperature \(algorithm 'distill'\): parameter 'temperature' = -1.0 is out of range \[0, inf\)"),
    (lambda c: c.update(teacher={"cache": "/somewhere"}),
     r"algorithm.on_policy: a teacher cache covers the data's responses only"),
    # keys of the shared train section that are the distill algorithm's own parameters: refused, naming algorithm.*
    (lambda c: c["train"].update(on_policy=0.5),
     r"train.on_policy is an algorithm's parameter now: use algorithm.on_policy \(algorithm: \{name: distill, "
     r"on_policy: 0.5\}\)"),
    (lambda c: c["train"].update(on_policy_max_new_tokens=8), r"use algorithm.max_new_tokens \(of algorithm 'distill'\)"),
    (lambda c: c["train"].update(on_policy_temperature=0.7), r"use algorithm.temperature \(of algorithm 'distill'\)"),
])
def test_bad_on_policy_configs(tmp_path, change, message):
    raw = config(tmp_path)
    change(raw)
    with pytest.raises(dz.ConfigError, match=message):
        train(dz.load_config(raw))


@pytest.mark.parametrize("algorithm", ["distill", "dpkd-online"])
def test_sampling_under_fsdp2_follows_the_ddp_loss_curve(tmp_path, algorithm):
    """Two gloo processes: the student samples every step (GKD's lambda = 1, or DPKD's online y_l) with its
    root unit gathered; FSDP2 and DDP draw the same samples and so follow one loss curve."""
    import subprocess
    import sys

    curves = {}
    for parallel in ("ddp", "fsdp"):
        (tmp_path / parallel).mkdir()
        raw = config(tmp_path / parallel, steps=3)
        if algorithm == "dpkd-online":
            raw.update(objective={"name": "dpkd", "beta": 0.5},
                       algorithm={"name": "dpkd", "online": True, "max_new_tokens": 3})
        raw["train"]["parallel"] = parallel
        path = tmp_path / f"{parallel}.yaml"
        path.write_text(json.dumps(raw))
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
                               "distillzoo", "train", str(path)], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-5000:]
        curves[parallel] = [(r["loss"], r["tokens"]) for r in
                            map(json.loads, (Path(raw["output_dir"]) / "metrics.jsonl").read_text().splitlines())]
    assert len(curves["fsdp"]) == 3
    assert [t for _, t in curves["fsdp"]] == [t for _, t in curves["ddp"]]  # the same samples, token for token
    assert [v for v, _ in curves["fsdp"]] == pytest.approx([v for v, _ in curves["ddp"]], abs=1e-5)
