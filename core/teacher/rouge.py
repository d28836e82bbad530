"""Text metrics of an answer against its reference: ROUGE-L (with rouge-score), exact match, the language.

ROUGE-L is the F-measure of the longest common subsequence of the two token
sequences, computed by the rouge-score package (the implementation the
instruction-following distillation papers report) with a tokenizer that knows
Chinese, Japanese and Korean: rouge-score's own tokenizer keeps only ``[a-z0-9]``
and would score every Chinese answer 0. :class:`CJKTokenizer` makes each CJK
character one token and hands every other stretch of text to rouge-score's own
tokenizer (lower-casing, punctuation dropped, Porter stemming), so on text with no
CJK character the score is exactly rouge-score's default ``RougeScorer(["rougeL"],
use_stemmer=True)``.
"""

from __future__ import annotations

import re
from functools import lru_cache

#: Han ideographs (with extensions A and the compatibility block), kana, Hangul syllables and jamo
CJK = re.compile("([\u1100-\u11ff\u3040-\u30ff\u3130-\u318f\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff])")
HAN = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


class CJKTokenizer:
    """rouge-score's tokenizer, with each CJK character a token of its own (the ``tokenize`` rouge-score calls)."""

    def __init__(self, use_stemmer: bool = True) -> None:
        from nltk.stem import porter

        self.stemmer = porter.PorterStemmer() if use_stemmer else None

    def tokenize(self, text: str) -> list[str]:
        from rouge_score import tokenize

        tokens: list[str] = []
        for i, part in enumerate(CJK.split(text)):
            if i % 2:  # the split's captured pieces: one CJK character each
                tokens.append(part)
            elif part.strip():
                tokens += tokenize.tokenize(part, self.stemmer)
        return tokens


@lru_cache(maxsize=2)
def _scorer(use_stemmer: bool):
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=CJKTokenizer(use_stemmer))


def rouge_l(answer: str, reference: str, *, use_stemmer: bool = True) -> float:
    """ROUGE-L F-measure of ``answer`` against ``reference`` in [0, 1] (0 when either has no token)."""
    return float(_scorer(use_stemmer).score(reference, answer)["rougeL"].fmeasure)


def exact(answer: str, reference: str) -> bool:
    """The answer is the reference, both stripped of surrounding whitespace."""
    return answer.strip() == reference.strip()


def language(text: str) -> str:
    """``zh`` when the text has a Han character, ``en`` when it is ASCII, else ``other`` (for records
    without a ``language`` field)."""
    if HAN.search(text):
        return "zh"
    return "en" if text.isascii() else "other"
