"""Built-in scorers: ``mfd`` (the teacher–student fitting gap) and ``judge`` (an offline LLM-judge interface)."""

from __future__ import annotations

import importlib
from typing import Callable

import torch

from distillzoo.hooks.hookspecs import hookimpl
from distillzoo.errors import ParameterError
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
            ht, wt = batch.teacher.sparse_teacher(batch.input_ids, batch.attention_mask, batch.targets, batch.ids), None
        with torch.no_grad():
            kl = objective("fkl", reduction="none").from_hidden(hs, ws, ht, wt, batch.targets)
        return batch.per_sample_mean(kl)


class Judge(Scorer):
    """An LLM judge (or any rater) as a scorer: ``judge(prompt_messages, response) -> float`` per sample.

    ``judge`` is a callable, or its import path ``"package.module:function"`` (what a
    YAML config can name). Nothing here calls a network: the judge decides that.
    """

    name = "judge"
    needs = ()

    def __init__(self, judge: "str | Callable" = None) -> None:
        if isinstance(judge, str):
            module, _, attr = judge.partition(":")
            try:
                judge = getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError, ValueError) as e:
                raise ParameterError(f"judge: cannot import {module}:{attr} ({e})") from None
        if not callable(judge):
            raise ParameterError("judge: give judge, a callable (prompt_messages, response) -> float, or its "
                                 "'module:function' import path")
        self.judge = judge

    def score(self, batch):
        return [float(self.judge(messages[:-1], messages[-1]["content"])) for messages in batch.messages]


@hookimpl
def register_scorers(register):
    register("mfd", MFD, summary="teacher-student fitting gap per token: student NLL - teacher NLL, or the KL")
    register("judge", Judge, summary="an offline judge: any callable (prompt, response) -> score")
