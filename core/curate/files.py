"""The files of a curation: JSONL written atomically and read one item at a time, and shard directories (the
records a stage kept and those it dropped) written under a temporary name and renamed."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from distillzoo.atomic import sweep_temporaries, write_dir_atomically


def write_jsonl(path: Path, items) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_temporaries(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    count = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for item in items:
                f.write(json.dumps(item, ensure_ascii=False) + "\n")
                count += 1
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    os.replace(tmp, path)
    return count


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def write_shard(directory: Path, kept: list[dict], dropped: list[dict]) -> None:
    def write(tmp: Path) -> None:
        for name, items in (("kept.jsonl", kept), ("dropped.jsonl", dropped)):
            (tmp / name).write_text("".join(json.dumps(i, ensure_ascii=False) + "\n" for i in items),
                                    encoding="utf-8")

    write_dir_atomically(directory, write)


def each(path: Path, also=None):
    """The items of a JSONL file, one at a time (``also`` is called on each): a stage's whole output is never
    held in memory."""
    if not path.exists():
        return
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                item = json.loads(line)
                if also is not None:
                    also(item)
                yield item
