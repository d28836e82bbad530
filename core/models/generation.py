"""Decoding from a causal LM: left-padded batches, a KV cache, sampled per sample id.

:func:`decode` is the decoding loop: left-padded batches, a KV cache, only the
last position's logits (``[batch, V]``, never ``[batch, seq, V]``), greedy at
``temperature=0`` or sampled with temperature / top-k / top-p. Each row draws
from its own generator, seeded by the run's seed and the sample's id, so a
sample's answer does not depend on the batch it lands in, nor on whether the run
was interrupted and resumed. :func:`student_samples` replaces an example's last
reply with the model's own sample (GKD's and online DPKD's on-policy data).
"""

from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch

from distillzoo.errors import ParameterError

if TYPE_CHECKING:
    from distillzoo.data.tokenizer import ChatTokenizer


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


def step_sampling(max_new_tokens: int, temperature: float, seed: int, step: int) -> Sampling:
    """The sampling of training step ``step``'s student samples (on-policy KD, online DPKD); each example's
    generator adds its sample id, so a sample depends on the seed, the step and the id alone."""
    return Sampling(max_new_tokens, temperature, seed=seed * 1_000_003 + step)


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
    return with_replies(examples, prompts, answers, tokenizer)


def with_replies(examples: list[dict], prompts: list[list[int]], answers: list[tuple[list[int], str]],
                 tokenizer: ChatTokenizer) -> list[dict]:
    """The examples with their last reply replaced by ``answers`` (``(token ids, finish reason)`` per prompt, as
    :func:`decode` returns them), scored, with ``<|im_end|>`` where the answer stopped, so it is never empty."""
    out = []
    for ex, prompt, (answer, finish) in zip(examples, prompts, answers):
        reply = answer + ([tokenizer.im_end_id] if finish == "stop" else [])  # never empty: max_new_tokens >= 1
        out.append({**ex, "input_ids": torch.tensor(prompt + reply, dtype=torch.int32),
                    "loss_mask": torch.tensor([False] * len(prompt) + [True] * len(reply))})
    return out
