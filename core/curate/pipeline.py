"""``distillzoo curate CONFIG``: instruction or preference records through a pipeline of named stages.

::

    curate:
      data: [data/magpie.jsonl, data/openhermes.parquet]
      format: chat
      out: curated/
      eval: [{path: data/eval.jsonl, format: chat}]     # what decontaminate compares against
      malformed: reject                                 # or refuse (the default)
      stages:
        - {name: dedup, near: true, threshold: 0.8}
        - {name: decontaminate, n: 13}
        - {name: quality, min_chars: 1, max_duplicate_line_fraction: 0.3}

The records are read as training reads them (JSONL, JSON, Parquet, Arrow, datasets directories; ``format``
and ``columns`` as in ``data.streams``). A malformed record (bad JSON, not UTF-8, missing fields, an id used
twice) is refused, naming its file and line, before anything is written; with ``malformed: reject`` it goes
to ``rejects.jsonl`` with its place and reason instead, and the rest goes on.

The input is cut into shards of ``shard_size`` records, in order. Each stage reads the shards the stage
before it kept and writes, per shard, the records it keeps and those it drops with the reason
(``out/stages/NN-NAME/shard-KKKKK/``), each shard directory written under a temporary name and renamed. A
killed run, rerun with the same config, keeps the shards already written (feeding their kept records to the
stage, so a deduplicating stage knows them) and computes the rest: it neither loses nor repeats a record. A
rerun with another config or other input is refused (``manifest.json`` records both).

Written to ``out``: ``curated.jsonl`` (the records every stage kept, as they were read), ``dropped/NN-NAME.jsonl``
per stage (each dropped record's id, place, reason and what it was a duplicate or contaminant of),
``rejects.jsonl`` (malformed records, with ``malformed: reject``), ``report.json`` and ``report.md`` (the
counts per stage and reason; the output's count is checked against them, so it is never silently short).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from distillzoo.atomic import sweep_temporaries, write_dir_atomically, write_text_atomically
from distillzoo.errors import ConfigError, DataError, DistillzooError, UnknownNameError, did_you_mean

MALFORMED = ("refuse", "reject")


@dataclass
class Row:
    """One record: where it was read (``file:line``), the record as read, and its fields as the format reads it."""

    where: str
    record: dict
    fields: dict

    @property
    def id(self) -> str:
        return str(self.fields["id"])


class Stage:
    """Base of a curation stage, registered through the ``register_curation_stages`` hook and named in
    ``curate.stages``. Built with the entry's parameters; :meth:`judge` says why a record is dropped (None: kept).

    A stage with state (a deduplicator's index) builds it from the records it keeps, in :meth:`judge`, and from
    :meth:`seen`, which a resumed run calls with every record the stage kept in the shards already written."""

    name = ""

    def begin(self, context: "Context") -> None:
        """Before the first record: read what the stage needs (evaluation sets, ...)."""

    def seen(self, row: Row) -> None:
        """A record this stage kept in a shard written by an earlier, interrupted run."""

    def judge(self, row: Row) -> tuple[str, dict] | None:
        """``(reason, detail)`` to drop ``row`` (detail: JSON-able, e.g. ``{"of": sample id}``), or None to keep it."""
        raise NotImplementedError

    #: a stage that decides on the whole of its input (a balancer): :meth:`observe` sees every record first, then
    #: :meth:`settle` is called, then :meth:`judge` (on a resumed run too, so its decisions are the same)
    needs_all = False

    def observe(self, row: Row) -> None:
        """With ``needs_all``: one record of the stage's input, before any is judged."""

    def settle(self) -> None:
        """With ``needs_all``: every record was observed."""

    def summary(self) -> dict:
        """What the report adds for this stage (JSON-able), after its last record."""
        return {}


@dataclass
class Context:
    """What a stage sees of the run: the curate section and where it came from."""

    section: dict
    where: str


def _stages(section: dict, where: str) -> list[tuple[str, Stage]]:
    from distillzoo.hooks.manager import components

    found = components("curation_stages")
    entries = section.get("stages") or []
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{where}: curate.stages: give a list of stages, [{{name: dedup}}, ...] "
                          f"(available: {', '.join(sorted(found))})")
    out = []
    for i, entry in enumerate(entries):
        entry = dict(entry or {})
        name = entry.pop("name", None)
        if name not in found:
            raise UnknownNameError(f"{where}: curate.stages[{i}].name: unknown stage {name!r}. Available: "
                                   f"{', '.join(sorted(found))}." + did_you_mean(str(name), found))
        try:
            out.append((f"{i:02d}-{name}", found[name].obj(**entry)))
        except (TypeError, DistillzooError) as e:
            raise ConfigError(f"{where}: curate.stages[{i}] ({name}): {e}") from None
    return out


# ---------------------------------------------------------------------------------------------- reading
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
                    _fields(row, format, columns)
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


