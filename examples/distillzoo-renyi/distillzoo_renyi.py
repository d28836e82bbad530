"""Renyi divergence of order alpha between teacher p and student q, as a distillzoo plugin
(an objective, and a data-selection scorer built on it).

D_alpha(p || q) = 1 / (alpha - 1) * log sum_v p_v^alpha q_v^(1 - alpha),  0 < alpha < 1.

It tends to KL(p || q) as alpha -> 1; alpha = 1/2 is -2 log(1 - H^2) with H the
Hellinger distance. Everything else (temperature, masking, reductions, vocab
mismatch, the fused from_hidden path) comes from distillzoo's base class.
"""

import torch

import distillzoo as dz


class Renyi(dz.LogitObjective):
    name = "renyi"

    def __init__(self, *, alpha: float = 0.5, **common):
        super().__init__(**common)
        self.alpha = alpha

    def token_loss(self, student_logprobs, teacher_logprobs, labels):
        a = self.alpha
        return torch.logsumexp(a * teacher_logprobs + (1 - a) * student_logprobs, dim=-1) / (a - 1)


CATALOGUE_ENTRY = {
    "kind": "logit",
    "summary": "Renyi divergence of order alpha between teacher and student",
    "formula": "tau^2 / (alpha - 1) * log sum_v p_v^alpha q_v^(1 - alpha)",
    "params": {
        "alpha": {"type": "float", "default": 0.5, "range": "(0, 1)", "doc": "order of the divergence"},
    },
    "inputs": ["student_logits", "teacher_logits", "labels"],
    "paper": {
        "title": "On measures of entropy and information",
        "authors": "Renyi",
        "year": 1961,
    },
}


@dz.hookimpl
def register_objectives(register):
    register(Renyi, entry=CATALOGUE_ENTRY)


class RenyiGap(dz.Scorer):
    """A data-selection scorer: each sample's mean Renyi divergence (teacher || student) over its response."""

    name = "renyi_gap"
    needs = ("teacher", "student")

    def __init__(self, alpha: float = 0.5):
        self.divergence = Renyi(alpha=alpha, reduction="none")

    def score(self, batch):
        hs, ws = batch.head("student")
        ht, wt = batch.head("teacher")
        with torch.no_grad():
            return batch.per_sample_mean(self.divergence.from_hidden(hs, ws, ht, wt, batch.targets))


@dz.hookimpl
def register_scorers(register):
    register("renyi_gap", RenyiGap, summary="mean Renyi divergence of order alpha per response token")
