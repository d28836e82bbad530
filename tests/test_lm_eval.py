"""The lm-evaluation-harness bridge (distillzoo.teacher.lm_eval) against plain-torch references.

A tiny random Qwen2 student (the real 151,936 vocab) is saved with save_pretrained; local
JSONL tasks are written to tmp_path. Every expected number is computed here from the
model's own logits (log_softmax, argmax loops without a KV cache), not through the bridge.
"""

import json
import re
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("lm_eval")

from distillzoo.errors import ConfigError, DataError  # noqa: E402
from distillzoo.models.causal_lm import load_causal_lm, tiny_qwen2  # noqa: E402
from distillzoo.teacher.lm_eval import check_student_dir, run_lm_eval  # noqa: E402

MC_QUESTIONS = [
    ("What is 2 + 2?", ["4", "5", "22"]),
    ("What is the capital of France?", ["Paris", "Rome", "Berlin", "Madrid"]),
    ("Which animal barks?", ["a dog", "a cat"]),
    ("What colour is the sky on a clear day?", ["blue", "green", "bright red"]),
    ("How many legs has a spider?", ["eight", "six", "four"]),
    ("What is frozen water called?", ["ice", "steam"]),
    ("Which planet do we live on?", ["Earth", "Mars", "Jupiter", "the Moon"]),
    ("What is H2O?", ["water", "salt", "sugar"]),
]
#: which questions get the model's own favourite choice as their label: 4 of 8 overall, 3 of the first 4
RIGHT = {0, 1, 2, 5}
#: prompts that end differently, so that even a random model answers each its own way
GEN_PROMPTS = ["One plus one is", "Name a colour:", "Say hello to the", "The opposite of up is"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Offline as lm-eval is to be run, and any socket connection fails the test: nothing may reach a hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError(f"a network connection was attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    directory = tmp_path_factory.mktemp("student") / "final"
    tiny_qwen2(hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1, seed=3).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def model(student):
    return load_causal_lm(str(student))


@pytest.fixture(scope="module")
def lm_class():
    from distillzoo.teacher.lm_eval import DistillzooLM

    return DistillzooLM


# ---------------------------------------------------------------------------- plain-torch references
@torch.no_grad()
def naive_logprob(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """Summed log p(continuation | context) and whether each token is the argmax, from one unpadded forward."""
    ids = torch.tensor([context + continuation])
    log_probs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    rows = log_probs[len(context) - 1:len(context) - 1 + len(continuation)]
    target = torch.tensor(continuation)
    return float(rows.gather(-1, target[:, None]).sum()), bool((rows.argmax(-1) == target).all())


def naive_split(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's convention: trailing context spaces join the continuation; the continuation is what the whole
    string's tokens add past the context's; an empty context is <|endoftext|>."""
    if context == "":
        return [tok.pad_id], tok.encode(continuation)
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    whole, ctx = tok.encode(stripped + continuation), tok.encode(stripped)
    return ctx, whole[len(ctx):]


@torch.no_grad()
def naive_greedy(model, tok, prompt: str, max_new: int, stop: str | None) -> str:
    """Greedy text after ``prompt``: a full forward per token, stopping at a special token, ``stop`` or max_new."""
    ids, new = tok.encode(prompt), []
    for _ in range(max_new):
        token = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
        if token in (tok.pad_id, tok.im_end_id):
            break
        new.append(token)
        if stop and stop in tok.decode(new):
            break
    text = tok.decode(new)
    return text.split(stop)[0] if stop else text


def mc_context(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def write_task(directory, name: str, rows: list[dict], body: str, cache) -> None:
    """A local lm-eval task: ``name``.jsonl and ``name``.yaml (json dataset, its test split) under ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    head = f"""\
        task: {name}
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}
          cache_dir: {cache}
        test_split: test
        """
    (directory / f"{name}.yaml").write_text(textwrap.dedent(head) + textwrap.dedent(body), encoding="utf-8")


MC_BODY = """\
    output_type: multiple_choice
    doc_to_text: "Question: {{question}}\\nAnswer:"
    doc_to_choice: choices
    doc_to_target: label
    metric_list:
      - metric: acc
        aggregation: mean
        higher_is_better: true
    metadata:
      version: 1.0
    """
GEN_BODY = """\
    output_type: generate_until
    doc_to_text: prompt
    doc_to_target: answer
    generation_kwargs:
      until: ["\\n"]
      max_gen_toks: 4
      do_sample: false
    metric_list:
      - metric: exact_match
        aggregation: mean
        higher_is_better: true
    metadata:
      version: 1.0
    """


def instances(kind: str, arguments: list[tuple]):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=0) for a in arguments]


# ---------------------------------------------------------------------------- 1. multiple choice
def test_multiple_choice_acc_equals_naive_argmax(student, model, tok, tmp_path, monkeypatch):
    preds = []
    for question, choices in MC_QUESTIONS:
        scores = [naive_logprob(model, *naive_split(tok, mc_context(question), " " + c))[0] for c in choices]
        preds.append(max(range(len(choices)), key=scores.__getitem__))
    rows = [{"question": q, "choices": c, "label": p if i in RIGHT else (p + 1) % len(c)}
            for i, ((q, c), p) in enumerate(zip(MC_QUESTIONS, preds))]
    naive_acc = sum(r["label"] == p for r, p in zip(rows, preds)) / len(rows)
    write_task(tmp_path / "tasks", "tiny_mc", rows, MC_BODY, tmp_path / "hf-cache")
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)

    out = run_lm_eval(student, ["tiny_mc"], tasks_dir=tmp_path / "tasks", batch_size=5)
    assert out["results"]["tiny_mc"]["acc"] == pytest.approx(naive_acc) == 0.5
    assert "acc_stderr" in out["results"]["tiny_mc"]
    assert out["n-samples"]["tiny_mc"]["effective"] == len(rows)
    assert out["config"]["student"] == str(student) and out["config"]["lm_eval_version"]
    json.dumps(out, allow_nan=False)  # plain JSON: no numpy values, no NaN
    assert list(workdir.iterdir()) == []  # lm-eval wrote nothing where it ran

    limited = run_lm_eval(student, ["tiny_*"], tasks_dir=tmp_path / "tasks", limit=4)  # a glob, the first 4 docs
    assert limited["results"]["tiny_mc"]["acc"] == pytest.approx(0.75)
    assert limited["n-samples"]["tiny_mc"]["effective"] == 4


def test_loglikelihood_equals_naive_log_softmax(model, tok, lm_class):
    lm = lm_class(model, tok, batch_size=3)
    requests = [(mc_context("What is 2 + 2?"), " 4"), (mc_context("What is 2 + 2?"), " 22"),
                ("The capital of France is", " Paris, of course."), ("", "Hello world"), ("Answer: ", "Paris"),
                (mc_context("What is 2 + 2?"), " 4"), ("A much longer context, to pad the others in its batch:", " x")]
    got = lm.loglikelihood(instances("loglikelihood", requests))
    for (context, continuation), (logp, greedy) in zip(requests, got):
        want_logp, want_greedy = naive_logprob(model, *naive_split(tok, context, continuation))
        assert logp == pytest.approx(want_logp, abs=1e-4), (context, continuation)
        assert greedy == want_greedy

    context = tok.encode("Once upon a time")
    chain = []
    for _ in range(3):  # the greedy continuation, token by token
        chain.append(int(model(input_ids=torch.tensor([context + chain])).logits[0, -1].argmax()))
    other = chain[:2] + [(chain[2] + 1) % 1000]
    (lp_greedy, is_greedy), (lp_other, not_greedy) = lm.loglikelihood_tokens([(context, chain), (context, other)])
    assert is_greedy and not not_greedy
    assert lp_greedy == pytest.approx(naive_logprob(model, context, chain)[0], abs=1e-4)
    assert lp_other == pytest.approx(naive_logprob(model, context, other)[0], abs=1e-4)


def test_loglikelihood_rolling_equals_lm_eval_windows(model, tok, lm_class):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    text = "The quick brown fox jumps over the lazy dog, and then it runs away into the forest."
    tokens = tok.encode(text)
    whole = naive_logprob(model, [tok.pad_id], tokens)[0]
    assert lm_class(model, tok).loglikelihood_rolling(instances("loglikelihood_rolling", [(text,)]))[0] == \
        pytest.approx(whole, abs=1e-4)

    windows = map(make_disjoint_window, get_rolling_token_windows(token_list=tokens, prefix_token=tok.pad_id,
                                                                  max_seq_len=6, context_len=1))
    want = sum(naive_logprob(model, list(ctx), list(cont))[0] for ctx, cont in windows)
    short = lm_class(model, tok, batch_size=2, max_length=6)
    assert short.loglikelihood_rolling(instances("loglikelihood_rolling", [(text,), ("",)])) == \
        pytest.approx([want, 0.0], abs=1e-4)


# ---------------------------------------------------------------------------- 2. generation
def test_generate_until_exact_match_equals_naive_greedy(student, model, tok, tmp_path, lm_class):
    answers = [naive_greedy(model, tok, p, 4, "\n") for p in GEN_PROMPTS]
    rows = [{"prompt": p, "answer": a if i % 2 == 0 else a + "#"} for i, (p, a) in enumerate(zip(GEN_PROMPTS, answers))]
    write_task(tmp_path / "tasks", "tiny_gen", rows, GEN_BODY, tmp_path / "hf-cache")
    out = run_lm_eval(student, ["tiny_gen"], tasks_dir=tmp_path / "tasks", batch_size=3)
    assert out["results"]["tiny_gen"]["exact_match"] == pytest.approx(0.5)

    lm = lm_class(model, tok, batch_size=3)
    assert lm.generate_until(instances("generate_until", [(p, {"until": ["\n"], "max_gen_toks": 4})
                                                          for p in GEN_PROMPTS])) == answers
    long = naive_greedy(model, tok, GEN_PROMPTS[1], 6, None)
    stop = next(piece for piece in (tok.decode([t]) for t in tok.encode(long)[2:]) if piece.strip() and piece.isascii())
    got = lm.generate_until(instances("generate_until", [(GEN_PROMPTS[1], {"until": [stop], "max_gen_toks": 6}),
                                                         (GEN_PROMPTS[1], {"max_gen_toks": 6})]))
    assert got == [long.split(stop)[0], long]
    with pytest.raises(ConfigError, match="greedily"):
        lm.generate_until(instances("generate_until", [("Q:", {"do_sample": True, "temperature": 1.0})]))


# ---------------------------------------------------------------------------- 3. bad input
def test_not_a_model_directory_is_a_data_error_naming_it(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=re.escape(str(empty)) + ".*no config.json and no weights.*nothing"):
        run_lm_eval(empty, ["tiny_mc"])
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("not a model\n")
    with pytest.raises(DataError, match=re.escape(str(notes)) + ".*no config.json.*notes.txt"):
        run_lm_eval(notes, ["tiny_mc"])
    (notes / "config.json").write_text("{}")
    with pytest.raises(DataError, match=re.escape(str(notes)) + ".*no weights"):
        check_student_dir(notes)
    with pytest.raises(DataError, match="does not exist"):
        run_lm_eval(tmp_path / "missing", ["tiny_mc"])
    with pytest.raises(DataError, match="is a file"):
        run_lm_eval(notes / "notes.txt", ["tiny_mc"])
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "run.json").write_text("{}")
    with pytest.raises(DataError, match="did you mean .*final"):
        check_student_dir(run)


def test_unknown_task_names_it_and_the_tasks_dir(student, tmp_path, no_models):
    tasks = tmp_path / "tasks"
    write_task(tasks, "tiny_mc", [{"question": "q", "choices": ["a", "b"], "label": 0}], MC_BODY, tmp_path / "c")
    (tasks / "broken.yaml").write_text("task: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        run_lm_eval(student, ["tiny_mcq"], tasks_dir=tasks)
    message = str(info.value)
    assert "'tiny_mcq'" in message and str(tasks) in message and "built-in" in message
    assert "Did you mean 'tiny_mc'" in message and "broken.yaml" in message
    with pytest.raises(ConfigError, match="not a directory"):
        run_lm_eval(student, ["tiny_mc"], tasks_dir=tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="no lm-eval task"):
        run_lm_eval(student, [], tasks_dir=tasks)


def test_importing_distillzoo_does_not_import_lm_eval():
    code = "import sys, distillzoo, distillzoo.teacher.lm_eval; assert 'lm_eval' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
