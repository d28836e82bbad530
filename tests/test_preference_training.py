"""distillzoo train with preference algorithms (dpo, simpo, dpkd) against hand-written loops over full logits."""

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import distillzoo as dz
from distillzoo.models.causal_lm import tiny_qwen2
from distillzoo.data.records import IGNORE_INDEX
from distillzoo.data.pairs import PreferenceDataset, collate_preference
from distillzoo.models.generation import Sampling, decode
from distillzoo.data.shards import ConversationDataset
from distillzoo.training.streams import MixedStreams, Stream
from distillzoo import train
from helpers import train_killed_at_checkpoint, write_jsonl

STUDENT = {"hidden_size": 32, "num_layers": 1, "seed": 0}
REFERENCE = {"hidden_size": 32, "num_layers": 1, "seed": 7}
TEACHER = {"hidden_size": 48, "num_layers": 1, "seed": 1}
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def pair_records(n=12):
    """Replies of different lengths on both sides, so per-token averages (ipo, simpo, rpo) differ from sums."""
    return [{"id": f"p{a}", "prompt": f"{a} + 1 = ?", "chosen": str(a + 1) if a % 2 else f"{a + 1}, {WORDS[(a + 1) % 10]}",
             "rejected": f"I think {a + 2}" if a % 3 else str(a + 3)} for a in range(n)]


def chat_records(n=8):
    return [{"id": f"q{a}", "messages": [{"role": "user", "content": f"{a} + 1 = ?"},
                                         {"role": "assistant", "content": str(a + 1)}]} for a in range(n)]


def config(tmp_path, objective, *, data=None, fmt="preference", **train_kw):
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = data or write_jsonl(tmp_path / "pairs.jsonl", pair_records())
    return {"objective": objective, "seed": 0, "student": {"tiny": STUDENT},
            "data": {"streams": [{"name": "p", "path": str(data), "format": fmt, "repeat": 1}], "max_length": 64,
                     "system": None},
            "train": {"steps": 4, "batch_size": 4, "micro_batch_size": 2, "lr": 1e-3, "warmup_steps": 0,
                      "min_lr_ratio": 1.0, "max_grad_norm": 1.0, "log_every": 1, "progress": False,
                      "precision": "fp32", **train_kw},
            "output_dir": str(tmp_path / "run"), "resume": "never"}


