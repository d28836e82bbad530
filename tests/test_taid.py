"""TAID's schedule against the paper's update worked by hand, its loss at the weight the schedule reached, and a
SIGKILLed run resumed along the same schedule to the same weights."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import distillzoo as dz
from distillzoo import train
from helpers import taid_reference, train_killed_at_checkpoint, write_jsonl


def test_the_schedule_follows_the_papers_update_worked_by_hand():
    taid = dz.objective("taid", t_start=0.4, t_end=1.0, alpha=0.5, beta=0.9)
    seen = []
    for step, loss in enumerate([2.0, 1.5, 1.2, 1.3]):
        taid.begin_step(step, 10)
        taid.end_step({"loss": loss})
        seen.append(taid.t)
    # step 0: J is only remembered, t stays 0.4
    # step 1: d = (2.0 - 1.5) / 2.0 = 0.25, m = 0.1 * 0.25 = 0.025, s(m) = 0.5062497,
    #         t + alpha s(m) (1 - t) = 0.4 + 0.5 * 0.5062497 * 0.6 = 0.5518749 > linear 0.4 + 0.6 / 10 = 0.46
    # step 2: d = 0.3 / 1.5 = 0.2, m = 0.9 * 0.025 + 0.1 * 0.2 = 0.0425, s(m) = 0.5106234,
    #         0.5518749 + 0.5 * 0.5106234 * 0.4481251 = 0.6662865 > 0.52
    # step 3: d = -0.1 / 1.2 = -0.0833333, m = 0.9 * 0.0425 - 0.0083333 = 0.0299167, s(m) = 0.5074786,
    #         0.6662865 + 0.5 * 0.5074786 * 0.3337135 = 0.7509627 > 0.58
    assert seen == pytest.approx([0.4, 0.5518749, 0.6662865, 0.7509627], abs=1e-7)
    assert taid.progress_state() == {"t": seen[-1], "previous": 1.3, "momentum": pytest.approx(0.0299167, abs=1e-7)}


def test_the_linear_schedule_is_a_floor_and_t_end_a_ceiling():
    slow = dz.objective("taid", t_start=0.2, t_end=0.8, alpha=1e-4)
    fixed = dz.objective("taid", t_start=0.2, t_end=0.8, adaptive=False)
    fast = dz.objective("taid", t_start=0.2, t_end=0.8, alpha=1.0, beta=0.0)
    for step, loss in enumerate([3.0, 1.0, 0.5, 0.25]):
        for taid in (slow, fixed, fast):
            taid.begin_step(step, 4)
            taid.end_step({"loss": loss})
    assert slow.t == pytest.approx(0.2 + 0.6 * 3 / 4) and fixed.t == pytest.approx(0.2 + 0.6 * 3 / 4)
    assert fast.t == 0.8  # s(m) of a halving loss each step pushes t past t_end; it stops there


def test_the_loss_is_the_kl_to_the_interpolation_at_the_weight_reached():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(5, 151_936, generator=g, dtype=torch.float64) * 3, torch.randn(
        5, 151_936, generator=g, dtype=torch.float64) * 3
    labels = torch.zeros(5, dtype=torch.long)
    taid = dz.objective("taid", t_start=0.3, alpha=0.5)
    for step, loss in enumerate([2.0, 1.0]):
        taid.begin_step(step, 100)
        taid.end_step({"loss": loss})
    assert taid.t > 0.3
    s = student.clone().requires_grad_(True)
    got = taid(s, teacher, labels)
    got.backward()
    ref_s = student.clone().requires_grad_(True)
    want = taid_reference(ref_s, teacher, t_start=taid.t).mean()
    want.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-9)
    torch.testing.assert_close(s.grad, ref_s.grad, rtol=1e-7, atol=1e-12)


def _config(root: Path, **train_kw) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    rows = [{"id": f"q{a}", "messages": [{"role": "user", "content": f"What is {a} + {a + 2}?" if a % 2 else
                                          f"{a} 加 {a + 2} 等于几？"},
                                         {"role": "assistant", "content": str(2 * a + 2)}]} for a in range(8)]
    data = write_jsonl(root / "train.jsonl", rows)
    return {"objective": {"name": "taid", "t_start": 0.4, "alpha": 0.2, "beta": 0.5},
            "student": {"tiny": {"hidden_size": 32, "num_layers": 1, "seed": 0}},
            "teacher": {"tiny": {"hidden_size": 48, "num_layers": 1, "seed": 1}},
            "data": {"streams": [{"name": "s", "path": str(data), "format": "chat", "repeat": 1}], "system": None},
            "train": {"steps": 6, "batch_size": 4, "lr": 2e-2, "min_lr_ratio": 1.0, "max_grad_norm": None,
                      "log_every": 1, "progress": False, "eval_every": 0, **train_kw},
            "output_dir": str(root / "run"), "seed": 3}


def test_a_killed_taid_run_resumes_along_the_same_schedule_to_the_same_weights(tmp_path):
    from safetensors.torch import load_file

    straight = train(dz.load_config(_config(tmp_path / "straight", checkpoint_every=3)))
    raw = _config(tmp_path / "killed", checkpoint_every=3)
    path = tmp_path / "killed.yaml"
    path.write_text(json.dumps(raw))
    run = Path(raw["output_dir"])
    train_killed_at_checkpoint(path, run, 3)
    state = torch.load(run / "checkpoints" / "step-00000003" / "state.pt", weights_only=False)
    schedule = state["algorithm"]["objective"]
    assert set(schedule) == {"t", "previous", "momentum"} and schedule["t"] > 0.4 and math.isfinite(schedule["previous"])
    resumed = train(dz.load_config(path))
    losses = lambda r: [json.loads(line)["loss"] for line in (Path(r) / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert losses(run) == pytest.approx(losses(straight.output_dir), rel=1e-6)
    a = load_file(Path(straight.output_dir) / "final" / "model.safetensors")
    b = load_file(Path(resumed.output_dir) / "final" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6)
