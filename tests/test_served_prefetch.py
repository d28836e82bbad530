"""The teacher off the student's critical path: ``teacher.prefetch`` asks the server for the next steps' top-k
while the student computes the current one, without changing which examples a step draws or what it trains."""

from __future__ import annotations

import json

import pytest
import torch

from distillzoo.data.tokenizer import load_tokenizer
from distillzoo.teacher.server import TeacherServer
from distillzoo.training.streams import MixedStreams, Stream
from test_served_teacher import _config, _start, _train_setup


@pytest.mark.parametrize("world_size", [1, 2])
def test_peek_returns_what_the_next_takes_return_and_leaves_the_order(world_size):
    streams = [Stream("a", list(range(7)), repeat=1), Stream("b", list(range(100, 105)), repeat=2)]
    for rank in range(world_size):
        peeking = MixedStreams(streams, seed=3, rank=rank, world_size=world_size)
        plain = MixedStreams(streams, seed=3, rank=rank, world_size=world_size)
        for _ in range(9):  # 17 examples an epoch: the peeks cross epoch boundaries
            ahead = [peeking.peek(3, k) for k in (1, 2, 3)]
            state = peeking.state_dict()
            assert peeking.peek(3) == ahead[0] and peeking.state_dict() == state
            taken = peeking.take(3)
            assert taken == ahead[0] == plain.take(3)
            assert peeking.peek(3) == ahead[1] and peeking.peek(3, 2) == ahead[2]


def _run(tmp_path, url, prefetch, monkeypatch):
    """Train 4 steps; return the losses, the final weights, and at which step each step's sequences were sent."""
    import distillzoo as dz
    from safetensors.torch import load_file

    from distillzoo import train
    from distillzoo.plugins.algorithms.distill import Distill
    from distillzoo.teacher.served import ServedTeacher

    drawn: dict[int, list] = {}
    sent: list[tuple[int, list]] = []
    current = {"step": -1}
    micro_batches, submit = Distill.micro_batches, ServedTeacher.submit

    def recording_micro_batches(self, run, examples, step, size):
        current["step"] = step
        drawn[step] = [ex["input_ids"].tolist() for ex in examples]
        return micro_batches(self, run, examples, step, size)

    def recording_submit(self, sequences, ids, starts=None):
        sent.append((current["step"], [list(s) for s in sequences]))
        return submit(self, sequences, ids, starts)

    monkeypatch.setattr(Distill, "micro_batches", recording_micro_batches)
    monkeypatch.setattr(ServedTeacher, "submit", recording_submit)
    result = train(dz.load_config(_config(tmp_path, f"prefetch-{prefetch}", server=url, model="t", top_k=8,
                                          prefetch=prefetch)))
    losses = [json.loads(line)["loss"] for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    sent_at = {next(s for s, seqs in drawn.items() if seqs == sequences): at for at, sequences in sent}
    return losses, load_file(result.output_dir / "final" / "model.safetensors"), sent_at, len(sent)


def test_prefetch_sends_the_next_steps_during_the_current_one_and_trains_the_same_student(tmp_path, monkeypatch):
    teacher = _train_setup(tmp_path)
    http = TeacherServer(teacher, load_tokenizer(), "t").http()
    url = _start(http)
    try:
        plain = _run(tmp_path, url, 0, monkeypatch)
        ahead = _run(tmp_path, url, 2, monkeypatch)
    finally:
        http.shutdown()
    assert plain[2] == {0: 0, 1: 1, 2: 2, 3: 3} and plain[3] == 4  # each step asks when it needs its teacher
    assert ahead[2] == {0: 0, 1: 0, 2: 0, 3: 1} and ahead[3] == 4  # two steps ahead, each sequence sent once
    assert ahead[0] == plain[0]  # the same batches, the same teacher: the same losses, bit for bit
    assert all(torch.equal(ahead[1][key], plain[1][key]) for key in plain[1])


def test_a_negative_prefetch_is_refused_by_name(tmp_path):
    import distillzoo as dz
    from distillzoo.errors import ConfigError
    from distillzoo.training.spec import resolve

    _train_setup(tmp_path)
    cfg = _config(tmp_path, "run", server="http://127.0.0.1:9", model="t", top_k=4, prefetch=-1)
    with pytest.raises(ConfigError, match=r"teacher.prefetch: the steps fetched ahead must be an integer >= 0, got -1"):
        resolve(dz.load_config(cfg), "cfg.yaml", read_data=False)
