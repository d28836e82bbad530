"""A teacher served by an inference engine, through the OpenAI-compatible API that vLLM, SGLang and
``distillzoo serve`` speak.

:class:`ServedTeacher` scores token-id sequences with ``POST /v1/completions`` (``prompt`` a list
of token-id lists, ``max_tokens: 1``, ``prompt_logprobs: k``) and turns each position's entries
into the sparse top-k teacher the objectives take: the ``k`` entries of rank 1 to ``k`` (the
prompt's own token, which the server adds when it falls outside them, is dropped), and the tail
``log(1 - sum(exp(top-k log-probs)))`` of the server's full-softmax values, never a renormalised
top-k. The log-probs are the server's raw ones (vLLM's default ``--logprobs-mode raw_logprobs``),
at temperature 1.

At most ``max_in_flight`` requests are in flight (a thread pool); a request that meets a 429, a
500, 502, 503 or 504, a refused or cut-off connection or a time-out is retried with exponential backoff, and one that still
fails raises :class:`ServerError` naming the URL, the status, the response body and the sample
ids. A response that does not hold one whole ``prompt_logprobs`` list per sequence is refused:
never a silently partial teacher.
"""

from __future__ import annotations

import http.client
import json
import math
import time
import urllib.error
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Sequence

import torch

from distillzoo.data.records import IGNORE_INDEX
from distillzoo.errors import ServerError
from distillzoo.objectives.sparse import SparseTeacher

#: the statuses worth a retry: rate limiting and the server's own failures
RETRY_STATUSES = (429, 500, 502, 503, 504)
#: the scoring APIs: vLLM's ``prompt_logprobs`` on ``/v1/completions`` (vLLM, ``distillzoo serve``), SGLang's ``/generate``
APIS = ("openai", "sglang")
#: how far above 1 the top-k's probability mass may sum before a position is refused (the server's rounding)
MASS_TOLERANCE = 1e-4


