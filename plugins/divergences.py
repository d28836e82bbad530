"""Built-in divergences between teacher (p) and student (q) next-token distributions.

All take ``log p`` and ``log q`` over the shared vocab, ``[n, V]`` fp32, and return
``[n]``; the base class applies temperature, masking, vocab truncation and reduction.
Terms with zero mass on the weighting side contribute 0 (``0 * log 0 = 0``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from distillzoo.hookspecs import hookimpl
from distillzoo.base import LogitObjective


def kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a || b) = sum_v a_v (log a_v - log b_v) per row, with 0 where a_v = 0."""
    a = log_a.exp()
    return torch.where(a > 0, a * (log_a - log_b), 0.0).sum(-1)


class ForwardKL(LogitObjective):
    """Forward KL, KL(p || q) = sum_v p_v (log p_v - log q_v): mean-seeking.

    The true KL (teacher entropy included), so a student equal to the teacher
    scores exactly 0.
    """

    name = "fkl"

    def token_loss(self, student_logprobs: Tensor, teacher_logprobs: Tensor, labels: Tensor) -> Tensor:
        return kl(teacher_logprobs, student_logprobs)


class ReverseKL(LogitObjective):
    """Reverse KL, KL(q || p) = sum_v q_v (log q_v - log p_v): mode-seeking (MiniLLM)."""

    name = "rkl"

    def token_loss(self, student_logprobs: Tensor, teacher_logprobs: Tensor, labels: Tensor) -> Tensor:
        return kl(student_logprobs, teacher_logprobs)


@hookimpl
def register_objectives(register):
    register(ForwardKL)
    register(ReverseKL)
