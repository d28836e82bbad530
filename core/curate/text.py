"""The text of a record as curation compares it: normalised, split into words (each CJK character one), and cut
into shingles. English and Chinese alike: Chinese has no spaces, so a word-based view of it would see one token
per sentence."""

from __future__ import annotations

import re
import unicodedata

#: a CJK character (Han, kana, hangul) is a word of its own; otherwise a word is a run of letters and digits
WORD = re.compile(r"[\u1100-\u11ff\u3040-\u30ff\u3130-\u318f\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]"
                  r"|[^\W_]+")


def normalise(text: str) -> str:
    """NFKC, lower case, whitespace collapsed: what exact deduplication hashes."""
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def words(text: str) -> list[str]:
    """The words of the normalised text (each CJK character one): what n-gram decontamination compares."""
    return WORD.findall(normalise(text))


def shingles(text: str, k: int) -> set[str]:
    """The k-word shingles of the text (the whole text when it has fewer than k words): what MinHash sketches."""
    w = words(text)
    if len(w) < k:
        return {" ".join(w)} if w else set()
    return {" ".join(w[i:i + k]) for i in range(len(w) - k + 1)}


def record_text(fields: dict) -> str:
    """The text of a record as a format's reader gives it: every message of a conversation; a preference
    record's prompt and both responses."""
    parts = []
    for key in ("messages", "prompt"):
        value = fields.get(key)
        if isinstance(value, list):
            parts += [str(m.get("content", "")) for m in value if isinstance(m, dict)]
        elif isinstance(value, str):
            parts.append(value)
    parts += [str(fields[k]) for k in ("chosen", "rejected") if isinstance(fields.get(k), str)]
    return "\n".join(parts)


def response_text(fields: dict) -> str:
    """The reply a quality gate judges: a conversation's last assistant message, a preference record's chosen."""
    messages = fields.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict):
        return str(messages[-1].get("content", ""))
    return str(fields.get("chosen", ""))


def instruction_text(fields: dict) -> str:
    """The instruction a tagger classifies and a teacher expands: a conversation's user turns (before its last
    reply), a preference record's prompt."""
    value = fields.get("messages") or fields.get("prompt")
    if isinstance(value, str):
        return value
    turns = [m for m in value or [] if isinstance(m, dict)]
    if turns and turns[-1].get("role") == "assistant":
        turns = turns[:-1]
    return "\n\n".join(str(m.get("content", "")) for m in turns if m.get("role") == "user")
