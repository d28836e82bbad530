"""Built-in divergences between teacher (p) and student (q) next-token distributions.

The divergences are :class:`~distillzoo.objectives.logit.PointwiseDivergence` subclasses: each
states its elementwise term ``f(log p_v, log q_v)`` and ``df/d(log q_v)``; the base
class sums over the vocab in chunks, applies temperature, masking, vocab
truncation and reduction, and handles sparse (top-k) teachers. Terms with zero
mass on the weighting side are 0 (``0 * log 0 = 0``), never NaN.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from distillzoo.objectives.logit import LogitObjective, PointwiseDivergence
from distillzoo.hooks.hookspecs import hookimpl
from distillzoo.kernels import columns


def kl_terms(log_a: Tensor, log_b: Tensor) -> Tensor:
    """Elementwise a (log a - log b), 0 where a = 0."""
    a = log_a.exp()
    return torch.where(a > 0, a * (log_a - log_b), 0.0)


def kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a || b) = sum_v a_v (log a_v - log b_v) per row, with 0 where a_v = 0."""
    return kl_terms(log_a, log_b).sum(-1)


def log_mixture(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """log(w a + (1 - w) b) elementwise, from log a and log b, for 0 <= w < 1."""
    log_w = math.log(weight_a) if weight_a > 0 else -math.inf
    return torch.logaddexp(log_a + log_w, log_b + math.log1p(-weight_a))


class ForwardKL(PointwiseDivergence):
    """Forward KL, KL(p || q) = sum_v p_v (log p_v - log q_v): mean-seeking.

    The true KL (teacher entropy included), so a student equal to the teacher
    scores exactly 0.
    """

    name = "fkl"
    triton_kind = "fkl"

    def pointwise(self, log_p: Tensor, log_q: Tensor) -> tuple[Tensor, Tensor]:
        p = log_p.exp()
        return torch.where(p > 0, p * (log_p - log_q), 0.0), -p

    columns_buffers = 2  # the student's logits and the teacher's (the rest are block temporaries)

    def columns_terms(self, student: Tensor, teacher: Tensor, want_grad: bool):
        return columns.forward_kl(student, teacher, self.temperature, want_grad)


class ReverseKL(PointwiseDivergence):
    """Reverse KL, KL(q || p) = sum_v q_v (log q_v - log p_v): mode-seeking (MiniLLM).

    Infinite where the teacher has no mass (log p = -inf) but the student has some.
    """

    name = "rkl"
    triton_kind = "rkl"

    def pointwise(self, log_p: Tensor, log_q: Tensor) -> tuple[Tensor, Tensor]:
        q = log_q.exp()
        ratio = torch.where(q > 0, log_q - log_p, 0.0)
        return q * ratio, q * (ratio + 1)


class JensenShannon(PointwiseDivergence):
    """Generalised JSD (GKD): beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q.

    beta is strictly inside (0, 1): jsd / beta tends to fkl as beta -> 0 and
    jsd / (1 - beta) to rkl as beta -> 1, with no special-cased endpoints.
    d/dlog q = (1 - beta) q (log q - log m): the terms through m cancel.
    """

    name = "jsd"
    triton_kind = "jsd"
    triton_weight = "beta"

    def __init__(self, *, beta: float = 0.5, **common) -> None:
        super().__init__(**common)
        self.beta = float(beta)

    def pointwise(self, log_p: Tensor, log_q: Tensor) -> tuple[Tensor, Tensor]:
        beta = self.beta
        log_m = log_mixture(log_p, log_q, beta)
        student_side = kl_terms(log_q, log_m)
        return beta * kl_terms(log_p, log_m) + (1 - beta) * student_side, (1 - beta) * student_side


class _Skewed(PointwiseDivergence):
    """A DistiLLM skew divergence: its mixture weight alpha in [0, 1)."""

    triton_weight = "alpha"

    def __init__(self, *, alpha: float = 0.1, **common) -> None:
        super().__init__(**common)
        self.alpha = float(alpha)


class SkewKL(_Skewed):
    """DistiLLM skew KL: KL(p || alpha p + (1 - alpha) q); alpha = 0 is forward KL."""

    name = "skl"
    triton_kind = "skl"

    def pointwise(self, log_p: Tensor, log_q: Tensor) -> tuple[Tensor, Tensor]:
        alpha = self.alpha
        log_m = log_mixture(log_p, log_q, alpha)
        p = log_p.exp()
        value = torch.where(p > 0, p * (log_p - log_m), 0.0)
        # d/dlog q of -p log m = -p (1 - alpha) q / m
        return value, torch.where(p > 0, -(1 - alpha) * p * (log_q - log_m).exp(), 0.0)


class SkewReverseKL(_Skewed):
    """DistiLLM skew reverse KL: KL(q || (1 - alpha) p + alpha q); alpha = 0 is reverse KL."""

    name = "srkl"
    triton_kind = "srkl"

    def pointwise(self, log_p: Tensor, log_q: Tensor) -> tuple[Tensor, Tensor]:
        alpha = self.alpha
        log_m = log_mixture(log_q, log_p, alpha)
        q = log_q.exp()
        ratio = torch.where(q > 0, log_q - log_m, 0.0)
        # d/dlog q of q (log q - log m) = q (log q - log m) + q - q * alpha q / m
        return q * ratio, q * (ratio + 1 - alpha * ratio.exp())


class TotalVariation(PointwiseDivergence):
    """Total variation distance, 1/2 sum_v |p_v - q_v| (subgradient 0 where p = q)."""

    name = "tvd"
    triton_kind = "tvd"

    def pointwise(self, log_p: Tensor, log_q: Tensor) -> tuple[Tensor, Tensor]:
        p, q = log_p.exp(), log_q.exp()
        diff = q - p
        return 0.5 * diff.abs(), 0.5 * torch.sign(diff) * q


class AlphaBeta(PointwiseDivergence):
    """ABKD's alpha-beta divergence (Wang et al. 2025; Cichocki et al.'s AB-divergence):
    ``-1/(alpha beta) sum_v [p^alpha q^beta - alpha/(alpha+beta) p^(alpha+beta) - beta/(alpha+beta) q^(alpha+beta)]``.

    alpha -> 1, beta -> 0 tends to forward KL and alpha -> 0, beta -> 1 to reverse KL; alpha weighs the
    modes the student misses (hardness), beta the modes it is confident on. Both are > 0 here (the limits are
    fkl and rkl). d/dlog q = -(p^alpha q^beta - q^(alpha+beta)) / alpha; an entry the teacher masks (p = 0)
    adds q^(alpha+beta) / (alpha (alpha+beta)), finite.
    """

    name = "abkd"
    triton_kind = "abkd"
    triton_weight = "exponents"

    def __init__(self, *, alpha: float = 0.5, beta: float = 0.5, **common) -> None:
        super().__init__(**common)
        self.alpha, self.beta = float(alpha), float(beta)

    @property
    def exponents(self) -> tuple[float, float]:
        return self.alpha, self.beta

    def pointwise(self, log_p: Tensor, log_q: Tensor) -> tuple[Tensor, Tensor]:
        a, b = self.alpha, self.beta
        cross = torch.exp(a * log_p + b * log_q)
        own_q = torch.exp((a + b) * log_q)
        value = -(cross - a / (a + b) * torch.exp((a + b) * log_p) - b / (a + b) * own_q) / (a * b)
        return value, -(cross - own_q) / a


class AdaptiveKL(LogitObjective):
    """AKL, adaptive KL (Wu et al., COLING 2025): forward and reverse KL weighted by where the two distributions
    differ, per token: ``w KL(p || q) + (1 - w) KL(q || p)``, ``w = g_head / (g_head + g_tail)``.

    The tail is the teacher's least probable entries whose cumulative mass stays below ``mu``, the head the
    rest (as the authors' released code and DistiLLM's split them); ``g_head`` and ``g_tail`` are the summed
    gaps ``|p_v - q_v|`` over each.
    FKL fits the head first and RKL the tail, so the larger gap gets the divergence that closes it. The weights
    are allocation coefficients, held constant in the gradient. Not pointwise (the head needs the row sorted),
    so it takes the generic row path, logits or from_hidden, and no sparse teacher: the head of a top-k folded
    with one tail bucket is not the head of the full distribution.
    """

    name = "akl"
    holds_constant = ("w",)

    def __init__(self, *, mu: float = 0.5, **common) -> None:
        super().__init__(**common)
        self.mu = float(mu)

    def token_loss(self, student_logprobs: Tensor, teacher_logprobs: Tensor, labels: Tensor) -> Tensor:
        log_p, log_q = teacher_logprobs, student_logprobs
        p, q = log_p.exp(), log_q.exp()
        with torch.no_grad():
            ranked, order = p.sort(-1)  # least probable first
            tail = ranked.cumsum(-1) < self.mu
            gap = (ranked - q.gather(-1, order)).abs()
            g_head, g_tail = (gap * ~tail).sum(-1), (gap * tail).sum(-1)
            total = g_head + g_tail
            w = torch.where(total > 0, g_head / torch.where(total > 0, total, 1.0), 0.5)
        forward = kl(log_p, log_q)
        reverse = torch.where(q > 0, q * (log_q - log_p), 0.0).sum(-1)
        return w * forward + (1 - w) * reverse


class TAID(LogitObjective):
    """TAID, temporally adaptive interpolated distillation (Shing et al., ICLR 2025): forward KL toward
    ``p_t = softmax((1 - t) log q' + t log p)``, an interpolation of the student's own distribution (``q'``,
    held constant) and the teacher's, ``KL(p_t || q)``; ``t`` moves from ``t_start`` to ``t_end`` over training.

    After each step (the step's global mean TAID loss ``J``): the relative change ``d = (J_prev - J) / J_prev``
    feeds a momentum ``m = beta m + (1 - beta) d``, and ``t = min(t_end, max(t_lin, t + alpha s(m) (1 - t)))``
    with ``t_lin`` the linear schedule ``t_start + (t_end - t_start) step / steps``; at the first step ``J`` is
    only remembered. ``adaptive: false`` follows ``t_lin`` alone. ``t``, ``J_prev`` and ``m`` are checkpointed.
    Not pointwise (``p_t`` is normalised over the vocab), so it takes the row path (logits and from_hidden).
    The authors' code feeds the update the cross-entropy ``-sum p_t log q``, which adds ``p_t``'s entropy to
    ``J``; here ``J`` is the divergence itself, as the paper writes it.
    """

    name = "taid"
    wants_progress = True
    holds_constant = ("q'",)

    def __init__(self, *, t_start: float = 0.4, t_end: float = 1.0, alpha: float = 5e-4, beta: float = 0.99,
                 adaptive: bool = True, **common) -> None:
        super().__init__(**common)
        if not 0 <= t_start <= t_end <= 1:
            from distillzoo.errors import ParameterError

            raise ParameterError(f"taid: need 0 <= t_start <= t_end <= 1, got t_start={t_start}, t_end={t_end}")
        self.t_start, self.t_end, self.alpha, self.beta = float(t_start), float(t_end), float(alpha), float(beta)
        self.adaptive = bool(adaptive)
        self.t, self.previous, self.momentum, self.step, self.steps = self.t_start, math.inf, 0.0, 0, 1

    def token_loss(self, student_logprobs: Tensor, teacher_logprobs: Tensor, labels: Tensor) -> Tensor:
        log_pt = torch.log_softmax((1 - self.t) * student_logprobs.detach() + self.t * teacher_logprobs, -1)
        return kl(log_pt, student_logprobs)

    def begin_step(self, step: int, total_steps: int) -> None:
        self.step, self.steps = int(step), max(int(total_steps), 1)

    def end_step(self, losses: dict) -> None:
        loss = float(losses["loss"])
        if math.isinf(self.previous):
            self.previous = loss
            return
        change = (self.previous - loss) / (self.previous + 1e-15)
        self.momentum = self.beta * self.momentum + (1 - self.beta) * change
        linear = self.t_start + (self.t_end - self.t_start) * self.step / self.steps
        grown = self.t + self.alpha / (1 + math.exp(-self.momentum)) * (1 - self.t)
        self.t = min(self.t_end, max(linear, grown)) if self.adaptive else linear
        self.previous = loss

    def progress_state(self) -> dict:
        return {"t": self.t, "previous": self.previous, "momentum": self.momentum}

    def load_progress_state(self, state: dict) -> None:
        self.t, self.previous, self.momentum = float(state["t"]), float(state["previous"]), float(state["momentum"])


@hookimpl
def register_objectives(register):
    register(ForwardKL)
    register(ReverseKL)
    register(JensenShannon)
    register(SkewKL)
    register(SkewReverseKL)
    register(TotalVariation)
    register(AlphaBeta)
    register(AdaptiveKL)
    register(TAID)