class ServedTeacher:
    """A client of one served model. ``sequences_per_request`` sequences go in each scoring request."""

    def __init__(self, url: str, model: str | None = None, *, top_k: int, max_in_flight: int = 4,
                 timeout_s: float = 120.0, retries: int = 4, backoff_s: float = 0.5,
                 sequences_per_request: int = 8, api: str = "openai") -> None:
        if not 1 <= top_k:
            raise ServerError(f"top_k must be >= 1, got {top_k}")
        if api not in APIS:
            raise ServerError(f"api {api!r} is not one of {list(APIS)}")
        self.api = api
        self._background: ThreadPoolExecutor | None = None
        self._closed = False
        self.url, self.model, self.top_k = url.rstrip("/"), model, top_k
        self.max_in_flight, self.timeout_s, self.retries, self.backoff_s = max_in_flight, timeout_s, retries, backoff_s
        self.sequences_per_request = sequences_per_request

    def close(self) -> None:
        """Cancel what a prefetch queued and stop retrying what is in flight (a run that stopped, or ended)."""
        self._closed = True
        if self._background is not None:
            self._background.shutdown(wait=False, cancel_futures=True)
            self._background = None

    # ------------------------------------------------------------------------------------------ HTTP
    def _request(self, path: str, body: dict | None, sample_ids: Sequence[str] = ()) -> dict:
        url = self.url + path
        data = None if body is None else json.dumps(body).encode()
        what = f" (samples {', '.join(map(str, sample_ids[:8]))}{', ...' if len(sample_ids) > 8 else ''})" \
            if sample_ids else ""
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(url, data=data, method="GET" if body is None else "POST",
                                             headers={"Content-Type": "application/json"})
            if self._closed:
                raise ServerError(f"teacher server {url}: the client was closed{what}")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    answer = json.loads(response.read())
                if not isinstance(answer, (dict, list)):
                    raise ServerError(f"teacher server {url}: the response is JSON but neither an object nor a list"
                                      f"{what}: {str(answer)[:200]}")
                return answer
            except urllib.error.HTTPError as e:
                status, text = e.code, e.read().decode("utf-8", "replace")[:500]
                if status not in RETRY_STATUSES or attempt == self.retries:
                    raise ServerError(f"teacher server {url}: HTTP {status}{what} after {attempt + 1} attempt(s): "
                                      f"{text}") from None
            except (urllib.error.URLError, http.client.HTTPException, OSError) as e:  # refused, cut off, timed out
                if attempt == self.retries:
                    reason = getattr(e, "reason", e)
                    raise ServerError(f"teacher server {url}: no answer{what} after {attempt + 1} attempt(s): "
                                      f"{reason}") from None
            except json.JSONDecodeError as e:
                raise ServerError(f"teacher server {url}: the response is not JSON{what}: {e}") from None
            time.sleep(min(self.backoff_s * 2 ** attempt, 30.0))
        raise AssertionError("unreachable")

    def _openai_only(self, what: str) -> None:
        if self.api != "openai":
            raise ServerError(f"teacher server {self.url}: {what} reads vLLM's OpenAI-compatible /v1/completions "
                              f"(prompt_logprobs, return_token_ids); teacher.api {self.api!r} serves the top-k only")

    # ------------------------------------------------------------------------------------------ checks
    def served_models(self) -> list[dict]:
        """``/v1/models``: what the server serves; refused unless it serves ``model`` (when one is named)."""
        found = self._request("/v1/models", None).get("data") or []
        names = [m.get("id") for m in found]
        if self.model is not None and self.model not in names:
            raise ServerError(f"teacher server {self.url} serves {names}, not {self.model!r} (teacher.model)")
        if self.model is None and len(names) == 1:
            self.model = names[0]
        return found

    def check_tokenizer(self, expected: Sequence[int], text: str) -> None:
        """Refuse a server whose tokenizer gives other ids than ``expected`` for ``text`` (``/tokenize``),
        naming the first token where they differ."""
        try:
            got = self._request("/tokenize", {"model": self.model, "prompt": text, "add_special_tokens": False})
        except ServerError as e:
            if self.api == "sglang" and " HTTP 404" in str(e):
                import warnings

                warnings.warn(f"teacher server {self.url} has no /tokenize, so its tokenizer is not checked against "
                              "the run's; serve the teacher with the tokenizer the run uses", stacklevel=2)
                return
            raise
        tokens = list(got.get("tokens") or [])
        if tokens != list(expected):
            at = next((i for i, (a, b) in enumerate(zip(tokens, expected)) if a != b), min(len(tokens), len(expected)))
            raise ServerError(f"teacher server {self.url} tokenizes differently from this run's tokenizer: on the probe "
                              f"{text!r}, token {at} is {tokens[at] if at < len(tokens) else 'missing'} there and "
                              f"{expected[at] if at < len(expected) else 'missing'} here; serve the teacher with the "
                              "tokenizer the run uses")

    # ------------------------------------------------------------------------------------------ scoring
    def topk(self, sequences: Sequence[Sequence[int]], sample_ids: Sequence[str], starts: Sequence[int] | None = None
             ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per sequence of ``L`` ids: ``(ids [L-1, k] int64, logprobs [L-1, k] fp32, tail [L-1] fp32)``, row ``i``
        the distribution of token ``i + 1`` given the tokens up to ``i``. ``starts[i]``: the first token of sequence
        ``i`` whose distribution is needed (its reply's first token); the rows before it are placeholders, and the
        server is asked to skip them (``prompt_logprobs_start``, which ``distillzoo serve`` reads and vLLM ignores)."""
        starts = [1] * len(sequences) if starts is None else [max(int(s), 1) for s in starts]

        def score(chunk: range):
            ids = [str(sample_ids[i]) for i in chunk]
            prompts = [list(map(int, sequences[i])) for i in chunk]
            if self.api == "sglang":  # SGLang's native endpoint: per position the top k as [logprob, id, text]
                body = {"input_ids": prompts, "sampling_params": {"max_new_tokens": 1, "temperature": 0.0},
                        "return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": self.top_k}
                answer = self._request("/generate", body, ids)
                answers = answer if isinstance(answer, list) else [answer]
                entries = [sglang_entries((a or {}).get("meta_info") or {}) for a in answers]
            else:
                body = {"model": self.model, "prompt": prompts, "max_tokens": 1, "temperature": 0.0,
                        "prompt_logprobs": self.top_k}
                if any(starts[i] > 1 for i in chunk):
                    body["prompt_logprobs_start"] = [starts[i] for i in chunk]
                entries = [c.get("prompt_logprobs") for c in self._choices(body, ids)]
            if len(entries) != len(chunk):
                raise ServerError(f"teacher server {self.url}: {len(entries)} answers for {len(chunk)} prompts "
                                  f"(samples {', '.join(ids)})")
            return [top_k_rows(e, len(p), self.top_k, f"teacher server {self.url}: sample {n!r}", starts[i])
                    for e, p, n, i in zip(entries, prompts, ids, chunk)]

        return self._in_chunks(len(sequences), score)

    def _choices(self, body: dict, ids: list[str]) -> list[dict]:
        """``/v1/completions``' choices for ``body``, in prompt order, one per prompt or a ServerError."""
        choices = sorted(self._request("/v1/completions", body, ids).get("choices") or [],
                         key=lambda c: c.get("index", 0))
        if len(choices) != len(ids):
            raise ServerError(f"teacher server {self.url}: {len(choices)} answers for {len(ids)} prompts "
                              f"(samples {', '.join(ids)})")
        return choices

    def _in_chunks(self, n: int, score) -> list:
        """``score(range)`` over ``n`` sequences, ``sequences_per_request`` a request, at most ``max_in_flight`` at
        once; the rows of every chunk, in order."""
        chunks = [range(s, min(s + self.sequences_per_request, n)) for s in range(0, n, self.sequences_per_request)]
        with ThreadPoolExecutor(max_workers=max(1, self.max_in_flight)) as pool:
            return [row for rows in pool.map(score, chunks) for row in rows]

    def token_logprobs(self, sequences: Sequence[Sequence[int]], sample_ids: Sequence[str],
                       starts: Sequence[int] | None = None) -> list[torch.Tensor]:
        """Per sequence of ``L`` ids: ``[L-1]`` fp32, row ``i`` the log-prob of token ``i + 1`` given the tokens up to
        ``i`` (the prompt's own token, which every ``prompt_logprobs`` entry holds), NaN before ``starts``."""
        self._openai_only("the log-probs of a sequence's own tokens (dpkd, mfd's nll_gap)")
        starts = [1] * len(sequences) if starts is None else [max(int(x), 1) for x in starts]
        body_of = lambda chunk: {"model": self.model, "prompt": [list(map(int, sequences[i])) for i in chunk],  # noqa: E731
                                 "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 1,
                                 "prompt_logprobs_start": [starts[i] for i in chunk]}

        def score(chunk: range):
            ids = [str(sample_ids[i]) for i in chunk]
            return [own_logprobs(c.get("prompt_logprobs"), sequences[i], starts[i],
                                 f"teacher server {self.url}: sample {ids[n]!r}")
                    for n, (i, c) in enumerate(zip(chunk, self._choices(body_of(chunk), ids)))]

        return self._in_chunks(len(sequences), score)

    # ------------------------------------------------------------------------------------------ generation
    def generate(self, prompts: Sequence[Sequence[int]], sampling, ids: Sequence[str], stop_ids: Sequence[int]
                 ) -> list[tuple[list[int], str]]:
        """``(answer token ids, finish reason)`` per prompt, as :func:`distillzoo.models.generation.decode` returns
        them: one request per prompt (``n: 1``), seeded by the sampling's seed and the prompt's id so that an answer
        depends on neither its batch nor the requests around it; the answer stops before the first of ``stop_ids``
        (``<|im_end|>``, ``<|endoftext|>``). Token ids come back as vLLM's ``return_token_ids`` gives them."""
        from distillzoo.models.generation import sample_seed

        self._openai_only("generation (generate, sampler: teacher, judge: teacher)")
        stop = set(map(int, stop_ids))

        def one(n: int):
            body = {"model": self.model, "prompt": list(map(int, prompts[n])), "n": 1,
                    "max_tokens": sampling.max_new_tokens, "temperature": sampling.temperature,
                    "top_p": sampling.top_p, "seed": sample_seed(sampling.seed, str(ids[n])),
                    "stop_token_ids": sorted(stop), "return_token_ids": True, "skip_special_tokens": False}
            if sampling.top_k > 0:
                body["top_k"] = sampling.top_k
            choices = self._request("/v1/completions", body, [str(ids[n])]).get("choices") or []
            tokens = choices[0].get("token_ids") if len(choices) == 1 else None
            if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
                raise ServerError(f"teacher server {self.url}: sample {ids[n]!r}: the answer holds no token_ids (vLLM "
                                  "returns them with return_token_ids, from 0.10.2 on; distillzoo serve always)")
            cut = next((i for i, t in enumerate(tokens) if t in stop), None)
            reason = "stop" if cut is not None or choices[0].get("finish_reason") == "stop" else "length"
            return tokens[:cut], reason

        with ThreadPoolExecutor(max_workers=max(1, self.max_in_flight)) as pool:
            return list(pool.map(one, range(len(prompts))))

    def submit(self, sequences: Sequence[Sequence[int]], sample_ids: Sequence[str],
               starts: Sequence[int] | None = None) -> Future:
        """:meth:`topk` in the background (one batch at a time, in the order submitted): what a prefetch of the
        steps ahead asks while the student computes the current one."""
        if self._background is None:
            self._background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="distillzoo-teacher-prefetch")
        return self._background.submit(self.topk, [list(map(int, s)) for s in sequences], list(sample_ids),
                                       None if starts is None else list(starts))

    def sparse_teacher(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, targets: torch.Tensor,
                       sample_ids: Sequence, rows: list | None = None) -> SparseTeacher:
        """A ``[B, T-1, k]`` SparseTeacher of a right-padded batch, its rows filled at the valid ``targets``: from
        ``rows`` (what :meth:`topk` returned for the batch's sequences) or scored now."""
        if rows is None:
            rows = self.topk(*batch_sequences(input_ids, attention_mask, targets, sample_ids))
        shape = (*targets.shape, self.top_k)
        ids = torch.arange(self.top_k).expand(shape).clone()  # rows never scored hold a valid uniform top-k
        logprobs = torch.full(shape, -math.log(self.top_k))
        tail = torch.full(targets.shape, -math.inf)
        valid = (targets != IGNORE_INDEX).cpu()
        for row, (top_ids, top_logprobs, top_tail) in enumerate(rows):
            positions = valid[row].nonzero().flatten()
            ids[row, positions] = top_ids[positions]
            logprobs[row, positions] = top_logprobs[positions]
            tail[row, positions] = top_tail[positions]
        device = targets.device
        return SparseTeacher(ids.to(device), logprobs.to(device), tail.to(device))


def batch_sequences(input_ids: torch.Tensor, attention_mask: torch.Tensor, targets: torch.Tensor, sample_ids
                    ) -> tuple[list[list[int]], list[str], list[int]]:
    """``(sequences, sample ids, starts)`` of a right-padded batch as the client's scoring takes them: each row's
    ids without padding, and the first token whose distribution its loss reads (one past its first valid target)."""
    lengths = attention_mask.sum(-1).tolist()
    valid = (targets != IGNORE_INDEX).cpu()
    starts = [int(v.nonzero()[0]) + 1 if v.any() else n for v, n in zip(valid, lengths)]
    return [input_ids[row, :n].tolist() for row, n in enumerate(lengths)], [str(i) for i in sample_ids], starts


def top_k_rows(entries, length: int, k: int, where: str, start: int = 1):
    """``(ids [L-1, k] int64, logprobs [L-1, k] fp32, tail [L-1] fp32)`` from a ``prompt_logprobs`` list of a
    sequence of ``length`` tokens, in vLLM's format: entry 0 null, entry ``i`` mapping token ids (strings) to
    ``{logprob, rank, ...}`` for the top k of token ``i``'s distribution, and the prompt's own token with its true
    rank wherever it falls outside them (dropped here). Refused, naming ``where`` and the token: a list of another
    length, fewer than ``k`` entries of rank <= k, a log-prob that is NaN or above 0, a top k whose probability mass
    exceeds 1 by more than :data:`MASS_TOLERANCE`. Entries before ``start`` may be null (not asked for): their rows
    are placeholders, a uniform top k with an empty tail, which no loss reads."""
    if not isinstance(entries, list) or len(entries) != length:
        got = len(entries) if isinstance(entries, list) else type(entries).__name__
        raise ServerError(f"{where}: prompt_logprobs has {got} entries for {length} tokens (is the server vLLM with "
                          "prompt_logprobs, or distillzoo serve?)")
    ids = torch.arange(k).repeat(max(length - 1, 0), 1)
    logprobs = torch.full((max(length - 1, 0), k), -math.log(k), dtype=torch.float64)
    for position, entry in enumerate(entries[1:]):
        if entry is None and position + 1 < start:
            continue
        try:
            ranked = sorted((int(v["rank"]), -float(v["logprob"]), int(t)) for t, v in (entry or {}).items()
                            if v.get("rank") is not None and int(v["rank"]) <= k)[:k]
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise ServerError(f"{where}, token {position + 1}: an entry that is not {{token id: {{logprob, rank}}}}: "
                              f"{type(e).__name__}: {e}") from None
        if len(ranked) < k:
            raise ServerError(f"{where}, token {position + 1}: {len(ranked)} log-probs of rank <= {k}; the server's "
                              f"--max-logprobs must be at least teacher.top_k ({k})")
        values = [-v for _, v, _ in ranked]
        bad = next((v for v in values if math.isnan(v) or v > MASS_TOLERANCE), None)
        if bad is not None:
            raise ServerError(f"{where}, token {position + 1}: log-prob {bad} is not a log-probability (NaN or above 0)")
        ids[position] = torch.tensor([t for _, _, t in ranked])
        logprobs[position] = torch.tensor(values, dtype=torch.float64)
    mass = logprobs.exp().sum(-1)
    if length > 1 and float(mass.max()) > 1 + MASS_TOLERANCE:
        at = int(mass.argmax())
        raise ServerError(f"{where}, token {at + 1}: the top {k} probabilities sum to {float(mass[at]):.6f}, above 1; "
                          "the server's log-probs are not of one softmax (a processed or tempered mode?)")
    tail = torch.where(mass < 1, torch.log1p(-mass.clamp(max=1.0)), torch.tensor(-math.inf, dtype=torch.float64))
    return ids, logprobs.clamp(max=0.0).float(), tail.float()


def own_logprobs(entries, sequence: Sequence[int], start: int, where: str) -> torch.Tensor:
    """``[L-1]`` log-probs of a sequence's own tokens from its ``prompt_logprobs`` (NaN before ``start``); refused,
    naming the token, where an entry lacks the token or its log-prob is NaN or above 0."""
    if not isinstance(entries, list) or len(entries) != len(sequence):
        got = len(entries) if isinstance(entries, list) else type(entries).__name__
        raise ServerError(f"{where}: prompt_logprobs has {got} entries for {len(sequence)} tokens")
    out = torch.full((max(len(sequence) - 1, 0),), math.nan)
    for position in range(max(start, 1), len(sequence)):
        value = ((entries[position] or {}).get(str(int(sequence[position]))) or {}).get("logprob")
        if not isinstance(value, (int, float)) or math.isnan(value) or value > MASS_TOLERANCE:
            raise ServerError(f"{where}, token {position}: the entry holds no log-prob of the sequence's own token "
                              f"{int(sequence[position])} (got {value!r})")
        out[position - 1] = min(float(value), 0.0)
    return out


def sglang_entries(meta_info: dict) -> list | None:
    """SGLang's ``meta_info`` (``input_top_logprobs``: per prompt token null or ``[[logprob, id, text], ...]``
    best first) as vLLM's ``prompt_logprobs`` list, each entry's rank its place in the list."""
    top = meta_info.get("input_top_logprobs")
    if not isinstance(top, list):
        return None  # refused by top_k_rows, naming the sample
    try:
        return [None if not position else {str(int(item[1])): {"logprob": item[0], "rank": rank + 1}
                                           for rank, item in enumerate(position)} for position in top]
    except (TypeError, ValueError, IndexError) as e:
        raise ServerError(f"SGLang's input_top_logprobs holds an entry that is not [[logprob, token id, text], ...]: "
                          f"{type(e).__name__}: {e}") from None


def split_specials(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` with its control strings (``<|im_start|>``, ...) read as the control tokens, as a
    transformers tokenizer (and so vLLM's ``/tokenize``) reads them."""
    ids: list[int] = []
    rest = text
    while rest:
        hits = [(rest.find(s), s) for s in tokenizer.special if s in rest]
        if not hits:
            return ids + tokenizer.encode(rest)
        at, special = min(hits)
        ids += tokenizer.encode(rest[:at]) + [tokenizer.special[special]]
        rest = rest[at + len(special):]
    return ids


#: the text a server's tokenizer must encode as the run's does: English, Chinese and ChatML's control tokens
PROBE = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nTranslate: 今天天气很好。" \
        "<|im_end|>\n<|im_start|>assistant\nThe weather is nice today.<|im_end|>\n"


def check_served(teacher: ServedTeacher, tokenizer, where: str) -> None:
    """Refuse a server that does not serve ``teacher.model`` or tokenizes :data:`PROBE` otherwise than ``tokenizer``
    (the control strings read as control tokens, as a transformers tokenizer reads them)."""
    from distillzoo.errors import ConfigError

    expected = split_specials(tokenizer, PROBE)
    try:
        teacher.served_models()
        teacher.check_tokenizer(expected, PROBE)
    except ServerError as e:
        raise ConfigError(f"{where}: {e}") from None


def served_client(section, role: str, tokenizer, where: str) -> ServedTeacher:
    """The client of a config section's ``server`` (``model``, ``top_k``, default 1, and ``api`` as given), refused
    unless the server serves that model and tokenizes as ``tokenizer`` does."""
    client = ServedTeacher(section.server, section.model, top_k=section.top_k or 1, api=section.api)
    check_served(client, tokenizer, f"{where}: {role}.server")
    return client


def identity(model) -> str:
    """What tells one model's outputs from another's in a resumable output: a hash of a model's config and
    weights, or a server's URL and the name it serves."""
    from distillzoo.models.causal_lm import model_fingerprint

    return f"served:{model.url}:{model.model}" if isinstance(model, ServedTeacher) else model_fingerprint(model)


def served_roles(cfg, roles, where: str) -> tuple[str, ...]:
    """Which of ``roles`` a config gives as ``server: URL``; a ConfigError where a role gives a server and a model."""
    from distillzoo.errors import ConfigError

    served = tuple(role for role in roles if cfg[role] is not None and cfg[role].server is not None)
    for role in served:
        if cfg[role].path is not None or cfg[role].tiny is not None:
            raise ConfigError(f"{where}: {role}: give {role}.server or a model ({role}.path, {role}.tiny), not both")
    return served
