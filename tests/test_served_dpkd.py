"""DPKD with a served teacher: the teacher's log-probs of y_w and y_l from the server's ``prompt_logprobs`` train the
student as the in-process teacher does, offline and online, and an online run SIGKILLed and resumed reaches the
uninterrupted run's weights."""

from __future__ import annotations

import json

import pytest
import yaml

from distillzoo.data.tokenizer import load_tokenizer
from distillzoo.teacher.server import TeacherServer
from test_served_teacher import _start, _train_setup


def _pairs(root):
    from helpers import write_jsonl

    records = [{"id": f"p{a}-{b}", "prompt": [{"role": "user", "content": f"{a} + {b} = ?"}],
                "chosen": f"{a + b}, 答案是 {a + b}", "rejected": f"{a * b + 1}"} for a in range(4) for b in range(3)]
    write_jsonl(root / "pairs.jsonl", records)


def _config(root, name, teacher, online=False):
    stream = ({"name": "arith", "path": str(root / "train.jsonl"), "format": "chat", "repeat": 2} if online else
              {"name": "pairs", "path": str(root / "pairs.jsonl"), "format": "preference", "repeat": 2})
    return {"objective": {"name": "dpkd", "beta": 0.5}, "seed": 0,
            "algorithm": {"name": "dpkd", "online": online, **({"max_new_tokens": 4} if online else {})},
            "student": {"tiny": {"hidden_size": 32, "num_layers": 1}}, "teacher": teacher,
            "data": {"streams": [stream], "system": None, "max_length": 64},
            "train": {"steps": 6, "batch_size": 4, "lr": 1e-2, "log_every": 1, "progress": False,
                      "checkpoint_every": 2},
            "output_dir": str(root / name), "resume": "never"}


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _weights(run_dir):
    from safetensors.torch import load_file

    return load_file(run_dir / "final" / "model.safetensors")


def _gap(a, b) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture()
def server(tmp_path):
    teacher = _train_setup(tmp_path)
    _pairs(tmp_path)
    http = TeacherServer(teacher, load_tokenizer(), "t").http()
    url = _start(http)
    yield url
    http.shutdown()


@pytest.mark.parametrize("online", [False, True], ids=["offline", "online"])
def test_dpkd_on_a_served_teacher_trains_as_on_the_teacher_model(tmp_path, server, online):
    import distillzoo as dz

    served = dz.train(dz.load_config(_config(tmp_path, "served", {"server": server, "model": "t"}, online)))
    local = dz.train(dz.load_config(_config(tmp_path, "local", {"path": str(tmp_path / "teacher")}, online)))
    assert len(_losses(served.output_dir)) == 6
    assert _losses(served.output_dir) == pytest.approx(_losses(local.output_dir), rel=1e-5)
    assert _gap(_weights(served.output_dir), _weights(local.output_dir)) <= 1e-4


def test_online_dpkd_on_a_served_teacher_sigkilled_then_resumed_reaches_the_uninterrupted_weights(tmp_path, server):
    import distillzoo as dz
    from helpers import train_killed_at_checkpoint

    whole = dz.train(dz.load_config(_config(tmp_path, "whole", {"server": server, "model": "t"}, online=True)))
    killed = {**_config(tmp_path, "killed", {"server": server, "model": "t"}, online=True), "resume": "auto"}
    (tmp_path / "killed.yaml").write_text(yaml.safe_dump(killed), encoding="utf-8")
    train_killed_at_checkpoint(tmp_path / "killed.yaml", tmp_path / "killed", 2)
    resumed = dz.train(dz.load_config(killed))
    assert [json.loads(line)["step"] for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()][-4:] \
        == [3, 4, 5, 6]
    assert _gap(_weights(whole.output_dir), _weights(resumed.output_dir)) <= 1e-6


def test_dpkd_s_reverse_kl_term_needs_the_teacher_model_not_a_server(tmp_path):
    import distillzoo as dz
    from distillzoo.errors import ConfigError
    from distillzoo.training.spec import resolve

    _train_setup(tmp_path)
    _pairs(tmp_path)
    cfg = _config(tmp_path, "run", {"server": "http://127.0.0.1:9", "model": "t"})
    cfg["objective"]["rkl_weight"] = 0.1
    with pytest.raises(ConfigError, match=r"objective.rkl_weight: the reverse-KL term needs the teacher's logits"):
        resolve(dz.load_config(cfg), "cfg.yaml", read_data=False)
