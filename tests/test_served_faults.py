"""Faults of a served teacher, each with a clear error and nothing lost: no server at the URL, the server gone
mid-run (then back, and ``resume: auto`` reaches the uninterrupted run's weights), and an on-policy run SIGKILLed
and resumed against the same server."""

from __future__ import annotations

import json
import socket

import pytest
import torch
import yaml

from distillzoo.data.tokenizer import load_tokenizer
from distillzoo.errors import ServerError
from distillzoo.teacher.server import TeacherServer
from test_served_teacher import _config, _start, _train_setup


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weights(run_dir):
    from safetensors.torch import load_file

    return load_file(run_dir / "final" / "model.safetensors")


def _steps(run_dir) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_no_server_at_the_url_is_refused_before_any_step_naming_the_url(tmp_path):
    import distillzoo as dz
    from distillzoo.errors import ConfigError

    _train_setup(tmp_path)
    url = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(ConfigError, match=rf"teacher.server: teacher server {url}/v1/models: no answer after 5 "
                                          r"attempt\(s\)"):
        dz.train(dz.load_config(_config(tmp_path, "run", server=url, model="t", top_k=4)))
    assert not (tmp_path / "run" / "final").exists() and not (tmp_path / "run" / "checkpoints").exists()


def _checkpointed(tmp_path, name, url, **teacher):
    cfg = _config(tmp_path, name, server=url, model="t", top_k=8, **teacher)
    cfg["train"].update({"steps": 6, "checkpoint_every": 2})
    return cfg


def test_a_server_gone_mid_run_stops_naming_the_intact_checkpoint_and_a_resume_reaches_the_same_weights(
        tmp_path, monkeypatch):
    import distillzoo as dz
    from distillzoo.plugins.algorithms.distill import Distill

    teacher = _train_setup(tmp_path)
    server = TeacherServer(teacher, load_tokenizer(), "t")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    http = server.http(port=port)
    _start(http)
    uninterrupted = dz.train(dz.load_config(_checkpointed(tmp_path, "whole", url)))

    micro_batches = Distill.micro_batches

    def server_dies_at_step_4(self, run, examples, step, size):
        if step == 3:  # the 4th step, asked for when it starts (prefetch 0): the checkpoint of step 2 is on disk
            http.shutdown()
            http.server_close()
        return micro_batches(self, run, examples, step, size)

    monkeypatch.setattr(Distill, "micro_batches", server_dies_at_step_4)
    cfg = _checkpointed(tmp_path, "broken", url, prefetch=0)
    with pytest.raises(ServerError) as e:
        dz.train(dz.load_config(cfg))
    message = str(e.value)
    assert f"step 4: teacher server {url}/v1/completions: no answer (samples " in message
    assert "after 5 attempt(s)" in message and "step-00000002, is intact" in message and "resume: auto" in message
    run_dir = tmp_path / "broken"
    assert not (run_dir / "final").exists() and _steps(run_dir) == [1, 2, 3]
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-00000002"]

    monkeypatch.setattr(Distill, "micro_batches", micro_batches)
    again = server.http(port=port)  # the server is back at the same address
    _start(again)
    try:
        resumed = dz.train(dz.load_config({**cfg, "resume": "auto"}))
    finally:
        again.shutdown()
    assert _steps(run_dir) == [1, 2, 3, 4, 5, 6]
    want, got = _weights(uninterrupted.output_dir), _weights(resumed.output_dir)
    assert max(float((want[k] - got[k]).abs().max()) for k in want) <= 1e-6


def test_on_policy_with_a_served_teacher_sigkilled_then_resumed_reaches_the_uninterrupted_weights(tmp_path):
    import distillzoo as dz
    from helpers import train_killed_at_checkpoint

    teacher = _train_setup(tmp_path)
    http = TeacherServer(teacher, load_tokenizer(), "t").http()
    url = _start(http)
    try:
        cfg = _checkpointed(tmp_path, "whole", url)
        cfg["algorithm"] = {"name": "distill", "on_policy": 0.5, "max_new_tokens": 4}
        whole = dz.train(dz.load_config(cfg))
        killed = {**cfg, "output_dir": str(tmp_path / "killed"), "resume": "auto"}
        (tmp_path / "killed.yaml").write_text(yaml.safe_dump(killed), encoding="utf-8")
        train_killed_at_checkpoint(tmp_path / "killed.yaml", tmp_path / "killed", 2)
        resumed = dz.train(dz.load_config(killed))
    finally:
        http.shutdown()
    assert _steps(tmp_path / "killed")[-4:] == [3, 4, 5, 6]
    sampled = [dz.plugins.algorithms.distill.on_policy_step(0, s, 0.5) for s in range(6)]
    assert any(sampled) and not all(sampled)  # both kinds of step, prefetched and sampled, were resumed through
    want, got = _weights(whole.output_dir), _weights(resumed.output_dir)
    assert max(float((want[k] - got[k]).abs().max()) for k in want) <= 1e-6
    assert torch.isfinite(torch.tensor([json.loads(line)["loss"] for line in
                                        (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()])).all()
