"""The served teacher's parsers on responses written by hand from vLLM's and SGLang's documented formats, the
malformed responses each refuses, and the SGLang scoring path end to end against a server speaking its format."""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from distillzoo.data.tokenizer import load_tokenizer
from distillzoo.models.causal_lm import tiny_qwen2
from distillzoo.teacher.served import ServedTeacher, ServerError, sglang_entries, top_k_rows
from distillzoo.teacher.server import TeacherServer

# vLLM's /v1/completions with prompt_logprobs: 2 for the prompt [10, 20, 30]: a null first entry; at token 1 the
# prompt's own token (20) is outside the top 2 and comes with its true rank; at token 2 it is the top token
VLLM = [None,
        {"20": {"logprob": -2.25, "rank": 3, "decoded_token": " b"},
         "7": {"logprob": -0.5, "rank": 1, "decoded_token": " x"},
         "8": {"logprob": -1.5, "rank": 2, "decoded_token": " y"}},
        {"30": {"logprob": -0.125, "rank": 1, "decoded_token": " c"},
         "9": {"logprob": -3.0, "rank": 2, "decoded_token": " z"}}]


def test_a_vllm_prompt_logprobs_list_becomes_the_top_k_with_the_tail_of_the_full_softmax():
    ids, logprobs, tail = top_k_rows(VLLM, 3, 2, "here")
    assert ids.tolist() == [[7, 8], [30, 9]]
    assert logprobs.tolist() == [[-0.5, -1.5], [-0.125, -3.0]]
    want = [math.log(1 - math.exp(-0.5) - math.exp(-1.5)), math.log(1 - math.exp(-0.125) - math.exp(-3.0))]
    assert tail.tolist() == pytest.approx(want, abs=1e-6)


def test_a_k_that_covers_every_listed_token_at_mass_one_has_an_empty_tail():
    entries = [None, {"4": {"logprob": math.log(0.75), "rank": 1}, "5": {"logprob": math.log(0.25), "rank": 2}}]
    _, _, tail = top_k_rows(entries, 2, 2, "here")
    assert tail.tolist() == [-math.inf]


def _with(position: int, token: str, value: dict) -> list:
    entries = json.loads(json.dumps(VLLM))
    entries[position][token] = value
    return entries


@pytest.mark.parametrize("entries, k, message", [
    (VLLM[:2], 2, "2 entries for 3 tokens"),
    ({"not": "a list"}, 2, "dict entries for 3 tokens"),
    (VLLM, 3, "token 2: 2 log-probs of rank <= 3"),
    (_with(1, "7", {"logprob": float("nan"), "rank": 1}), 2, "log-prob nan is not a log-probability"),
    (_with(1, "7", {"logprob": float("inf"), "rank": 1}), 2, "log-prob inf is not a log-probability"),
    (_with(2, "9", {"logprob": -0.01, "rank": 2}), 2, "token 2: the top 2 probabilities sum to 1.872"),
    (_with(1, "7", {"rank": 1}), 2, "token 1: an entry that is not"),
    (_with(1, "x7", {"logprob": -0.5, "rank": 1}), 2, "token 1: an entry that is not"),
])
def test_malformed_prompt_logprobs_are_refused_naming_the_token(entries, k, message):
    with pytest.raises(ServerError, match="sample 's3'") as e:
        top_k_rows(entries, 3, k, "sample 's3'")
    assert message in str(e.value)


def test_sglang_input_top_logprobs_read_as_the_same_top_k():
    # SGLang's /generate with return_logprob, logprob_start_len 0, top_logprobs_num 2: per prompt token null or
    # [[logprob, token id, text], ...] best first
    meta = {"input_token_logprobs": [[None, 10, None], [-2.25, 20, None], [-0.125, 30, None]],
            "input_top_logprobs": [None, [[-0.5, 7, None], [-1.5, 8, None]], [[-0.125, 30, None], [-3.0, 9, None]]]}
    got = top_k_rows(sglang_entries(meta), 3, 2, "here")
    want = top_k_rows(VLLM, 3, 2, "here")
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    with pytest.raises(ServerError, match="not \\[\\[logprob, token id, text\\]"):
        sglang_entries({"input_top_logprobs": [None, [[-0.5]]]})
    with pytest.raises(ServerError, match="NoneType entries for 3 tokens"):
        top_k_rows(sglang_entries({}), 3, 2, "here")


@pytest.fixture(scope="module")
def sglang_url():
    """A server answering SGLang's /generate (its documented response: a list, one object per prompt, each with
    meta_info.input_top_logprobs), scored by distillzoo's reference server's model."""
    model = tiny_qwen2(vocab_size=151_936, hidden_size=16, num_layers=1, seed=5).eval()
    teacher = TeacherServer(model, load_tokenizer(), "tiny")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            assert self.path == "/generate" and body["return_logprob"] and body["logprob_start_len"] == 0
            k = body["top_logprobs_num"]
            answers = []
            for entries, _ in teacher.score(body["input_ids"], k):
                top = [None] + [sorted(([v["logprob"], int(t), None] for t, v in e.items() if v["rank"] <= k),
                                       key=lambda item: -item[0]) for e in entries[1:]]
                answers.append({"text": "", "meta_info": {"input_top_logprobs": top}})
            data = json.dumps(answers).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    openai = teacher.http()
    threading.Thread(target=openai.serve_forever, daemon=True).start()
    yield "http://127.0.0.1:%d" % http.server_address[1], "http://127.0.0.1:%d" % openai.server_address[1]
    http.shutdown()
    openai.shutdown()


def test_the_sglang_api_scores_what_the_openai_api_scores(sglang_url):
    sglang, openai = sglang_url
    g = torch.Generator().manual_seed(1)
    sequences = [torch.randint(0, 151_643, (n,), generator=g).tolist() for n in (5, 9, 2)]
    names = ["a", "b", "c"]
    got = ServedTeacher(sglang, top_k=4, api="sglang", sequences_per_request=2).topk(sequences, names)
    want = ServedTeacher(openai, "tiny", top_k=4).topk(sequences, names)
    for row_got, row_want in zip(got, want):
        assert torch.equal(row_got[0], row_want[0])
        torch.testing.assert_close(row_got[1], row_want[1], rtol=0, atol=1e-6)
        torch.testing.assert_close(row_got[2], row_want[2], rtol=0, atol=1e-6)


def test_an_unknown_api_is_refused_with_the_choices():
    with pytest.raises(ServerError, match=r"api 'tgi' is not one of \['openai', 'sglang'\]"):
        ServedTeacher("http://127.0.0.1:1", top_k=2, api="tgi")


def test_what_needs_the_openai_api_refuses_an_sglang_client_by_name():
    from distillzoo.models.generation import Sampling

    client = ServedTeacher("http://127.0.0.1:1", top_k=2, api="sglang")
    with pytest.raises(ServerError, match=r"the log-probs of a sequence's own tokens .* teacher.api 'sglang' serves "
                                          r"the top-k only"):
        client.token_logprobs([[1, 2, 3]], ["a"])
    with pytest.raises(ServerError, match=r"generation .* teacher.api 'sglang' serves the top-k only"):
        client.generate([[1, 2]], Sampling(2), ["a"], [3])
