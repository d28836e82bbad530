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
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from distillzoo.atomic import sweep_temporaries, write_text_atomically
from distillzoo.curate.files import each, read_jsonl, write_jsonl, write_shard
from distillzoo.curate.source import fields_of, source_shards
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

    def transform(self, rows: list[Row]) -> list[list[dict] | tuple[str, dict]]:
        """One outcome per row of a shard, in order: ``(reason, detail)`` to drop it, or the records that take its
        place: ``[row.record]`` keeps it as it is, a changed copy rewrites it (same id), and records after it are
        new rows (each with an id of its own). A stage that calls a model overrides this to batch the shard; by
        default each row is judged alone."""
        return [verdict if (verdict := self.judge(row)) is not None else [row.record] for row in rows]

    #: a stage that decides on the whole of its input (a balancer): :meth:`observe` sees every record first, then
    #: :meth:`settle` is called, then :meth:`judge` (on a resumed run too, so its decisions are the same)
    needs_all = False

    def observe(self, row: Row) -> None:
        """With ``needs_all``: one record of the stage's input, before any is judged."""

    def settle(self) -> None:
        """With ``needs_all``: every record was observed."""

    def end(self) -> None:
        """After the last shard: free what the stage held (an index on disk, ...)."""

    def summary(self) -> dict:
        """What the report adds for this stage (JSON-able), after its last record."""
        return {}

    #: the config sections (teacher, student, reference) whose models the stage reads; a resumed run is refused
    #: when one of them changed
    roles: tuple[str, ...] = ()


class Tagger:
    """Base of a tagger of the ``tag`` stage, registered through the ``register_taggers`` hook and named in
    ``{name: tag, tagger: NAME}``: :meth:`tag` gives each row of a shard its label (one of :attr:`labels`) and a
    JSON-able detail (the scores behind it). A trained classifier (DistilQwen2 tags with a DeBERTa v3 one) is a
    tagger whose :meth:`begin` loads it and whose :meth:`tag` runs it over the batch."""

    name = ""
    #: the config sections (teacher, student, reference) whose models the tagger reads
    roles: tuple[str, ...] = ()

    def begin(self, context: "Context", types: list[dict]) -> None:
        """Before the first shard: ``types``, the stage's taxonomy (``{name, en, keywords}`` each); a label is a
        type's ``name``."""

    def tag(self, rows: list[Row]) -> list[tuple[str, dict]]:
        raise NotImplementedError


@dataclass
class Context:
    """What a stage sees of the run: the curate section, where it came from, and the models of the whole config
    (``cfg``: its ``teacher``, ``student`` and ``reference`` sections, each a model or a server)."""

    section: dict
    where: str
    cfg: object = None
    say: object = print
    launch: object = None  # the torchrun launch (distillzoo.teacher.launch.Launch); one process when None

    def __post_init__(self) -> None:
        if self.launch is None:
            from distillzoo.teacher.launch import Launch

            self.launch = Launch()
        self.stage = ""  # the label of the stage running (NN-NAME)
        self._models: dict = {}
        self._tokenizer = None

    @property
    def tokenizer(self):
        """The chat tokenizer of the config's ``data.tokenizer`` (Qwen's by default)."""
        if self._tokenizer is None:
            from distillzoo.data.tokenizer import load_tokenizer

            data = getattr(self.cfg, "data", None)
            self._tokenizer = load_tokenizer(data.tokenizer if data is not None else None)
        return self._tokenizer

    def model(self, role: str, stage: str):
        """The model (in process) or the served client of the config's ``role`` section, loaded once per run."""
        if role not in self._models:
            from distillzoo.curate.models import load_role

            self._models[role] = load_role(self.cfg, role, self.tokenizer, f"{self.where}: {stage}")
        return self._models[role]

    def close(self) -> None:
        for model in self._models.values():
            getattr(model, "close", lambda: None)()


def index_path(context: Context) -> Path:
    """Where the running stage may keep an index on disk for the length of a run (a hidden file in ``out``)."""
    out = Path(context.section["out"])
    out.mkdir(parents=True, exist_ok=True)
    return out / f".{context.stage}.index"


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