def metrics(run):
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def naive_logps(model, batch):
    """Summed log-probs [2B] of the labelled tokens from the model's full logits, and the counts."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].float()
    targets = batch.labels[:, 1:]
    mask = targets != IGNORE_INDEX
    picked = torch.log_softmax(logits, -1).gather(-1, torch.where(mask, targets, 0)[..., None]).squeeze(-1)
    return torch.where(mask, picked, 0.0).sum(-1), mask.sum(-1).float()


def hand_loss(kind, params, pc, pr, rc, rr, cl, rl):
    """Per-pair losses of SPEC section 3, spelled out."""
    beta = params.get("beta", 2.0 if kind == "simpo" else 0.1)
    ls = torch.nn.functional.logsigmoid
    if kind == "simpo":
        gamma = params.get("gamma", 0.5)
        return -ls(beta * pc / cl - beta * pr / rl - gamma), beta * pc / cl, beta * pr / rl
    loss_type, eps = params.get("loss_type", "sigmoid"), params.get("eps", 0.0)
    chosen, rejected = pc - rc, pr - rr
    if loss_type == "ipo":
        chosen, rejected = pc / cl - rc / cl, pr / rl - rr / rl
    d = chosen - rejected
    if loss_type == "sigmoid":
        loss = -(1 - eps) * ls(beta * d) - eps * ls(-beta * d)
    elif loss_type == "hinge":
        loss = torch.relu(1 - beta * d)
    elif loss_type == "ipo":
        loss = (d - 1 / (2 * beta)) ** 2
    else:
        loss = (-(1 - eps) * ls(beta * d) + eps * ls(-beta * d)) / (1 - 2 * eps)
    loss = loss + params.get("rpo_alpha", 0.0) * (-pc / cl)
    return loss, beta * chosen, beta * rejected


def hand_written_loop(tmp_path, kind, params, steps, batch_size=4, lr=1e-3):
    """The same data order and optimiser, losses from materialised logits, one backward per step."""
    tok = dz.load_tokenizer()
    dataset = PreferenceDataset(tmp_path / "pairs.jsonl", tok, max_length=64, system=None)
    streams = MixedStreams([Stream("p", dataset, repeat=1)], seed=0)
    student = tiny_qwen2(**STUDENT, tie_word_embeddings=True).train()
    reference = tiny_qwen2(**REFERENCE, tie_word_embeddings=True).eval() if kind != "simpo" else None
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0, fused=True)
    losses, first = [], None
    for _ in range(steps):
        batch = collate_preference(streams.take(batch_size), tok.pad_id)
        n = batch.n_pairs
        logps, lengths = naive_logps(student, batch)
        rc = rr = None
        if reference is not None:
            with torch.no_grad():
                ref, _ = naive_logps(reference, batch)
            rc, rr = ref[:n], ref[n:]
        per_pair, chosen, rejected = hand_loss(kind, params, logps[:n], logps[n:], rc, rr, lengths[:n], lengths[n:])
        loss = per_pair.mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if first is None:
            chosen, rejected, logps = chosen.detach(), rejected.detach(), logps.detach()
            first = {"rewards/chosen": float(chosen.mean()), "rewards/rejected": float(rejected.mean()),
                     "rewards/margins": float((chosen - rejected).mean()),
                     "rewards/accuracies": float((chosen > rejected).float().mean()),
                     "logps/chosen": float(logps[:n].mean()), "logps/rejected": float(logps[n:].mean())}
            if params.get("rpo_alpha"):
                first["nll_loss"] = float((-logps[:n] / lengths[:n]).mean())
            first = {k: float(v) for k, v in first.items()}
    return losses, first, student.state_dict()


@pytest.mark.parametrize("kind, params", [
    ("dpo", {"loss_type": "sigmoid"}),
    ("dpo", {"loss_type": "hinge", "beta": 0.5}),
    ("dpo", {"loss_type": "ipo", "beta": 0.5}),
    ("dpo", {"loss_type": "robust", "eps": 0.2}),
    ("dpo", {"loss_type": "sigmoid", "rpo_alpha": 0.5}),
    ("simpo", {}),
], ids=["sigmoid", "hinge", "ipo", "robust", "rpo", "simpo"])
def test_train_matches_a_hand_written_loop_over_materialised_logits(tmp_path, kind, params):
    raw = config(tmp_path, {"name": kind, **params})
    if kind != "simpo":
        raw["reference"] = {"tiny": REFERENCE}
    result = train(dz.load_config(raw))
    rows = metrics(result.output_dir)
    want, first, weights = hand_written_loop(tmp_path, kind, params, steps=4)
    assert [r["loss"] for r in rows] == pytest.approx(want, rel=1e-5)
    assert rows[-1]["loss"] != rows[0]["loss"]
    assert [r["pairs"] for r in rows] == [4, 4, 4, 4]
    for key, value in first.items():  # rewards are differences of fp32 sums of about -40: ~4e-6 apart
        assert rows[0][key] == pytest.approx(value, rel=1e-5, abs=1e-5), key
    assert ("nll_loss" in rows[0]) == bool(params.get("rpo_alpha"))
    got = load_file(result.output_dir / "final" / "model.safetensors")
    for key, value in got.items():
        torch.testing.assert_close(value, weights[key], rtol=0, atol=2e-5)


@pytest.fixture(scope="module")
def reference_columns(tmp_path_factory):
    """The pairs with reference log-probs of the student's starting weights, as a column and as a cache."""
    from distillzoo.teacher.reference_cache import write_reference_cache

    root = tmp_path_factory.mktemp("refs")
    write_jsonl(root / "pairs.jsonl", pair_records())
    tok = dz.load_tokenizer()
    dataset = PreferenceDataset(root / "pairs.jsonl", tok, max_length=64, system=None)
    initial = tiny_qwen2(**STUDENT, tie_word_embeddings=True)
    cache = write_reference_cache(root / "ref.jsonl", initial, dataset, batch_size=4)
    rows = []
    for record in pair_records():
        chosen, rejected = cache.entries[record["id"]][:2]
        rows.append({**record, "reference_chosen_logps": chosen, "reference_rejected_logps": rejected})
    write_jsonl(root / "with-columns.jsonl", rows)
    return root


