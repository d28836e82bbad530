"""Tokenized instruction data on disk: ``distillzoo prepare`` writes it, :class:`TokenShards` reads it.

A prepared directory holds one shard of instruction examples (dolly, alpaca,
chat, or any format a plugin registers that returns ``messages``)::

    tokens.bin      token ids of every example, concatenated (int32 by default)
    loss_mask.bin   uint8 per token: 1 where the loss is taken (assistant replies)
    index.npy       int64 offsets [examples + 1] into both files
    ids.json        the sample id of each example (the record's "id", or a hash of its content)
    meta.json       dtype, vocab size, tokenizer, counts, sources, skipped records

Qwen's ids exceed 65,535, so int32 is the default and uint16 is accepted only
for a vocab that fits it; there are no sentinel values. The directory is
written under a temporary name and renamed into place: a malformed record
(named by ``file:line``) or a crash leaves nothing half-written.
"""

from __future__ import annotations

import glob
import json
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from distillzoo.atomic import sweep_temporaries, write_dir_atomically
from distillzoo.data.records import IGNORE_INDEX, check_max_length, read_records
from distillzoo.errors import DataError
from distillzoo.data.tokenizer import QWEN_DEFAULT_SYSTEM, ChatTokenizer, load_tokenizer

FORMAT_VERSION = 1
STORE_DTYPES = {"int32": np.int32, "uint16": np.uint16}


def check_store_dtype(dtype: str, vocab_size: int, where: str = "dtype") -> np.dtype:
    """The numpy dtype for token ids; uint16 only when every id of the vocab fits it."""
    if dtype not in STORE_DTYPES:
        raise DataError(f"{where}: token dtype {dtype!r} is not one of {list(STORE_DTYPES)}")
    if dtype == "uint16" and vocab_size > 65_536:
        raise DataError(f"{where}: uint16 cannot store this vocab ({vocab_size:,} ids; Qwen's exceed 65,535, e.g. "
                        "<|im_start|> is 151,644); use int32")
    return np.dtype(STORE_DTYPES[dtype])


def tokenize_conversations(paths: Sequence[str | Path], format: str, tokenizer: ChatTokenizer,
                           max_length: int | None, system: str | None, columns: dict | None = None):
    """``([(sample id, ids, loss_mask), ...], skipped file:line list)`` of instruction records, cut to max_length.

    A record left with no loss token (its prompt fills max_length) is skipped, with a warning.
    """
    check_max_length(max_length)
    examples, skipped = [], []
    for path in paths:
        for where, fields in read_records(path, format, columns):
            if "messages" not in fields:
                raise DataError(f"{where}: format {format!r} gives {sorted(fields)}, not a conversation ('messages'); "
                                "this takes instruction data (dolly, alpaca, chat)")
            ids, mask = tokenizer.encode_conversation(fields["messages"], system)
            if max_length is not None:
                ids, mask = ids[:max_length], mask[:max_length]
            if not any(mask):
                skipped.append(where)
                continue
            examples.append((str(fields["id"]), ids, mask))
    if skipped:
        warnings.warn(f"{len(skipped)} record(s) had no response token within max_length={max_length} and were "
                      f"skipped (first: {skipped[0]})", stacklevel=3)
    return examples, skipped


