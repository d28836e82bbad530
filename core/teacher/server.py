"""``distillzoo serve``: a transformers model behind the subset of the OpenAI-compatible API that
vLLM and SGLang serve and that distillzoo's teacher client speaks.

Endpoints:

* ``GET /v1/models``: the served model (``owned_by: distillzoo``);
* ``POST /tokenize``: ``{prompt, add_special_tokens}`` to ``{tokens, count, max_model_len}``; the
  ChatML control strings in the text are the control tokens, as a transformers tokenizer reads them;
* ``POST /v1/completions`` with ``prompt`` a list of token ids, or a list of such lists:

  - scoring, vLLM's extension: ``prompt_logprobs: k`` gives each choice a ``prompt_logprobs`` list
    whose first entry is null and whose entry ``i`` maps token ids (as strings) to ``{logprob,
    rank, decoded_token}`` for the top ``k`` of the distribution of token ``i`` given the tokens
    before it, plus the prompt's own token ``i`` wherever it falls outside them (distillzoo's extension
    ``prompt_logprobs_start: s``, an integer or one per prompt, leaves the entries before ``s`` null
    and skips their computation; vLLM ignores it and fills them). The log-probs are
    of the full softmax of the raw logits (vLLM's default ``raw_logprobs``): the request's
    ``temperature`` applies to sampling, never to them. Each choice holds the one greedy token after
    its prompt (what ``max_tokens: 1`` asks of vLLM), not a longer generation;
  - generation: ``max_tokens``, ``n``, ``temperature``, ``top_p``, ``top_k``, ``seed``; each choice
    holds ``token_ids`` (as vLLM's ``return_token_ids`` gives them) and ``text``, and stops before
    ``<|im_end|>``.

Requests that arrive while the model is busy are batched: one worker thread drains the queue and
scores every waiting sequence in one padded forward pass (at most ``max_batch_tokens`` tokens),
so concurrent clients share the model rather than queue behind each other. Generation runs
request by request, each with its own seed, so a sample does not depend on what else arrived.
"""

from __future__ import annotations

import json
import queue
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

from distillzoo.data.tokenizer import ChatTokenizer
from distillzoo.errors import ParameterError
from distillzoo.models.causal_lm import final_hidden, lm_head_weight
from distillzoo.models.generation import Sampling, decode
from distillzoo.teacher.served import split_specials

#: the most log-probs per position a request may ask for unless the server is started with more (vLLM's
#: ``--max-logprobs`` bounds it the same way)
MAX_LOGPROBS = 64


class RequestError(Exception):
    """A request the server refuses (HTTP 400), with the reason it answers."""


@dataclass
class _Job:
    sequences: list[list[int]]
    k: int
    starts: list[int]
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None