@pytest.mark.parametrize("source", ["model", "teacher", "data", "cache"])
def test_every_reference_source_gives_the_frozen_initial_copy_s_curve(tmp_path, reference_columns, source):
    """initial (TRL's default: a frozen copy of the starting student) against the other four sources of log rho."""
    root = reference_columns
    initial = train(dz.load_config(config(tmp_path / "initial", {"name": "dpo"}, data=root / "pairs.jsonl")))
    raw = config(tmp_path / source, {"name": "dpo"}, data=root / ("with-columns.jsonl" if source == "data" else
                                                                  "pairs.jsonl"))
    raw["algorithm"] = {"name": "preference", "reference": source}
    if source == "model":
        raw["reference"] = {"tiny": STUDENT}  # the same starting weights, as a separate model
    elif source == "teacher":
        raw["teacher"] = {"tiny": STUDENT}
    elif source == "cache":
        raw["reference"] = {"cache": str(root / "ref.jsonl")}
    other = train(dz.load_config(raw))
    a, b = metrics(initial.output_dir), metrics(other.output_dir)
    assert a[0]["rewards/margins"] == 0.0  # the policy starts at the reference
    assert a[-1]["rewards/margins"] > 0  # and moves towards the chosen replies
    # the cache and the column hold fp32-rounded sums from a batch of 4 (padding differs): ~1e-7
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-5)
    assert [r["rewards/margins"] for r in b] == pytest.approx([r["rewards/margins"] for r in a], rel=1e-3, abs=1e-6)


def test_held_out_pairs_report_loss_and_rewards(tmp_path):
    raw = config(tmp_path, {"name": "dpo"}, steps=2, eval_every=2)
    raw["data"]["eval"] = {"name": "held-out", "path": raw["data"]["streams"][0]["path"], "format": "preference"}
    rows = metrics(train(dz.load_config(raw)).output_dir)
    assert {"eval/loss", "eval/rewards/accuracies", "eval/rewards/margins", "eval/logps/chosen"} <= rows[-1].keys()
    # evaluated after step 2's update on all 12 pairs, from the trained weights: not the first step's log 2
    assert rows[-1]["eval/loss"] != pytest.approx(math.log(2), abs=1e-6)


def online_config(tmp_path, **train_kw):
    data = write_jsonl(tmp_path / "answers.jsonl", chat_records())
    raw = config(tmp_path, {"name": "dpkd", "beta": 0.5}, data=data, fmt="chat", **train_kw)
    raw["teacher"] = {"tiny": TEACHER}
    raw["algorithm"] = {"name": "dpkd", "online": True, "max_new_tokens": 3}
    raw["seed"] = 5
    return raw


