"""distillzoo train: config checks before any model loads, accumulation, exact resume after SIGKILL, DDP."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import distillzoo as dz
from distillzoo import train
from helpers import assert_trained_alike, train_killed_at_checkpoint, write_jsonl


def arithmetic(n_a=10):
    return [{"messages": [{"role": "user", "content": f"{a} + {b} = ?"}, {"role": "assistant", "content": str(a + b)}]}
            for a in range(n_a) for b in range(3)]


def config(tmp_path, **train_overrides):
    tmp_path.mkdir(parents=True, exist_ok=True)
    train_path = write_jsonl(tmp_path / "train.jsonl", arithmetic())
    eval_path = write_jsonl(tmp_path / "eval.jsonl", arithmetic(2))
    return {
        "objective": {"name": "fkl"},
        "student": {"tiny": {"hidden_size": 32, "num_layers": 1, "seed": 0}},
        "teacher": {"tiny": {"hidden_size": 48, "num_layers": 1, "seed": 1}},
        "data": {"streams": [{"name": "arith", "path": str(train_path), "format": "chat", "repeat": 1}],
                 "eval": {"name": "eval", "path": str(eval_path), "format": "chat"}, "max_length": 64},
        "train": {"steps": 8, "batch_size": 4, "lr": 1e-2, "warmup_steps": 2, "checkpoint_every": 2,
                  "log_every": 1, "progress": False, **train_overrides},
        "output_dir": str(tmp_path / "run"),
        "seed": 0,
    }


def metrics(run):
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def test_a_run_trains_logs_and_saves_a_loadable_student(tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = dz.load_config(config(tmp_path, eval_every=4))
    result = train(cfg)
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, 9)) and result.steps == 8
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert {"eval/nll", "eval/kl_teacher_student"} <= rows[3].keys()
    assert rows[-1]["eval/kl_teacher_student"] < rows[3]["eval/kl_teacher_student"]
    assert [r["lr"] for r in rows[:3]] == pytest.approx([5e-3, 1e-2, 1e-2])
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    assert student.config.vocab_size == 151_936
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-00000004", "step-00000006"]


def test_accumulation_is_normalised_by_the_step_s_valid_tokens(tmp_path):
    whole = train(dz.load_config(config(tmp_path / "a", checkpoint_every=0, steps=3)))
    split = train(dz.load_config(config(tmp_path / "b", checkpoint_every=0, steps=3, micro_batch_size=1)))
    a, b = metrics(whole.output_dir), metrics(split.output_dir)
    # Padding differs (one example per micro-batch), so fp32 attention rounds differently: ~1e-7 absolute on a
    # per-token KL of ~0.016. A per-micro-batch mean would weigh 2- and 3-token answers unequally instead.
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], abs=1e-6)
    assert [r["tokens"] for r in a] == [r["tokens"] for r in b]
    # the first step's gradient (before Adam, whose sign-like update of near-zero gradients amplifies rounding)
    assert a[0]["grad_norm"] == pytest.approx(b[0]["grad_norm"], rel=1e-4)


def test_bf16_autocast_follows_the_fp32_loss_curve(tmp_path):
    """precision=bf16 (the default on CUDA): decoders under autocast, bf16 operands for the loss head."""
    fp32 = metrics(train(dz.load_config(config(tmp_path / "a", steps=4, checkpoint_every=0))).output_dir)
    bf16 = metrics(train(dz.load_config(config(tmp_path / "b", steps=4, checkpoint_every=0,
                                               precision="bf16"))).output_dir)
    # bf16 keeps 8 bits of mantissa: the per-token KL agrees to a few percent, not to fp32 rounding
    assert [r["loss"] for r in bf16] == pytest.approx([r["loss"] for r in fp32], rel=5e-2)
    assert [r["loss"] for r in bf16] != [r["loss"] for r in fp32]  # it did run in bf16


def test_sigkill_then_resume_auto_reaches_the_uninterrupted_weights(tmp_path):
    straight = train(dz.load_config(config(tmp_path / "straight", steps=12, checkpoint_every=3)))
    raw = config(tmp_path / "killed", steps=12, checkpoint_every=3)
    cfg_path = tmp_path / "killed.yaml"
    cfg_path.write_text(json.dumps(raw))  # JSON is YAML
    run = Path(raw["output_dir"])
    train_killed_at_checkpoint(cfg_path, run, 3)
    resumed = train(dz.load_config(cfg_path))
    assert [r["step"] for r in metrics(run)] == list(range(1, 13))
    a = load_file(straight.output_dir / "final" / "model.safetensors")
    b = load_file(resumed.output_dir / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6)
    assert [r["loss"] for r in metrics(run)] == pytest.approx([r["loss"] for r in metrics(straight.output_dir)], rel=1e-6)


@pytest.mark.parametrize("change, message", [
    (lambda c: c["objective"].update(name="fkll"), r"objective.name: unknown objective 'fkll'"),
    (lambda c: c["data"]["streams"][0].update(format="dolyy"), r"data.streams\[0\].format: unknown data format 'dolyy'.*Did you mean 'dolly'"),
    (lambda c: c["train"].update(stepz=3), r"unknown config key 'train.stepz'"),
    (lambda c: c["data"]["streams"][0].update(path="/nope.jsonl"), r"data.streams\[0\].path: '/nope.jsonl' does not exist"),
    (lambda c: c.pop("teacher"), r"teacher: the objective needs a teacher"),
    (lambda c: c.update(objective={"name": "dpo"}), r"objective.name: 'dpo' is a preference objective"),
    (lambda c: c["train"].update(precision="fp16"), r"train.precision: 'fp16' is not one of \['auto', 'fp32', 'bf16'\]"),
    (lambda c: c["train"].update(parallel="zero3"), r"train.parallel: 'zero3' is not one of \['ddp', 'fsdp'\]"),
])
def test_bad_config_fails_before_any_model_is_loaded(tmp_path, monkeypatch, change, message):
    import distillzoo.models.causal_lm as causal_lm  # where models are built

    def no_models(*args, **kwargs):
        raise AssertionError("a model was built before the config was checked")

    monkeypatch.setattr(causal_lm, "tiny_qwen2", no_models)
    monkeypatch.setattr(causal_lm, "load_causal_lm", no_models)
    raw = config(tmp_path)
    change(raw)
    path = tmp_path / "bad.yaml"
    path.write_text(json.dumps(raw))
    with pytest.raises(dz.ConfigError, match=message):
        train(dz.load_config(path), where=str(path))


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_gloo_processes_follow_the_single_process_loss_curve(tmp_path, parallel):
    """torchrun --nproc_per_node 2 (gloo, each rank half of the global batch) against one process."""
    single = train(dz.load_config(config(tmp_path / "one", steps=4, checkpoint_every=0)))
    raw = config(tmp_path / "two", steps=4, checkpoint_every=2, parallel=parallel)
    cfg_path = tmp_path / "two.yaml"
    cfg_path.write_text(json.dumps(raw))

    def torchrun():
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
                               "distillzoo", "train", str(cfg_path)], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-6000:]
        return done

    done = torchrun()
    assert done.stdout.count("trained 4 steps") == 1  # rank 0 reports
    one, two = metrics(single.output_dir), metrics(raw["output_dir"])
    assert [r["tokens"] for r in one] == [r["tokens"] for r in two]  # the same global batches
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], abs=1e-6)
    assert two[-1]["loss"] < two[0]["loss"]
    a = load_file(single.output_dir / "final" / "model.safetensors")
    b = load_file(Path(raw["output_dir"]) / "final" / "model.safetensors")
    assert_trained_alike(a, b, lr=raw["train"]["lr"])
    # the checkpoint of step 2 (gathered from the shards under FSDP2) resumes into the same two ranks
    before = b
    assert "resumed from" in torchrun().stderr
    after = load_file(Path(raw["output_dir"]) / "final" / "model.safetensors")
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=1e-6)
    assert [r["step"] for r in metrics(raw["output_dir"])] == [1, 2, 3, 4]
