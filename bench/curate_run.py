"""One curation run in a process of its own, for bench/test_bench_curate.py: writes N synthetic bilingual chat
rows (or reuses them), runs distillzoo curate's dedup + decontaminate + quality over them (``distillzoo``), its
dedup alone (``distillzoo-dedup``), or datatrove's MinHash dedup (signatures, buckets, clusters, filter) over the
same rows (``datatrove-dedup``; datatrove's Gopher filters need spaCy, which is left out), and prints one JSON line: rows, seconds, rows/s, the process's peak RSS (MiB) and the rows kept.

    python bench/curate_run.py --rows 100000 --tool distillzoo --dir /tmp/curate-bench
    python bench/curate_run.py --rows 100000 --tool datatrove-dedup --dir /tmp/curate-bench

The rows: about 60 words each (English words, or Chinese characters in a third of them), with planted
near duplicates of a whole record (one word or character changed) for 10%, exact copies in other case and spacing for 2%, replies that repeat
a line for 2%, and 1% that hold a 20-word passage of an evaluation set.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

import numpy as np

EN = np.array(("river stone light cloud market garden window letter winter silver engine forest bridge paper music "
               "orange planet doctor mirror island candle village rocket harbor velvet meadow signal copper lantern "
               "thunder pencil violin desert castle feather glacier jungle marble needle ocean pepper quartz saddle "
               "tiger umbrella wagon yellow zebra anchor basket cactus dolphin eagle falcon galaxy helmet igloo").split())
ZH = np.array([chr(c) for c in range(0x4E00, 0x4E00 + 2000)])


def eval_passages(seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed + 1)
    return [" ".join(rng.choice(EN, 20)) for _ in range(100)]


def rows(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    passages = eval_passages(seed)
    kept: list[tuple[str, str]] = []
    for i in range(n):
        kind = rng.random()
        if kind < 0.12 and kept:
            text, reply = kept[int(rng.integers(len(kept)))]
            if kind < 0.10:  # a near copy: one word of an earlier record changed (a character, in Chinese)
                words = text.split(" ") if " " in text else list(text)
                words[int(rng.integers(len(words)))] = str(rng.choice(EN if " " in text else ZH))
                text = (" " if " " in text else "").join(words)
            else:  # an exact copy in other case and spacing
                text, reply = "  " + text.upper(), reply.upper() + " "
        else:
            text = "".join(rng.choice(ZH, 60)) if i % 3 == 2 else " ".join(rng.choice(EN, 60))
            reply = " ".join(rng.choice(EN, 30))
            if len(kept) < 5000:
                kept.append((text, reply))
            elif rng.random() < 0.01:
                kept[int(rng.integers(len(kept)))] = (text, reply)
        if 0.12 <= kind < 0.13:
            text = text + " " + passages[int(rng.integers(len(passages)))]
        if 0.13 <= kind < 0.15:
            reply = "\n".join([reply] * 4)
        yield {"id": f"r{i}", "messages": [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]}


def write(directory: Path, n: int) -> tuple[Path, Path]:
    data, evals = directory / f"rows-{n}.jsonl", directory / "eval.jsonl"
    if not data.exists():
        tmp = data.with_suffix(".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            for row in rows(n):
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, data)
        evals.write_text("".join(json.dumps({"id": f"e{k}", "messages": [
            {"role": "user", "content": p}, {"role": "assistant", "content": "ok"}]}) + "\n"
            for k, p in enumerate(eval_passages())), encoding="utf-8")
    return data, evals


def run_distillzoo(data: Path, evals: Path, out: Path, dedup_only: bool = False) -> int:
    from distillzoo.curate.pipeline import curate

    stages = [{"name": "dedup", "threshold": 0.8}]
    if not dedup_only:
        stages += [{"name": "decontaminate", "n": 13}, {"name": "quality"}]
    report = curate({"data": str(data), "format": "chat", "out": str(out), "eval": [{"path": str(evals)}],
                     "malformed": "refuse", "shard_size": 10000, "stages": stages}, say=lambda line: None)
    return report["output"]


def run_datatrove(data: Path, out: Path) -> int:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import (MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter,
                                          MinhashDedupSignature)
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    def adapter(self, record: dict, path: str, id_in_file):
        return {"text": "\n".join(m["content"] for m in record["messages"]), "id": record["id"], "metadata": {}}

    reader = lambda: JsonlReader(str(data.parent), glob_pattern=data.name, adapter=adapter)  # noqa: E731
    from datatrove.utils.hashing import HashConfig

    # sha1: the xxhash wheel this installs takes bytes only, and datatrove hands it str
    config = MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8, hash_config=HashConfig(hash_fc="sha1"))
    stages = [
        [reader(), MinhashDedupSignature(output_folder=str(out / "sigs"), config=config)],
        [MinhashDedupBuckets(input_folder=str(out / "sigs"), output_folder=str(out / "buckets"), config=config)],
        [MinhashDedupCluster(input_folder=str(out / "buckets"), output_folder=str(out / "remove"), config=config)],
        [reader(), MinhashDedupFilter(input_folder=str(out / "remove")), JsonlWriter(str(out / "kept"))],
    ]
    for k, pipeline in enumerate(stages):
        tasks = config.num_buckets if k == 1 else 1
        LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=1,
                              logging_dir=str(out / f"logs-{k}")).run()
    import gzip

    return sum(sum(1 for _ in gzip.open(p, "rt")) for p in (out / "kept").glob("*.jsonl.gz"))


TOOLS = ("distillzoo", "distillzoo-dedup", "datatrove-dedup")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, required=True)
    parser.add_argument("--tool", choices=TOOLS, required=True)
    parser.add_argument("--dir", type=Path, required=True)
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    data, evals = write(args.dir, args.rows)
    out = args.dir / f"out-{args.tool}-{args.rows}-{os.getpid()}"
    start = time.perf_counter()
    if args.tool == "datatrove-dedup":
        kept = run_datatrove(data, out)
    else:
        kept = run_distillzoo(data, evals, out, dedup_only=args.tool == "distillzoo-dedup")
    seconds = time.perf_counter() - start
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    print(json.dumps({"tool": args.tool, "rows": args.rows, "seconds": round(seconds, 2),
                      "rows_per_s": round(args.rows / seconds, 1), "kept": kept,
                      "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))


if __name__ == "__main__":
    main()
