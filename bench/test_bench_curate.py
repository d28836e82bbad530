"""distillzoo curate's dedup + decontaminate + quality over synthetic bilingual rows: rows/s and peak RSS, at
100k rows by default and at each size of ``DISTILLZOO_BENCH_CURATE_ROWS`` (comma-separated, e.g.
``100000,1000000``), beside its dedup alone and datatrove's MinHash dedup on the same rows where datatrove
installs (``pip install datatrove spacy orjson``).

Each measurement is one run of bench/curate_run.py in a process of its own (peak RSS is that process's); the
rows are written once per size before the first run and shared. The memory goal: peak RSS at 1M rows at most
twice that at 100k (dedup's index lives on disk, every stage streams its shards). Threads: one process, one
thread of Python; datatrove runs with one worker.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
SIZES = [int(n) for n in os.environ.get("DISTILLZOO_BENCH_CURATE_ROWS", "100000").split(",")]
TOOLS = ["distillzoo", "distillzoo-dedup", "datatrove-dedup"]


def _datatrove() -> bool:
    try:
        import datatrove  # noqa: F401
        import orjson  # noqa: F401
        import spacy  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="session")
def rows_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("curate-bench")


@pytest.mark.parametrize("rows", SIZES)
@pytest.mark.parametrize("tool", TOOLS)
def test_curate_throughput_and_peak_rss(benchmark, rows_dir, tool, rows):
    if tool.startswith("datatrove") and not _datatrove():
        pytest.skip("datatrove (with spacy and orjson) is not installed")
    sys.path.insert(0, str(HERE))
    from curate_run import write

    write(rows_dir, rows)  # the rows, once per size, outside the measurement
    result = {}

    def run():
        done = subprocess.run([sys.executable, str(HERE / "curate_run.py"), "--rows", str(rows), "--tool", tool,
                               "--dir", str(rows_dir)], capture_output=True, text=True, check=True)
        result.update(json.loads(done.stdout.strip().splitlines()[-1]))

    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    assert result["rows"] == rows and 0.75 * rows < result["kept"] < 0.95 * rows
