"""Built-in curation stages of ``distillzoo curate``: ``dedup``, ``decontaminate``, ``quality``, ``balance``.

* ``dedup``: exact duplicates (the SHA-1 of the record's normalised text: NFKC, lower case, whitespace
  collapsed) and, with ``near: true``, near duplicates: MinHash over the record's ``shingle``-word shingles
  (each CJK character a word, so Chinese is shingled too), indexed by datasketch's LSH tuned to a threshold
  ``candidate_margin`` below ``threshold`` (so that pairs just above it are found), each candidate confirmed
  by the exact Jaccard similarity of the two shingle sets (kept as 64-bit hashes). The index (text hashes,
  band keys, shingle hashes) lives in an SQLite file beside the stage's shards with a page cache of
  ``index_cache_mb``, so memory stays bounded however many records pass; it is removed when the stage ends. The first record of a
  group is kept; each later one is dropped naming the record it duplicates (``of``) and their similarity.
* ``decontaminate``: drops a record that shares an ``n``-word sequence (13 by default, as the GPT-3 and
  Llama 2 reports count overlap) with any record of ``curate.eval``, naming the evaluation record and the
  n-gram.
* ``quality``: Gopher-style gates on the reply: its length in characters (``min_chars``, ``max_chars``),
  the fraction of its lines that repeat an earlier line (``max_duplicate_line_fraction``), and the fraction
  of its words covered by its most frequent word bigram (``max_top_bigram_fraction``); with
  ``languages`` (ISO 639-1 codes), the language of the record's text, identified offline by lingua over
  every language it knows (``language_accuracy``: high, about 1 GB of models, or low, about 100 MB), kept
  when it is one of them or the text is too short to tell (``min_chars_for_language``).
* ``balance``: downsamples to target shares over buckets (``by``: record fields such as ``task`` and
  ``language``, and ``length``, the reply's characters cut at ``length_edges``), at most ``cap`` per bucket.
  It sees its whole input first: the scarcest bucket relative to its weight is kept whole and every other
  is cut to its share; within a bucket the records kept are those with the smallest hash of (seed, id),
  so the choice is deterministic by seed and independent of order and sharding. The report gives each
  bucket's count in, kept, achieved and target share.
"""

from __future__ import annotations

import hashlib
from collections import Counter

from distillzoo.curate.pipeline import Stage
from distillzoo.curate.text import normalise, record_text, response_text, shingles, words
from distillzoo.errors import ParameterError
from distillzoo.hooks.hookspecs import hookimpl