def test_online_dpkd_first_step_is_the_hand_loss_on_independently_decoded_samples(tmp_path, tok):
    result = train(dz.load_config(online_config(tmp_path, steps=1)))
    logged = metrics(result.output_dir)[0]
    dataset = ConversationDataset(tmp_path / "answers.jsonl", "chat", tok, system=None)
    examples = MixedStreams([Stream("p", dataset, repeat=1)], seed=5).take(4)
    student = tiny_qwen2(**STUDENT, tie_word_embeddings=True)
    teacher = tiny_qwen2(**TEACHER, tie_word_embeddings=True)
    by_id = {r["id"]: r for r in chat_records()}
    prompts = [tok.encode_prompt(by_id[ex["id"]]["messages"][:1], None) for ex in examples]
    samples = decode(student, tok, prompts, Sampling(3, 1.0, seed=5 * 1_000_003), ids=[ex["id"] for ex in examples])
    losses, margins = [], []
    with torch.no_grad():
        for prompt, ex, (answer, finish) in zip(prompts, examples, samples):
            chosen = tok.encode_response(by_id[ex["id"]]["messages"][1]["content"])  # the teacher's answer (y_w)
            rejected = answer + ([tok.im_end_id] if finish == "stop" else [])  # the student's own (y_l)

            def logp(model, reply):
                ids = torch.tensor([prompt + reply])
                lp = torch.log_softmax(model(input_ids=ids).logits[0, len(prompt) - 1:-1].double(), -1)
                return float(lp.gather(-1, torch.tensor(reply)[:, None]).sum())

            h = (logp(student, chosen) - logp(teacher, chosen)) - (logp(student, rejected) - logp(teacher, rejected))
            losses.append(math.log1p(math.exp(-0.5 * h)))
            margins.append(0.5 * h)
    assert logged["pairs"] == 4
    assert logged["loss"] == pytest.approx(sum(losses) / 4, rel=1e-5)
    assert logged["rewards/margins"] == pytest.approx(sum(margins) / 4, rel=1e-4, abs=1e-6)


def sigkill_then_resume(tmp_path, raw, steps=12, every=3):
    straight_raw = copy.deepcopy(raw)
    straight_raw["output_dir"] = str(tmp_path / "straight")
    straight_raw["train"].update(steps=steps, checkpoint_every=every)
    straight = train(dz.load_config(straight_raw))
    raw = copy.deepcopy(straight_raw)
    raw["output_dir"], raw["resume"] = str(tmp_path / "killed"), "auto"
    cfg_path = tmp_path / "killed.yaml"
    cfg_path.write_text(json.dumps(raw))
    run = Path(raw["output_dir"])
    train_killed_at_checkpoint(cfg_path, run, every)
    resumed = train(dz.load_config(cfg_path))
    assert [r["step"] for r in metrics(run)] == list(range(1, steps + 1))
    a = load_file(straight.output_dir / "final" / "model.safetensors")
    b = load_file(resumed.output_dir / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6)
    assert [r["loss"] for r in metrics(run)] == pytest.approx([r["loss"] for r in metrics(straight.output_dir)],
                                                              rel=1e-6)


def test_sigkill_then_resume_auto_reaches_the_uninterrupted_weights_dpo(tmp_path):
    sigkill_then_resume(tmp_path, config(tmp_path, {"name": "dpo", "loss_type": "ipo"}))


def test_sigkill_then_resume_auto_reaches_the_uninterrupted_weights_online_dpkd(tmp_path):
    """The student's samples are drawn again after the resume, from the same seeds: the same pairs."""
    sigkill_then_resume(tmp_path, online_config(tmp_path), steps=9)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_gloo_processes_follow_the_single_process_dpo_curve(tmp_path, parallel):
    """torchrun --nproc_per_node 2: each rank scores two of the step's four pairs (FSDP2 shards the reference too)."""
    raw = config(tmp_path / "two", {"name": "dpo"}, micro_batch_size=None, parallel=parallel)
    raw["reference"] = {"tiny": REFERENCE}
    single_ref = config(tmp_path / "one-ref", {"name": "dpo"}, micro_batch_size=None)
    single_ref["reference"] = {"tiny": REFERENCE}
    one = metrics(train(dz.load_config(single_ref)).output_dir)
    cfg_path = tmp_path / "two.yaml"
    cfg_path.write_text(json.dumps(raw))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "distillzoo",
                           "train", str(cfg_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-6000:]
    two = metrics(raw["output_dir"])
    assert [r["pairs"] for r in two] == [4, 4, 4, 4]  # the global batch, two pairs per rank
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], abs=1e-6)
    assert [r["rewards/accuracies"] for r in two] == [r["rewards/accuracies"] for r in one]
    a = load_file(Path(single_ref["output_dir"]) / "final" / "model.safetensors")
    b = load_file(Path(raw["output_dir"]) / "final" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-5)
