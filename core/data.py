"""Data: JSONL records through a format plugin, tokenized with ChatML, batched for the objectives.

Every error names the file and line of the record (and the field) that caused it.
Token ids are kept as int32 (Qwen's ids exceed 65,535, so no 16-bit store), and
batches are int64 for the model.

Preference data (``format: preference``, see :mod:`distillzoo.plugins.formats`)
becomes :class:`PreferenceExample` (prompt, chosen and rejected token ids) and
is batched by :func:`collate_preference` into one ``[2B, T]`` batch, chosen rows
first, so a single forward pass scores both responses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import Tensor

from .errors import DataError, DistillzooError, UnknownNameError, did_you_mean
from .tokenizer import QWEN_DEFAULT_SYSTEM, ChatTokenizer, load_tokenizer

IGNORE_INDEX = -100
TOKEN_DTYPE = torch.int32


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


def data_format(name: str):
    """The reader registered under ``name`` through the ``register_data_formats`` hook."""
    from .manager import components

    formats = components("data_formats")
    if name not in formats:
        raise UnknownNameError(f"unknown data format {name!r}. Available: {', '.join(sorted(formats))}."
                               + did_you_mean(name, formats))
    return formats[name].obj


def format_records(name: str) -> str:
    """``"instruction"`` or ``"preference"``: what the records of data format ``name`` hold (as registered;
    the manager refuses any other value at registration)."""
    from .manager import components

    data_format(name)  # an unknown name fails here, with the choices
    return components("data_formats")[name].details.get("records", "instruction")


def formats_of(records: str) -> list[str]:
    """The registered data formats whose records are ``records``."""
    from .manager import components

    return sorted(n for n, c in components("data_formats").items() if c.details.get("records", "instruction") == records)


def read_records(path: str | Path, format: str, columns: dict | None = None) -> Iterator[tuple[str, dict]]:
    """``(where, fields)`` of each record as the format's reader returns them.

    ``path`` is JSONL, JSON, Parquet, Arrow or a datasets save_to_disk directory (see
    :mod:`distillzoo.tables`; ``where`` is ``file:line`` or ``file, row N``), and
    ``columns`` maps the format's field names to the dataset's column names.
    """
    from .tables import read_rows

    reader = data_format(format)
    for where, record in read_rows(path, columns):
        try:
            yield where, reader(record)
        except DistillzooError as e:
            raise DataError(f"{where}: {e}") from None


def as_token_ids(ids: Sequence[int], vocab_size: int | None = None, where: str = "") -> Tensor:
    """int32 ids; a 16-bit store would wrap Qwen's ids above 65,535, so only int32/int64 are accepted."""
    if isinstance(ids, Tensor):
        if ids.dtype in (torch.uint16, torch.int16, torch.uint8, torch.int8):
            raise DataError(f"{where}: token ids stored as {ids.dtype} cannot hold Qwen's ids (vocab 151,936 > 65,535); "
                            "store them as int32")
        out = ids.to(TOKEN_DTYPE)
    else:
        out = torch.tensor(list(ids), dtype=TOKEN_DTYPE)
    if vocab_size is not None and out.numel() and (int(out.min()) < 0 or int(out.max()) >= vocab_size):
        raise DataError(f"{where}: token id {int(out.max()) if int(out.max()) >= vocab_size else int(out.min())} is "
                        f"outside the vocab [0, {vocab_size})")
    return out


# ---------------------------------------------------------------------------- preference
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


def check_max_length(max_length: int | None, what: str = "max_length") -> None:
    """A DataError unless ``max_length`` is None or a positive number of tokens."""
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
        raise DataError(f"{what} must be a positive number of tokens (or None), got {max_length!r}")


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
        tokenizer: a :class:`~distillzoo.tokenizer.ChatTokenizer` (default: the embedded Qwen one).
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
        """Fill each example's reference log-probs from a :class:`~distillzoo.reference_cache.ReferenceCache`."""
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
