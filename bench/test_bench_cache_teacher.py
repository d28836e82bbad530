"""``distillzoo cache-teacher`` throughput: one process against two under torchrun, in response tokens per second.

The command runs as users run it, in a subprocess (``torchrun --nproc_per_node P -m
distillzoo cache-teacher ...``), on the quickstart's training records with a
Qwen2-architecture teacher of the real vocab (151,936) built from a config. Each
measurement is two runs: the cache from scratch, then the same command on the
finished cache (which starts the processes, loads the model and checks every
shard, then has nothing to do). Throughput is the response tokens cached over the
difference, so process start-up is not counted; ``wall_s`` keeps the whole.

Threads: one process uses torch's default (every core); torchrun gives each of
several processes one thread (OMP_NUM_THREADS=1). On a CPU the two then share the
same cores, so this measures how the split behaves, not extra hardware; on a GPU
node each rank has a GPU of its own.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from common import CUDA, device_name

# (records, teacher hidden, layers): a CPU-sized teacher; on a GPU, Qwen2.5-0.5B's width
SHAPE = (8192, 896, 24) if CUDA else (4096, 128, 2)
DATA = Path(__file__).resolve().parent.parent / "data" / "quickstart" / "train.jsonl"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from distillzoo.models.causal_lm import tiny_qwen2

    root = tmp_path_factory.mktemp("cache-bench")
    records, hidden, layers = SHAPE
    lines = DATA.read_text(encoding="utf-8").splitlines()[:records]
    (root / "data.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    tiny_qwen2(hidden_size=hidden, num_layers=layers, num_heads=hidden // 64 if hidden >= 128 else 2,
               num_kv_heads=2, seed=0).save_pretrained(root / "teacher")
    return root


def run(inputs, processes, out):
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "-m", "distillzoo",
            "cache-teacher", str(inputs / "teacher"), str(inputs / "data.jsonl"), "--format", "chat", "--no-system",
            "--k", "32", "--batch-size", "16", "--shard-size", "128", "--out", str(out)]
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    return time.perf_counter() - started


@pytest.mark.parametrize("processes", [1, 2])
def test_cache_teacher_throughput(benchmark, inputs, processes, tmp_path):
    timings = {}

    def cache():
        out = tmp_path / f"cache-{len(timings)}"
        timings[len(timings)] = (run(inputs, processes, out), run(inputs, processes, out), out)

    benchmark.pedantic(cache, rounds=1, iterations=1)
    full, startup, out = timings[0]
    manifest = json.loads((out / "manifest.json").read_text())
    tokens = sum(int(np.load(shard / "index.npy")[-1]) for shard in sorted(out.glob("shard-*")))
    benchmark.extra_info.update(
        device=device_name(), processes=processes, threads_per_process=1 if processes > 1 else os.cpu_count(),
        samples=manifest["samples"], response_tokens=tokens, wall_s=full, startup_s=startup,
        tokens_per_s=tokens / max(full - startup, 1e-9), tokens_per_s_with_startup=tokens / full)
