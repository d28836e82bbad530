"""Built-in scorers: ``mfd`` (the teacher–student fitting gap) and ``judge`` (an offline LLM-judge interface)."""

from __future__ import annotations

import importlib
import re
from typing import Callable

import torch

from distillzoo.hooks.hookspecs import hookimpl
from distillzoo.errors import DataError, ParameterError
from distillzoo.teacher.scoring import Scorer, per_sample_nll


class MFD(Scorer):
    """The teacher–student fitting gap of each sample, per response token (higher: more left to distil).

    ``metric="nll_gap"``: mean over the reference response's tokens of the student's
    NLL minus the teacher's, ``log p(y_t) - log q(y_t)``. ``metric="kl"``: mean over
    the same positions of KL(p || q) over the whole vocab. DistilQwen2 scores the
    gap with an LLM judge; this is the offline, model-based version.
    """

    name = "mfd"
    needs = ("teacher", "student")
    METRICS = ("nll_gap", "kl")

    def __init__(self, metric: str = "nll_gap") -> None:
        if metric not in self.METRICS:
            raise ParameterError(f"mfd: metric {metric!r} is not one of {list(self.METRICS)}")
        self.metric = metric

    def score(self, batch):
        if self.metric == "nll_gap":
            return batch.per_sample_mean(per_sample_nll(batch, "student") - per_sample_nll(batch, "teacher"))
        from distillzoo.objectives.registry import objective

        hs, ws = batch.head("student")
        if isinstance(batch.teacher, torch.nn.Module):
            ht, wt = batch.head("teacher")
        else:  # a served teacher: its top-k (teacher.top_k) and tail, as distill trains on them
            if batch.teacher.top_k < 2:
                raise ParameterError("mfd: metric 'kl' with a served teacher reads its top-k: give teacher.top_k (the "
                                     f"log-probs per token to ask for, 2 or more; got {batch.teacher.top_k})")
            ht, wt = batch.teacher.sparse_teacher(batch.input_ids, batch.attention_mask, batch.targets, batch.ids), None
        with torch.no_grad():
            kl = objective("fkl", reduction="none").from_hidden(hs, ws, ht, wt, batch.targets)
        return batch.per_sample_mean(kl)


#: what ``judge: teacher`` asks the teacher, with the sample's instruction and response filled in
JUDGE_TEMPLATE = ("Rate how correct, complete and helpful the response is to the instruction, on a scale from 1 "
                  "(useless) to 10 (excellent). Reply with the number only.\n\nInstruction:\n{instruction}\n\n"
                  "Response:\n{response}")


class Judge(Scorer):
    """An LLM judge (or any rater) as a scorer.

    ``judge``: a callable ``(prompt_messages, response) -> float``, or its import path
    ``"package.module:function"`` (what a YAML config can name), which decides for itself what it
    calls; or ``"teacher"``: the run's teacher, a model or a server (``teacher.server``), answers
    ``template`` (``{instruction}``, ``{response}``) greedily in at most ``max_new_tokens`` tokens,
    and the first number of its answer is the score (an answer with none is refused, naming the
    sample and the answer).
    """

    name = "judge"
    needs = ()

    def __init__(self, judge: "str | Callable" = None, template: str = JUDGE_TEMPLATE, max_new_tokens: int = 8) -> None:
        self.template, self.max_new_tokens = template, int(max_new_tokens)
        if judge == "teacher":
            try:
                filled = template.format(instruction="\0i", response="\0r")
            except (KeyError, IndexError, ValueError) as e:
                raise ParameterError(f"judge: template: {type(e).__name__}: {e}; it may name {{instruction}} and "
                                     "{response} only (write a literal brace as {{ or }})") from None
            if "\0i" not in filled or "\0r" not in filled:
                raise ParameterError("judge: template must hold {instruction} and {response}")
            self.needs, self.judge = ("teacher",), None
            return
        if isinstance(judge, str):
            module, _, attr = judge.partition(":")
            try:
                judge = getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError, ValueError) as e:
                raise ParameterError(f"judge: cannot import {module}:{attr} ({e})") from None
        if not callable(judge):
            raise ParameterError("judge: give judge, a callable (prompt_messages, response) -> float, its "
                                 "'module:function' import path, or 'teacher'")
        self.judge = judge

    def score(self, batch):
        if self.judge is not None:
            return [float(self.judge(messages[:-1], messages[-1]["content"])) for messages in batch.messages]
        from distillzoo.models.generation import Sampling, decode

        tok = batch.tokenizer
        asks = [self.template.format(instruction="\n\n".join(m["content"] for m in messages[:-1] if m["role"] == "user"),
                                     response=messages[-1]["content"]) for messages in batch.messages]
        prompts = [tok.encode_prompt([{"role": "user", "content": ask}], None) for ask in asks]
        sampling = Sampling(self.max_new_tokens, 0.0)
        if isinstance(batch.teacher, torch.nn.Module):
            answers = decode(batch.teacher, tok, prompts, sampling, ids=batch.ids)
        else:  # a served teacher
            answers = batch.teacher.generate(prompts, sampling, batch.ids, [tok.im_end_id])
        return [_rating(tok.decode(tokens), sample_id) for (tokens, _), sample_id in zip(answers, batch.ids)]


def _rating(answer: str, sample_id: str) -> float:
    found = re.search(r"-?\d+(?:\.\d+)?", answer)
    if found is None:
        raise DataError(f"judge: sample {sample_id!r}: the teacher's answer {answer[:200]!r} holds no number; give a "
                        "template the judge model follows, or a judge that can rate")
    return float(found.group())


@hookimpl
def register_scorers(register):
    register("mfd", MFD, summary="teacher-student fitting gap per token: student NLL - teacher NLL, or the KL")
    register("judge", Judge, summary="an offline judge: any callable (prompt, response) -> score")