def _fraction(value, name: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 1:
        raise ParameterError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


class Dedup(Stage):
    name = "dedup"

    def __init__(self, near: bool = True, threshold: float = 0.8, num_perm: int = 128, shingle: int = 5,
                 candidate_margin: float = 0.15, seed: int = 1, index_cache_mb: int = 64) -> None:
        self.near, self.threshold = bool(near), _fraction(threshold, "dedup.threshold")
        self.margin = _fraction(candidate_margin, "dedup.candidate_margin")
        if not isinstance(num_perm, int) or num_perm < 16:
            raise ParameterError(f"dedup.num_perm must be an integer >= 16, got {num_perm!r}")
        if not isinstance(shingle, int) or shingle < 1:
            raise ParameterError(f"dedup.shingle must be an integer >= 1, got {shingle!r}")
        self.num_perm, self.shingle, self.seed = num_perm, shingle, int(seed)
        self.cache_mb = int(index_cache_mb)
        self.db, self.count, self.bands = None, 0, (0, 0)

    def begin(self, context) -> None:
        """A fresh index on disk, next to the stage's shards (a resumed run rebuilds it from ``seen``)."""
        import sqlite3
        from datasketch import MinHashLSH

        from distillzoo.curate.pipeline import index_path

        path = index_path(context)
        path.unlink(missing_ok=True)
        self.path = path
        self.db = sqlite3.connect(path)
        self.db.executescript(f"""
            PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF; PRAGMA cache_size = -{self.cache_mb * 1024};
            CREATE TABLE exact (hash INTEGER PRIMARY KEY, id TEXT);
            CREATE TABLE band (key INTEGER, n INTEGER);
            CREATE INDEX band_key ON band (key);
            CREATE TABLE shingles (n INTEGER PRIMARY KEY, id TEXT, hashes BLOB);""")
        if self.near:  # datasketch's band layout for the candidate threshold (false positives and negatives weighed)
            from datasketch import MinHash

            lsh = MinHashLSH(threshold=max(self.threshold - self.margin, 0.05), num_perm=self.num_perm)
            self.bands = (lsh.b, lsh.r)
            first = MinHash(num_perm=self.num_perm, seed=self.seed)
            self.permutations, self.scheme = first.permutations, first.scheme  # drawn once

    def end(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None
            self.path.unlink(missing_ok=True)

    def _sketch(self, text: str):
        """``(band keys, sorted uint64 hashes of the shingles)`` of a record's text: the MinHash signature (over the
        shingles' 64-bit hashes, cut to the 32 bits datasketch's permutations take) cut into ``b`` bands of ``r``
        values, each band hashed with its number to one 63-bit key."""
        import numpy as np
        from datasketch import MinHash

        hashes = np.unique(np.array([int.from_bytes(hashlib.blake2b(s.encode("utf-8"), digest_size=8).digest(),
                                                     "little") for s in shingles(text, self.shingle)], dtype=np.uint64))
        sketch = MinHash(num_perm=self.num_perm, seed=self.seed, hashfunc=int, permutations=self.permutations,
                          scheme=self.scheme)
        sketch.update_batch((hashes & np.uint64(0xFFFFFFFF)).tolist())
        b, r = self.bands
        values = sketch.hashvalues
        keys = [int.from_bytes(hashlib.blake2b(values[i * r:(i + 1) * r].tobytes(), digest_size=8,
                                               person=i.to_bytes(2, "little")).digest(), "little", signed=True)
                for i in range(b)]
        return keys, hashes

    @staticmethod
    def _exact_key(text: str) -> int:
        return int.from_bytes(hashlib.sha1(normalise(text).encode("utf-8")).digest()[:8], "little", signed=True)

    def _add(self, row, key: int, sketch) -> None:
        self.db.execute("INSERT OR IGNORE INTO exact VALUES (?, ?)", (key, row.id))
        if sketch is not None:
            n = self.count
            self.db.executemany("INSERT INTO band VALUES (?, ?)", [(k, n) for k in sketch[0]])
            self.db.execute("INSERT INTO shingles VALUES (?, ?, ?)", (n, row.id, sketch[1].tobytes()))
        self.count += 1

    def seen(self, row) -> None:
        text = record_text(row.fields)
        self._add(row, self._exact_key(text), self._sketch(text) if self.near else None)

    def judge(self, row):
        import numpy as np

        text = record_text(row.fields)
        key = self._exact_key(text)
        found = self.db.execute("SELECT id FROM exact WHERE hash = ?", (key,)).fetchone()
        if found is not None:
            return "exact duplicate", {"of": found[0]}
        sketch = None
        if self.near:
            sketch = self._sketch(text)
            marks = ",".join("?" * len(sketch[0]))
            best = None
            for n, other_id, blob in self.db.execute(
                    f"SELECT n, id, hashes FROM shingles WHERE n IN (SELECT n FROM band WHERE key IN ({marks}))",
                    sketch[0]):
                other = np.frombuffer(blob, dtype=np.uint64)
                shared = len(np.intersect1d(other, sketch[1], assume_unique=True))
                similarity = shared / max(len(other) + len(sketch[1]) - shared, 1)
                # the most similar; of equals, the one kept first
                if similarity >= self.threshold and (best is None or (similarity, -n) > (best[1], -best[2])):
                    best = (other_id, similarity, n)
            if best is not None:
                return "near duplicate", {"of": best[0], "jaccard": round(best[1], 4)}
        self._add(row, key, sketch)
        return None


class Decontaminate(Stage):
    name = "decontaminate"

    def __init__(self, n: int = 13) -> None:
        if not isinstance(n, int) or n < 1:
            raise ParameterError(f"decontaminate.n must be an integer >= 1, got {n!r}")
        self.n = n
        self.grams: dict[tuple[str, ...], str] = {}

    def begin(self, context) -> None:
        from distillzoo.curate.source import fields_of, read_source
        from distillzoo.errors import ConfigError

        sets = context.section.get("eval") or []
        if not sets:
            raise ConfigError(f"{context.where}: curate.eval: decontaminate needs the evaluation sets to compare "
                              "against, [{path, format}]")
        for spec in sets:
            for where, row, why in read_source([spec["path"]], spec.get("format", "chat"), spec.get("columns")):
                if why is not None:
                    raise ConfigError(f"{context.where}: curate.eval: {where}: {why}")
                w = words(record_text(fields_of(row, spec.get("format", "chat"), spec.get("columns"))))
                for i in range(len(w) - self.n + 1):
                    self.grams.setdefault(tuple(w[i:i + self.n]), where)

    def judge(self, row):
        w = words(record_text(row.fields))
        for i in range(len(w) - self.n + 1):
            gram = tuple(w[i:i + self.n])
            if gram in self.grams:
                return f"shares a {self.n}-gram with an evaluation record", {"eval": self.grams[gram],
                                                                            "ngram": " ".join(gram)}
        return None


class Quality(Stage):
    name = "quality"

    def __init__(self, min_chars: int = 1, max_chars: int = 100_000, max_duplicate_line_fraction: float = 0.3,
                 max_top_bigram_fraction: float = 0.2, min_words_for_bigrams: int = 20,
                 languages: list | None = None, language_accuracy: str = "high",
                 min_chars_for_language: int = 20) -> None:
        if not (isinstance(min_chars, int) and isinstance(max_chars, int) and 0 <= min_chars <= max_chars):
            raise ParameterError(f"quality: min_chars and max_chars must be integers, 0 <= min_chars <= max_chars; got "
                                 f"{min_chars!r} and {max_chars!r}")
        self.min_chars, self.max_chars = min_chars, max_chars
        self.max_dup_lines = _fraction(max_duplicate_line_fraction, "quality.max_duplicate_line_fraction")
        self.max_bigram = _fraction(max_top_bigram_fraction, "quality.max_top_bigram_fraction")
        self.min_words = int(min_words_for_bigrams)
        self.languages, self.detector = None, None
        if languages is not None:
            if not isinstance(languages, (list, tuple)) or not languages or \
                    not all(isinstance(code, str) and len(code) == 2 for code in languages):
                raise ParameterError(f"quality.languages: ISO 639-1 codes such as [en, zh], got {languages!r}")
            if language_accuracy not in ("high", "low"):
                raise ParameterError(f"quality.language_accuracy: 'high' or 'low', got {language_accuracy!r}")
            self.languages = {code.lower() for code in languages}
            self.accuracy, self.min_language_chars = language_accuracy, int(min_chars_for_language)

    def begin(self, context) -> None:
        if self.languages is None:
            return
        try:
            from lingua import LanguageDetectorBuilder
        except ImportError:
            from distillzoo.errors import ConfigError

            raise ConfigError(f"{context.where}: curate: quality.languages identifies languages with lingua, which "
                              "is not installed: pip install 'distillzoo[curate]'") from None
        builder = LanguageDetectorBuilder.from_all_languages()  # every language, so that a third is told apart
        self.detector = (builder.with_low_accuracy_mode() if self.accuracy == "low" else builder).build()

    def _language(self, row) -> str | None:
        text = record_text(row.fields)
        if len(text.strip()) < self.min_language_chars:
            return None  # too short to tell
        found = self.detector.detect_language_of(text)
        return None if found is None else found.iso_code_639_1.name.lower()

    def judge(self, row):
        reply = response_text(row.fields)
        length = len(reply.strip())
        if length < self.min_chars:
            return "too short", {"chars": length}
        if length > self.max_chars:
            return "too long", {"chars": length}
        lines = [line.strip() for line in reply.splitlines() if line.strip()]
        if len(lines) > 1:
            repeated = len(lines) - len(set(lines))
            if repeated / len(lines) > self.max_dup_lines:
                return "repeated lines", {"fraction": round(repeated / len(lines), 4)}
        w = words(reply)
        if len(w) >= self.min_words:
            top, count = Counter(zip(w, w[1:])).most_common(1)[0]
            share = 2 * count / len(w)
            if share > self.max_bigram:
                return "a repeated bigram", {"bigram": " ".join(top), "fraction": round(share, 4)}
        if self.detector is not None:
            found = self._language(row)
            if found is not None and found not in self.languages:
                return "another language", {"language": found}
        return None


class Balance(Stage):
    name = "balance"
    needs_all = True

    def __init__(self, by="language", weights: dict | None = None, cap: int | None = None,
                 length_edges: list | None = None, seed: int = 0) -> None:
        self.by = [by] if isinstance(by, str) else list(by or [])
        if not self.by or not all(isinstance(b, str) and b for b in self.by):
            raise ParameterError(f"balance.by: a record field, 'length', or a list of them; got {by!r}")
        if weights is not None and (not isinstance(weights, dict) or not weights or not all(
                isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0 for w in weights.values())):
            raise ParameterError(f"balance.weights: {{bucket: weight >= 0}}, got {weights!r}")
        if weights is not None and sum(weights.values()) <= 0:
            raise ParameterError("balance.weights: at least one weight must be > 0")
        if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool) or cap < 1):
            raise ParameterError(f"balance.cap: an integer >= 1, got {cap!r}")
        if weights is None and cap is None:
            raise ParameterError("balance: give weights (target shares per bucket), cap (the most per bucket), or both")
        edges = list(length_edges or [100, 500, 2000])
        if "length" in self.by and (edges != sorted(edges) or not all(isinstance(e, int) and e > 0 for e in edges)):
            raise ParameterError(f"balance.length_edges: increasing character counts, got {length_edges!r}")
        self.weights = None if weights is None else {str(k): float(v) for k, v in weights.items()}
        self.cap, self.edges, self.seed = cap, edges, int(seed)
        self.ranks: dict[str, list[int]] = {}
        self.threshold: dict[str, int] = {}
        self.target: dict[str, int] = {}

    def bucket(self, row) -> str:
        parts = []
        for key in self.by:
            if key == "length":
                n = len(response_text(row.fields))
                i = sum(n >= e for e in self.edges)
                lo = 0 if i == 0 else self.edges[i - 1]
                parts.append(f"{lo}-{self.edges[i] - 1}" if i < len(self.edges) else f"{lo}+")
            else:
                parts.append(str(row.record.get(key, row.fields.get(key))))
        return "/".join(parts)

    def _rank(self, row) -> int:
        return int.from_bytes(hashlib.sha256(f"{self.seed}\0{row.id}".encode()).digest()[:8], "little")

    def observe(self, row) -> None:
        self.ranks.setdefault(self.bucket(row), []).append(self._rank(row))

    def settle(self) -> None:
        """After every record was observed: how many of each bucket are kept (the most the weights allow, each
        within cap), and the rank below which a record of the bucket is kept."""
        counts = {b: len(r) for b, r in self.ranks.items()}
        if self.weights is not None:
            unknown = sorted(set(counts) - set(self.weights))
            if unknown:
                raise ParameterError(f"balance.weights: the data has buckets {unknown} that weights does not name "
                                     f"(it names {sorted(self.weights)}); give each a weight (0 drops it)")
            shares = {b: self.weights.get(b, 0.0) / sum(self.weights[c] for c in counts) for b in counts}
            room = [(min(counts[b], self.cap or counts[b])) / s for b, s in shares.items() if s > 0]
            total = min(room) if room else 0
            self.target = {b: min(counts[b], self.cap or counts[b], int(round(total * s))) for b, s in shares.items()}
        else:
            self.target = {b: min(n, self.cap) for b, n in counts.items()}
        for b, ranks in self.ranks.items():
            keep = self.target[b]
            self.threshold[b] = sorted(ranks)[keep - 1] if keep else -1

    def judge(self, row):
        b = self.bucket(row)
        if self._rank(row) <= self.threshold[b]:
            return None
        return "over its bucket's target", {"bucket": b, "target": self.target[b]}

    def summary(self) -> dict:
        counts = {b: len(r) for b, r in self.ranks.items()}
        kept = sum(self.target.values())
        return {"buckets": {b: {"in": counts[b], "kept": self.target[b],
                                "share": round(self.target[b] / kept, 4) if kept else 0.0,
                                **({"target_share": round(self.weights.get(b, 0.0) / sum(self.weights.values()), 4)}
                                   if self.weights else {})}
                            for b in sorted(counts)}}


@hookimpl
def register_curation_stages(register):
    register("dedup", Dedup, summary="exact (normalised text hash) and near duplicates (MinHash LSH over shingles)")
    register("decontaminate", Decontaminate, summary="drop records sharing an n-gram (13) with an evaluation set")
    register("quality", Quality, summary="length bounds and Gopher-style repetition gates on the reply")
    register("balance", Balance, summary="downsample to target shares (or caps) over task, language, length buckets")
