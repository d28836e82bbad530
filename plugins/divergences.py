"""Built-in divergences between teacher (p) and student (q) next-token distributions.

All take ``log p`` and ``log q`` over the shared vocab, ``[n, V]`` fp32, and return
``[n]``; the base class applies temperature, masking, vocab truncation and reduction.
Terms with zero mass on the weighting side contribute 0 (``0 * log 0 = 0``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from distillzoo.hookspecs import hookimpl
from distillzoo.base import LogitObjective


def kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a || b) = sum_v a_v (log a_v - log b_v) per row, with 0 where a_v = 0."""
    a = log_a.exp()
    return torch.where(a > 0, a * (log_a - log_b), 0.0).sum(-1)


def log_mixture(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """log(w a + (1 - w) b) elementwise, from log a and log b, for 0 <= w < 1."""
    log_w = math.log(weight_a) if weight_a > 0 else -math.inf
    return torch.logaddexp(log_a + log_w, log_b + math.log1p(-weight_a))


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


class JensenShannon(LogitObjective):
    """Generalised JSD (GKD): beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q.

    beta is strictly inside (0, 1): jsd / beta tends to fkl as beta -> 0 and
    jsd / (1 - beta) to rkl as beta -> 1, with no special-cased endpoints.
    """

    name = "jsd"

    def __init__(self, *, beta: float = 0.5, **common) -> None:
        super().__init__(**common)
        self.beta = float(beta)

    def token_loss(self, student_logprobs: Tensor, teacher_logprobs: Tensor, labels: Tensor) -> Tensor:
        beta = self.beta
        log_m = log_mixture(teacher_logprobs, student_logprobs, beta)
        return beta * kl(teacher_logprobs, log_m) + (1 - beta) * kl(student_logprobs, log_m)


class _Skewed(LogitObjective):
    """A DistiLLM skew divergence: its mixture weight alpha in [0, 1)."""

    def __init__(self, *, alpha: float = 0.1, **common) -> None:
        super().__init__(**common)
        self.alpha = float(alpha)


class SkewKL(_Skewed):
    """DistiLLM skew KL: KL(p || alpha p + (1 - alpha) q); alpha = 0 is forward KL."""

    name = "skl"

    def token_loss(self, student_logprobs: Tensor, teacher_logprobs: Tensor, labels: Tensor) -> Tensor:
        return kl(teacher_logprobs, log_mixture(teacher_logprobs, student_logprobs, self.alpha))


class SkewReverseKL(_Skewed):
    """DistiLLM skew reverse KL: KL(q || (1 - alpha) p + alpha q); alpha = 0 is reverse KL."""

    name = "srkl"

    def token_loss(self, student_logprobs: Tensor, teacher_logprobs: Tensor, labels: Tensor) -> Tensor:
        return kl(student_logprobs, log_mixture(student_logprobs, teacher_logprobs, self.alpha))


class TotalVariation(LogitObjective):
    """Total variation distance, 1/2 sum_v |p_v - q_v|."""

    name = "tvd"

    def token_loss(self, student_logprobs: Tensor, teacher_logprobs: Tensor, labels: Tensor) -> Tensor:
        return 0.5 * (teacher_logprobs.exp() - student_logprobs.exp()).abs().sum(-1)


@hookimpl
def register_objectives(register):
    register(ForwardKL)
    register(ReverseKL)
    register(JensenShannon)
    register(SkewKL)
    register(SkewReverseKL)
    register(TotalVariation)
