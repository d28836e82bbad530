"""Preference pairs: tokenized prompt / chosen / rejected, and their ``[2B, T]`` batches.

Preference records (``format: preference``, see :mod:`distillzoo.plugins.formats`)
become :class:`PreferenceExample` (prompt, chosen and rejected token ids) in a
:class:`PreferenceDataset`, and :func:`collate_preference` batches them into one
``[2B, T]`` batch, chosen rows first, so a single forward pass scores both responses.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from distillzoo.data.records import IGNORE_INDEX, as_token_ids, check_max_length, read_records
from distillzoo.data.tokenizer import QWEN_DEFAULT_SYSTEM, ChatTokenizer, load_tokenizer
from distillzoo.errors import DataError


@dataclass
class PreferenceExample:
    """One tokenized pair: int32 ids of the prompt and of both responses (ending in ``<|im_end|>``)."""

    id: str
    prompt: Tensor
    chosen: Tensor
    rejected: Tensor
    reference_chosen_logps: float | None = None
    reference_rejected_logps: float | None = None
    where: str = ""


def _truncate(prompt: list[int], response: list[int], max_length: int | None, max_prompt_length: int | None):
    """Keep the prompt's end (at most max_prompt_length) and the response's start, within max_length."""
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        prompt = prompt[-max_prompt_length:]
    if max_length is not None and len(prompt) + len(response) > max_length:
        response = response[:max(max_length - len(prompt), 0)]
    return prompt, response


class PreferenceDataset(torch.utils.data.Dataset):
    """Tokenized preference pairs from record files (map-style; ids int32).

    Args:
        paths: one file or several, read in order (JSONL, JSON, Parquet, Arrow, a datasets directory).
        tokenizer: a :class:`~distillzoo.data.tokenizer.ChatTokenizer` (default: the embedded Qwen one).
        max_length: prompt + response tokens per row; the prompt is cut from the left to
            ``max_prompt_length`` first, then the response from the right.
        system: the system message for prompts without one (None: none).
        columns: ``{format field: dataset column}`` for datasets named differently.
    """

    def __init__(self, paths: str | Path | Sequence[str | Path], tokenizer: ChatTokenizer | None = None, *,
                 format: str = "preference", max_length: int | None = None, max_prompt_length: int | None = None,
                 system: str | None = QWEN_DEFAULT_SYSTEM, columns: dict | None = None) -> None:
        self.tokenizer = tokenizer or load_tokenizer()
        check_max_length(max_length)
        check_max_length(max_prompt_length, "max_prompt_length")
        if max_length is not None and max_prompt_length is not None and max_prompt_length >= max_length:
            raise DataError(f"max_prompt_length={max_prompt_length} leaves no room for the response within "
                            f"max_length={max_length}")
        paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
        self.examples: list[PreferenceExample] = []
        seen: dict[str, str] = {}
        for path in paths:
            for where, fields in read_records(path, format, columns):
                prompt = self.tokenizer.encode_prompt(fields["prompt"], system)
                sides = {}
                for side in ("chosen", "rejected"):
                    p, r = _truncate(prompt, self.tokenizer.encode_response(fields[side]), max_length, max_prompt_length)
                    if not r:
                        raise DataError(f"{where}: the prompt fills max_length={max_length} ({len(p)} tokens) and "
                                        f"leaves no {side} tokens; raise max_length or set max_prompt_length")
                    sides[side] = r
                if fields["id"] in seen:
                    raise DataError(f"{where}: id {fields['id']!r} was already used at {seen[fields['id']]}; ids key the "
                                    "reference cache and must be unique")
                seen[fields["id"]] = where
                vocab = self.tokenizer.vocab_size
                self.examples.append(PreferenceExample(
                    fields["id"], as_token_ids(p, vocab, where), as_token_ids(sides["chosen"], vocab, where),
                    as_token_ids(sides["rejected"], vocab, where), fields.get("reference_chosen_logps"),
                    fields.get("reference_rejected_logps"), where))

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> PreferenceExample:
        return self.examples[i]

    def attach_reference(self, cache) -> None:
        """Fill each example's reference log-probs from a :class:`~distillzoo.teacher.reference_cache.ReferenceCache`."""
        for ex in self.examples:
            ex.reference_chosen_logps, ex.reference_rejected_logps = cache.lookup(
                ex.id, len(ex.chosen), len(ex.rejected), ex.where)


@dataclass
class PreferenceBatch:
    """``B`` pairs as one ``[2B, T]`` batch: rows ``:B`` are prompt + chosen, rows ``B:`` prompt + rejected.

    ``labels`` are aligned with ``input_ids`` (transformers convention) and hold
    ``IGNORE_INDEX`` on prompt and padding. Right padding with ``pad_id``.
    """

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    ids: list[str]
    reference_chosen_logps: Tensor | None = None
    reference_rejected_logps: Tensor | None = None

    @property
    def n_pairs(self) -> int:
        return len(self.ids)

    def to(self, device) -> "PreferenceBatch":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return PreferenceBatch(move(self.input_ids), move(self.attention_mask), move(self.labels), self.ids,
                               move(self.reference_chosen_logps), move(self.reference_rejected_logps))


def collate_preference(examples: Sequence[PreferenceExample], pad_id: int) -> PreferenceBatch:
    """Pad prompt + response rows (chosen ones first) to one length; responses labelled, the rest ignored."""
    rows = [(ex.prompt, ex.chosen) for ex in examples] + [(ex.prompt, ex.rejected) for ex in examples]
    width = max(len(p) + len(r) for p, r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (prompt, response) in enumerate(rows):
        n_prompt, n = len(prompt), len(prompt) + len(response)
        input_ids[i, :n_prompt], input_ids[i, n_prompt:n] = prompt, response
        labels[i, n_prompt:n] = response
        attention_mask[i, :n] = 1
    have = [ex.reference_chosen_logps is not None for ex in examples]
    ref_c = ref_r = None
    if all(have):
        ref_c = torch.tensor([ex.reference_chosen_logps for ex in examples], dtype=torch.float32)
        ref_r = torch.tensor([ex.reference_rejected_logps for ex in examples], dtype=torch.float32)
    elif any(have):
        missing = [ex.where or ex.id for ex, h in zip(examples, have) if not h]
        raise DataError(f"some records carry reference log-probs and some do not (missing at {', '.join(missing[:4])}); "
                        "give them for every record or use a reference model or cache")
    return PreferenceBatch(input_ids, attention_mask, labels, [ex.id for ex in examples], ref_c, ref_r)
