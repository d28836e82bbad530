"""The vocab-chunked torch path: loss and d(student logits) with O(rows x chunk) temporaries.

Every function here takes a block of rows of logits ``[r, V]`` (any float dtype,
possibly non-contiguous views of wider tensors), walks the vocab in column chunks
of ``chunk`` entries, and never builds an ``[r, V]`` temporary: the only ``[r, V]``
tensor written is the caller's gradient buffer. Arithmetic is fp32 for
fp32/bf16/fp16 inputs (float64 stays float64), the same numerics the Triton
kernels use.

The divergences that are a sum over the vocab of an elementwise term
``f(log p_v, log q_v)`` (fkl, rkl, jsd, skl, srkl, tvd, ...) share one routine,
:func:`pointwise_loss_and_grad`. With ``s = z / tau``, ``log q = s - logsumexp(s)``
and ``G_v = df/d(log q_v)``, the gradient is::

    dD/ds_v = G_v - q_v * sum_u G_u

so two reductions per row (the softmax statistics, then the loss and ``sum G``)
and one write of the gradient suffice. The statistics are an online softmax (row
max, then the sum of ``exp(s - max)``); this path takes the max in its own pass,
four reads of the logits in all, where the Triton kernels fuse it into the sum.
"""

from __future__ import annotations

import os
from typing import Callable

import torch
from torch import Tensor

# Columns per vocab chunk; DISTILLZOO_VOCAB_CHUNK overrides (tests use small values).
DEFAULT_VOCAB_CHUNK = 8192

Pointwise = Callable[[Tensor, Tensor], "tuple[Tensor, Tensor]"]


def vocab_chunk(chunk: int | None = None) -> int:
    return int(chunk or os.environ.get("DISTILLZOO_VOCAB_CHUNK", DEFAULT_VOCAB_CHUNK))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 inputs, float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def _columns(width: int, chunk: int):
    for start in range(0, width, chunk):
        yield start, min(start + chunk, width)


def softmax_stats(x: Tensor, tau: float = 1.0, chunk: int | None = None, ids: Tensor | None = None):
    """Row-wise online-softmax statistics of ``x / tau`` ``[r, V]``, chunk by chunk.

    Returns ``(m, log_d)`` with ``m`` the row max and ``log_d = log sum_v exp(x_v / tau - m)``,
    so that ``log q_v = (x_v / tau - m) - log_d``: the difference to the max is taken
    first, as torch's log_softmax does. (``m + log_d`` rounded to fp32 at |x| ~ 1e4
    loses 1e-3, which a divergence of size 1e4 turns into an error of 10.)
    With ``ids`` ([r, k]), also returns ``log_d_out``: the same sum over the entries
    outside the ids, relative to the same ``m`` (-inf when nothing is left).
    """
    chunk = vocab_chunk(chunk)
    dtype = compute_dtype(x.dtype)
    rows = x.shape[0]
    m = torch.full((rows,), -torch.inf, dtype=dtype, device=x.device)
    for a, b in _columns(x.shape[1], chunk):
        m = torch.maximum(m, x[:, a:b].to(dtype).amax(dim=-1) / tau)
    m = torch.where(torch.isfinite(m), m, 0.0)  # a row of -inf has no distribution; keep it NaN-free
    d = torch.zeros(rows, dtype=dtype, device=x.device)
    d_out = torch.zeros_like(d) if ids is not None else None
    for a, b in _columns(x.shape[1], chunk):
        shifted = x[:, a:b].to(dtype) / tau - m[:, None]
        d += shifted.exp().sum(-1)
        if ids is not None:
            d_out += _mask_ids(shifted, ids, a, b).exp().sum(-1)
    if ids is None:
        return m, d.log()
    return m, d.log(), d_out.log()


def logsumexp(x: Tensor, tau: float = 1.0, chunk: int | None = None) -> Tensor:
    """Row-wise ``logsumexp(x / tau)`` of ``[r, V]``, chunk by chunk."""
    m, log_d = softmax_stats(x, tau, chunk)
    return m + log_d


