"""Rows from the files users hold their data in: JSONL, JSON, Parquet, Arrow, and ``datasets`` directories.

:func:`read_rows` yields ``(where, row)`` for every record of

* a JSONL file (``where`` is ``file:line``), the default for any other suffix;
* a ``.json`` file: a JSON array of records, or JSON lines (what ``Dataset.to_json`` writes);
* a ``.parquet`` file (``Dataset.to_parquet``, pandas, Spark, ...);
* an ``.arrow`` file (an Arrow IPC stream, as ``datasets`` writes them, or an IPC file);
* a directory written by ``Dataset.save_to_disk`` (its ``state.json`` lists the Arrow files).

For the tabular kinds ``where`` is ``file, row N`` (0-based, counted across the
files of a directory, as ``dataset[N]`` would index it). Nothing is downloaded and
no cache is written: Parquet and Arrow are read with pyarrow
(``pip install "distillzoo[datasets]"``), the ``datasets`` library is not needed.

``columns`` maps the field names a data format reads to the names a dataset uses,
``{"instruction": "question", "response": "answer"}``: each row gets the field
``instruction`` with the value of its ``question`` column (the other columns stay).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Mapping

from distillzoo.errors import DataError

TABULAR = (".parquet", ".arrow")


def read_jsonl(path: str | Path) -> Iterator[tuple[str, dict]]:
    """``(where, record)`` per non-blank line, ``where`` being ``file:line``; bad JSON names its line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist")
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not UTF-8 (byte {e.start + 1} of the line, {raw[e.start:e.start + 4]!r}: "
                                f"{e.reason}); re-encode the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise DataError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
            yield where, record


def kind(path: str | Path) -> str | None:
    """``jsonl``, ``json``, ``parquet``, ``arrow``, ``datasets`` (a save_to_disk directory), ``prepared``
    (a ``distillzoo prepare`` directory), or None when the path is neither such a file nor directory."""
    path = Path(path)
    if path.is_dir():
        if (path / "meta.json").is_file():
            return "prepared"
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            return "datasets"
        return None
    if not path.is_file():
        return None
    return {".json": "json", ".parquet": "parquet", ".arrow": "arrow"}.get(path.suffix.lower(), "jsonl")


def read_rows(path: str | Path, columns: Mapping[str, str] | None = None) -> Iterator[tuple[str, dict]]:
    """``(where, row)`` per record of a JSONL, JSON, Parquet or Arrow file or a save_to_disk directory."""
    path = Path(path)
    found = kind(path)
    if found is None:
        if not path.exists():
            raise DataError(f"data file {str(path)!r} does not exist")
        raise DataError(f"data {str(path)!r} is a directory, but neither a datasets save_to_disk one (state.json) nor "
                        "a prepared one")
    if found == "prepared":
        raise DataError(f"{path} is a distillzoo prepare directory (tokenized shards), not records; give the records "
                        "it was prepared from, or use it where prepared data is accepted (train streams)")
    rows = {"jsonl": read_jsonl, "json": _json_rows, "parquet": _parquet_rows, "arrow": _arrow_rows,
            "datasets": _datasets_rows}[found](path)
    if not columns:
        yield from rows
        return
    for where, row in rows:
        yield where, _rename(row, columns, where)


def _rename(row: dict, columns: Mapping[str, str], where: str) -> dict:
    missing = [column for column in columns.values() if column not in row]
    if missing:
        raise DataError(f"{where}: no column {missing[0]!r} (mapped to field "
                        f"{next(f for f, c in columns.items() if c == missing[0])!r} by columns); the record has "
                        f"{sorted(row)}")
    return {**row, **{field: row[column] for field, column in columns.items()}}


def _json_rows(path: Path) -> Iterator[tuple[str, dict]]:
    """A JSON array of records, or JSON lines under a ``.json`` name."""
    with path.open("rb") as f:
        head = f.read(4096).lstrip()
    if not head.startswith(b"["):
        yield from read_jsonl(path)
        return
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 (byte {e.start}: {e.reason}); re-encode the file as UTF-8") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataError(f"{path}, row {i}: a record must be a JSON object, got {type(record).__name__}")
        yield f"{path}, row {i}", record


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise DataError('reading Parquet, Arrow and datasets directories needs pyarrow: '
                        'pip install "distillzoo[datasets]"') from None
    return pyarrow


def _batch_rows(label: str, batches, start: int = 0) -> Iterator[tuple[str, dict]]:
    i = start
    for batch in batches:
        for row in batch.to_pylist():
            yield f"{label}, row {i}", row
            i += 1


def _parquet_rows(path: Path) -> Iterator[tuple[str, dict]]:
    pa = _pyarrow()
    try:
        file = pa.parquet.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    start = 0
    for group in range(file.num_row_groups):  # a damaged page fails naming the file and the rows it held
        try:
            table = file.read_row_group(group)
        except (pa.ArrowException, OSError) as e:
            rows = file.metadata.row_group(group).num_rows
            raise DataError(f"{path}, rows {start}-{start + rows - 1} (row group {group}): the Parquet data cannot "
                            f"be read ({e}); the file is damaged: write it again") from None
        yield from _batch_rows(str(path), table.to_batches(max_chunksize=1024), start)
        start += table.num_rows


def _arrow_table(path: Path):
    pa = _pyarrow()
    try:
        with pa.memory_map(str(path)) as source:
            try:
                return pa.ipc.open_stream(source).read_all()  # what datasets writes
            except pa.ArrowInvalid:
                source.seek(0)
                return pa.ipc.open_file(source).read_all()
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Arrow file ({e})") from None


def _arrow_rows(path: Path) -> Iterator[tuple[str, dict]]:
    yield from _batch_rows(str(path), _arrow_table(path).to_batches(max_chunksize=1024))


def _datasets_rows(path: Path) -> Iterator[tuple[str, dict]]:
    """A ``Dataset.save_to_disk`` directory: its Arrow files in the order state.json lists them."""
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8")).get("splits", [])
        raise DataError(f"{path} is a DatasetDict with splits {splits}; give one split's directory, e.g. "
                        f"{path / (splits[0] if splits else 'train')}")
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        files = [path / f["filename"] for f in state["_data_files"]]
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}/state.json: not a datasets save_to_disk state ({type(e).__name__}: {e})") from None
    if state.get("_indices_data_files"):
        raise DataError(f"{path} holds an indices mapping (a select or shuffle not flattened); save it with "
                        "dataset.flatten_indices().save_to_disk(...)")
    start = 0
    for file in files:
        table = _arrow_table(file)
        yield from _batch_rows(str(path), table.to_batches(max_chunksize=1024), start)
        start += table.num_rows