def curate(section: dict, where: str = "<config>", say=print, cfg=None) -> dict:
    """Run (or finish) the pipeline a ``curate`` section describes; returns the report. ``cfg``, the whole config,
    gives the model stages their models (its ``teacher``, ``student``, ``reference``).

    Under ``torchrun`` every rank loads the models of the model stages and answers its share of each shard's
    records (every ``world``-th), and rank 0 runs the other stages and writes every file, as one process
    would."""
    from distillzoo.teacher.launch import Launch

    from distillzoo.curate.source import forget_readers

    forget_readers()  # the formats' readers as the plugins of this run register them
    section, stages = validate_curate(section, where, cfg)
    out = Path(section["out"])
    launch = Launch.from_env()
    context = Context(section, where, cfg, say, launch)
    manifest = {"distillzoo_curate": 1, "curate": {k: v for k, v in section.items() if k != "out"},
                "models": _model_identities(context, stages),
                "inputs": _digest(section["data"] + [e["path"] for e in section.get("eval") or []])}
    path = out / "manifest.json"
    if path.exists():
        old = json.loads(path.read_text(encoding="utf-8"))
        if old != manifest:
            keys = [k for k in ("curate", "models", "inputs") if old.get(k) != manifest[k]]
            raise ConfigError(f"{where}: curate.out: {out} holds a curation of another {' and '.join(keys)} "
                              f"({'config' if 'curate' in keys else 'model' if 'models' in keys else 'input'} "
                              "changed); give another out, or remove it")
    elif launch.main:
        write_text_atomically(path, json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    if launch.main:
        source_shards(section, out, say)
    launch.barrier()
    shards = sorted((out / "stages" / "source").glob("shard-*"))
    fmt, columns = section["format"], section.get("columns")
    as_row = lambda item: Row(item["where"], item["record"], fields_of(item["record"], fmt, columns))  # noqa: E731
    report = {"input": 0, "malformed": 0, "stages": []}
    source = shards
    try:
        for label, stage in stages:
            shards = _run_stage(label, stage, shards, out, context, as_row, report, say)
    finally:
        context.close()
    if launch.main:
        _finish(section, where, source, shards, out, as_row, report)
    launch.barrier()
    return json.loads((out / "report.json").read_text(encoding="utf-8"))


def _finish(section: dict, where: str, source: list[Path], shards: list[Path], out: Path, as_row, report: dict):
    """The outputs: curated.jsonl (its count checked against the report), rejects.jsonl, the report with the
    distributions before and after."""
    from distillzoo.curate.report import Distributions, markdown, plot

    before, after = Distributions(), Distributions()
    for shard in source:
        report["malformed"] += sum(1 for _ in each(shard / "dropped.jsonl"))
        for item in each(shard / "kept.jsonl"):
            report["input"] += 1
            before.add(as_row(item))
    report["input"] += report["malformed"]
    expected = report["input"] - report["malformed"] + sum(s["added"] - s["dropped"] for s in report["stages"])
    count = write_jsonl(out / "curated.jsonl", (item["record"] for shard in shards for item in
                                                 each(shard / "kept.jsonl", lambda i: after.add(as_row(i)))))
    if count != expected:
        (out / "curated.jsonl").unlink()
        raise DataError(f"{where}: curate: {count} records kept, but the counts say {expected}; nothing final was "
                        "written")
    report["output"] = count
    if section["malformed"] == "reject":
        write_jsonl(out / "rejects.jsonl", (item for shard in source for item in each(shard / "dropped.jsonl")))
    report["distributions"] = {"before": before.table(), "after": after.table()}
    report["plot"] = plot(report["distributions"], out / "distributions.png")
    write_text_atomically(out / "report.json", json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    write_text_atomically(out / "report.md", markdown(report))


def _model_identities(context: Context, stages) -> dict:
    """What the model stages read, by role: a model's config and weights hash, or a server's URL and model name;
    part of the manifest, so that a rerun with another model is refused rather than mixed in."""
    from distillzoo.teacher.served import identity

    roles = sorted({role for label, stage in stages for role in stage.roles})
    users = {role: next(label for label, stage in stages if role in stage.roles) for role in roles}
    return {role: identity(context.model(role, f"curate.stages[{int(users[role][:2])}]")) for role in roles}


def _run_stage(label: str, stage: Stage, shards: list[Path], out: Path, context: Context, as_row, report: dict,
               say) -> list[Path]:
    """One stage over every shard: the shards already written are fed to it (``seen``), the others computed and
    written atomically. Returns the stage's shards. Under torchrun a model stage runs on every rank (each its
    share of a shard's records); any other stage on rank 0 alone, while the others wait."""
    launch = context.launch
    directory = out / "stages" / label
    shared = launch.world > 1 and bool(stage.roles)
    if not (launch.main or shared):
        launch.barrier()
        return [directory / shard.name for shard in shards]
    context.stage = label
    stage.begin(context)
    if stage.needs_all:
        for shard in shards:
            for item in each(shard / "kept.jsonl"):
                stage.observe(as_row(item))
        stage.settle()
    if launch.main:
        directory.mkdir(parents=True, exist_ok=True)
        sweep_temporaries(directory, "shard-*")
    done = {p.name for p in directory.glob("shard-*")} if launch.main else set()
    done = launch.gather(done)[0] if shared else done  # every rank skips the shards rank 0 found written
    reasons: Counter = Counter()
    counts = {"stage": label, "in": 0, "kept": 0, "dropped": 0, "added": 0}
    next_shards = []
    for shard in shards:
        target = directory / shard.name
        next_shards.append(target)
        rows = read_jsonl(shard / "kept.jsonl")
        if shard.name in done:  # written by an earlier run: the stage learns what it kept
            if not launch.main:
                continue
            kept_items = read_jsonl(target / "kept.jsonl")
            for item in kept_items:
                stage.seen(as_row(item))
            dropped_items = read_jsonl(target / "dropped.jsonl")
        else:
            batch = [as_row(item) for item in rows]
            outcomes = _transform(stage, batch, launch, shared)
            if not launch.main:
                continue
            kept_items, dropped_items = _outcomes(label, batch, outcomes, context, as_row)
            write_shard(target, kept_items, dropped_items)
        added = sum(1 for item in kept_items if item.get("from") is not None)
        if len(kept_items) - added + len(dropped_items) != len(rows):
            raise DataError(f"{target}: {len(kept_items) - added} kept and {len(dropped_items)} dropped of "
                            f"{len(rows)} records; the shard is damaged: remove it and rerun")
        counts["in"] += len(rows)
        counts["kept"] += len(kept_items) - added
        counts["added"] += added
        counts["dropped"] += len(dropped_items)
        reasons.update(d["reason"].split(":")[0] for d in dropped_items)
    stage.end()
    summaries = launch.gather(stage.summary()) if shared else [stage.summary()]
    if launch.main:
        write_jsonl(out / "dropped" / f"{label}.jsonl", (d for t in next_shards for d in each(t / "dropped.jsonl")))
        report["stages"].append({**counts, "reasons": dict(reasons), **_merged(summaries)})
        say(f"{label}: kept {counts['kept']} of {counts['in']}"
            + (f", added {counts['added']}" if counts["added"] else ""))
    launch.barrier()
    return next_shards


def _transform(stage: Stage, rows: list[Row], launch, shared: bool) -> list:
    """The stage's outcomes for a shard's rows; ``shared`` among the ranks, each transforming every ``world``-th
    row, the outcomes gathered back into order on every rank."""
    if not shared:
        return stage.transform(rows) if rows else []
    mine = rows[launch.rank::launch.world]
    got = launch.gather(stage.transform(mine) if mine else [])
    return [got[i % launch.world][i // launch.world] for i in range(len(rows))]


def _merged(summaries: list[dict]) -> dict:
    """The ranks' summaries of a stage as one: numbers added, mappings merged key by key, anything else rank 0's."""
    out = dict(summaries[0])
    for other in summaries[1:]:
        for key, value in other.items():
            mine = out.get(key)
            if isinstance(value, (int, float)) and isinstance(mine, (int, float)):
                out[key] = mine + value
            elif isinstance(value, dict) and isinstance(mine, dict):
                out[key] = _merged([mine, value])
            elif key not in out:
                out[key] = value
    return out


def _outcomes(label: str, rows: list[Row], outcomes: list, context: Context, as_row) -> tuple[list[dict], list[dict]]:
    """The stage's outcomes for a shard's rows as the shard's kept and dropped items. A record a stage wrote is
    checked to be a record of the format; a rewritten one keeps its row's id, and a new one is marked with the
    id it came ``from``."""
    if len(outcomes) != len(rows):
        raise DistillzooError(f"curate stage {label}: {len(outcomes)} outcomes for {len(rows)} records")
    kept, dropped = [], []
    for row, outcome in zip(rows, outcomes):
        if isinstance(outcome, tuple):
            reason, detail = outcome
            dropped.append({"id": row.id, "where": row.where, "reason": reason, **detail})
            continue
        for k, record in enumerate(outcome):
            item = {"where": row.where if k == 0 else f"{row.where} ({label} {k})", "record": record}
            if record is row.record:  # kept as it was read: already a record of the format
                item["id"] = row.id
                kept.append(item)
                continue
            try:
                item["id"] = as_row(item).id
            except (DistillzooError, KeyError, TypeError) as e:
                raise DataError(f"curate stage {label}: from {row.where}: the record it wrote is not a "
                                f"{context.section['format']!r} record: {e}") from None
            if k == 0 and item["id"] != row.id:
                raise DataError(f"curate stage {label}: {row.where}: a rewritten record keeps its id {row.id!r}, "
                                f"got {item['id']!r}")
            if k > 0:
                item["from"] = row.id
            kept.append(item)
    return kept, dropped


def validate_curate(section, where: str = "<config>", cfg=None) -> tuple[dict, list[tuple[str, Stage]]]:
    """The ``curate`` section checked before any record is read or model loaded: its keys, each stage built from
    its entry, the evaluation sets there, and each model a stage reads given by the config (``cfg``)."""
    section = _checked(section, where)
    stages = _stages(section, where)
    for spec in section.get("eval") or []:
        if not isinstance(spec, dict) or not Path(str(spec.get("path"))).exists():
            raise ConfigError(f"{where}: curate.eval: {spec!r}: give {{path, format}} of an existing file")
    if any(stage.roles for _, stage in stages):
        from distillzoo.curate.models import require_role

        for label, stage in stages:
            for role in stage.roles:
                require_role(cfg, role, f"{where}: curate.stages[{int(label[:2])}] ({stage.name})")
    return section, stages


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