def _mask_ids(shifted: Tensor, ids: Tensor, a: int, b: int) -> Tensor:
    """A copy of the [r, b - a] chunk with -inf at the ids that fall inside [a, b)."""
    buf = torch.empty(shifted.shape[0], b - a + 1, dtype=shifted.dtype, device=shifted.device)
    buf[:, : b - a] = shifted
    inside = (ids >= a) & (ids < b)
    # ids outside this chunk land in the spare last column, which is dropped.
    buf.scatter_(1, torch.where(inside, ids - a, b - a), -torch.inf)
    return buf[:, : b - a]


def _log_probs(x: Tensor, tau: float, m: Tensor, log_d: Tensor, dtype: torch.dtype) -> Tensor:
    return (x.to(dtype) / tau - m[:, None]) - log_d[:, None]


def argmax(x: Tensor, chunk: int | None = None) -> tuple[Tensor, Tensor]:
    """Row-wise max and first index of the max of ``[r, V]``, chunk by chunk (ties: lowest index)."""
    best = torch.full((x.shape[0],), -torch.inf, dtype=compute_dtype(x.dtype), device=x.device)
    index = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    for a, b in _columns(x.shape[1], vocab_chunk(chunk)):
        value, where = x[:, a:b].to(best.dtype).max(dim=-1)
        better = value > best
        best = torch.where(better, value, best)
        index = torch.where(better, where + a, index)
    return best, index


def pointwise_loss_and_grad(pointwise: Pointwise, student: Tensor, teacher: Tensor, tau: float,
                            grad: Tensor | None = None, grad_scale: float = 1.0,
                            chunk: int | None = None) -> Tensor:
    """Per-row ``sum_v f(log p_v, log q_v)`` for ``[r, V]`` logits; adds ``grad_scale * dD/dz`` into ``grad``.

    ``pointwise(log_p, log_q) -> (f, df/dlog_q)`` elementwise on ``[r, c]`` chunks.
    The teacher may hold -inf (masked vocab). ``grad`` is an ``[r, V]`` buffer in
    the compute dtype; the gradient is w.r.t. the raw logits ``z`` (``1/tau`` included).
    """
    chunk = vocab_chunk(chunk)
    dtype = compute_dtype(student.dtype)
    stats_s = softmax_stats(student, tau, chunk)
    stats_t = softmax_stats(teacher, tau, chunk)
    loss = torch.zeros(student.shape[0], dtype=dtype, device=student.device)
    sum_g = torch.zeros_like(loss)
    for a, b in _columns(student.shape[1], chunk):
        log_q = _log_probs(student[:, a:b], tau, *stats_s, dtype)
        log_p = _log_probs(teacher[:, a:b], tau, *stats_t, dtype)
        value, g = pointwise(log_p, log_q)
        loss += value.sum(-1)
        if grad is not None:
            sum_g += g.sum(-1)
            grad[:, a:b].add_(g, alpha=grad_scale / tau)
    if grad is not None:
        _subtract_softmax(grad, student, tau, stats_s, sum_g * (grad_scale / tau), chunk)
    return loss


def _subtract_softmax(grad: Tensor, student: Tensor, tau: float, stats, coef: Tensor, chunk: int) -> None:
    """grad[:, v] -= coef * q_v, chunk by chunk (the softmax part of d log q / d z)."""
    for a, b in _columns(student.shape[1], chunk):
        q = _log_probs(student[:, a:b], tau, *stats, grad.dtype).exp_()
        grad[:, a:b].addcmul_(q, coef[:, None], value=-1.0)