def prepare_shards(paths: str | Path | Sequence[str | Path], out_dir: str | Path, *, format: str,
                   tokenizer: ChatTokenizer | None = None, max_length: int | None = None, dtype: str = "int32",
                   system: str | None = QWEN_DEFAULT_SYSTEM, overwrite: bool = False,
                   columns: dict | None = None) -> "TokenShards":
    """Tokenize instruction records (JSONL, JSON, Parquet, Arrow, a datasets directory; ``columns`` maps
    format fields to dataset columns) into ``out_dir`` (atomically); returns the reader.

    Examples longer than ``max_length`` are cut at the end; one left with no loss
    token (its prompt fills max_length) is skipped, and listed in meta.json.
    """
    tokenizer = tokenizer or load_tokenizer()
    store = check_store_dtype(dtype, tokenizer.vocab_size)
    out_dir = Path(out_dir)
    sweep_temporaries(out_dir.parent, glob.escape(out_dir.name))  # a killed prepare's half-written copy
    if out_dir.exists() and not overwrite:
        raise DataError(f"{out_dir} already exists; remove it or pass overwrite=True (--overwrite)")
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    examples, skipped = tokenize_conversations(paths, format, tokenizer, max_length, system, columns)
    tokens = [np.asarray(ids, dtype=np.int64) for _, ids, _ in examples]
    masks = [np.asarray(mask, dtype=np.uint8) for _, _, mask in examples]
    offsets = np.concatenate([[0], np.cumsum([len(t) for t in tokens], dtype=np.int64)])
    flat = np.concatenate(tokens) if tokens else np.zeros(0, dtype=np.int64)
    if flat.size and (flat.min() < 0 or flat.max() >= tokenizer.vocab_size):
        raise DataError(f"token id {int(flat.max())} is outside the tokenizer's vocab [0, {tokenizer.vocab_size})")
    meta = {
        "distillzoo_shards": FORMAT_VERSION, "dtype": dtype, "vocab_size": tokenizer.vocab_size,
        "tokenizer": tokenizer.name, "format": format, "examples": len(tokens), "tokens": int(flat.size),
        "max_length": max_length, "sources": [str(p) for p in paths], "columns": columns, "skipped": skipped,
    }

    def write(tmp: Path) -> None:
        flat.astype(store).tofile(tmp / "tokens.bin")
        (np.concatenate(masks) if masks else np.zeros(0, np.uint8)).tofile(tmp / "loss_mask.bin")
        np.save(tmp / "index.npy", np.asarray(offsets, dtype=np.int64))
        (tmp / "ids.json").write_text(json.dumps([i for i, _, _ in examples], ensure_ascii=False), encoding="utf-8")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    write_dir_atomically(out_dir, write)
    return TokenShards(out_dir)


