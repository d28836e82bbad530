"""Answers from a causal LM for the prompts of a dataset: batched, sampled per sample id, resumable.

:func:`decode` is the decoding loop: left-padded batches, a KV cache, only the
last position's logits (``[batch, V]``, never ``[batch, seq, V]``), greedy at
``temperature=0`` or sampled with temperature / top-k / top-p. Each row draws
from its own generator, seeded by the run's seed and the sample's id, so a
sample's answer does not depend on the batch it lands in, nor on whether the run
was interrupted and resumed.

:func:`generate_file` writes one JSONL line per prompt, keyed by the sample id:
each process appends a batch at a time (flushed and fsynced) to its part of the
output, and the parts are merged into it in prompt order at the end (see
:mod:`distillzoo.parts`). Rerun on the same output, it skips the ids already
there or in a part; a last line cut off mid-write is dropped first, so an
interrupted run neither duplicates nor loses samples. Under ``torchrun`` each
rank answers its share of the batches, and the output is the one process's.

Records: ``responses`` mode writes the chat format (the prompt's messages plus
the answer, which ``chat`` training reads directly); ``pairs`` mode writes the
preference format, the teacher's answer as ``chosen`` and the student's as
``rejected``, which ``dpkd`` trains on directly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .causal_lm import check_vocab, model_fingerprint, place_model, require_model
from .data import read_records
from .errors import DataError, ParameterError
from .launch import Launch
from .parts import PartedOutput
from .tokenizer import QWEN_DEFAULT_SYSTEM, ChatTokenizer


@dataclass(frozen=True)
class Sampling:
    """Decoding parameters. ``temperature=0`` is greedy; ``top_k=0`` and ``top_p=1`` are off."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ParameterError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ParameterError(f"temperature must be >= 0 (0: greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ParameterError(f"top_k must be >= 0 (0: off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ParameterError(f"top_p must be in (0, 1], got {self.top_p}")


def sample_seed(seed: int, sample_id: str) -> int:
    """A 63-bit seed from the run's seed and a sample id (stable across runs and machines)."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{sample_id}".encode()).digest()[:8], "little") >> 1


def _probs(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """``[B, V]`` fp32 next-token probabilities at the sampling's temperature, top-k and top-p (temperature > 0)."""
    logits = logits.float() / sampling.temperature
    if sampling.top_k:
        kth = logits.topk(min(sampling.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= sampling.top_p  # keep the smallest prefix reaching top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits.softmax(-1)


def _pick(logits: torch.Tensor, sampling: Sampling, generators: list[torch.Generator],
          mixed: tuple[torch.Tensor, float] | None = None) -> torch.Tensor:
    """One next token per row of ``[B, V]`` logits; with ``mixed = (other logits, w)`` from (1 - w) q + w p."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    if mixed is None:
        probs = _probs(logits, sampling)
    else:
        other, weight = mixed
        vocab = min(logits.shape[-1], other.shape[-1])  # the shared leading vocab, as the objectives compare
        probs = (1 - weight) * _probs(logits[:, :vocab], sampling) + weight * _probs(other[:, :vocab], sampling)
    probs = probs.cpu()
    return torch.stack([torch.multinomial(p, 1, generator=g)[0] for p, g in zip(probs, generators)]).to(logits.device)


@torch.no_grad()
def decode(model, tokenizer: ChatTokenizer, prompts: Sequence[Sequence[int]], sampling: Sampling = Sampling(), *,
           ids: Sequence[str] | None = None, batch_size: int = 16,
           mix: tuple[torch.nn.Module, float] | None = None) -> list[tuple[list[int], str]]:
    """``(answer token ids, finish reason)`` per prompt; the answer stops before ``<|im_end|>``.

    The finish reason is ``"stop"`` (``<|im_end|>`` was produced) or ``"length"``.
    ``ids`` (one per prompt) seed each row's sampling; default: the prompt's index.
    ``mix = (other, w)`` draws each token from ``(1 - w) q + w p``, ``q`` this model's
    distribution and ``p`` the other model's (MiniLLM's teacher-mixed sampling; both
    at the sampling's temperature, top-k and top-p, over the vocab they share); it
    needs ``temperature > 0``. ``w = 1`` samples from the other model alone.
    """
    device = next(model.parameters()).device
    ids = [str(i) for i in range(len(prompts))] if ids is None else [str(i) for i in ids]
    if len(ids) != len(prompts):
        raise ParameterError(f"decode: {len(ids)} ids for {len(prompts)} prompts")
    if mix is not None and (sampling.temperature == 0 or not 0 <= mix[1] <= 1):
        raise ParameterError(f"decode: mixed sampling needs temperature > 0 and a weight in [0, 1], got temperature "
                             f"{sampling.temperature} and weight {mix[1]}")
    models = [model] + ([mix[0]] if mix is not None else [])
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    out: list[tuple[list[int], str]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = [list(p) for p in prompts[start:start + batch_size]]
        generators = [torch.Generator().manual_seed(sample_seed(sampling.seed, i)) for i in ids[start:start + batch_size]]
        width = max(len(p) for p in chunk)
        input_ids = torch.full((len(chunk), width), tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for row, p in enumerate(chunk):
            input_ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[row, width - len(p):] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        steps = [m(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
                 for m in models]
        keywords = [_cache_keyword(m) for m in models]
        answers: list[list[int]] = [[] for _ in chunk]
        done = torch.zeros(len(chunk), dtype=torch.bool, device=device)
        for _ in range(sampling.max_new_tokens):
            mixed = (steps[1].logits[:, -1], mix[1]) if mix is not None else None
            token = _pick(steps[0].logits[:, -1], sampling, generators, mixed)
            for row in (~done).nonzero().flatten().tolist():
                if int(token[row]) != tokenizer.im_end_id:
                    answers[row].append(int(token[row]))
            done |= token == tokenizer.im_end_id
            if bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = positions[:, -1:] + 1
            steps = [m(input_ids=token[:, None], attention_mask=mask, position_ids=positions,
                       **{kw: getattr(s, kw)}, use_cache=True, logits_to_keep=1)
                     for m, s, kw in zip(models, steps, keywords)]
        out.extend((a, "stop" if d else "length") for a, d in zip(answers, done.tolist()))
    for m, training in zip(models, was_training):
        m.train(training)
    return out


def _cache_keyword(model) -> str:
    """The KV cache's name in ``model.forward`` and its output: ``cache`` in transformers 5.x, where
    ``past_key_values`` is deprecated (removed in 5.40), else ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def split_last_reply(example: dict) -> tuple[list[int], list[int]]:
    """``(prompt ids, reply ids)`` of an instruction example: the reply is its last run of loss tokens."""
    mask = example["loss_mask"].tolist()
    last = len(mask) - 1 - mask[::-1].index(True)
    start = last
    while start > 0 and mask[start - 1]:
        start -= 1
    ids = example["input_ids"].tolist()
    return ids[:start], ids[start:last + 1]


@torch.no_grad()
def student_samples(student, tokenizer: ChatTokenizer, examples: list[dict], sampling: Sampling, *,
                    mix: tuple[torch.nn.Module, float] | None = None) -> list[dict]:
    """The examples with their last scored reply replaced by the student's own sample (GKD's on-policy data).

    The prompt is everything before the last run of loss tokens; the sample is
    scored, with ``<|im_end|>`` when the student produced it, so it is never empty.
    Each example samples from a generator seeded by ``sampling.seed`` and its sample id
    (or its position), so a sample does not depend on its batch or on a resume.
    ``mix = (teacher, w)``: the samples come from ``(1 - w) q + w p`` (see :func:`decode`).
    """
    prompts = [split_last_reply(ex)[0] for ex in examples]
    ids = [str(ex.get("id", i)) for i, ex in enumerate(examples)]
    answers = decode(student, tokenizer, prompts, sampling, ids=ids, batch_size=len(examples), mix=mix)
    out = []
    for ex, prompt, (answer, finish) in zip(examples, prompts, answers):
        reply = answer + ([tokenizer.im_end_id] if finish == "stop" else [])  # never empty: max_new_tokens >= 1
        out.append({**ex, "input_ids": torch.tensor(prompt + reply, dtype=torch.int32),
                    "loss_mask": torch.tensor([False] * len(prompt) + [True] * len(reply))})
    return out


def read_prompts(path: str | Path, format: str, columns: dict | None = None) -> list[tuple[str, list[dict]]]:
    """``(sample id, prompt messages)`` per record: the conversation before its last assistant reply.

    Ids must be unique: they key the output, the resume and later the teacher cache.
    """
    prompts, seen = [], {}
    for where, fields in read_records(path, format, columns):
        messages = fields.get("messages") or fields.get("prompt")
        if not messages:
            raise DataError(f"{where}: format {format!r} gives no prompt ('messages' or 'prompt')")
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if not messages or messages[-1]["role"] != "user":
            raise DataError(f"{where}: the prompt must end with a user turn")
        sample_id = str(fields["id"])
        if sample_id in seen:
            raise DataError(f"{where}: sample id {sample_id!r} repeats {seen[sample_id]}; ids key the output")
        seen[sample_id] = where
        prompts.append((sample_id, messages))
    return prompts


def generate_file(models: dict, tokenizer: ChatTokenizer, data: str | Path, format: str, out: str | Path,
                  sampling: Sampling = Sampling(), *, mode: str = "responses", system: str | None = QWEN_DEFAULT_SYSTEM,
                  batch_size: int = 16, progress: bool = True, columns: dict | None = None,
                  launch: Launch | None = None) -> dict:
    """Answer every prompt of ``data`` not yet in ``out`` (or in a part of it: see :mod:`distillzoo.parts`).

    Under torchrun (``launch``), each rank answers every ``world``-th batch and rank 0
    writes ``out`` in the order of the prompts, as one process would.

    Returns ``{"written", "already_done", "empty", "total"}``; ``empty`` lists the ids
    whose answer (either answer, for pairs) was empty: they are not written, since
    no training format takes an empty reply (a rerun tries them again, and the same
    seed gives the same answer).

    ``models``: ``{"responses": model}`` for ``mode="responses"``, or
    ``{"chosen": teacher, "rejected": student}`` for ``mode="pairs"``.
    """
    names = {"responses": ("responses",), "pairs": ("chosen", "rejected")}
    if mode not in names:
        raise ParameterError(f"generate mode {mode!r} is not one of {list(names)}")
    if set(models) != set(names[mode]):
        raise ParameterError(f"generate mode {mode!r} needs models {list(names[mode])}, got {sorted(models)}")
    launch = launch or Launch()
    output = PartedOutput(out, launch, identity={
        "mode": mode, "models": {role: model_fingerprint(m) for role, m in models.items()},
        "sampling": dataclasses.asdict(sampling), "system": system, "data": str(data), "format": format,
        "columns": columns})
    prompts = read_prompts(data, format, columns)
    done = output.done()
    todo = [(i, m) for i, m in prompts if i not in done]
    batches = [todo[start:start + batch_size] for start in range(0, len(todo), batch_size)]
    mine = launch.mine(len(batches))  # whole batches, dealt round-robin: each decoded as one process decodes it
    empty: list[str] = []
    bar = None
    if progress and launch.main:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(len(batches[b]) for b in mine), desc=f"distillzoo generate ({mode})")
    for b in mine:
        chunk = batches[b]
        ids = [i for i, _ in chunk]
        tokens = [tokenizer.encode_prompt(m, system) for _, m in chunk]
        answers = {role: decode(model, tokenizer, tokens, sampling, ids=ids, batch_size=batch_size)
                   for role, model in models.items()}
        texts = {role: [tokenizer.decode(tokens) for tokens, _ in out] for role, out in answers.items()}
        records = []
        for k, (sample_id, messages) in enumerate(chunk):
            if any(not texts[role][k].strip() for role in models):
                empty.append(sample_id)  # neither chat nor preference training takes an empty reply
                continue
            finish = {role: answers[role][k][1] for role in models}
            if mode == "responses":
                records.append({"id": sample_id,
                                "messages": [*messages, {"role": "assistant", "content": texts["responses"][k]}],
                                "finish_reason": finish["responses"]})
            else:
                records.append({"id": sample_id, "prompt": messages, "chosen": texts["chosen"][k],
                                "rejected": texts["rejected"][k], "finish_reason": finish})
        output.append(records)
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    output.merge([i for i, _ in prompts])
    empty = sorted((i for part in launch.gather(empty) for i in part), key={i: n for n, (i, _) in enumerate(prompts)}.get)
    return {"written": len(todo) - len(empty), "already_done": len(prompts) - len(todo), "empty": empty,
            "total": len(prompts)}


MODES = ("responses", "pairs")


def validate_generate(cfg, where: str = "<config>") -> None:
    """The ``generate`` section, checked before any model is loaded."""
    from .data import data_format
    from .errors import ConfigError, DistillzooError

    g = cfg.generate
    if g is None:
        raise ConfigError(f"{where}: generate: no 'generate' section (prompts, out, mode, sampling)")
    if g.mode not in MODES:
        raise ConfigError(f"{where}: generate.mode: {g.mode!r} is not one of {list(MODES)}")
    if g.model not in ("teacher", "student"):
        raise ConfigError(f"{where}: generate.model: {g.model!r} is not one of ['teacher', 'student']")
    roles = ("teacher", "student") if g.mode == "pairs" else (g.model,)
    for role in roles:
        require_model(cfg, role, f"generate (mode {g.mode})", where)
    from .tokenizer import load_tokenizer

    vocab = load_tokenizer(cfg.data.tokenizer if cfg.data is not None else None).vocab_size
    for role in roles:
        check_vocab(cfg, role, vocab, where)
    from .tables import kind

    if g.prompts is None or kind(g.prompts) in (None, "prepared"):
        raise ConfigError(f"{where}: generate.prompts: {g.prompts!r} is not a records file (JSONL, JSON, Parquet, "
                          "Arrow) or a datasets save_to_disk directory")
    try:
        data_format(g.format)
    except DistillzooError as e:
        raise ConfigError(f"{where}: generate.format: {e}") from None
    if g.out is None:
        raise ConfigError(f"{where}: generate.out: give the JSONL file to write (a rerun appends what is missing)")
    try:
        Sampling(g.max_new_tokens, g.temperature, g.top_k, g.top_p, cfg.seed)
    except ParameterError as e:
        raise ConfigError(f"{where}: generate: {e}") from None
    if g.batch_size < 1:
        raise ConfigError(f"{where}: generate.batch_size must be >= 1, got {g.batch_size}")


def generate_from_config(cfg, where: str = "<config>") -> dict:
    """``distillzoo generate``: validate, load the models the mode needs, answer into ``generate.out`` (under
    torchrun, every rank its share)."""
    from .tokenizer import load_tokenizer

    validate_generate(cfg, where)
    g = cfg.generate
    launch = Launch.from_env()
    roles = {"chosen": "teacher", "rejected": "student"} if g.mode == "pairs" else {"responses": g.model}
    models = {key: place_model(cfg[role], role, launch) for key, role in roles.items()}
    data = cfg.data
    tokenizer = load_tokenizer(data.tokenizer if data is not None else None)
    system = data.system if data is not None else QWEN_DEFAULT_SYSTEM
    return generate_file(models, tokenizer, g.prompts, g.format, g.out,
                         Sampling(g.max_new_tokens, g.temperature, g.top_k, g.top_p, cfg.seed),
                         mode=g.mode, system=system, batch_size=g.batch_size, progress=g.progress,
                         columns=None if g.columns is None else dict(g.columns), launch=launch)