def sparse_pointwise_loss_and_grad(pointwise: Pointwise, student: Tensor, ids: Tensor, teacher_logprobs: Tensor,
                                   teacher_tail: Tensor, tau: float, grad: Tensor | None = None,
                                   grad_scale: float = 1.0, chunk: int | None = None) -> Tensor:
    """The divergence between two (k + 1)-bucket distributions: the k kept ids and one tail bucket.

    Teacher buckets: ``log p`` at ``ids`` ([r, k], of the full softmax) and the tail
    ``log(1 - sum p)`` ([r]). Student buckets: ``log q`` at the same ids and the log of
    the student's mass outside them, summed exactly over the other entries (never
    ``1 - sum q``, which cancels catastrophically). With ``G`` the bucket derivatives
    of ``f`` w.r.t. ``log Q``::

        dD/ds_v = G_i - q_v sum G                    for v = ids[i]
        dD/ds_v = q_v (G_tail / Q_tail - sum G)       for v outside the ids

    Passes over the vocab: the logsumexp, the logsumexp outside the ids, the gradient.
    """
    chunk = vocab_chunk(chunk)
    dtype = compute_dtype(student.dtype)
    k = ids.shape[1]
    m, log_d, log_d_out = softmax_stats(student, tau, chunk, ids)
    kept = _log_probs(student.gather(1, ids), tau, m, log_d, dtype)
    log_q = torch.cat([kept, (log_d_out - log_d)[:, None]], dim=1)
    log_p = torch.cat([teacher_logprobs.to(dtype), teacher_tail.to(dtype)[:, None]], dim=1)
    value, g = pointwise(log_p, log_q)
    loss = value.sum(-1)
    if grad is None:
        return loss
    scale = grad_scale / tau
    has_tail = torch.isfinite(log_d_out)
    log_tail = torch.where(has_tail, log_q[:, k], 0.0)
    g_tail = torch.where(has_tail, g[:, k], 0.0)
    # Outside the ids: q_v (G_tail / Q_tail - sum G) = q_v (G_tail S / Q_tail - sum_i G_i), S = sum_i q_i
    # the student's kept mass, so no O(1) terms cancel when Q_tail ~ 1 (the usual case for small k).
    kept_mass_over_tail = torch.exp(torch.logsumexp(kept, dim=-1) - log_tail)
    outside = torch.where(has_tail, g_tail * kept_mass_over_tail, 0.0) - g[:, :k].sum(-1)
    _subtract_softmax(grad, student, tau, (m, log_d), -outside * scale, chunk)
    # At the ids the total is G_i - q_i sum G = q_i * outside + (G_i - q_i G_tail / Q_tail).
    fix = g[:, :k] - kept.exp() * (g_tail * torch.exp(-log_tail))[:, None]
    grad.scatter_add_(1, ids, fix * scale)
    return loss


def cross_entropy_loss_and_grad(student: Tensor, labels: Tensor, tau: float, label_smoothing: float = 0.0,
                                grad: Tensor | None = None, grad_scale: float = 1.0,
                                chunk: int | None = None) -> Tensor:
    """Per-row ``-(1 - eps) log q(label) - eps/V sum_v log q_v``; gradient ``q - (1 - eps) onehot - eps/V``."""
    chunk = vocab_chunk(chunk)
    dtype = compute_dtype(student.dtype)
    rows, width = student.shape
    m, log_d = softmax_stats(student, tau, chunk)
    picked = _log_probs(student.gather(1, labels[:, None]), tau, m, log_d, dtype).squeeze(1)
    loss = -(1.0 - label_smoothing) * picked
    if label_smoothing:
        total = torch.zeros(rows, dtype=dtype, device=student.device)
        for a, b in _columns(width, chunk):
            total += _log_probs(student[:, a:b], tau, m, log_d, dtype).sum(-1)
        loss = loss - label_smoothing * total / width
    if grad is not None:
        scale = grad_scale / tau
        if label_smoothing:
            grad.sub_(label_smoothing * scale / width)
        _subtract_softmax(grad, student, tau, (m, log_d), torch.full_like(m, -scale), chunk)
        grad.scatter_add_(1, labels[:, None], torch.full((rows, 1), -(1.0 - label_smoothing) * scale,
                                                         dtype=grad.dtype, device=grad.device))
    return loss
