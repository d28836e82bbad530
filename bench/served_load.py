"""Load on ``distillzoo serve``: concurrent client processes scoring against one server, on 127.0.0.1 only.

The server serves a Qwen2-architecture model of the real vocabulary (151,936) built from a config, in its own
process. Each client process loops for ``--seconds``: it sends a request of ``--batch`` random sequences (16 to
128 tokens, the reply starting at a random token) through :class:`distillzoo.teacher.served.ServedTeacher` and
checks every ``--check-every``-th answer against the same model run in the client process (``teacher_topk`` on
its own forward pass): ids equal, log-probs and tail within 1e-5. A failed request, a wrong answer or a client
that dies is counted, never retried past the client's own retries.

    python bench/served_load.py --clients 8 --seconds 120 --out bench/results/served-load-cpu.md

prints, and writes to ``--out``, the requests, failures, spot checks, scored tokens per second and latency.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

MODEL = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "seed": 7}


def _client(index: int, url: str, model_dir: str, seconds: float, batch: int, check_every: int, queue) -> None:
    import torch

    torch.set_num_threads(1)
    from distillzoo.models.causal_lm import final_hidden, lm_head_weight, load_causal_lm
    from distillzoo.teacher.cache import teacher_topk
    from distillzoo.teacher.served import ServedTeacher

    model = load_causal_lm(model_dir, device="cpu").eval()
    client = ServedTeacher(url, "load", top_k=8, max_in_flight=1)
    g = torch.Generator().manual_seed(1000 + index)
    stats = {"requests": 0, "failed": 0, "wrong": 0, "checked": 0, "tokens": 0, "latencies": [], "errors": []}
    deadline = time.time() + seconds
    while time.time() < deadline:
        sequences = [torch.randint(0, 151_643, (int(torch.randint(16, 129, (1,), generator=g)),), generator=g).tolist()
                     for _ in range(batch)]
        starts = [int(torch.randint(1, len(s), (1,), generator=g)) for s in sequences]
        started = time.perf_counter()
        try:
            rows = client.topk(sequences, [f"c{index}-{stats['requests']}-{i}" for i in range(batch)], starts)
        except Exception as e:  # noqa: BLE001 (counted and reported)
            stats["failed"] += 1
            stats["errors"].append(f"{type(e).__name__}: {e}"[:300])
            continue
        finally:
            stats["requests"] += 1
        stats["latencies"].append(time.perf_counter() - started)
        stats["tokens"] += sum(len(s) - start for s, start in zip(sequences, starts))
        if stats["requests"] % check_every == 0:
            for sequence, start, (ids, logprobs, tail) in zip(sequences, starts, rows):
                with torch.no_grad():
                    hidden = final_hidden(model, torch.tensor([sequence]), torch.ones(1, len(sequence), dtype=torch.long))
                want = teacher_topk(hidden[0, :-1], lm_head_weight(model), 8)
                part = slice(start - 1, None)
                ok = torch.equal(ids[part], want[0][part].long()) and \
                    float((logprobs[part] - want[1][part]).abs().max()) <= 1e-5 and \
                    float((tail[part] - want[2][part]).abs().max()) <= 1e-5
                stats["checked"] += 1
                stats["wrong"] += not ok
    queue.put(stats)


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--batch", type=int, default=4, help="sequences per request")
    parser.add_argument("--check-every", type=int, default=10, help="spot-check every N-th answer of each client")
    parser.add_argument("--out", default=None, help="write the report (markdown) here")
    args = parser.parse_args(argv)

    from common import start_server
    from distillzoo.models.causal_lm import tiny_qwen2

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "teacher"
        tiny_qwen2(**MODEL).save_pretrained(model_dir)
        server, url = start_server(model_dir, "load")
        try:
            ctx = mp.get_context("spawn")
            queue = ctx.Queue()
            procs = [ctx.Process(target=_client, args=(i, url, str(model_dir), args.seconds, args.batch,
                                                       args.check_every, queue)) for i in range(args.clients)]
            started = time.perf_counter()
            for p in procs:
                p.start()
            results = [queue.get(timeout=args.seconds + 600) for _ in procs]
            for p in procs:
                p.join()
            wall = time.perf_counter() - started
        finally:
            server.terminate()
            server.wait(timeout=30)
    latencies = sorted(x for r in results for x in r["latencies"])
    total = {key: sum(r[key] for r in results) for key in ("requests", "failed", "wrong", "checked", "tokens")}
    errors = [e for r in results for e in r["errors"]][:5]
    dead = sum(p.exitcode != 0 for p in procs)
    p50, p95 = (latencies[int(q * (len(latencies) - 1))] if latencies else float("nan") for q in (0.5, 0.95))
    report = "\n".join([
        "# `distillzoo serve` under load",
        "",
        f"Machine: {_cpu()}, {os.cpu_count()} cores; Python "
        f"{platform.python_version()}. Run: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.  ",
        f"Command: `python bench/served_load.py --clients {args.clients} --seconds {args.seconds:g} --batch "
        f"{args.batch} --check-every {args.check_every}`",
        "",
        f"One server process (one torch thread) over a Qwen2-architecture model ({json.dumps(MODEL)}, vocab 151,936), "
        f"{args.clients} client processes for {args.seconds:g} s each, {args.batch} sequences of 16 to 128 tokens per "
        "request, top-8, each reply from a random token on.",
        "",
        "| requests | failed | clients dead | spot checks | wrong | scored tokens/s | latency p50 s | latency p95 s |",
        "|---|---|---|---|---|---|---|---|",
        f"| {total['requests']} | {total['failed']} | {dead} | {total['checked']} | {total['wrong']} | "
        f"{total['tokens'] / wall:.0f} | {p50:.3f} | {p95:.3f} |",
        "",
        *(["First errors:", "", *[f"- {e}" for e in errors], ""] if errors else []),
    ])
    print(report)
    if args.out:
        Path(args.out).write_text(report + "\n", encoding="utf-8")
    return 0 if total["failed"] == total["wrong"] == dead == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
