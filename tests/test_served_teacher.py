"""The served teacher: distillzoo's reference server and the OpenAI-compatible client, against the in-process
teacher's top-k, a padded batch against one sequence at a time, and the client's retries and refusals."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from distillzoo.data.tokenizer import ChatTokenizer, load_tokenizer
from distillzoo.models.causal_lm import final_hidden, lm_head_weight, tiny_qwen2
from distillzoo.teacher.cache import teacher_topk
from distillzoo.teacher.served import ServedTeacher, ServerError
from distillzoo.teacher.served import split_specials, top_k_rows
from distillzoo.teacher.server import TeacherServer

VOCAB = 151_936


@pytest.fixture(scope="module")
def model():
    return tiny_qwen2(vocab_size=VOCAB, hidden_size=32, num_layers=2, seed=3).eval()


def _start(server: ThreadingHTTPServer) -> str:
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host, port = server.server_address[:2]
    return f"http://{host}:{port}"


@pytest.fixture(scope="module")
def served(model):
    teacher = TeacherServer(model, load_tokenizer(), "tiny-teacher")
    http = teacher.http()
    url = _start(http)
    yield teacher, url
    http.shutdown()


def _sequences(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 151_643, (int(torch.randint(3, 17, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def test_served_top_k_equals_the_in_process_teacher_s_top_k_at_the_full_qwen_vocab(model, served):
    _, url = served
    # a request's rows go through the head 256 at a time: one sequence of 300 tokens crosses that boundary
    sequences = _sequences(6) + [torch.randint(0, 151_643, (300,), generator=torch.Generator().manual_seed(9)).tolist()]
    starts = [1, 2, 1, 5, 1, 3, 40]  # rows before a start are not asked for
    client = ServedTeacher(url, "tiny-teacher", top_k=8, sequences_per_request=2, max_in_flight=3)
    rows = client.topk(sequences, [f"s{i}" for i in range(len(sequences))], starts)
    weight = lm_head_weight(model)
    for sequence, start, (ids, logprobs, tail) in zip(sequences, starts, rows):
        with torch.no_grad():
            hidden = final_hidden(model, torch.tensor([sequence]), torch.ones(1, len(sequence), dtype=torch.long))
        want_ids, want_logprobs, want_tail = teacher_topk(hidden[0, :-1], weight, 8)
        assert ids.shape == (len(sequence) - 1, 8)
        asked = slice(start - 1, None)
        assert torch.equal(ids[asked], want_ids[asked].long())
        assert (logprobs[asked] - want_logprobs[asked]).abs().max() <= 1e-5
        assert (tail[asked] - want_tail[asked]).abs().max() <= 1e-5


def test_a_padded_batch_scores_each_sequence_as_it_scores_alone(served):
    teacher, _ = served
    sequences = _sequences(5, seed=1)
    together = teacher._score_batch(sequences, [4] * len(sequences))
    for sequence, (entries, token) in zip(sequences, together):
        alone, alone_token = teacher._score_batch([sequence], [4])[0]
        assert token == alone_token and len(entries) == len(sequence) and entries[0] is None
        for a, b in zip(entries[1:], alone[1:]):
            assert a.keys() == b.keys()
            assert all(abs(a[t]["logprob"] - b[t]["logprob"]) <= 1e-5 for t in a)
        start = len(sequence) // 2 + 1  # prompt_logprobs_start: the entries before it null, the rest the same
        later, _ = teacher._score_batch([sequence], [4], [start])[0]
        assert len(later) == len(sequence) and all(e is None for e in later[:start])
        assert later[start:] == entries[start:] or all(
            a.keys() == b.keys() and all(abs(a[t]["logprob"] - b[t]["logprob"]) <= 1e-5 for t in a)
            for a, b in zip(later[start:], entries[start:]))


def test_each_entry_holds_the_prompt_s_own_token_with_its_true_rank(model, served):
    _, url = served
    sequence = _sequences(1, seed=2)[0]
    client = ServedTeacher(url, top_k=2)
    body = {"prompt": [sequence], "max_tokens": 1, "prompt_logprobs": 2}
    entries = client._request("/v1/completions", body)["choices"][0]["prompt_logprobs"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([sequence])).logits[0, :-1].float()
    logp = torch.log_softmax(logits, -1)
    for position, entry in enumerate(entries[1:]):
        token = sequence[position + 1]
        own = entry[str(token)]
        assert abs(own["logprob"] - float(logp[position, token])) <= 1e-5
        # its rank: one more than the tokens above it, up to the ties that fp32 rounding makes or breaks
        above = [int((logp[position] > logp[position, token] + d).sum()) + 1 for d in (1e-5, -1e-5)]
        assert above[0] <= own["rank"] <= above[1] or own["rank"] <= 2
        assert len(entry) == (2 if own["rank"] <= 2 else 3)


def test_the_client_names_the_served_model_and_refuses_another_name(served):
    _, url = served
    assert ServedTeacher(url, top_k=4).served_models()[0]["id"] == "tiny-teacher"
    with pytest.raises(ServerError, match=r"serves \['tiny-teacher'\], not 'big-teacher'"):
        ServedTeacher(url, "big-teacher", top_k=4).served_models()


def test_a_server_with_another_tokenizer_is_refused_naming_the_first_differing_token(model):
    base = load_tokenizer()
    probe = "<|im_start|>user\nHello, world 你好<|im_end|>\n"
    expected = split_specials(base, probe)
    ServedTeacher("http://unused", top_k=1)  # construction needs no server
    shifted = ChatTokenizer(lambda text: [t + 1 if t > 20_000 else t for t in base.encode(text)], base._decode,
                            base.special, base.vocab_size, "shifted")
    http = TeacherServer(model, shifted, "other").http()
    url = _start(http)
    try:
        client = ServedTeacher(url, "other", top_k=1)
        got = split_specials(shifted, probe)
        first = next(i for i, (a, b) in enumerate(zip(got, expected)) if a != b)
        with pytest.raises(ServerError, match=rf"token {first} is {got[first]} there and {expected[first]} here"):
            client.check_tokenizer(expected, probe)
    finally:
        http.shutdown()
    assert expected[0] == base.im_start_id and base.im_end_id in expected


def test_a_k_above_the_server_s_max_logprobs_is_refused_with_the_server_s_reason(served):
    _, url = served
    with pytest.raises(ServerError, match=r"HTTP 400.*--max-logprobs"):
        ServedTeacher(url, top_k=65).topk([[1, 2, 3]], ["row-7"])


class _Flaky(BaseHTTPRequestHandler):
    """Answers 503 ``failures`` times, then forwards to the real server (``target``)."""

    protocol_version = "HTTP/1.1"
    failures, seen, target, body = 0, 0, "", b""

    def log_message(self, *args):
        pass

    def do_POST(self):  # noqa: N802
        data = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).seen += 1
        if type(self).seen <= type(self).failures:
            payload, status = type(self).body or b'{"error": "overloaded"}', 503
        else:
            import urllib.request

            request = urllib.request.Request(type(self).target + self.path, data=data,
                                             headers={"Content-Type": "application/json"})
            payload, status = urllib.request.urlopen(request).read(), 200
        self.send_response(status)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


def test_the_client_retries_a_busy_server_and_gets_the_same_teacher(served):
    _, url = served
    _Flaky.failures, _Flaky.seen, _Flaky.target = 2, 0, url
    flaky = ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    flaky_url = _start(flaky)
    try:
        sequence = _sequences(1, seed=4)
        got = ServedTeacher(flaky_url, top_k=4, backoff_s=0.01).topk(sequence, ["a"])[0]
        want = ServedTeacher(url, top_k=4).topk(sequence, ["a"])[0]
    finally:
        flaky.shutdown()
    assert _Flaky.seen == 3
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_a_server_that_keeps_failing_raises_naming_url_status_body_and_samples(served):
    _, url = served
    _Flaky.failures, _Flaky.seen, _Flaky.target, _Flaky.body = 100, 0, url, b"engine dead"
    flaky = ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    flaky_url = _start(flaky)
    try:
        with pytest.raises(ServerError) as e:
            ServedTeacher(flaky_url, top_k=4, retries=2, backoff_s=0.01).topk([[5, 6, 7]], ["sample-42"])
    finally:
        flaky.shutdown()
        _Flaky.body = b""
    message = str(e.value)
    assert f"{flaky_url}/v1/completions" in message and "HTTP 503" in message
    assert "engine dead" in message and "sample-42" in message and "3 attempt(s)" in message
    assert _Flaky.seen == 3


def test_a_response_short_of_a_position_is_refused_not_padded(served):
    _, url = served
    client = ServedTeacher(url, top_k=2)
    entries = client._request("/v1/completions", {"prompt": [[1, 2, 3, 4]], "max_tokens": 1,
                                                  "prompt_logprobs": 2})["choices"][0]["prompt_logprobs"]
    with pytest.raises(ServerError, match=r"sample 'x': prompt_logprobs has 3 entries for 4 tokens"):
        top_k_rows(entries[:3], 4, 2, "sample 'x'")
    assert json.dumps(entries)  # what the server answers is plain JSON


def test_distillzoo_serve_serves_a_saved_model_that_the_client_reads(model, tmp_path):
    import re
    import subprocess
    import sys

    model.save_pretrained(tmp_path / "teacher")
    process = subprocess.Popen([sys.executable, "-m", "distillzoo", "serve", str(tmp_path / "teacher"), "--port", "0",
                                "--served-model-name", "t", "--max-logprobs", "4"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = process.stdout.readline()
        url = re.search(r"at (http://[\d.]+:\d+)/v1", line).group(1)
        client = ServedTeacher(url, "t", top_k=4)
        assert client.served_models()[0]["owned_by"] == "distillzoo"
        sequence = [11, 22, 33, 44, 55]
        ids, logprobs, tail = client.topk([sequence], ["a"])[0]
        with torch.no_grad():
            hidden = final_hidden(model, torch.tensor([sequence]), None)
        want = teacher_topk(hidden[0, :-1], lm_head_weight(model), 4)
        assert torch.equal(ids, want[0].long()) and (logprobs - want[1]).abs().max() <= 1e-5
        with pytest.raises(ServerError, match="HTTP 400"):
            ServedTeacher(url, "t", top_k=5).topk([sequence], ["a"])
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_serve_binds_beyond_loopback_only_when_told(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "distillzoo", "serve", str(tmp_path), "--host", "0.0.0.0"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--host 0.0.0.0" in result.stderr and "--allow-remote" in result.stderr


# ------------------------------------------------------------------------------------------ training on a server
def _train_setup(root):
    from helpers import write_jsonl

    teacher = tiny_qwen2(hidden_size=48, num_layers=1, seed=1, tie_word_embeddings=True)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(30)  # a peaked teacher, as a trained one is
    teacher.save_pretrained(root / "teacher")
    records = [{"id": f"s{a}-{b}", "messages": [{"role": "user", "content": f"{a} + {b} = ?"},
                                                {"role": "assistant", "content": f"{a + b}, 答案是 {a + b}"}]}
               for a in range(4) for b in range(3)]
    write_jsonl(root / "train.jsonl", records)
    return teacher


def _config(root, name, **teacher):
    return {"objective": {"name": "fkl"}, "seed": 0, "student": {"tiny": {"hidden_size": 32, "num_layers": 1}},
            "teacher": teacher,
            "data": {"streams": [{"name": "arith", "path": str(root / "train.jsonl"), "format": "chat", "repeat": 2}],
                     "system": None, "max_length": 64},
            "train": {"steps": 4, "batch_size": 4, "lr": 1e-2, "log_every": 1, "progress": False},
            "output_dir": str(root / name), "resume": "never"}


def test_training_on_a_served_teacher_equals_training_on_the_same_top_k_from_a_cache(tmp_path):
    import distillzoo as dz
    from safetensors.torch import load_file

    from distillzoo import train
    from distillzoo.data.shards import ConversationDataset
    from distillzoo.teacher.cache import write_teacher_cache

    teacher = _train_setup(tmp_path)
    tok = load_tokenizer()
    write_teacher_cache(tmp_path / "cache", teacher, ConversationDataset(tmp_path / "train.jsonl", "chat", tok,
                                                                        system=None),
                        k=16, dtype="float32", teacher_name="t", tokenizer_name=tok.name, pad_id=tok.pad_id,
                        progress=False)
    http = TeacherServer(teacher, tok, "t").http()
    url = _start(http)
    try:
        served = train(dz.load_config(_config(tmp_path, "served", server=url, model="t", top_k=16)))
    finally:
        http.shutdown()
    cached = train(dz.load_config(_config(tmp_path, "cached", cache=str(tmp_path / "cache"), top_k=16)))

    def losses(result):
        return [json.loads(line)["loss"] for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]

    assert len(losses(served)) == 4
    assert losses(served) == pytest.approx(losses(cached), rel=1e-5)
    a = load_file(served.output_dir / "final" / "model.safetensors")
    b = load_file(cached.output_dir / "final" / "model.safetensors")
    assert max(float((a[key] - b[key]).abs().max()) for key in a) <= 1e-4


@pytest.mark.parametrize("change, message", [
    ({"objective": {"name": "fkl", "temperature": 2.0}}, r"objective temperature 2.0: a server's prompt_logprobs"),
    ({"teacher": {"server": "http://127.0.0.1:9", "model": "t"}}, r"teacher.top_k: give the log-probs per token"),
    ({"objective": {"name": "dpo"}}, r"teacher.server: algorithm 'preference' does not read"),
])
def test_a_served_teacher_the_run_cannot_use_is_refused_before_training(tmp_path, change, message):
    import distillzoo as dz
    from distillzoo.errors import ConfigError
    from distillzoo.training.spec import resolve

    _train_setup(tmp_path)
    cfg = {**_config(tmp_path, "run", server="http://127.0.0.1:9", model="t", top_k=4), **change}
    with pytest.raises(ConfigError, match=message):
        resolve(dz.load_config(cfg), "cfg.yaml", read_data=False)


def test_training_against_a_server_with_another_model_name_is_refused_naming_both(tmp_path, served):
    import distillzoo as dz
    from distillzoo import train
    from distillzoo.errors import ConfigError

    _train_setup(tmp_path)
    _, url = served
    with pytest.raises(ConfigError, match=r"teacher.server: teacher server .* serves \['tiny-teacher'\], not 'x'"):
        train(dz.load_config(_config(tmp_path, "run", server=url, model="x", top_k=4)))


def test_on_policy_the_server_scores_the_student_s_own_samples(tmp_path):
    import distillzoo as dz
    from distillzoo import train
    from distillzoo.data.shards import ConversationDataset

    teacher = _train_setup(tmp_path)
    tok = load_tokenizer()
    server = TeacherServer(teacher, tok, "t")
    seen: list[list[int]] = []
    score = server.score
    server.score = lambda sequences, k, starts=None: (seen.extend(map(list, sequences)),
                                                     score(sequences, k, starts))[1]
    http = server.http()
    url = _start(http)
    cfg = _config(tmp_path, "on-policy", server=url, model="t", top_k=8)
    cfg["algorithm"] = {"name": "distill", "on_policy": 1.0, "max_new_tokens": 4}
    cfg["train"]["steps"] = 2
    try:
        result = train(dz.load_config(cfg))
    finally:
        http.shutdown()
    data = {tuple(ex["input_ids"].tolist()) for ex in ConversationDataset(tmp_path / "train.jsonl", "chat", tok,
                                                                          system=None)}
    assert len(seen) == 8 and not any(tuple(s) in data for s in seen)  # 2 steps x 4 samples, none the data's reply
    losses = [json.loads(line)["loss"] for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(0 < x < 50 for x in losses)


def test_the_server_generates_what_the_in_process_decoder_generates(model, served):
    from distillzoo.models.generation import Sampling, decode

    _, url = served
    tok = load_tokenizer()
    prompt = tok.encode_prompt([{"role": "user", "content": "2 + 3 = ?"}], system=None)
    client = ServedTeacher(url, top_k=1)
    greedy = client._request("/v1/completions", {"prompt": [prompt], "max_tokens": 5, "temperature": 0})
    assert greedy["choices"][0]["token_ids"] == decode(model, tok, [prompt], Sampling(5, 0.0))[0][0]
    sampled = client._request("/v1/completions", {"prompt": prompt, "max_tokens": 5, "n": 3, "seed": 7})
    want = decode(model, tok, [prompt] * 3, Sampling(5, 1.0, seed=7), ids=["0:0", "0:1", "0:2"])
    assert [c["token_ids"] for c in sampled["choices"]] == [tokens for tokens, _ in want]
    assert len({tuple(c["token_ids"]) for c in sampled["choices"]}) > 1  # n samples, not one copied


def test_cache_teacher_from_a_server_stores_what_it_stores_from_the_model(tmp_path, capsys):
    import numpy as np

    from distillzoo.cli import main

    teacher = _train_setup(tmp_path)
    http = TeacherServer(teacher, load_tokenizer(), "t").http()
    url = _start(http)
    common = [str(tmp_path / "train.jsonl"), "--format", "chat", "--no-system", "--k", "8", "--dtype", "float32",
              "--batch-size", "5", "--shard-size", "7", "--no-progress"]
    try:
        assert main(["cache-teacher", url, *common, "--served-model", "t", "--out", str(tmp_path / "served")]) == 0
        assert "cached the top-8 of t for 12 samples" in capsys.readouterr().out
        assert main(["cache-teacher", url, *common, "--temperature", "2", "--out", str(tmp_path / "hot")]) == 2
        assert f"a cache from the teacher server {url} needs temperature 1, as a server's log-probs are of the raw " \
               "logits (got 2.0)" in capsys.readouterr().err
    finally:
        http.shutdown()
    assert main(["cache-teacher", str(tmp_path / "teacher"), *common, "--out", str(tmp_path / "model")]) == 0
    served, model = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("served", "model"))
    assert {k: v for k, v in served.items() if k != "teacher"} == {k: v for k, v in model.items() if k != "teacher"}
    for shard in ("shard-00000", "shard-00001"):
        a, b = tmp_path / "served" / shard, tmp_path / "model" / shard
        assert (a / "ids.json").read_text() == (b / "ids.json").read_text()
        assert np.array_equal(np.load(a / "index.npy"), np.load(b / "index.npy"))
        assert np.array_equal(np.fromfile(a / "topk_ids.bin", np.int32), np.fromfile(b / "topk_ids.bin", np.int32))
        logprobs = [np.fromfile(d / "logprobs.bin", np.float32) for d in (a, b)]
        # the head is scaled 30x, so logits reach the hundreds, where fp32's spacing is 3e-5: the server's padded
        # batches and the cache's round them differently by up to that much
        assert np.abs(logprobs[0] - logprobs[1]).max() <= float(np.spacing(np.float32(256)))
        # this teacher is peaked (its top 8 hold all but 1e-5 to 2e-3 of the mass), so 1 - sum(exp(top-k)) cancels:
        # the tail's mass is off by at most sum(p_i * |log-prob error|) <= 1e-5, its log by up to a few percent
        tails = [np.exp(np.fromfile(d / "tail.bin", np.float32).astype(np.float64)) for d in (a, b)]
        assert np.abs(tails[0] - tails[1]).max() <= 1e-5 and tails[1].max() < 1e-2
    assert not (tmp_path / "hot").exists() or not any((tmp_path / "hot").glob("shard-*"))


def test_generate_with_a_served_teacher_writes_the_server_s_answers_seeded_per_sample(tmp_path, model, served):
    import distillzoo as dz
    from distillzoo.models.generation import Sampling, decode, sample_seed
    from distillzoo.teacher.generate import generate_from_config, read_prompts

    _train_setup(tmp_path)  # its records' prompts
    tok = load_tokenizer()
    _, url = served
    cfg = {"seed": 3, "teacher": {"server": url, "model": "tiny-teacher"}, "data": {"system": None},
           "generate": {"prompts": str(tmp_path / "train.jsonl"), "format": "chat", "out": str(tmp_path / "out.jsonl"),
                        "max_new_tokens": 6, "temperature": 1.0, "batch_size": 5, "progress": False}}
    report = generate_from_config(dz.load_config(cfg))
    again = generate_from_config(dz.load_config(cfg))  # a rerun has nothing left to ask
    assert report["written"] == 12 and again["already_done"] == 12 and again["written"] == 0
    written = {json.loads(line)["id"]: json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()}
    # the server decodes each request alone, seeded by the request's seed: here the sample's, from the run's seed
    for sample_id, messages in read_prompts(tmp_path / "train.jsonl", "chat"):
        (tokens, reason), = decode(model, tok, [tok.encode_prompt(messages, None)],
                                   Sampling(6, 1.0, seed=sample_seed(3, sample_id)), ids=["0:0"])
        assert written[sample_id]["messages"][-1]["content"] == tok.decode(tokens)
        assert written[sample_id]["finish_reason"] == reason


@pytest.mark.parametrize("source", ["server", "model"])
def test_with_sampler_teacher_the_replies_trained_on_are_the_teacher_s_generation(tmp_path, model, served, source):
    import distillzoo as dz
    from distillzoo import train
    from distillzoo.data.shards import ConversationDataset
    from distillzoo.models.generation import Sampling, decode, sample_seed, split_last_reply, step_sampling
    from distillzoo.plugins.algorithms.distill import Distill

    _train_setup(tmp_path)
    model.save_pretrained(tmp_path / "random-teacher")  # a teacher whose samples are not blank
    teacher = {"server": served[1], "model": "tiny-teacher", "top_k": 8} if source == "server" else \
        {"path": str(tmp_path / "random-teacher")}
    cfg = _config(tmp_path, f"seqkd-{source}", **teacher)
    cfg["algorithm"] = {"name": "distill", "on_policy": 1.0, "sampler": "teacher", "max_new_tokens": 3}
    cfg["train"]["steps"] = 2
    trained: list[list[int]] = []
    micro_batches = Distill.micro_batches

    def recording(self, run, examples, step, size):
        batches = micro_batches(self, run, examples, step, size)
        trained.extend(row[:int(n)].tolist() for b in batches
                       for row, n in zip(b.inputs["input_ids"], b.inputs["attention_mask"].sum(-1)))
        return batches

    Distill.micro_batches = recording
    try:
        train(dz.load_config(cfg))
    finally:
        Distill.micro_batches = micro_batches
    tok = load_tokenizer()
    data = {tuple(ex["input_ids"].tolist()): ex for ex in ConversationDataset(tmp_path / "train.jsonl", "chat", tok,
                                                                              system=None)}
    assert len(trained) == 8
    for step in range(2):
        sampling = step_sampling(3, 1.0, 0, step)
        for sequence in trained[4 * step:4 * step + 4]:
            # the example it came from: the one whose prompt it starts with
            ex = next(e for e in data.values() if sequence[:len(split_last_reply(e)[0])] == split_last_reply(e)[0])
            prompt = split_last_reply(ex)[0]
            if source == "server":  # the server decodes each request alone, seeded by the request's seed
                (answer, finish), = decode(model, tok, [prompt], Sampling(3, 1.0, seed=sample_seed(sampling.seed,
                                                                                                   ex["id"])),
                                           ids=["0:0"])
            else:
                (answer, finish), = decode(model, tok, [prompt], sampling, ids=[ex["id"]])
            assert sequence == prompt + answer + ([tok.im_end_id] if finish == "stop" else [])


def test_sampler_teacher_needs_a_teacher_that_can_generate(tmp_path):
    import distillzoo as dz
    from distillzoo.errors import ConfigError
    from distillzoo.training.spec import resolve

    _train_setup(tmp_path)
    cfg = _config(tmp_path, "run", cache=str(tmp_path / "cache"), top_k=4)
    cfg["algorithm"] = {"name": "distill", "on_policy": 0.5, "sampler": "teacher"}
    with pytest.raises(ConfigError, match=r"algorithm.sampler: 'teacher' samples from one teacher that can generate"):
        resolve(dz.load_config(cfg), "cfg.yaml", read_data=False)
