"""The CPU path of the fused heads: a chunk's logits as ``[V, c]`` columns, transformed in place.

On a CPU the lm_head GEMM is fastest as ``W @ h.T`` (``[V, H] x [H, c]``, both
operands in their natural row-major layout): 15-25% more FLOP/s than ``h @ W.T``
at the chunk sizes used here (fp32, on a 2-core AMD EPYC), and the weight-gradient
GEMM ``G @ h`` is the same shape. So :meth:`~distillzoo.objectives.logit.LogitObjective.from_hidden` and
:func:`~distillzoo.kernels.token_logprobs` compute each chunk's logits as
``[V, c]``, one column per token, and every function here takes that layout.

The logits are temporaries of the caller, so they are transformed in place:
log-softmax by subtracting each column's max and log-sum, the objective's terms
over row blocks of the vocab (``[block, c]``, contiguous), and the gradient
written over a logits buffer, never into a zero-filled one. A pointwise divergence
holds two ``[V, c]`` fp32 buffers at once (the student's and the teacher's), so
the caller sizes ``c`` from a memory budget. Arithmetic is fp32 (float64 for
float64 inputs), as on the other paths.
"""

from __future__ import annotations

import os
from typing import Callable

import torch
from torch import Tensor

from distillzoo.kernels.vocab_chunked import compute_dtype

#: bytes per block of the elementwise work (``[block, c]`` temporaries): small, so that the few
#: temporaries alive at once stay in the allocator's reused heap chunks
DEFAULT_BLOCK_BYTES = 1 << 20


