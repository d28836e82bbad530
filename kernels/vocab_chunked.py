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

so two reductions per row (both logsumexps, then the loss and ``sum G``) and one
write of the gradient suffice: three passes over the vocab.
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


def logsumexp(x: Tensor, tau: float = 1.0, chunk: int | None = None) -> Tensor:
    """Row-wise ``logsumexp(x / tau)`` of ``[r, V]``, chunk by chunk (online, fp32 or float64)."""
    dtype = compute_dtype(x.dtype)
    out = torch.full((x.shape[0],), -torch.inf, dtype=dtype, device=x.device)
    for a, b in _columns(x.shape[1], vocab_chunk(chunk)):
        out = torch.logaddexp(out, torch.logsumexp(x[:, a:b].to(dtype) / tau, dim=-1))
    return out


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
    lse_s = logsumexp(student, tau, chunk)
    lse_t = logsumexp(teacher, tau, chunk)
    loss = torch.zeros(student.shape[0], dtype=dtype, device=student.device)
    sum_g = torch.zeros_like(loss)
    for a, b in _columns(student.shape[1], chunk):
        log_q = student[:, a:b].to(dtype) / tau - lse_s[:, None]
        log_p = teacher[:, a:b].to(dtype) / tau - lse_t[:, None]
        value, g = pointwise(log_p, log_q)
        loss += value.sum(-1)
        if grad is not None:
            sum_g += g.sum(-1)
            grad[:, a:b].add_(g, alpha=grad_scale / tau)
    if grad is not None:
        _subtract_softmax(grad, student, tau, lse_s, sum_g * (grad_scale / tau), chunk)
    return loss


def _subtract_softmax(grad: Tensor, student: Tensor, tau: float, lse: Tensor, coef: Tensor, chunk: int) -> None:
    """grad[:, v] -= coef * q_v, chunk by chunk (the softmax part of d log q / d z)."""
    dtype = grad.dtype
    for a, b in _columns(student.shape[1], chunk):
        q = torch.exp(student[:, a:b].to(dtype) / tau - lse[:, None])
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
    """
    chunk = vocab_chunk(chunk)
    dtype = compute_dtype(student.dtype)
    rows, width = student.shape
    k = ids.shape[1]
    lse_s = logsumexp(student, tau, chunk)
    lse_out = torch.full((rows,), -torch.inf, dtype=dtype, device=student.device)
    for a, b, masked in _masked_columns(student, ids, tau, chunk, dtype):
        lse_out = torch.logaddexp(lse_out, torch.logsumexp(masked, dim=-1))
    kept = student.gather(1, ids).to(dtype) / tau - lse_s[:, None]
    log_q = torch.cat([kept, (lse_out - lse_s)[:, None]], dim=1)
    log_p = torch.cat([teacher_logprobs.to(dtype), teacher_tail.to(dtype)[:, None]], dim=1)
    value, g = pointwise(log_p, log_q)
    loss = value.sum(-1)
    if grad is None:
        return loss
    scale = grad_scale / tau
    sum_g = g.sum(-1)
    has_tail = torch.isfinite(lse_out)
    tail_coef = torch.where(has_tail, g[:, k], 0.0) * scale
    tail_lse = torch.where(has_tail, lse_out, 0.0)
    if k < width:
        for a, b, masked in _masked_columns(student, ids, tau, chunk, dtype):
            # exp(-inf - lse) = 0 at the kept ids, so only the tail entries get G_tail q_v / Q_tail.
            grad[:, a:b].addcmul_(torch.exp(masked - tail_lse[:, None]), tail_coef[:, None])
    _subtract_softmax(grad, student, tau, lse_s, sum_g * scale, chunk)
    grad.scatter_add_(1, ids, g[:, :k] * scale)
    return loss


def _masked_columns(student: Tensor, ids: Tensor, tau: float, chunk: int, dtype: torch.dtype):
    """Yield (a, b, s[:, a:b] / tau with -inf at the kept ids), one [r, c] buffer per chunk."""
    rows = student.shape[0]
    for a, b in _columns(student.shape[1], chunk):
        buf = torch.empty(rows, b - a + 1, dtype=dtype, device=student.device)
        buf[:, : b - a] = student[:, a:b].to(dtype) / tau
        inside = (ids >= a) & (ids < b)
        # ids outside this chunk land in the spare last column, which is dropped.
        buf.scatter_(1, torch.where(inside, ids - a, b - a), -torch.inf)
        yield a, b, buf[:, : b - a]


def cross_entropy_loss_and_grad(student: Tensor, labels: Tensor, tau: float, label_smoothing: float = 0.0,
                                grad: Tensor | None = None, grad_scale: float = 1.0,
                                chunk: int | None = None) -> Tensor:
    """Per-row ``-(1 - eps) log q(label) - eps/V sum_v log q_v``; gradient ``q - (1 - eps) onehot - eps/V``."""
    chunk = vocab_chunk(chunk)
    dtype = compute_dtype(student.dtype)
    rows, width = student.shape
    lse = logsumexp(student, tau, chunk)
    picked = student.gather(1, labels[:, None]).squeeze(1).to(dtype) / tau
    loss = (1.0 - label_smoothing) * (lse - picked)
    if label_smoothing:
        total = torch.zeros(rows, dtype=dtype, device=student.device)
        for a, b in _columns(width, chunk):
            total += student[:, a:b].to(dtype).sum(-1)
        loss = loss + label_smoothing * (lse - total / (tau * width))
    if grad is not None:
        scale = grad_scale / tau
        if label_smoothing:
            grad.sub_(label_smoothing * scale / width)
        _subtract_softmax(grad, student, tau, lse, torch.full_like(lse, -scale), chunk)
        grad.scatter_add_(1, labels[:, None], torch.full((rows, 1), -(1.0 - label_smoothing) * scale,
                                                         dtype=grad.dtype, device=grad.device))
    return loss
