"""Data selection: scorers rate each sample (higher = more worth distilling), ``filter`` keeps the best.

A scorer is a :class:`Scorer` subclass registered through the ``register_scorers``
hook and chosen by name in a config's ``score`` section::

    score:
      data: data/train.jsonl
      format: chat
      out: runs/scores.jsonl
      scorer: {name: mfd, metric: nll_gap}

``distillzoo score`` writes ``{"id", "score"}`` per sample; ``distillzoo filter``
keeps the records whose score passes a threshold or a quantile and reports the
ones it dropped. Built in (plugins/scorers.py): ``mfd``, the teacher–student
fitting gap, and ``judge``, an offline LLM-judge interface (any callable).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from distillzoo.atomic import write_text_atomically
from distillzoo.models.causal_lm import check_vocab, final_hidden, lm_head_weight, place_model, require_model
from distillzoo.data.records import IGNORE_INDEX, read_records
from distillzoo.data.tables import read_jsonl
from distillzoo.errors import ConfigError, DataError, DistillzooError, UnknownNameError, did_you_mean


@dataclass
class ScoreBatch:
    """What a scorer sees: the samples' ids and conversations, the tokenized batch and the models."""

    ids: list[str]
    messages: list[list[dict]]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    teacher: object = None
    student: object = None
    tokenizer: object = None

    @property
    def targets(self) -> torch.Tensor:
        """``[B, T-1]``: the token each position predicts, IGNORE_INDEX off the responses."""
        return self.labels[:, 1:]

    def hidden(self, role: str) -> torch.Tensor:
        """``[B, T-1, H]`` final hidden states of the teacher or student (no grad)."""
        model = {"teacher": self.teacher, "student": self.student}[role]
        with torch.no_grad():
            return final_hidden(model, self.input_ids, self.attention_mask)[:, :-1]

    def head(self, role: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(hidden [B, T-1, H], lm_head weight)`` of the teacher or student, for the fused ``from_hidden``."""
        return self.hidden(role), lm_head_weight(self.teacher if role == "teacher" else self.student)

    def per_sample_mean(self, values: torch.Tensor) -> list[float]:
        """Per-sample means over the response tokens of per-token values.

        ``values``: ``[B, T-1]`` aligned with :attr:`targets` (what ``reduction="none"``
        returns), or ``[n_valid]`` in the row-major order of the valid targets.
        """
        valid = (self.targets != IGNORE_INDEX).cpu()
        counts = valid.sum(-1)
        values = values.detach().double().cpu()
        if values.shape == valid.shape:
            sums = torch.where(valid, values, 0.0).sum(-1)
        else:
            rows = torch.repeat_interleave(torch.arange(len(counts)), counts)
            sums = torch.zeros(len(counts), dtype=torch.float64).index_add_(0, rows, values.reshape(-1))
        return (sums / counts.clamp(min=1)).tolist()


class Scorer:
    """Base of every scorer: ``needs`` names the models it reads; ``score`` returns one float per sample."""

    name = ""
    needs: tuple[str, ...] = ()

    def score(self, batch: ScoreBatch) -> list[float]:
        raise NotImplementedError


def make_scorer(spec: dict, where: str = "score.scorer") -> Scorer:
    """The scorer a ``{name, **params}`` mapping names, through the ``register_scorers`` hook."""
    from distillzoo.hooks.manager import components

    spec = dict(spec or {})
    name = spec.pop("name", None)
    found = components("scorers")
    if name not in found:
        raise UnknownNameError(f"{where}.name: unknown scorer {name!r}. Available: {', '.join(sorted(found))}."
                               + did_you_mean(str(name), found))
    try:
        return found[name].obj(**spec)
    except TypeError as e:
        raise ConfigError(f"{where}: scorer {name!r}: {e}") from None


def score_samples(scorer: Scorer, path: str | Path, format: str, tokenizer, *, teacher=None, student=None,
                  system=None, max_length: int | None = None, batch_size: int = 8, progress: bool = False,
                  columns: dict | None = None, out: str | Path | None = None, launch=None) -> dict[str, float]:
    """``{sample id: score}`` for every record of an instruction file or dataset.

    With ``out``, the scores also go to that JSONL, resumably: each process appends a
    batch at a time to its part, a rerun skips the ids already scored, and the parts
    are merged into ``out`` in record order (:mod:`distillzoo.teacher.parts`). Under torchrun
    (``launch``) each rank scores every ``world``-th batch, as one process batches them.
    """
    from distillzoo.teacher.launch import Launch
    from distillzoo.teacher.parts import PartedOutput
    from distillzoo.data.shards import ConversationDataset, collate_sft

    launch = launch or Launch()
    dataset = ConversationDataset(path, format, tokenizer, max_length=max_length, system=system, columns=columns)
    conversations = {str(fields["id"]): fields["messages"] for _, fields in read_records(path, format, columns)}
    duplicate = next((i for n, i in enumerate(dataset.ids) if i in dataset.ids[:n]), None)
    if duplicate is not None:
        raise DataError(f"{path}: sample id {duplicate!r} occurs more than once; scores are keyed by id")
    output = None
    if out is not None:
        from distillzoo.teacher.served import identity

        output = PartedOutput(out, launch, identity={
            "scorer": {"name": scorer.name, **{k: v for k, v in vars(scorer).items() if not k.startswith("_")}},
            "models": {role: identity(m) for role, m in (("teacher", teacher), ("student", student))
                       if m is not None},
            "data": str(path), "format": format, "columns": columns, "system": system, "max_length": max_length})
    done = output.done() if output is not None else set()
    todo = [i for i, sample_id in enumerate(dataset.ids) if sample_id not in done]
    batches = [todo[start:start + batch_size] for start in range(0, len(todo), batch_size)]
    mine = launch.mine(len(batches))
    models = [m for m in (teacher, student) if isinstance(m, torch.nn.Module)]  # not a served one
    device = next(models[0].parameters()).device if models else torch.device("cpu")
    scores: dict[str, float] = {}
    bar = None
    if progress and launch.main:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(len(batches[b]) for b in mine), desc=f"distillzoo score ({scorer.name or type(scorer).__name__})")
    for b in mine:
        items = [dataset[i] for i in batches[b]]
        batch = collate_sft(items, tokenizer.pad_id, device)
        ids = batch["ids"]
        values = scorer.score(ScoreBatch(ids, [conversations[i] for i in ids], batch["input_ids"],
                                         batch["attention_mask"], batch["labels"], teacher, student, tokenizer))
        if len(values) != len(ids):
            raise DistillzooError(f"scorer {scorer.name!r} returned {len(values)} scores for {len(ids)} samples")
        batch_scores = {sample_id: float(value) for sample_id, value in zip(ids, values)}
        if output is not None:
            output.append([{"id": i, "score": s} for i, s in batch_scores.items()])
        scores.update(batch_scores)
        if bar is not None:
            bar.update(len(items))
    if bar is not None:
        bar.close()
    if output is None:
        return scores
    output.merge(dataset.ids)
    return read_scores(out)


def write_scores(path: str | Path, scores: dict[str, float]) -> None:
    write_text_atomically(Path(path), "".join(json.dumps({"id": i, "score": s}, ensure_ascii=False) + "\n"
                                              for i, s in scores.items()))


def read_scores(path: str | Path) -> dict[str, float]:
    out = {}
    for where, record in read_jsonl(path):
        if "id" not in record or not isinstance(record.get("score"), (int, float)):
            raise DataError(f"{where}: a score line is {{\"id\", \"score\": number}}, got {record!r}")
        out[str(record["id"])] = float(record["score"])
    return out


def filter_records(data: str | Path, format: str, scores: dict[str, float], out: str | Path, *,
                   threshold: float | None = None, quantile: float | None = None,
                   report: str | Path | None = None, columns: dict | None = None) -> dict:
    """Keep the records scoring at least ``threshold`` (or the ``quantile`` of the scores) and write them to the
    JSONL ``out``: JSONL input verbatim, line by line; the rows of any other kind (Parquet, Arrow, a datasets
    directory, JSON) as JSON objects with their own column names.

    Returns (and writes to ``report``) ``{"kept", "dropped", "cut", "dropped_samples": [{id, score, where}]}``.
    """
    if (threshold is None) == (quantile is None):
        raise ConfigError("filter: give exactly one of a threshold or a quantile")
    if quantile is not None and not 0 <= quantile <= 1:  # False for nan too
        raise ConfigError(f"filter: --quantile {quantile} is not in [0, 1]")
    if threshold is not None and not math.isfinite(threshold):
        raise ConfigError(f"filter: --threshold {threshold} is not a finite number; no score would pass it (nan) or "
                          "the cut would be meaningless (inf)")
    for what, path in (("--out", out), ("--report", report)):
        if path is not None and Path(path).exists() and Path(path).resolve() == Path(data).resolve():
            raise ConfigError(f"filter: {what} {str(path)!r} is the input file; write the kept records elsewhere "
                              "(the input would be lost)")
    from distillzoo.data.tables import kind, read_rows

    ids = [(where, str(fields["id"])) for where, fields in read_records(data, format, columns)]
    missing = [(w, i) for w, i in ids if i not in scores]
    if missing:
        raise DataError(f"{missing[0][0]}: sample {missing[0][1]!r} has no score ({len(missing)} of {len(ids)} "
                        "records have none); score this data first")
    if kind(data) == "jsonl":
        with Path(data).open("rb") as f:
            lines = f.readlines()  # split as read_jsonl numbers them (b"\n"), so line N of `where` is lines[N - 1]
        texts = [lines[int(where.rpartition(":")[2]) - 1].decode("utf-8") for where, _ in ids]  # decodes: checked
    else:  # the row as its file holds it, original column names and all
        texts = [json.dumps(row, ensure_ascii=False, default=str) + "\n" for _, row in read_rows(data)]
    values = np.array([scores[i] for _, i in ids])
    cut = float(threshold) if threshold is not None else float(np.quantile(values, quantile)) if len(values) else 0.0
    kept, dropped = [], []
    for (where, sample_id), line in zip(ids, texts):
        (kept if scores[sample_id] >= cut else dropped).append((where, sample_id, line))
    write_text_atomically(Path(out), "".join(line if line.endswith("\n") else line + "\n" for _, _, line in kept))
    result = {"kept": len(kept), "dropped": len(dropped), "cut": cut, "threshold": threshold, "quantile": quantile,
              "dropped_samples": [{"id": i, "score": scores[i], "where": w} for w, i, _ in dropped]}
    if report is not None:
        write_text_atomically(Path(report), json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return result


def per_sample_nll(batch: ScoreBatch, role: str) -> torch.Tensor:
    """``[n_valid]`` per-token NLL of the reference responses under a model (fused), or a server's log-probs of
    the responses' own tokens (a role given as ``server: URL``)."""
    from distillzoo.kernels import token_logprobs

    targets = batch.targets
    valid = targets != IGNORE_INDEX
    model = getattr(batch, role)
    if not isinstance(model, torch.nn.Module):  # a ServedTeacher
        from distillzoo.teacher.served import batch_sequences

        rows = model.token_logprobs(*batch_sequences(batch.input_ids, batch.attention_mask, targets, batch.ids))
        logps = torch.full(targets.shape, math.nan)
        for r, row in enumerate(rows):
            logps[r, :len(row)] = row
        return -logps.to(targets.device)[valid]
    hidden, weight = batch.head(role)
    with torch.no_grad():
        logps = token_logprobs(hidden, weight, targets)
    return -logps[valid]


def validate_score(cfg, where: str) -> None:
    """The ``score`` section, before any model loads."""
    s = cfg.score
    if s is None:
        raise ConfigError(f"{where}: score: no 'score' section (data, format, out, scorer)")
    from distillzoo.data.tables import kind

    if s.data is None or kind(s.data) in (None, "prepared"):
        raise ConfigError(f"{where}: score.data: {s.data!r} is not a records file (JSONL, JSON, Parquet, Arrow) or a "
                          "datasets save_to_disk directory")
    from distillzoo.data.records import data_format

    try:
        data_format(s.format)
        scorer = make_scorer(dict(s.scorer or {}), f"{where}: score.scorer")
    except DistillzooError as e:
        raise ConfigError(f"{where}: score: {e}" if not str(e).startswith(where) else str(e)) from None
    from distillzoo.data.tokenizer import load_tokenizer

    from distillzoo.teacher.served import served_roles

    vocab = load_tokenizer(cfg.data.tokenizer if cfg.data is not None else None).vocab_size
    served = served_roles(cfg, scorer.needs, where)
    for role in (r for r in scorer.needs if r not in served):
        require_model(cfg, role, f"scorer {s.scorer.get('name')!r}", where)
        check_vocab(cfg, role, vocab, where)
    if s.out is None:
        raise ConfigError(f"{where}: score.out: give the JSONL file to write the scores to")


def score_from_config(cfg, where: str = "<config>") -> dict[str, float]:
    """``distillzoo score``: validate, load the models the scorer needs, score into ``score.out`` (resumable;
    under torchrun every rank scores its share)."""
    from distillzoo.data.tokenizer import QWEN_DEFAULT_SYSTEM, load_tokenizer

    from distillzoo.teacher.launch import Launch

    validate_score(cfg, where)
    s = cfg.score
    scorer = make_scorer(dict(s.scorer))
    launch = Launch.from_env()
    from distillzoo.teacher.served import served_client

    data = cfg.data
    tokenizer = load_tokenizer(data.tokenizer if data is not None else None)
    models = {role: served_client(cfg[role], role, tokenizer, where) if cfg[role].server is not None else
              place_model(cfg[role], role, launch) for role in scorer.needs}
    return score_samples(scorer, s.data, s.format, tokenizer,
                         system=data.system if data is not None else QWEN_DEFAULT_SYSTEM,
                         max_length=data.max_length if data is not None else None, batch_size=s.batch_size,
                         progress=s.progress, columns=None if s.columns is None else dict(s.columns), out=s.out,
                         launch=launch, **models)
