"""Held-out evaluation of a causal LM on instruction data: greedy answers, exact match, NLL.

``exact_match`` asks the model each record's prompt (every message before the
last assistant reply, in ChatML), decodes greedily until ``<|im_end|>``, and
compares the answer with the reference reply (both stripped of surrounding
whitespace). ``response_nll`` is the mean negative log-likelihood per reference
response token (``<|im_end|>`` included) and ``response_kl`` the mean
KL(teacher || model) per response token, both through the fused paths (the
models are used as they are: call ``.eval()`` first, as ``load_causal_lm`` does).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Sequence

import torch

from distillzoo.models.causal_lm import final_hidden, lm_head_weight
from distillzoo.data.records import IGNORE_INDEX, read_records
from distillzoo.errors import DataError
from distillzoo.data.shards import collate_sft
from distillzoo.data.tokenizer import QWEN_DEFAULT_SYSTEM, ChatTokenizer


def greedy_answers(model, tokenizer: ChatTokenizer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 32,
                   batch_size: int = 64) -> list[list[int]]:
    """Greedy continuations of token-id prompts, each cut before its first ``<|im_end|>`` (batched, KV cache)."""
    from distillzoo.models.generation import Sampling, decode

    return [answer for answer, _ in decode(model, tokenizer, prompts, Sampling(max_new_tokens, temperature=0),
                                           batch_size=batch_size)]


def instruction_records(path: str | Path, format: str, columns: dict | None = None
                        ) -> list[tuple[str, list[dict], str, dict]]:
    """``(where, prompt messages, reference reply, record fields)`` of an instruction file or dataset."""
    rows = []
    for where, fields in read_records(path, format, columns):
        messages = fields.get("messages")
        if not messages or messages[-1]["role"] != "assistant":
            raise DataError(f"{where}: format {format!r} gives no conversation ending in an assistant reply")
        rows.append((where, messages[:-1], messages[-1]["content"], fields))
    return rows


def exact_match(model, tokenizer: ChatTokenizer, path: str | Path, format: str = "chat", *,
                system: str | None = QWEN_DEFAULT_SYSTEM, max_new_tokens: int = 32, batch_size: int = 64,
                group_by: str | None = "task", columns: dict | None = None) -> dict:
    """Exact-match accuracy of greedy answers, overall and per ``group_by`` field of the raw records.

    Returns ``{"exact_match", "n", "by_<group_by>": {value: accuracy}, "answers": [...]}``.
    """
    from distillzoo.data.tables import read_rows

    rows = instruction_records(path, format, columns)
    prompts = [tokenizer.encode_prompt(messages, system) for _, messages, _, _ in rows]
    answers = [tokenizer.decode(ids) for ids in greedy_answers(model, tokenizer, prompts,
                                                                max_new_tokens=max_new_tokens, batch_size=batch_size)]
    correct = [a.strip() == ref.strip() for a, (_, _, ref, _) in zip(answers, rows)]
    result = {"exact_match": sum(correct) / max(len(correct), 1), "n": len(correct)}
    if group_by is not None:
        raw = [record for _, record in read_rows(path, columns)]
        groups: dict[str, list[bool]] = defaultdict(list)
        for record, ok in zip(raw, correct):
            if group_by in record:
                groups[str(record[group_by])].append(ok)
        if groups:
            result[f"by_{group_by}"] = {k: sum(v) / len(v) for k, v in sorted(groups.items())}
    result["answers"] = answers
    return result


def _response_batches(dataset, pad_id: int, batch_size: int, device):
    for start in range(0, len(dataset), batch_size):
        batch = collate_sft([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))], pad_id, device)
        yield batch["input_ids"], batch["attention_mask"], batch["targets"]


@torch.no_grad()
def response_nll(model, dataset, pad_id: int, *, batch_size: int = 64) -> float:
    """Mean NLL per response token over a dataset of ``{input_ids, loss_mask}`` items."""
    from distillzoo.kernels import token_logprobs

    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    for input_ids, attention_mask, targets in _response_batches(dataset, pad_id, batch_size, device):
        hidden = final_hidden(model, input_ids, attention_mask)[:, :-1]
        total -= float(token_logprobs(hidden, lm_head_weight(model), targets).sum())
        tokens += int((targets != IGNORE_INDEX).sum())
    return total / max(tokens, 1)


@torch.no_grad()
def response_kl(teacher, student, dataset, pad_id: int, *, batch_size: int = 64) -> float:
    """Mean KL(teacher || student) per response token (full vocab, temperature 1), fused."""
    return response_divergences(teacher, student, dataset, pad_id, ("fkl",), batch_size=batch_size)["fkl"]


@torch.no_grad()
def response_divergences(teacher, student, dataset, pad_id: int, names: Sequence[str] = ("fkl", "rkl", "tvd"), *,
                         batch_size: int = 64) -> dict[str, float]:
    """Mean per response token of each named logit objective between teacher and student (full vocab,
    temperature 1, fused), in one pass: both models' hidden states once per batch, and one lm_head
    matmul per chunk for all the objectives (the terms of a :class:`~distillzoo.objectives.mixture.Mixture`).

    ``ce`` among the names is the student's NLL (it reads no teacher); ``teacher`` may be None
    when every named objective is teacher-free.
    """
    from distillzoo.objectives.registry import build_objective

    mixture = build_objective([(1.0, name, {}) for name in names], mixture=True, reduction="sum")
    device = next(student.parameters()).device
    totals, tokens = dict.fromkeys(mixture.term_names, 0.0), 0
    for input_ids, attention_mask, targets in _response_batches(dataset, pad_id, batch_size, device):
        hs = final_hidden(student, input_ids, attention_mask)[:, :-1]
        ht = wt = None
        if mixture.needs_teacher:
            ht, wt = final_hidden(teacher, input_ids, attention_mask)[:, :-1], lm_head_weight(teacher)
        mixture.from_hidden(hs, lm_head_weight(student), ht, wt, targets)
        valid = int((targets != IGNORE_INDEX).sum())
        for name, mean in mixture.term_losses.items():  # each term's mean over this batch's valid tokens
            totals[name] += float(mean) * valid
        tokens += valid
    return {name: total / max(tokens, 1) for name, total in zip(names, totals.values())}
