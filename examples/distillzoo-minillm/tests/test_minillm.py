import json
import math

import pytest
import torch

import distillzoo as dz
from distillzoo_minillm import MiniLLM, future_rewards, importance_weights


def test_future_rewards_by_hand():
    rewards = torch.tensor([[0.0, 1.0, 2.0, 4.0, 9.0], [3.0, 5.0, 7.0, 0.0, 0.0]])
    mask = torch.tensor([[False, True, True, True, False], [True, True, True, False, False]])
    # row 0 scores positions 1..3: after 1 -> 2 + 4, after 2 -> 4, after 3 -> nothing
    summed = future_rewards(rewards, mask, length_norm=False)
    assert summed.tolist() == [[0.0, 6.0, 4.0, 0.0, 0.0], [12.0, 7.0, 0.0, 0.0, 0.0]]
    averaged = future_rewards(rewards, mask, length_norm=True)
    assert averaged.tolist() == [[0.0, 3.0, 4.0, 0.0, 0.0], [6.0, 7.0, 0.0, 0.0, 0.0]]


def test_importance_weights_by_hand():
    log_q, log_p = torch.log(torch.tensor([0.5, 0.1])), torch.log(torch.tensor([0.25, 0.3]))
    a = 0.2
    want = [0.5 / (0.8 * 0.5 + 0.2 * 0.25), 0.1 / (0.8 * 0.1 + 0.2 * 0.3)]
    assert importance_weights(log_q, log_p, a).tolist() == pytest.approx(want, rel=1e-6)
    assert importance_weights(log_q, log_p, 0.0).tolist() == [1.0, 1.0]


def test_registered_under_its_package():
    spec = dz.algorithm_spec("minillm")
    assert spec.cls is MiniLLM and spec.package == "distillzoo-minillm"
    assert spec.validate_params({}) == {"teacher_mix": 0.2, "max_new_tokens": 64, "length_norm": True}


def config(tmp_path, objective="rkl", **algorithm):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{a}", "messages": [
        {"role": "user", "content": f"{a} + 1 = ?"}, {"role": "assistant", "content": str(a + 1)}]}) + "\n"
        for a in range(6)))
    return {"objective": {"name": objective}, "algorithm": {"name": "minillm", "max_new_tokens": 3, **algorithm},
            "student": {"tiny": {"hidden_size": 32, "num_layers": 1, "seed": 0}},
            "teacher": {"tiny": {"hidden_size": 48, "num_layers": 1, "seed": 1}},
            "data": {"streams": [{"name": "q", "path": str(data), "format": "chat", "repeat": 1}], "system": None},
            "train": {"steps": 2, "batch_size": 2, "lr": 1e-3, "log_every": 1, "progress": False},
            "output_dir": str(tmp_path / "run"), "resume": "never"}


def test_trains_by_name(tmp_path):
    result = dz.train(dz.load_config(config(tmp_path)))
    rows = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) and r["rkl"] > 0 for r in rows)
    assert all(0 < r["weight"] for r in rows)  # per-token importance weights, averaged


def test_refuses_an_objective_it_does_not_minimise(tmp_path):
    with pytest.raises(dz.ConfigError, match="algorithm 'minillm' minimises the sequence-level reverse KL"):
        dz.train(dz.load_config(config(tmp_path, "fkl")))