class TokenShards(torch.utils.data.Dataset):
    """A prepared directory, memory-mapped: item ``i`` is ``{"input_ids": int32 [n], "loss_mask": bool [n]}``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise DataError(f"{self.path} is not a prepared data directory (no meta.json); run distillzoo prepare")
        self.meta = _read_json(meta_path, dict)
        if self.meta.get("distillzoo_shards") != FORMAT_VERSION:
            raise DataError(f"{meta_path}: not a distillzoo shard directory of format {FORMAT_VERSION}")
        missing = [k for k in ("dtype", "vocab_size", "examples", "tokens") if k not in self.meta]
        if missing:
            raise DataError(f"{meta_path}: missing field(s) {missing}; the directory is damaged: prepare it again")
        store = check_store_dtype(self.meta["dtype"], self.meta["vocab_size"], str(meta_path))
        index = self.path / "index.npy"
        try:
            self.offsets = np.load(index)
        except (OSError, ValueError, EOFError) as e:
            raise DataError(f"{index}: unreadable ({type(e).__name__}: {e}); the directory is damaged: prepare it "
                            "again") from None
        if self.offsets.ndim != 1 or len(self.offsets) != self.meta["examples"] + 1 or self.offsets[0] != 0 \
                or (np.diff(self.offsets) < 0).any() or int(self.offsets[-1]) != self.meta["tokens"]:
            raise DataError(f"{index}: {len(self.offsets)} offsets ending at {int(self.offsets[-1]) if len(self.offsets) else None} "
                            f"do not describe meta.json's {self.meta['examples']} examples of {self.meta['tokens']} "
                            "tokens; the directory is damaged: prepare it again")
        n_tokens = int(self.offsets[-1])
        for name, dtype in (("tokens.bin", store), ("loss_mask.bin", np.dtype(np.uint8))):
            file = self.path / name
            actual, expected = (file.stat().st_size if file.exists() else -1), n_tokens * np.dtype(dtype).itemsize
            if actual != expected:
                raise DataError(f"{file} is {'missing' if actual < 0 else f'{actual:,} bytes'}; {expected:,} expected "
                                f"for {n_tokens:,} tokens ({np.dtype(dtype).name}): truncated or damaged, prepare it "
                                "again")
        self.tokens = np.memmap(self.path / "tokens.bin", dtype=store, mode="r", shape=(n_tokens,)) if n_tokens else \
            np.zeros(0, store)
        self.loss_mask = np.memmap(self.path / "loss_mask.bin", dtype=np.uint8, mode="r", shape=(n_tokens,)) if n_tokens \
            else np.zeros(0, np.uint8)
        vocab = int(self.meta["vocab_size"])
        if n_tokens and (int(self.tokens.max()) >= vocab or int(self.tokens.min()) < 0):
            position = int(np.argmax((self.tokens >= vocab) | (self.tokens < 0)))
            example = int(np.searchsorted(self.offsets, position, side="right")) - 1
            raise DataError(f"{self.path / 'tokens.bin'}: token id {int(self.tokens[position])} (example {example}, "
                            f"token {position - int(self.offsets[example])}) is outside the vocab [0, {vocab}) of "
                            "meta.json; the file is damaged: prepare it again")
        ids_path = self.path / "ids.json"  # sample ids (keys of a teacher cache); older directories have none
        self.ids = _read_json(ids_path, list) if ids_path.is_file() else None
        if self.ids is not None and len(self.ids) != len(self):
            raise DataError(f"{ids_path}: {len(self.ids)} sample ids for {len(self)} examples; the directory is "
                            "damaged: prepare it again")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(f"example {i} of {len(self)} in {self.path}")
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        item = {"input_ids": torch.from_numpy(self.tokens[a:b].astype(np.int32)),
                "loss_mask": torch.from_numpy(self.loss_mask[a:b].astype(bool))}
        if self.ids is not None:
            item["id"] = self.ids[i]
        return item


def _read_json(path: Path, kind: type):
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e}); the directory is damaged: prepare it again") from None
    if not isinstance(value, kind):
        raise DataError(f"{path}: expected a JSON {'object' if kind is dict else 'list'}, got {type(value).__name__}")
    return value


def collate_sft(examples: Sequence[dict], pad_id: int, device: torch.device | str | None = None) -> dict:
    """Instruction examples (``input_ids``, ``loss_mask``, ``id``) as one right-padded batch: the only collate of
    instruction data.

    ``input_ids`` / ``attention_mask`` / ``labels`` ``[B, T]`` int64 (labels only on loss
    tokens, ``IGNORE_INDEX`` elsewhere), ``targets`` ``[B, T-1]`` (the labels shifted: what
    the logits at each position score) and ``ids`` (each example's sample id, or None); the
    tensors on ``device`` when one is given.
    """
    width = max(len(ex["input_ids"]) for ex in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    attention_mask = torch.zeros_like(input_ids)
    for row, ex in enumerate(examples):
        n = len(ex["input_ids"])
        ids = ex["input_ids"].long()
        input_ids[row, :n] = ids
        labels[row, :n] = torch.where(ex["loss_mask"], ids, IGNORE_INDEX)
        attention_mask[row, :n] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "targets": labels[:, 1:]}
    if device is not None:
        batch = {k: v.to(device) for k, v in batch.items()}
    return {**batch, "ids": [ex.get("id") for ex in examples]}


class ConversationDataset(torch.utils.data.Dataset):
    """Instruction records tokenized in memory: the items :class:`TokenShards` gives for a prepared copy."""

    def __init__(self, paths: str | Path | Sequence[str | Path], format: str, tokenizer: ChatTokenizer | None = None,
                 *, max_length: int | None = None, system: str | None = QWEN_DEFAULT_SYSTEM,
                 columns: dict | None = None) -> None:
        paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
        examples, self.skipped = tokenize_conversations(paths, format, tokenizer or load_tokenizer(), max_length, system,
                                                        columns)
        self.examples = [(sample_id, torch.tensor(ids, dtype=torch.int32), torch.tensor(mask, dtype=torch.bool))
                         for sample_id, ids, mask in examples]

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def ids(self) -> list[str]:
        """The sample id of each example, in order."""
        return [sample_id for sample_id, _, _ in self.examples]

    def __getitem__(self, i: int) -> dict:
        sample_id, ids, mask = self.examples[i]
        return {"id": sample_id, "input_ids": ids, "loss_mask": mask}
