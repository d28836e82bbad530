"""A KD training step against a served teacher, with and without prefetch, beside the in-process teacher.

Each provider is one ``distillzoo train`` run of ``STEPS`` forward-KL steps on the quickstart's
training records, the same student, data and seed; the time per step is read from the run's own
metrics.jsonl (tokens / tokens_per_s, the median over the steps after the first), so model loading
and start-up are not counted.

* ``in-process``: the teacher model in the training process (``teacher.path``), dense;
* ``served``: the same teacher behind ``distillzoo serve`` in a second process, read as its top-k
  (``teacher.server``, ``top_k`` 16), fetched when each step needs it (``teacher.prefetch: 0``);
* ``served-prefetch``: the same, with the next step's top-k fetched while the student computes
  (``teacher.prefetch: 1``);
* ``cache``: the same top-k read from a ``distillzoo cache-teacher`` directory: the student's own time
  with a teacher that costs next to nothing, the floor the served runs are measured against.

The teacher's share of a served step is ``served - cache``; prefetch hides
``(served - served_prefetch) / (served - cache)`` of it. Threads: the training process and the
server process each run torch on one thread (``torch.set_num_threads(1)``, ``OMP_NUM_THREADS=1``), so on
a 2-core machine each has a core; on one core the two would take turns and prefetch could hide nothing.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common import CUDA, device_name, start_server

# (records, student hidden, teacher hidden, teacher layers, batch, steps)
SHAPE = (256, 896, 1536, 28, 16, 12) if CUDA else (256, 64, 384, 4, 8, 8)
DATA = Path(__file__).resolve().parent.parent / "data" / "quickstart" / "train.jsonl"
PROVIDERS = ["in-process", "served", "served-prefetch", "cache"]
TOP_K = 16


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from distillzoo.models.causal_lm import tiny_qwen2

    root = tmp_path_factory.mktemp("served-bench")
    records, _, hidden, layers, _, _ = SHAPE
    lines = DATA.read_text(encoding="utf-8").splitlines()[:records]
    (root / "data.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    tiny_qwen2(hidden_size=hidden, num_layers=layers, num_heads=hidden // 64, num_kv_heads=2,
               seed=0).save_pretrained(root / "teacher")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    done = subprocess.run([sys.executable, "-m", "distillzoo", "cache-teacher", str(root / "teacher"),
                           str(root / "data.jsonl"), "--format", "chat", "--no-system", "--k", str(TOP_K), "--dtype",
                           "float32", "--out", str(root / "cache")], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    server, url = start_server(root / "teacher", "teacher")
    yield root, url
    server.terminate()
    server.wait(timeout=30)


def _config(root, url, provider):
    _, student_hidden, _, _, batch, steps = SHAPE
    teacher = {"in-process": {"path": str(root / "teacher")},
               "served": {"server": url, "model": "teacher", "top_k": TOP_K, "prefetch": 0},
               "served-prefetch": {"server": url, "model": "teacher", "top_k": TOP_K, "prefetch": 1},
               "cache": {"cache": str(root / "cache"), "top_k": TOP_K}}[provider]
    return {"objective": {"name": "fkl"}, "seed": 0, "teacher": teacher,
            "student": {"tiny": {"hidden_size": student_hidden, "num_layers": 2, "num_heads": max(student_hidden // 64, 2),
                                 "num_kv_heads": 2}},
            "data": {"streams": [{"name": "train", "path": str(root / "data.jsonl"), "format": "chat", "repeat": 1}],
                     "system": None, "max_length": 256},
            "train": {"steps": steps, "batch_size": batch, "lr": 1e-3, "log_every": 1, "progress": False},
            "output_dir": str(root / "runs" / provider), "resume": "never"}


@pytest.mark.parametrize("provider", PROVIDERS)
def test_kd_step_with_a_served_teacher(benchmark, setup, provider):
    import distillzoo as dz

    root, url = setup
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = benchmark.pedantic(lambda: dz.train(dz.load_config(_config(root, url, provider))), rounds=1,
                                    iterations=1)
    finally:
        torch.set_num_threads(threads)
    records = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    per_step = sorted(r["tokens"] / r["tokens_per_s"] for r in records[1:])
    benchmark.extra_info.update({"device": device_name(), "provider": provider, "shape": list(SHAPE), "top_k": TOP_K,
                                 "s_per_step": per_step[len(per_step) // 2],
                                 "tokens_per_step": sum(r["tokens"] for r in records) / len(records),
                                 "losses": [r["loss"] for r in records], "torch_threads": 1,
                                 "server_threads": 1})
