"""The report of a curation: counts per stage and reason, and the data's distributions before and after over
task, language, reply length and score, as a Markdown table and a PNG of bar charts.

The dimensions: ``task`` is a record's ``task`` field (what the ``tag`` stage writes; ``untagged`` without
one); ``language`` its ``language`` field, else ``zh`` when its text holds a Han character, ``en`` when it is
ASCII, ``other`` otherwise; ``length`` the reply's characters in buckets of :data:`LENGTH_EDGES`; ``score``
its ``score`` field (what the ``score`` stage writes) in tenths of the range seen, or ``unscored``.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

from distillzoo.curate.text import record_text, response_text

#: the reply-length buckets of the report, in characters
LENGTH_EDGES = (50, 100, 200, 500, 1000, 2000, 4000)
DIMENSIONS = ("task", "language", "length", "score")


def length_bucket(n: int, edges=LENGTH_EDGES) -> str:
    """The bucket of a reply of ``n`` characters: ``lo-hi`` (both included) or ``lo+``."""
    i = sum(n >= e for e in edges)
    lo = 0 if i == 0 else edges[i - 1]
    return f"{lo}-{edges[i] - 1}" if i < len(edges) else f"{lo}+"


def language_of(row) -> str:
    """A record's language: its ``language`` field, else what its script says (zh, en, other)."""
    from distillzoo.teacher.rouge import language

    given = row.record.get("language", row.fields.get("language"))
    return str(given) if given is not None else language(record_text(row.fields))


class Distributions:
    """Counts of the records added, per dimension and value; scores are kept whole, to be binned at the end."""

    def __init__(self) -> None:
        self.counts = {d: Counter() for d in ("task", "language", "length")}
        self.scores: list[float] = []
        self.unscored = 0
        self.n = 0

    def add(self, row) -> None:
        self.n += 1
        self.counts["task"][str(row.record.get("task", "untagged"))] += 1
        self.counts["language"][language_of(row)] += 1
        self.counts["length"][length_bucket(len(response_text(row.fields)))] += 1
        score = row.record.get("score")
        if isinstance(score, (int, float)) and not isinstance(score, bool) and math.isfinite(score):
            self.scores.append(float(score))
        else:
            self.unscored += 1

    def table(self) -> dict:
        """``{dimension: {value: count}}``, scores binned into tenths of their range."""
        out = {d: dict(sorted(c.items())) for d, c in self.counts.items()}
        scores: Counter = Counter()
        if self.scores:
            lo, hi = min(self.scores), max(self.scores)
            width = (hi - lo) / 10 or 1.0
            for s in self.scores:
                k = min(int((s - lo) / width), 9)
                scores[f"{lo + k * width:.3g}..{lo + (k + 1) * width:.3g}"] += 1
        if self.unscored:
            scores["unscored"] = self.unscored
        out["score"] = dict(scores)
        out["records"] = self.n
        return out


def markdown(report: dict) -> str:
    """The report as tables: per stage, records in, kept, added, dropped and why; each balancer's buckets; each
    dimension's distribution before and after."""
    lines = ["# distillzoo curate", "",
             f"{report['input']} records read, {report['malformed']} malformed, {report['output']} kept.", "",
             "| stage | in | kept | added | dropped | reasons |", "|---|---|---|---|---|---|"]
    for s in report["stages"]:
        why = ", ".join(f"{k}: {v}" for k, v in sorted(s["reasons"].items())) or "-"
        lines.append(f"| {s['stage']} | {s['in']} | {s['kept']} | {s.get('added', 0)} | {s['dropped']} | {why} |")
    for s in report["stages"]:
        if "buckets" in s:  # a balancer: achieved against target, bucket by bucket
            lines += ["", f"{s['stage']}:", "", "| bucket | in | kept | share | target share |", "|---|---|---|---|---|"]
            lines += [f"| {b} | {v['in']} | {v['kept']} | {v['share']} | {v.get('target_share', '-')} |"
                      for b, v in s["buckets"].items()]
    dist = report.get("distributions")
    if dist:
        before, after = dist["before"], dist["after"]
        lines += ["", "## Distributions", "", f"{before['records']} records before the stages, {after['records']} after."]
        for d in DIMENSIONS:
            values = sorted(set(before[d]) | set(after[d]), key=_order)
            lines += ["", f"| {d} | before | share | after | share |", "|---|---|---|---|---|"]
            lines += [f"| {v} | {before[d].get(v, 0)} | {_share(before, d, v)} | {after[d].get(v, 0)} | "
                      f"{_share(after, d, v)} |" for v in values]
    if report.get("plot"):
        lines += ["", f"![distributions before and after]({report['plot']})"]
    return "\n".join(lines) + "\n"


def _share(table: dict, d: str, v: str) -> str:
    total = sum(table[d].values())
    return f"{table[d].get(v, 0) / total:.1%}" if total else "-"


def _order(value: str):
    """Buckets in numeric order where they start with a number, the rest by name after them."""
    head = value.split("-")[0].split("..")[0].rstrip("+")
    try:
        return (0, float(head), value)
    except ValueError:
        return (1, 0.0, value)


def plot(distributions: dict, path: Path) -> str | None:
    """A PNG of one bar chart per dimension, before and after side by side (shares of the records); returns its
    file name, or None when matplotlib is not installed (``pip install "distillzoo[curate]"``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    import os
    import tempfile

    before, after = distributions["before"], distributions["after"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for ax, d in zip(axes.flat, DIMENSIONS):
        values = sorted(set(before[d]) | set(after[d]), key=_order)
        x = range(len(values))
        for shift, label, table in ((-0.2, "before", before), (0.2, "after", after)):
            total = sum(table[d].values()) or 1
            ax.bar([i + shift for i in x], [table[d].get(v, 0) / total for v in values], width=0.4,
                   label=f"{label} ({table['records']} records)")
        ax.set_xticks(list(x), values, rotation=45, ha="right", fontsize=7)
        ax.set_title(d)
        ax.set_ylabel("share of records")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)
    return path.name
