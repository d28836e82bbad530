"""A JSONL output keyed by sample id, written by one process or by every rank of a torchrun launch.

Each rank appends its records, a batch at a time (flushed and fsynced), to its
own part next to the output, ``OUT.part-RANK``; when all ranks are done, rank 0
merges the parts into ``OUT`` in the order of the input (written atomically) and
removes them. So ``OUT`` only ever holds a whole run, and one process and N ranks
write the same bytes. A rerun after any process died skips the ids already in
``OUT`` or in any part (of any earlier number of ranks), after dropping a last
line cut off mid-write. Parts are resumed only under the settings they were
written with (``OUT.parts.json``: the model, sampling, scorer, ...), so a rerun
with another model never mixes its records with the first one's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from distillzoo.atomic import write_text_atomically
from distillzoo.errors import DataError
from distillzoo.teacher.launch import Launch


def _lines(path: Path) -> list[str]:
    """The whole lines of a file we append to; a last line without its newline (cut mid-write) is removed."""
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):
        text = text[:text.rfind("\n") + 1]
        write_text_atomically(path, text)
    return [line + "\n" for line in text.split("\n")[:-1]]  # "\n" only: a value may hold U+2028


def _records(path: Path) -> dict[str, str]:
    """``{id: line}`` of an output or part file; a line that is not a JSON record with an id is refused."""
    found = {}
    for n, line in enumerate(_lines(path), 1):
        try:
            found.setdefault(str(json.loads(line)["id"]), line)
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError(f"{path}:{n}: not a generated record (JSON with an 'id'); not appending to it") from None
    return found


def finished_ids(out_path: Path) -> set[str]:
    """Ids already in an output file; a last line without its newline (cut off mid-write) is removed."""
    return set(_records(Path(out_path)))


class PartedOutput:
    """``OUT`` and the parts the ranks of a launch write towards it.

    ``header``: a first line of ``OUT`` that is not a record (a cache's manifest). Such an
    output is written whole by :meth:`merge` and never resumed from: only parts are.
    """

    def __init__(self, out: str | Path, launch: Launch, header: str | None = None, identity: dict | None = None
                 ) -> None:
        self.out, self.launch, self.header = Path(out), launch, header
        self.identity = json.loads(json.dumps(identity or {}, sort_keys=True, default=str))
        self.part = self.out.with_name(f"{self.out.name}.part-{launch.rank}")
        self.settings = self.out.with_name(f"{self.out.name}.parts.json")

    def parts(self) -> list[Path]:
        return sorted(self.out.parent.glob(f"{self.out.name}.part-*"))

    def _same_settings(self) -> None:
        """Parts of an earlier run are resumed only under the settings they were written with (model,
        sampling, scorer, ...); a first run records them."""
        if not self.parts():
            write_text_atomically(self.settings, json.dumps(self.identity, indent=1) + "\n")
            return
        try:
            recorded = json.loads(self.settings.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            recorded = None
        if recorded != self.identity:
            changed = sorted(k for k in set(recorded or {}) | set(self.identity)
                             if (recorded or {}).get(k) != self.identity.get(k))
            raise DataError(f"{self.out}: the parts {', '.join(p.name for p in self.parts())} were written by an "
                            f"interrupted run with other settings ({', '.join(changed) or 'unrecorded'}: "
                            + "; ".join(f"{k} {(recorded or {}).get(k)!r} there, {self.identity.get(k)!r} now"
                                        for k in changed[:3])
                            + "); rerun with those settings to finish it, or remove the parts to start over")

    def done(self) -> set[str]:
        """The ids in ``OUT`` (unless it has a header) and in every part: what a rerun skips.

        Every rank gets the same set (the ranks deal out the rest by it): rank 0 first drops the
        torn last lines a killed run left, then all read, and none appends before all have read.
        """
        files = ([] if self.header is not None else [self.out]) + self.parts()
        if self.launch.main:
            self._same_settings()
            for path in files:
                _lines(path)
        self.launch.barrier()
        found = set().union(*(finished_ids(path) for path in files))
        self.launch.barrier()
        return found

    def append(self, records: Sequence[dict]) -> None:
        if not records:
            return
        self.out.parent.mkdir(parents=True, exist_ok=True)
        with self.part.open("a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
            f.flush()
            os.fsync(f.fileno())

    def merge(self, order: Sequence[str]) -> None:
        """Wait for every rank; then rank 0 writes ``OUT``: the header, the records in the order of the ids
        ``order``, then any other record ``OUT`` held before; and removes the parts."""
        self.launch.barrier()
        if self.launch.main:
            found = _records(self.out) if self.header is None else {}
            for part in self.parts():
                for key, line in _records(part).items():
                    found.setdefault(key, line)
            ranked = [found.pop(key) for key in order if key in found] + list(found.values())
            write_text_atomically(self.out, (self.header + "\n" if self.header is not None else "") + "".join(ranked))
            for part in self.parts():
                part.unlink()
            self.settings.unlink(missing_ok=True)
        self.launch.barrier()