def _fields(row: dict, format: str, columns: dict | None) -> dict:
    from distillzoo.data.records import data_format

    if columns:
        row = {**row, **{field: row[column] for field, column in columns.items() if column in row}}
    return data_format(format)(row)


# ---------------------------------------------------------------------------------------------- running
def _digest(paths: list[str]) -> list[dict]:
    out = []
    for path in paths:
        files = sorted(p for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else [Path(path)]
        h = hashlib.sha256()
        for file in files:
            with file.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        out.append({"path": str(path), "sha256": h.hexdigest()})
    return out


def _write_jsonl(path: Path, items) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_temporaries(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(item, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def _shard(directory: Path, kept: list[dict], dropped: list[dict]) -> None:
    def write(tmp: Path) -> None:
        for name, items in (("kept.jsonl", kept), ("dropped.jsonl", dropped)):
            (tmp / name).write_text("".join(json.dumps(i, ensure_ascii=False) + "\n" for i in items),
                                    encoding="utf-8")

    write_dir_atomically(directory, write)


def _source_shards(section: dict, out: Path, say) -> list[Path]:
    """The input cut into shards of valid records (``kept``) and malformed ones (``dropped``), resumably."""
    paths, format, columns = section["data"], section["format"], section.get("columns")
    size, refuse = section["shard_size"], section["malformed"] == "refuse"
    if refuse:  # nothing is written before the whole input is known to be well-formed
        seen: dict[str, str] = {}
        for at, row, why in read_source(paths, format, columns):
            why = why or _repeat(row, at, format, columns, seen)
            if why is not None:
                raise DataError(f"{at}: {why}; nothing was written (curate.malformed: reject moves such records to "
                                "rejects.jsonl and goes on)")
    directory = out / "stages" / "source"
    directory.mkdir(parents=True, exist_ok=True)
    sweep_temporaries(directory, "shard-*")
    seen, shards, kept, dropped, index = {}, [], [], [], 0

    def flush():
        target = directory / f"shard-{index:05d}"
        if not target.exists():
            _shard(target, kept, dropped)
        shards.append(target)

    done = {p.name for p in directory.glob("shard-*")}
    count = 0
    for at, row, why in read_source(paths, format, columns):
        name = f"shard-{index:05d}"
        if name in done:  # written by an earlier run: its ids are known for the repeat check below
            if count == 0:
                for item in _read_jsonl(directory / name / "kept.jsonl"):
                    seen[str(item["id"])] = item["where"]
        else:
            why = why or _repeat(row, at, format, columns, seen)
            (dropped if why else kept).append({"where": at, "reason": why} if why else
                                              {"where": at, "id": str(_fields(row, format, columns)["id"]),
                                               "record": row})
        count += 1
        if count == size:
            flush()
            index, count, kept, dropped = index + 1, 0, [], []
    if count:
        flush()
    say(f"source: {len(shards)} shard(s) of up to {size} records")
    return shards


def _repeat(row: dict, at: str, format: str, columns, seen: dict) -> str | None:
    sample_id = str(_fields(row, format, columns)["id"])
    if sample_id in seen:
        return f"id {sample_id!r} was used before, at {seen[sample_id]}"
    seen[sample_id] = at
    return None


def curate(section: dict, where: str = "<config>", say=print) -> dict:
    """Run (or finish) the pipeline a ``curate`` section describes; returns the report."""
    section = _checked(section, where)
    stages = _stages(section, where)
    out = Path(section["out"])
    manifest = {"distillzoo_curate": 1, "curate": {k: v for k, v in section.items() if k != "out"},
                "inputs": _digest(section["data"] + [e["path"] for e in section.get("eval") or []])}
    path = out / "manifest.json"
    if path.exists():
        old = json.loads(path.read_text(encoding="utf-8"))
        if old != manifest:
            keys = [k for k in ("curate", "inputs") if old.get(k) != manifest[k]]
            raise ConfigError(f"{where}: curate.out: {out} holds a curation of another {' and '.join(keys)} "
                              f"({'config' if 'curate' in keys else 'input'} changed); give another out, or remove it")
    else:
        write_text_atomically(path, json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    shards = _source_shards(section, out, say)
    report = {"input": 0, "malformed": 0, "stages": []}
    rejects = []
    for shard in shards:
        kept, dropped = _read_jsonl(shard / "kept.jsonl"), _read_jsonl(shard / "dropped.jsonl")
        report["input"] += len(kept) + len(dropped)
        report["malformed"] += len(dropped)
        rejects += dropped
    context = Context(section, where)
    for label, stage in stages:
        stage.begin(context)
        if stage.needs_all:
            for shard in shards:
                for item in _read_jsonl(shard / "kept.jsonl"):
                    stage.observe(Row(item["where"], item["record"], _fields(item["record"], section["format"],
                                                                             section.get("columns"))))
            stage.settle()
        directory = out / "stages" / label
        directory.mkdir(parents=True, exist_ok=True)
        sweep_temporaries(directory, "shard-*")
        reasons: Counter = Counter()
        counts = {"stage": label, "in": 0, "kept": 0, "dropped": 0}
        side = []
        next_shards = []
        for shard in shards:
            target = directory / shard.name
            rows = _read_jsonl(shard / "kept.jsonl")
            if target.exists():  # written by an earlier run: the stage learns what it kept
                kept_items = _read_jsonl(target / "kept.jsonl")
                for item in kept_items:
                    stage.seen(Row(item["where"], item["record"], _fields(item["record"], section["format"],
                                                                          section.get("columns"))))
                dropped_items = _read_jsonl(target / "dropped.jsonl")
            else:
                kept_items, dropped_items = [], []
                for item in rows:
                    row = Row(item["where"], item["record"], _fields(item["record"], section["format"],
                                                                    section.get("columns")))
                    verdict = stage.judge(row)
                    if verdict is None:
                        kept_items.append(item)
                    else:
                        reason, detail = verdict
                        dropped_items.append({"id": row.id, "where": row.where, "reason": reason, **detail})
                _shard(target, kept_items, dropped_items)
            if len(kept_items) + len(dropped_items) != len(rows):
                raise DataError(f"{target}: {len(kept_items)} kept and {len(dropped_items)} dropped of {len(rows)} "
                                "records; the shard is damaged: remove it and rerun")
            counts["in"] += len(rows)
            counts["kept"] += len(kept_items)
            counts["dropped"] += len(dropped_items)
            reasons.update(d["reason"].split(":")[0] for d in dropped_items)
            side += dropped_items
            next_shards.append(target)
        _write_jsonl(out / "dropped" / f"{label}.jsonl", side)
        report["stages"].append({**counts, "reasons": dict(reasons), **stage.summary()})
        say(f"{label}: kept {counts['kept']} of {counts['in']}")
        shards = next_shards
    final = [item["record"] for shard in shards for item in _read_jsonl(shard / "kept.jsonl")]
    expected = report["input"] - report["malformed"] - sum(s["dropped"] for s in report["stages"])
    if len(final) != expected:
        raise DataError(f"{where}: curate: {len(final)} records kept, but the counts say {expected}; nothing final was "
                        "written")
    report["output"] = len(final)
    _write_jsonl(out / "curated.jsonl", final)
    if section["malformed"] == "reject":
        _write_jsonl(out / "rejects.jsonl", rejects)
    write_text_atomically(out / "report.json", json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    write_text_atomically(out / "report.md", markdown(report))
    return report


def markdown(report: dict) -> str:
    """The report as a table: per stage, records in, kept, dropped and why."""
    lines = ["# distillzoo curate", "",
             f"{report['input']} records read, {report['malformed']} malformed, {report['output']} kept.", "",
             "| stage | in | kept | dropped | reasons |", "|---|---|---|---|---|"]
    for s in report["stages"]:
        why = ", ".join(f"{k}: {v}" for k, v in sorted(s["reasons"].items())) or "-"
        lines.append(f"| {s['stage']} | {s['in']} | {s['kept']} | {s['dropped']} | {why} |")
    for s in report["stages"]:
        if "buckets" in s:  # a balancer: achieved against target, bucket by bucket
            lines += ["", f"{s['stage']}:", "", "| bucket | in | kept | share | target share |", "|---|---|---|---|---|"]
            lines += [f"| {b} | {v['in']} | {v['kept']} | {v['share']} | {v.get('target_share', '-')} |"
                      for b, v in s["buckets"].items()]
    return "\n".join(lines) + "\n"


def _checked(section, where: str) -> dict:
    """The ``curate`` section as a plain dict, checked: data, format, out, malformed, shard_size, eval."""
    from omegaconf import DictConfig, OmegaConf

    if section is None:
        raise ConfigError(f"{where}: curate: no 'curate' section (data, format, out, stages)")
    section = OmegaConf.to_container(section, resolve=True) if isinstance(section, DictConfig) else dict(section)
    data = section.get("data")
    section["data"] = [data] if isinstance(data, str) else list(data or [])
    if not section["data"]:
        raise ConfigError(f"{where}: curate.data: give the records to curate (a file or a list)")
    for path in section["data"]:
        if not Path(path).exists():
            raise ConfigError(f"{where}: curate.data: {path!r} does not exist")
    if not section.get("out"):
        raise ConfigError(f"{where}: curate.out: give the directory to write to")
    if section.get("malformed") not in MALFORMED:
        raise ConfigError(f"{where}: curate.malformed: {section.get('malformed')!r} is not one of {list(MALFORMED)}")
    size = section.get("shard_size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ConfigError(f"{where}: curate.shard_size: an integer >= 1, got {size!r}")
    return section
