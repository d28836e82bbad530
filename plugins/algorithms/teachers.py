"""Several teachers for ``distill``: ``teachers:``, each a served or cached top-k teacher, routed by data stream or
mixed by weight on the same tokens.

::

    teachers:
      - {name: math, server: "http://10.0.0.5:8000", model: qwen-math-72b, top_k: 20, streams: [math]}
      - {name: chat, cache: cache/chat-72b, top_k: 20, streams: [chat, zh]}

Routed (every entry gives ``streams``, ``route`` or both): each example is read by exactly one teacher, the
one whose streams hold the stream it was drawn from and whose ``route`` its record's fields match
(``route: {language: zh}``, ``route: {task: [code, math]}``), and is distilled from it as if trained against
that teacher alone; a record that no teacher or two teachers would read is refused before training, naming
its file and line. Mixed (every entry gives ``weight``): every example is distilled from each teacher, the loss
the weighted sum of the objective against each. Each step logs ``teachers/<name>``: the share of the step's
scored tokens each teacher scored (times ``tokens``, the count).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from distillzoo.errors import ConfigError

#: what an entry of ``teachers:`` may give
KEYS = ("name", "server", "model", "top_k", "api", "cache", "streams", "route", "weight")


@dataclass
class Teacher:
    """One entry: its name, its source (a ServedTeacher or a TeacherCache), and its streams or its weight."""

    name: str
    source: object
    streams: tuple[str, ...] | None
    weight: float | None
    route: dict[str, tuple[str, ...]] | None = None

    @property
    def served(self) -> bool:
        return hasattr(self.source, "url")

    def reads(self, stream: str, fields: dict) -> bool:
        """Whether this teacher reads an example of ``stream`` whose record has ``fields``."""
        return (self.streams is None or stream in self.streams) and \
            (self.route is None or all(str(fields.get(k)) in v for k, v in self.route.items()))


def parse_teachers(entries, spec, open_source, where: str) -> list[Teacher]:
    """The ``teachers:`` list checked (names, sources, streams or weights), each source opened by
    ``open_source(spec with that teacher, where)`` (the algorithm's own checks of one served or cached teacher)."""
    from omegaconf import OmegaConf

    from distillzoo.config import ModelConfig

    if spec.teacher is not None:
        raise ConfigError(f"{where}: teachers: give teacher (one) or teachers (several), not both")
    entries = [OmegaConf.to_container(e, resolve=True) if not isinstance(e, dict) else e for e in entries]
    if len(entries) < 2:
        raise ConfigError(f"{where}: teachers: give two or more (one teacher goes in teacher:)")
    names = [e.get("name") for e in entries]
    if any(not isinstance(n, str) or not n for n in names) or len(set(names)) != len(names):
        raise ConfigError(f"{where}: teachers: every entry needs a name, each its own (got {names})")
    stream_names = [s.name for s in spec.data.streams]
    routed = [e.get("streams") is not None or e.get("route") is not None for e in entries]
    weighted = [e.get("weight") is not None for e in entries]
    if not (all(routed) and not any(weighted)) and not (all(weighted) and not any(routed)):
        raise ConfigError(f"{where}: teachers: give every teacher streams or a route (routed by data stream or "
                          "record field) or every teacher a weight (mixed on the same tokens), not a mix")
    teachers = []
    for i, entry in enumerate(entries):
        at = f"teachers[{i}] ({entry['name']})"
        unknown = sorted(set(entry) - set(KEYS))
        if unknown:
            raise ConfigError(f"{where}: {at}: unknown key(s) {unknown}; an entry takes {list(KEYS)}")
        sources = [k for k in ("server", "cache") if entry.get(k) is not None]
        if len(sources) != 1:
            raise ConfigError(f"{where}: {at}: give one of server or cache (got {sources}); a teacher model in "
                              "process goes in teacher:, or serve it (distillzoo serve) or cache it "
                              "(distillzoo cache-teacher) to use it among several")
        section = ModelConfig(**{k: v for k, v in entry.items() if k in ("server", "model", "top_k", "api", "cache")})
        source = open_source(dataclasses.replace(spec, teacher=section), f"{where}: {at}")
        streams = entry.get("streams")
        if streams is not None:
            streams = tuple(streams)
            stray = [s for s in streams if s not in stream_names]
            if stray or not streams:
                raise ConfigError(f"{where}: {at}.streams: {stray or streams} name no stream of data.streams "
                                  f"({stream_names})")
        weight = entry.get("weight")
        if weight is not None and not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight > 0):
            raise ConfigError(f"{where}: {at}.weight: must be a number > 0, got {weight!r}")
        route = entry.get("route")
        if route is not None:
            if not isinstance(route, dict) or not route:
                raise ConfigError(f"{where}: {at}.route: give {{record field: value or [values]}}, got {route!r}")
            route = {str(k): tuple(map(str, v if isinstance(v, (list, tuple)) else [v])) for k, v in route.items()}
        teachers.append(Teacher(entry["name"], source, streams, None if weight is None else float(weight), route))
    if all(routed) and not any(t.route for t in teachers):
        owners = {s: [t.name for t in teachers if s in t.streams] for s in stream_names}
        wrong = {s: o for s, o in owners.items() if len(o) != 1}
        if wrong:
            raise ConfigError(f"{where}: teachers: each data stream needs exactly one teacher; "
                              + ", ".join(f"stream {s!r} has {o or 'none'}" for s, o in wrong.items()))
    return teachers


def record_fields(teachers: list[Teacher], streams, where: str) -> dict[tuple[str, str], dict]:
    """``{(stream, sample id): {field: value}}`` of the fields the teachers route by, read from the streams' records,
    each record checked to be read by exactly one teacher (a ConfigError naming its file and line otherwise)."""
    from distillzoo.data.records import read_records
    from distillzoo.data.tables import kind, read_rows

    names = sorted({k for t in teachers for k in (t.route or {})})
    out: dict[str, dict] = {}
    for stream in streams:
        if kind(stream.path) == "prepared":
            raise ConfigError(f"{where}: teachers: a route reads record fields ({names}); stream {stream.name!r} is a "
                              "prepared directory, which keeps none: route it by streams, or train on its records")
        columns = None if stream.columns is None else dict(stream.columns)
        for (at, fields), (_, row) in zip(read_records(stream.path, stream.format, columns),
                                          read_rows(stream.path, columns)):
            tags = {k: row.get(k) for k in names}
            readers = [t.name for t in teachers if t.reads(stream.name, tags)]
            if len(readers) != 1:
                raise ConfigError(f"{where}: teachers: {at} (stream {stream.name!r}, {tags}) is read by "
                                  f"{readers or 'no teacher'}; each record needs exactly one")
            out[stream.name, str(fields["id"])] = tags
    return out


def routes(teachers: list[Teacher], examples: list[dict], fields: dict[tuple[str, str], dict] | None = None
           ) -> list[tuple[Teacher, list[int], float]]:
    """``(teacher, the rows of examples it scores, the weight of its loss)`` per teacher that scores any;
    ``fields``: what :func:`record_fields` read, when a teacher routes by them."""
    if teachers[0].weight is not None:
        rows = list(range(len(examples)))
        return [(t, rows, t.weight) for t in teachers]
    out = []
    for t in teachers:
        rows = [i for i, ex in enumerate(examples)
                if t.reads(ex.get("stream"), (fields or {}).get((ex.get("stream"), str(ex.get("id"))), {}))]
        if rows:
            out.append((t, rows, 1.0))
    return out
