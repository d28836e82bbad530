"""The input of a curation, read as training reads it and cut into source shards: each record checked to be a
record of its format with an id not used before, the malformed ones refused or set aside with their file:line."""

from __future__ import annotations

import hashlib
import json
from array import array
from pathlib import Path
from typing import Iterator

import numpy as np

from distillzoo.atomic import sweep_temporaries
from distillzoo.curate.files import write_shard
from distillzoo.errors import DataError, DistillzooError


def read_source(paths: list[str], format: str, columns: dict | None) -> Iterator[tuple[str, dict | None, str | None]]:
    """``(where, record or None, why it is malformed or None)`` per record of the input, in order. JSONL is read
    line by line as bytes, so a line that is not UTF-8 or not JSON is one malformed record, not a failed read."""
    from distillzoo.data.tables import kind, read_rows

    for path in paths:
        if kind(path) == "jsonl":
            rows = _jsonl_rows(Path(path))
        else:
            rows = ((where, row, None) for where, row in read_rows(path))
        for where, row, why in rows:
            if why is None:
                try:
                    fields_of(row, format, columns)
                except DistillzooError as e:
                    why = f"not a {format!r} record: {e}"
            yield where, row, why


def _jsonl_rows(path: Path):
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            where = f"{path}:{n}"
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield where, None, f"not UTF-8 ({e.reason} at byte {e.start})"
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                yield where, None, f"not JSON ({e.msg} at column {e.colno})"
                continue
            yield (where, row, None) if isinstance(row, dict) else (where, None, "not a JSON object")


def fields_of(row: dict, format: str, columns: dict | None) -> dict:
    """A record's fields as the format's reader gives them (``columns`` renaming fields first)."""
    if columns:
        row = {**row, **{field: row[column] for field, column in columns.items() if column in row}}
    return _reader(format)(row)


_readers: dict = {}


def forget_readers() -> None:
    """Start a run with no reader remembered (a plugin registered since the last run is seen)."""
    _readers.clear()


def _reader(format: str):
    """The format's reader, looked up once per run and format (a lookup asks every plugin)."""
    from distillzoo.data.records import data_format

    if format not in _readers:
        _readers[format] = data_format(format)
    return _readers[format]


class Ids:
    """The ids read so far, compactly (a set of 64-bit hashes, and per record its place as a file number and a
    line), so that a million records' ids take tens of megabytes; an id read again names the place of its first
    use. Two different ids share a hash with odds of about n^2 / 2^65 (3e-8 at a million)."""

    def __init__(self) -> None:
        self.hashes: set[int] = set()
        self.order = array("q")
        self.files: list[str] = []
        self.file = array("H")
        self.line = array("l")

    @staticmethod
    def _hash(sample_id: str) -> int:
        return int.from_bytes(hashlib.blake2b(sample_id.encode("utf-8"), digest_size=8).digest(), "little", signed=True)

    def repeat(self, sample_id: str, where: str) -> str | None:
        """Why the record at ``where`` is malformed because of its id, or None (and the id is recorded)."""
        h = self._hash(sample_id)
        if h in self.hashes:
            first = int(np.flatnonzero(np.frombuffer(self.order, dtype=np.int64) == h)[0])
            return f"id {sample_id!r} was used before, at {self.files[self.file[first]]}:{self.line[first]}"
        self.hashes.add(h)
        self.order.append(h)
        path, _, line = where.rpartition(":")
        if not self.files or self.files[-1] != path:
            self.files.append(path)
        self.file.append(len(self.files) - 1)
        self.line.append(int(line) if line.isdigit() else -1)
        return None


def _checked_rows(paths, format: str, columns):
    """``(where, record, sample id)`` of the valid records and ``(where, None, why)`` of the malformed ones."""
    ids = Ids()
    for at, row, why in read_source(paths, format, columns):
        if why is None:
            sample_id = str(fields_of(row, format, columns)["id"])
            why = ids.repeat(sample_id, at)
        yield (at, None, why) if why else (at, row, sample_id)


def source_shards(section: dict, out: Path, say) -> list[Path]:
    """The input cut into shards of ``shard_size`` records, in order: per shard, the valid records (``kept``) and
    the malformed ones with why (``dropped``). A shard already written by an earlier run is kept as it is."""
    paths, format, columns = section["data"], section["format"], section.get("columns")
    size = section["shard_size"]
    if section["malformed"] == "refuse":  # nothing is written before the whole input is known to be well-formed
        for at, row, why in _checked_rows(paths, format, columns):
            if row is None:
                raise DataError(f"{at}: {why}; nothing was written (curate.malformed: reject moves such records to "
                                "rejects.jsonl and goes on)")
    directory = out / "stages" / "source"
    directory.mkdir(parents=True, exist_ok=True)
    sweep_temporaries(directory, "shard-*")
    shards, kept, dropped, count = [], [], [], 0
    for at, row, what in _checked_rows(paths, format, columns):
        (dropped if row is None else kept).append({"where": at, "reason": what} if row is None else
                                                  {"where": at, "id": what, "record": row})
        count += 1
        if count == size:
            shards.append(_flush(directory, len(shards), kept, dropped))
            kept, dropped, count = [], [], 0
    if count:
        shards.append(_flush(directory, len(shards), kept, dropped))
    say(f"source: {len(shards)} shard(s) of up to {size} records")
    return shards


def _flush(directory: Path, index: int, kept: list, dropped: list) -> Path:
    target = directory / f"shard-{index:05d}"
    if not target.exists():
        write_shard(target, kept, dropped)
    return target