class TeacherServer:
    """The model, its tokenizer and the batching worker; :meth:`http` wraps it in an HTTP server."""

    def __init__(self, model, tokenizer: ChatTokenizer, name: str, *, max_logprobs: int = MAX_LOGPROBS,
                 max_batch_tokens: int = 16384, max_model_len: int = 32768) -> None:
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        self.weight = lm_head_weight(model)
        self.vocab = self.weight.shape[0]
        self.device = self.weight.device
        self.max_logprobs, self.max_batch_tokens, self.max_model_len = max_logprobs, max_batch_tokens, max_model_len
        self.jobs: queue.Queue[_Job] = queue.Queue()
        self._texts: dict[int, str] = {}  # decoded tokens, as each entry names its token
        self.lock = threading.Lock()  # the model runs one batch at a time (scoring batches, generation requests)
        #: forward passes run and sequences scored (what the batching test reads)
        self.passes = 0
        self.scored = 0
        self._worker = threading.Thread(target=self._work, name="distillzoo-serve-batcher", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------------------------------ scoring
    def score(self, sequences: list[list[int]], k: int, starts: list[int] | None = None) -> list[tuple]:
        """Each sequence's ``(prompt_logprobs, the greedy token after it)`` (see the module docstring), entries
        before ``starts[i]`` null; computed in a batch with whatever other requests are waiting."""
        job = _Job(sequences, k, starts or [1] * len(sequences))
        self.jobs.put(job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def _work(self) -> None:
        while True:
            jobs = [self.jobs.get()]
            tokens = sum(len(s) for s in jobs[0].sequences)
            while tokens < self.max_batch_tokens:  # everything already waiting, up to the token budget
                try:
                    job = self.jobs.get_nowait()
                except queue.Empty:
                    break
                jobs.append(job)
                tokens += sum(len(s) for s in job.sequences)
            try:
                rows = self._score_batch([s for job in jobs for s in job.sequences],
                                         [job.k for job in jobs for _ in job.sequences],
                                         [start for job in jobs for start in job.starts])
                start = 0
                for job in jobs:
                    job.result = rows[start:start + len(job.sequences)]
                    start += len(job.sequences)
            except BaseException as e:  # noqa: BLE001 (every waiting request gets the error, the worker lives)
                for job in jobs:
                    job.error = e
            for job in jobs:
                job.done.set()

    @torch.no_grad()
    def _score_batch(self, sequences: list[list[int]], ks: list[int], starts: list[int] | None = None
                     ) -> list[tuple[list[dict | None], int]]:
        """``(prompt_logprobs, the greedy next token)`` per sequence, longest first in padded passes of at most
        ``max_batch_tokens`` tokens."""
        results: dict[int, tuple[list[dict | None], int]] = {}
        batch: list[int] = []
        starts = starts or [1] * len(sequences)

        def flush() -> None:
            width = max(len(sequences[i]) for i in batch)
            ids = torch.full((len(batch), width), self.tokenizer.pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, i in enumerate(batch):
                ids[row, :len(sequences[i])] = torch.tensor(sequences[i])
                mask[row, :len(sequences[i])] = 1
            with self.lock:
                hidden = final_hidden(self.model, ids.to(self.device), mask.to(self.device))
                self.passes += 1
                self.scored += len(batch)
                results.update(self._entries([hidden[row, :len(sequences[i])] for row, i in enumerate(batch)],
                                             [sequences[i] for i in batch], [ks[i] for i in batch],
                                             [starts[i] for i in batch], batch))
            batch.clear()

        for i in sorted(range(len(sequences)), key=lambda i: -len(sequences[i])):
            if batch and len(sequences[batch[0]]) * (len(batch) + 1) > self.max_batch_tokens:
                flush()
            batch.append(i)
        if batch:
            flush()
        return [results[i] for i in range(len(sequences))]

    def _entries(self, hidden: list[torch.Tensor], sequences: list[list[int]], ks: list[int], starts: list[int],
                 keys: list[int]) -> dict[int, tuple[list[dict | None], int]]:
        """``{key: (prompt_logprobs, the greedy token after it)}`` of sequences from their ``[L, H]`` hidden states,
        the entries before each start null. The rows of all sequences go through the head together, 256 at a time
        (one read of its weight, however many sequences): log-probs are logits less their logsumexp over the
        vocabulary (shifted by the row's maximum), and a prompt token outside the top k gets its rank by a count over its
        row only."""
        starts = [min(max(start, 1), len(sequence)) for start, sequence in zip(starts, sequences)]
        rows, owners = [], []  # (sequence, position): position L-1 is the token after the prompt
        for n, (h, sequence, start) in enumerate(zip(hidden, sequences, starts)):
            positions = list(range(start - 1, len(sequence) - 1)) + [len(sequence) - 1]
            rows.append(h[positions])
            owners += [(n, position) for position in positions]
        hidden_rows = torch.cat(rows).float()
        weight = self.weight.float()
        k_max = max(ks)
        entries: list[list[dict | None]] = [[None] * start for start in starts]
        next_tokens = [0] * len(sequences)
        for lo in range(0, len(owners), 256):
            part = owners[lo:lo + 256]
            logits = hidden_rows[lo:lo + 256] @ weight.T
            top = logits.topk(k_max, dim=-1)
            peak = top.values[:, :1]  # log-probs as (logit - max) - log(sum(exp(logits - max))), as log_softmax:
            lse = torch.logsumexp(logits - peak, dim=-1, keepdim=True)  # exact near 0 however large the logits
            top_ids, top_logp = top.indices.tolist(), ((top.values - peak) - lse).tolist()
            actual = torch.tensor([sequences[n][min(t + 1, len(sequences[n]) - 1)] for n, t in part],
                                  device=logits.device)
            actual_logit = logits.gather(-1, actual[:, None])
            actual_logp = ((actual_logit - peak) - lse)[:, 0].tolist()
            for row, (n, position) in enumerate(part):
                if position == len(sequences[n]) - 1:
                    next_tokens[n] = top_ids[row][0]
                    continue
                k = ks[n]
                entry = {str(t): {"logprob": v, "rank": r + 1, "decoded_token": self._decoded(t)}
                         for r, (t, v) in enumerate(zip(top_ids[row][:k], top_logp[row][:k]))}
                token = sequences[n][position + 1]
                if str(token) not in entry:
                    rank = int((logits[row] > actual_logit[row]).sum()) + 1
                    entry[str(token)] = {"logprob": actual_logp[row], "rank": max(rank, k + 1),
                                         "decoded_token": self._decoded(token)}
                entries[n].append(entry)
        return {key: (e, t) for key, e, t in zip(keys, entries, next_tokens)}

    def _decoded(self, token: int) -> str:
        text = self._texts.get(token)
        if text is None:
            text = self._texts[token] = self.tokenizer.decode([token])
        return text

    # ------------------------------------------------------------------------------------------ requests
    def completions(self, body: dict) -> dict:
        prompts = _prompts(body.get("prompt"), self.vocab)
        if body.get("model") not in (None, self.name):
            raise RequestError(f"model {body.get('model')!r} is not served here; this server serves {self.name!r}")
        too_long = [i for i, p in enumerate(prompts) if len(p) > self.max_model_len]
        if too_long:
            raise RequestError(f"prompt {too_long[0]} has {len(prompts[too_long[0]])} tokens, more than "
                               f"max_model_len {self.max_model_len}")
        k = body.get("prompt_logprobs")
        if k is not None:
            if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= self.max_logprobs:
                raise RequestError(f"prompt_logprobs must be an integer in [0, {self.max_logprobs}] (the server's "
                                   f"--max-logprobs), got {k!r}")
            starts = body.get("prompt_logprobs_start", 1)
            starts = [starts] * len(prompts) if isinstance(starts, int) and not isinstance(starts, bool) else starts
            if not isinstance(starts, list) or len(starts) != len(prompts) or \
                    not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in starts):
                raise RequestError(f"prompt_logprobs_start must be an integer >= 1 or one per prompt, got "
                                   f"{body.get('prompt_logprobs_start')!r}")
            scored = self.score(prompts, max(k, 1), starts)
            choices = [{"index": i, "text": self.tokenizer.decode([token]), "token_ids": [token],
                        "finish_reason": "length", "logprobs": None, "prompt_logprobs": entries,
                        "prompt_token_ids": prompts[i]} for i, (entries, token) in enumerate(scored)]
            return _response(self.name, prompts, choices)
        n = _integer(body, "n", 1, 1)
        max_tokens = _integer(body, "max_tokens", 16, 1)
        try:
            sampling = Sampling(max_new_tokens=max_tokens, temperature=float(body.get("temperature", 1.0)),
                                top_k=max(int(body.get("top_k", 0) or 0), 0), top_p=float(body.get("top_p", 1.0)),
                                seed=int(body.get("seed") or 0))
        except (ParameterError, TypeError, ValueError) as e:
            raise RequestError(f"sampling parameters: {e}") from None
        with self.lock:
            answers = decode(self.model, self.tokenizer, [p for p in prompts for _ in range(n)], sampling,
                             ids=[f"{i}:{j}" for i in range(len(prompts)) for j in range(n)])
        choices = [{"index": index, "text": self.tokenizer.decode(tokens), "token_ids": tokens,
                    "finish_reason": reason, "logprobs": None} for index, (tokens, reason) in enumerate(answers)]
        return _response(self.name, prompts, choices)

    def tokenize(self, body: dict) -> dict:
        text = body.get("prompt")
        if not isinstance(text, str):
            raise RequestError("tokenize: 'prompt' must be a string")
        tokens = split_specials(self.tokenizer, text)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": self.max_model_len}

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.name, "object": "model", "owned_by": "distillzoo",
                                            "max_model_len": self.max_model_len}]}

    def http(self, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
        """An HTTP server over this teacher (``port`` 0: any free one; see ``server_address``)."""
        teacher = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # one line per request would drown the training output
                pass

            def _send(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                if self.path.rstrip("/") == "/v1/models":
                    self._send(200, teacher.models())
                elif self.path.rstrip("/") in ("/health", "/v1/health"):
                    self._send(200, {"status": "ok"})
                else:
                    self._send(404, {"error": {"message": f"no route GET {self.path}"}})

            def do_POST(self) -> None:  # noqa: N802
                routes = {"/v1/completions": teacher.completions, "/tokenize": teacher.tokenize}
                route = routes.get(self.path.rstrip("/"))
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                    body = json.loads(self.rfile.read(length) or b"{}")
                    if route is None:
                        self._send(404, {"error": {"message": f"no route POST {self.path}"}})
                        return
                    if not isinstance(body, dict):
                        raise RequestError("the request body must be a JSON object")
                    self._send(200, route(body))
                except (RequestError, json.JSONDecodeError, UnicodeDecodeError) as e:
                    self._send(400, {"error": {"message": str(e), "type": "BadRequestError"}})
                except Exception as e:  # noqa: BLE001 (the client sees a 500 naming it, the server goes on)
                    self._send(500, {"error": {"message": f"{type(e).__name__}: {e}", "type": "InternalServerError"}})

        server = ThreadingHTTPServer((host, port), Handler)
        server.daemon_threads = True
        return server


def _response(name: str, prompts: list[list[int]], choices: list[dict]) -> dict:
    prompt_tokens = sum(len(p) for p in prompts)
    completion_tokens = sum(len(c["token_ids"]) for c in choices)
    return {"id": "cmpl-distillzoo", "object": "text_completion", "model": name, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


def _prompts(prompt, vocab: int) -> list[list[int]]:
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
        prompts = prompt
    else:
        raise RequestError("prompt must be token ids (a list of integers) or a list of such lists; this server "
                           "reads no text prompts")
    for i, p in enumerate(prompts):
        if not p or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in p):
            raise RequestError(f"prompt {i}: token ids must be a non-empty list of integers in [0, {vocab})")
    return prompts


def _integer(body: dict, key: str, default: int, low: int) -> int:
    value = body.get(key, default)
    if value is None:
        value = default
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise RequestError(f"{key} must be an integer >= {low}, got {value!r}")
    return value


def serve(model_dir: str, *, host: str = "127.0.0.1", port: int = 8000, allow_remote: bool = False,
          dtype: str | None = None, device: str | None = None, served_model_name: str | None = None,
          tokenizer: str | None = None, max_logprobs: int = MAX_LOGPROBS) -> int:
    """``distillzoo serve``: load ``model_dir`` and answer requests until interrupted."""
    from distillzoo.data.tokenizer import load_tokenizer
    from distillzoo.errors import ConfigError
    from distillzoo.models.causal_lm import load_causal_lm

    if host not in ("127.0.0.1", "localhost", "::1") and not allow_remote:
        raise ConfigError(f"--host {host}: the server has no authentication; binding beyond this host needs "
                          "--allow-remote")
    model = load_causal_lm(model_dir, dtype=dtype, device=device or "cpu")
    teacher = TeacherServer(model, load_tokenizer(tokenizer), served_model_name or model_dir, max_logprobs=max_logprobs)
    http = teacher.http(host, port)
    bound_host, bound_port = http.server_address[:2]
    print(f"serving {teacher.name} at http://{bound_host}:{bound_port}/v1 (completions with prompt_logprobs up to "
          f"{max_logprobs}, tokenize, models)", flush=True)
    try:
        http.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        http.server_close()
    return 0