def _blocks(vocab: int, columns: int):
    """Row blocks ``[a, b)`` of the vocab: ``DISTILLZOO_VOCAB_CHUNK`` rows (tests set small ones), else about
    1 MiB of fp32 per block."""
    chosen = os.environ.get("DISTILLZOO_VOCAB_CHUNK")
    rows = int(chosen) if chosen else max(256, DEFAULT_BLOCK_BYTES // (4 * max(columns, 1)))
    for start in range(0, vocab, rows):
        yield start, min(start + rows, vocab)


class Workspace:
    """The ``[V, c]`` logits buffers of one pass over the chunks, allocated once and reused by every chunk.

    Allocating them per chunk costs page faults on every chunk, and buffers under
    glibc's mmap threshold (32 MiB at most) land on the heap, where the interleaved
    small temporaries keep it from shrinking: the process's resident memory then grows
    past the tensors alive. Callers :meth:`release` it at the end of each pass, so
    nothing is held between a forward and a backward pass.
    """

    def __init__(self) -> None:
        self.buffers: dict[int, Tensor] = {}

    def logits(self, slot: int, weight: Tensor, hidden: Tensor) -> Tensor:
        """``weight @ hidden.T`` ``[V, c]`` in the compute dtype, in buffer ``slot`` (fp32/fp64 weights) or new."""
        dtype = compute_dtype(hidden.dtype)
        if weight.dtype != dtype or hidden.dtype != dtype:
            return (weight @ hidden.T).to(dtype)
        vocab, columns = weight.shape[0], hidden.shape[0]
        buffer = self.buffers.get(slot)
        if buffer is None or buffer.numel() < vocab * columns or buffer.dtype != dtype:
            buffer = self.buffers[slot] = torch.empty(vocab * columns, dtype=dtype, device=weight.device)
        out = buffer[:vocab * columns].view(vocab, columns)
        return torch.mm(weight, hidden.T, out=out)

    def release(self) -> None:
        self.buffers.clear()


def column_max(x: Tensor) -> Tensor:
    """The max of each column of ``[V, c]`` (NaN if any, +inf, or -inf if all are).

    ``x.amax(0)`` walks the columns with a stride on CPUs (about 10x slower than a row reduction
    on a 2-core AMD EPYC); viewed as ``[V / 64, 64 c]`` the reduction runs over long contiguous rows,
    then the 64 partial maxima of each column are reduced.
    """
    vocab, columns = x.shape
    whole = vocab - vocab % 64
    if whole == 0 or not x.is_contiguous():
        return x.amax(0)
    top = x[:whole].view(whole // 64, 64 * columns).amax(0).view(64, columns).amax(0)
    return top if whole == vocab else torch.maximum(top, x[whole:].amax(0))


def column_stats(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(raw max, m, log_d)`` of each column of ``[V, c]``: ``log softmax = (x - m) - log_d``.

    ``raw max`` is the column's max as it is (NaN, +inf or -inf tell a broken
    distribution); ``m`` is it with non-finite values replaced by 0, so that a column
    of -inf gives no NaN. The difference to the max is taken first, as torch's
    log_softmax does.
    """
    top = column_max(x)
    m = torch.where(torch.isfinite(top), top, 0.0)
    d = torch.zeros_like(m)
    for a, b in _blocks(x.shape[0], x.shape[1]):
        d += (x[a:b] - m).exp_().sum(0)
    return top, m, d.log()


def log_softmax_(x: Tensor) -> Tensor:
    """``x`` ``[V, c]`` turned into its column log-softmax in place; returns the raw column max."""
    top, m, log_d = column_stats(x)
    x.sub_(m).sub_(log_d)
    return top


def pointwise(f: Callable[[Tensor, Tensor], "tuple[Tensor, Tensor]"], student: Tensor, teacher: Tensor,
              tau: float, want_grad: bool) -> tuple[Tensor, Tensor | None]:
    """``sum_v f(log p_v, log q_v)`` per column, and its gradient w.r.t. the raw student logits.

    ``student`` and ``teacher``: ``[V, c]`` raw logits (overwritten). ``f(log_p, log_q)``
    returns the elementwise term and ``G = df/dlog q`` on ``[block, c]`` blocks; the
    gradient w.r.t. ``s = z / tau`` is ``G - q sum_v G`` (see :mod:`distillzoo.kernels.vocab_chunked`),
    written over the teacher's buffer. Returns ``(loss [c], gradient [V, c] or None)``;
    the gradient includes the ``1 / tau``.
    """
    if tau != 1.0:
        student.mul_(1.0 / tau)
        teacher.mul_(1.0 / tau)
    log_softmax_(student)
    log_softmax_(teacher)
    loss = torch.zeros(student.shape[1], dtype=student.dtype, device=student.device)
    sum_g = torch.zeros_like(loss)
    for a, b in _blocks(*student.shape):
        value, g = f(teacher[a:b], student[a:b])
        loss += value.sum(0)
        if want_grad:
            sum_g += g.sum(0)
            teacher[a:b] = g  # log p of these rows is not read again
    if not want_grad:
        return loss, None
    grad = teacher.addcmul_(student.exp_(), sum_g, value=-1.0)
    if tau != 1.0:
        grad.mul_(1.0 / tau)
    return loss, grad


def forward_kl(student: Tensor, teacher: Tensor, tau: float, want_grad: bool) -> tuple[Tensor, Tensor | None]:
    """:func:`pointwise` for forward KL, ``sum_v p_v (log p_v - log q_v)``, with fewer passes over the buffers.

    The gradient w.r.t. the raw student logits is ``(q - p) / tau``. The generic path
    writes both buffers' log-softmax over them, then ``G = -p`` and ``q sum G``: nine
    passes over ``[V, c]`` after the statistics. Here each row block's log p, p, log q and
    q are block temporaries (L2-sized), so the buffers are read once and the teacher's
    written once with the gradient. The ``0 * log 0`` terms (entries without teacher
    mass, NaN in ``p (log p - log q)``) are zeroed as NaNs, one operation where a mask
    takes two; a NaN from the student's own logits would be zeroed with them, so a
    student column whose max is not finite (a NaN, +inf, or no mass at all) gets a NaN
    loss, as on the generic path.
    """
    if tau != 1.0:
        student.mul_(1.0 / tau)
        teacher.mul_(1.0 / tau)
    top_s, m_s, log_d_s = column_stats(student)
    _, m_t, log_d_t = column_stats(teacher)
    loss = torch.zeros(student.shape[1], dtype=student.dtype, device=student.device)
    for a, b in _blocks(*student.shape):
        log_p = teacher[a:b].sub(m_t).sub_(log_d_t)  # the difference to the max first, as log_softmax takes it
        log_q = student[a:b].sub(m_s).sub_(log_d_s)
        p = log_p.exp()
        term = log_p.sub_(log_q).mul_(p)
        loss += term.nan_to_num_(nan=0.0, posinf=torch.inf, neginf=-torch.inf).sum(0)
        if want_grad:
            torch.sub(log_q.exp_(), p, out=teacher[a:b])
    loss[~torch.isfinite(top_s)] = torch.nan
    if not want_grad:
        return loss, None
    return loss, teacher if tau == 1.0 else teacher.mul_(1.0 / tau)


def cross_entropy(student: Tensor, labels: Tensor, tau: float, label_smoothing: float,
                  want_grad: bool) -> tuple[Tensor, Tensor | None]:
    """``-(1 - eps) log q(label) - eps/V sum_v log q_v`` per column; gradient ``(q - (1 - eps) onehot - eps/V) / tau``
    written over ``student`` (``[V, c]`` raw logits)."""
    vocab, columns = student.shape
    if tau != 1.0:
        student.mul_(1.0 / tau)
    cols = torch.arange(columns, device=student.device)
    log_softmax_(student)
    picked = student[labels, cols]
    loss = -(1.0 - label_smoothing) * picked
    if label_smoothing:
        loss = loss - label_smoothing * student.sum(0) / vocab
    if not want_grad:
        return loss, None
    grad = student.exp_()
    if label_smoothing:
        grad.sub_(label_smoothing / vocab)
    grad[labels, cols] -= 1.0 - label_smoothing
    if tau != 1.0:
        grad.mul_(1.0 / tau)
    return loss, grad


def label_logprobs(logits: Tensor, labels: Tensor, with_entropy: bool) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """``(log q(label) [c], entropy [c] or None, m, log_d)`` of ``[V, c]`` logits (read only)."""
    _, m, log_d = column_stats(logits)
    cols = torch.arange(logits.shape[1], device=logits.device)
    picked = (logits[labels, cols] - m) - log_d
    entropy = None
    if with_entropy:
        expected = torch.zeros_like(m)  # sum_v q_v (x_v - m)
        for a, b in _blocks(*logits.shape):
            shifted = logits[a:b] - m
            q = (shifted - log_d).exp_()
            expected += torch.where(q > 0, q * shifted, 0.0).sum(0)
        entropy = log_d - expected
    return picked, entropy, m, log_d


def label_logprobs_grad_(logits: Tensor, labels: Tensor, m: Tensor, log_d: Tensor, g_lp: Tensor,
                         entropy: Tensor | None, g_h: Tensor | None) -> Tensor:
    """``logits`` ``[V, c]`` overwritten with d(g_lp . log q(label) + g_h . entropy)/d(logits)::

        dz_v = g_lp ([v = label] - q_v) - g_h q_v (log q_v + H)
    """
    cols = torch.arange(logits.shape[1], device=logits.device)
    if g_h is None:  # three passes over the buffer: log q, q, -g q
        grad = logits.sub_(m + log_d).exp_().mul_(-g_lp)
    else:
        log_q = logits.sub_(m).sub_(log_d)
        for a, b in _blocks(*logits.shape):
            block = log_q[a:b]
            q = block.exp()
            block.copy_(-q * (g_lp + g_h * torch.where(q > 0, block + entropy, 0.0)))
        grad = log_q
    grad[labels, cols] += g_lp
    return grad
