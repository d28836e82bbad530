"""Held-out evaluation of a causal LM on instruction records, prompt by prompt: the field's metrics.

:func:`evaluate` scores one model on one split and keeps every prompt's score, so
that a comparison can pair two models prompt by prompt (``distillzoo.compare.stats``):

* from the model's own answers to each prompt (every message before the last
  assistant reply, in ChatML; ``Decoding.samples`` answers per prompt, sampled at
  ``temperature``, or one greedy answer at temperature 0): ROUGE-L
  (:mod:`~distillzoo.teacher.rouge`, CJK-aware), exact match, and the answer's
  length in tokens over the reference's, each averaged over the prompt's samples;
* teacher-forced on the reference reply, read as the trainer's ``data.eval`` reads
  it (the same tokenization and ``max_length`` cut; a record with no reply token
  left is skipped, with a warning, as there): NLL per response token, and with a
  teacher, KL(teacher || model), KL(model || teacher) and TVD per token over the
  shared vocab, and top-1 agreement (the share of reply tokens where the two
  models' most likely next token is the same).

A prompt-unit metric weighs every prompt the same; a token-unit metric weighs each
prompt by its reply tokens, so ``Scores.mean("nll")`` is the trainer's ``eval/nll``.
Results are overall and per task and per language (the records' ``task`` (or Dolly's
``category``) and ``language`` fields; a record without ``language`` is ``zh`` if its reference has a
Han character, ``en`` if it is ASCII, else ``other``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distillzoo.data.records import IGNORE_INDEX
from distillzoo.data.shards import collate_sft
from distillzoo.data.tokenizer import QWEN_DEFAULT_SYSTEM, ChatTokenizer
from distillzoo.errors import DataError, DistillzooError, ParameterError
from distillzoo.models.causal_lm import final_hidden, lm_head_weight
from distillzoo.teacher.rouge import exact, language, rouge_l


@dataclass(frozen=True)
class Metric:
    label: str
    higher_is_better: bool | None  # None: neither (a length ratio)
    unit: str                      # "prompt" or "token": what the mean weighs
    teacher: bool = False          # needs a teacher
    share: bool = False            # a share in [0, 1], shown as a percentage


#: every metric :func:`evaluate` reports, in the order reports show them
METRICS: dict[str, Metric] = {
    "rouge_l": Metric("ROUGE-L", True, "prompt", share=True),
    "exact_match": Metric("exact match", True, "prompt", share=True),
    "nll": Metric("NLL/token", False, "token"),
    "top1_agreement": Metric("top-1 agreement", True, "token", teacher=True, share=True),
    "fkl": Metric("KL(t‖s)/token", False, "token", teacher=True),
    "rkl": Metric("KL(s‖t)/token", False, "token", teacher=True),
    "tvd": Metric("TVD/token", False, "token", teacher=True),
    "length_ratio": Metric("length / reference", None, "prompt"),
}
GROUPS = ("task", "language")


@dataclass(frozen=True)
class Decoding:
    """How the answers are drawn: ``samples`` per prompt at ``temperature`` (0: one greedy answer).

    ``max_new_tokens`` None: one more than the longest reference reply (an answer longer than every
    reference is cut where it already differs from them all).
    """

    samples: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.samples, int) or self.samples < 1:
            raise ParameterError(f"decoding: samples must be an integer >= 1, got {self.samples!r}")
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise ParameterError(f"decoding: temperature must be >= 0 (0: greedy), got {self.temperature!r}")
        if self.temperature == 0 and self.samples > 1:
            raise ParameterError(f"decoding: {self.samples} samples at temperature 0 would be {self.samples} copies of "
                                 "one greedy answer; give a temperature > 0 (the papers sample at 1.0) or samples: 1")
        if not 0 < self.top_p <= 1:
            raise ParameterError(f"decoding: top_p must be in (0, 1], got {self.top_p!r}")
        if self.max_new_tokens is not None and (not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1):
            raise ParameterError(f"decoding: max_new_tokens must be an integer >= 1 or null, got {self.max_new_tokens!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ParameterError(f"decoding: seed must be an integer >= 0, got {self.seed!r}")

    @property
    def words(self) -> str:
        if self.temperature == 0:
            return "one greedy answer per prompt"
        return (f"{self.samples} sampled answer{'s' if self.samples > 1 else ''} per prompt (temperature "
                f"{self.temperature:g}{f', top-p {self.top_p:g}' if self.top_p < 1 else ''}, seed {self.seed})")


@dataclass
class Scores:
    """One model's per-prompt scores on one split.

    ``sums[m][p]``: for a prompt-unit metric the prompt's score (its samples' mean); for a
    token-unit metric the sum over the prompt's reply tokens. ``tokens[p]``: its reply tokens.
    """

    ids: list[str]
    groups: dict[str, list[str]]
    tokens: np.ndarray
    sums: dict[str, np.ndarray]
    answers: list[list[str]] = field(default_factory=list)

    def weights(self, metric: str) -> np.ndarray:
        return self.tokens.astype(np.float64) if METRICS[metric].unit == "token" else np.ones(len(self.ids))

    def mean(self, metric: str, mask: np.ndarray | None = None) -> float:
        w, v = self.weights(metric), self.sums[metric]
        if mask is not None:
            w, v = w[mask], v[mask]
        return float(v.sum() / w.sum()) if w.sum() > 0 else math.nan

    def summary(self) -> dict[str, Any]:
        """``{metric: mean, "n": prompts, "by_task": {task: {metric: mean, "n"}}, "by_language": ...}``."""
        out: dict[str, Any] = {m: self.mean(m) for m in self.sums}
        out["n"] = len(self.ids)
        for group in GROUPS:
            labels = np.asarray(self.groups.get(group) or [], dtype=object)
            values = sorted({v for v in labels if v is not None})
            if not values:
                continue
            out[f"by_{group}"] = {v: {**{m: self.mean(m, labels == v) for m in self.sums},
                                      "n": int((labels == v).sum())} for v in values}
        return out

    def to_json(self) -> dict:
        return {"ids": self.ids, "groups": self.groups, "tokens": self.tokens.tolist(),
                "sums": {m: v.tolist() for m, v in self.sums.items()}, "answers": self.answers}

    @classmethod
    def from_json(cls, raw: dict) -> "Scores":
        return cls(list(raw["ids"]), {k: list(v) for k, v in raw["groups"].items()}, np.asarray(raw["tokens"]),
                   {m: np.asarray(v, dtype=np.float64) for m, v in raw["sums"].items()}, list(raw.get("answers", [])))


@dataclass
class Prompt:
    where: str
    id: str
    messages: list[dict]      # the prompt: every message before the reference reply
    reference: str
    forced: dict              # {"id", "input_ids", "loss_mask"}, as the trainer's data.eval holds it
    groups: dict[str, str | None]


def read_split(path: str | Path, format: str, tokenizer: ChatTokenizer, *, system: str | None = QWEN_DEFAULT_SYSTEM,
               max_length: int | None = None, columns: dict | None = None) -> list[Prompt]:
    """The split's prompts and references, each tokenized as the trainer's ``data.eval`` tokenizes it."""
    from distillzoo.data.records import check_max_length, read_records
    from distillzoo.data.tables import read_rows

    check_max_length(max_length)
    prompts, skipped = [], []
    raw = (record for _, record in read_rows(path, columns))  # the record's own fields: task, language
    for (where, fields), record in zip(read_records(path, format, columns), raw):
        fields = {**record, **fields}
        messages = fields.get("messages")
        if not messages or messages[-1].get("role") != "assistant":
            raise DataError(f"{where}: format {format!r} gives no conversation ending in an assistant reply: a "
                            "held-out record needs a reference answer")
        reference = messages[-1].get("content")
        if not isinstance(reference, str) or not reference.strip():
            raise DataError(f"{where}: the reference reply is empty: a held-out record needs a reference answer")
        ids, mask = tokenizer.encode_conversation(messages, system)
        if max_length is not None:
            ids, mask = ids[:max_length], mask[:max_length]
        if not any(mask):
            skipped.append(where)
            continue
        lang = fields.get("language") or fields.get("lang") or language(reference)
        task = fields.get("task", fields.get("category"))  # Dolly names its tasks categories
        prompts.append(Prompt(where, str(fields["id"]), messages[:-1], reference,
                              {"id": str(fields["id"]), "input_ids": torch.tensor(ids, dtype=torch.int32),
                               "loss_mask": torch.tensor(mask, dtype=torch.bool)},
                              {"task": None if task is None else str(task), "language": str(lang)}))
    if skipped:
        warnings.warn(f"{len(skipped)} held-out record(s) had no response token within max_length={max_length} and "
                      f"were skipped (first: {skipped[0]})", stacklevel=2)
    if not prompts:
        raise DataError(f"{path}: no held-out record with a reference reply"
                        + (f" within max_length={max_length}" if skipped else ""))
    return prompts


def token_metrics(hs: torch.Tensor, ws: torch.Tensor, targets: torch.Tensor, ht: torch.Tensor | None = None,
                  wt: torch.Tensor | None = None, *, rows: int | None = None) -> dict[str, torch.Tensor]:
    """Per valid target token (``targets != IGNORE_INDEX``, row-major): ``nll`` over the model's vocab, and with a
    teacher ``fkl``, ``rkl``, ``tvd`` and ``top1_agreement`` over the shared leading vocab; fp32, in row chunks
    (never the whole ``[tokens, V]``)."""
    valid = targets.reshape(-1) != IGNORE_INDEX
    hs, t = hs.reshape(-1, hs.shape[-1])[valid], targets.reshape(-1)[valid]
    if ht is not None:
        ht = ht.reshape(-1, ht.shape[-1])[valid]
    vocab = ws.shape[0] if wt is None else min(ws.shape[0], wt.shape[0])
    rows = rows or max(1, (64 << 20) // (4 * 6 * ws.shape[0]))  # ~64 MiB of fp32 [rows, V] temporaries
    out: dict[str, list[torch.Tensor]] = {"nll": []}
    if ht is not None:
        out.update(top1_agreement=[], fkl=[], rkl=[], tvd=[])
    for i in range(0, hs.shape[0], rows):
        zs = hs[i:i + rows].float() @ ws.float().T
        out["nll"].append(-zs.log_softmax(-1).gather(1, t[i:i + rows, None]).squeeze(1))
        if ht is None:
            continue
        ls = zs[:, :vocab].log_softmax(-1)
        lt = (ht[i:i + rows].float() @ wt[:vocab].float().T).log_softmax(-1)
        ps, pt = ls.exp(), lt.exp()
        out["top1_agreement"].append((ls.argmax(-1) == lt.argmax(-1)).float())
        out["fkl"].append((pt * (lt - ls)).sum(-1))
        out["rkl"].append((ps * (ls - lt)).sum(-1))
        out["tvd"].append(0.5 * (pt - ps).abs().sum(-1))
    return {k: torch.cat(v) if v else hs.new_zeros(0) for k, v in out.items()}


@torch.no_grad()
def evaluate(model, tokenizer: ChatTokenizer, prompts: list[Prompt], *, teacher=None,
             decoding: Decoding = Decoding(), batch_size: int = 64, system: str | None = QWEN_DEFAULT_SYSTEM,
             generate: bool = True, forced: bool = True) -> Scores:
    """``model``'s per-prompt scores on ``prompts`` (from :func:`read_split`), against ``teacher`` where given;
    ``generate=False`` leaves out the metrics of the model's answers (none is drawn), ``forced=False`` the
    teacher-forced ones."""
    from distillzoo.models.generation import Sampling, decode

    device = next(model.parameters()).device
    n = len(prompts)
    tokens = np.zeros(n, dtype=np.int64)
    names = [m for m, spec in METRICS.items() if forced and spec.unit == "token"
             and (teacher is not None or not spec.teacher)]
    sums = {m: np.zeros(n) for m in names}
    ws = lm_head_weight(model)
    wt = lm_head_weight(teacher) if teacher is not None and forced else None
    for start in range(0, n if forced else 0, batch_size):
        chunk = prompts[start:start + batch_size]
        batch = collate_sft([p.forced for p in chunk], tokenizer.pad_id, device)
        targets = batch["targets"]
        hs = final_hidden(model, batch["input_ids"], batch["attention_mask"])[:, :-1]
        ht = final_hidden(teacher, batch["input_ids"], batch["attention_mask"])[:, :-1] if teacher is not None else None
        per_token = token_metrics(hs, ws, targets, ht, wt)
        counts = (targets != IGNORE_INDEX).sum(1).cpu().numpy()
        owner = np.repeat(np.arange(start, start + len(chunk)), counts)
        tokens[start:start + len(chunk)] = counts
        for m in names:
            np.add.at(sums[m], owner, per_token[m].double().cpu().numpy())
    answers: list[list[str]] = [[] for _ in range(n)]
    if generate:
        references = [tokenizer.encode(p.reference) for p in prompts]
        longest = max(len(r) for r in references)
        sampling = Sampling(decoding.max_new_tokens or longest + 1, temperature=decoding.temperature,
                            top_p=decoding.top_p, seed=decoding.seed)
        encoded = [tokenizer.encode_prompt(p.messages, system) for p in prompts]
        k = decoding.samples
        drawn = decode(model, tokenizer, [e for e in encoded for _ in range(k)], sampling,
                       ids=[f"{p.id}#{s}" for p in prompts for s in range(k)], batch_size=batch_size)
        em, rl, length = np.zeros(n), np.zeros(n), np.zeros(n)
        for i, p in enumerate(prompts):
            for ids, _ in drawn[i * k:(i + 1) * k]:
                text = tokenizer.decode(ids)
                answers[i].append(text)
                em[i] += exact(text, p.reference) / k
                rl[i] += rouge_l(text, p.reference) / k
                length[i] += len(ids) / max(len(references[i]), 1) / k
        sums = {"rouge_l": rl, "exact_match": em, **sums, "length_ratio": length}
    groups = {g: [p.groups[g] for p in prompts] for g in GROUPS}
    return Scores([p.id for p in prompts], groups, tokens, {m: sums[m] for m in METRICS if m in sums}, answers)


def load_model(path: str | Path, role: str = "student", device: str | None = None):
    """A saved model directory for evaluation, refused clearly when it is not one."""
    from distillzoo.models.causal_lm import load_causal_lm

    directory = Path(path)
    if not directory.is_dir():
        raise DataError(f"{role} {str(path)!r} is not a directory; give a saved model directory (a distillzoo "
                        "train run's final/, or any local transformers causal LM)")
    if not (directory / "config.json").is_file():
        found = sorted(p.name for p in directory.iterdir())[:6]
        raise DataError(f"{role} {str(path)!r} is not a model directory: it has no config.json (it holds "
                        f"{found or 'nothing'}); give a run's final/ directory")
    try:
        return load_causal_lm(str(directory), device=device)
    except DistillzooError as e:
        raise DataError(f"{role} {str(path)!r}: {e}") from None


def table(summary: dict, metrics: list[str] | None = None) -> str:
    """A plain-text table of a :meth:`Scores.summary`: one row per metric, columns all / per task / per language."""
    metrics = [m for m in (metrics or METRICS) if m in summary]
    columns = [("all", summary)] + [(f"{group}={value}", part) for group in GROUPS
                                     for value, part in summary.get(f"by_{group}", {}).items()]
    head = f"{'metric':<20}" + "".join(f"{name:>14}" for name, _ in columns)
    rows = [head, f"{'prompts':<20}" + "".join(f"{part['n']:>14}" for _, part in columns)]
    for m in metrics:
        scale, unit = (100, "%") if METRICS[m].share else (1, "")
        rows.append(f"{METRICS[m].label:<20}" + "".join(
            f"{part[m] * scale:>13.{1 if unit else 3}f}{unit or ' '}" for _, part in columns))
    return "\n".join(rows)


def evaluate_model(student: str | Path, path: str | Path, format: str = "chat", *, teacher: str | Path | None = None,
                   decoding: Decoding = Decoding(), system: str | None = QWEN_DEFAULT_SYSTEM,
                   max_length: int | None = None, columns: dict | None = None, tokenizer: str | None = None,
                   batch_size: int = 64, device: str | None = None) -> tuple[dict, Scores]:
    """``distillzoo eval``: a saved student's summary and per-prompt scores on a held-out split."""
    from distillzoo.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer)
    prompts = read_split(path, format, tok, system=system, max_length=max_length, columns=columns)
    model = load_model(student, "student", device)
    judge = load_model(teacher, "teacher", device) if teacher is not None else None
    scores = evaluate(model, tok, prompts, teacher=judge, decoding=decoding, batch_size=batch_size, system=system)
    summary = {"student": str(student), "teacher": None if teacher is None else str(teacher), "data": str(path),
               "format": format, "decoding": decoding.words, "max_length": max_length, **scores.summary()}
    return summary, scores
