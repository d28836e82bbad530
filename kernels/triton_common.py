"""Triton building blocks shared by the kernels: online softmax statistics and log-add-exp.

Imported only when a Triton kernel first runs (see :mod:`distillzoo.kernels.backend`).
"""

import triton
import triton.language as tl


@triton.jit
def segment_softmax_stats(ptr, start, end, inv_tau, BLOCK: tl.constexpr):
    """Online softmax statistics of ``x * inv_tau`` over entries ``[start, end)`` of one row.

    Returns ``(m, d)``: the raw max (-inf when no entry has mass) and ``sum exp(x * inv_tau - m)``
    (0 when none has). A row's statistics are one segment's (:func:`row_softmax_stats`) or
    several segments' combined (:func:`combine_stats`, the split-row kernels).
    """
    offs = tl.arange(0, BLOCK)
    # a running scalar max (one reduction per tile) and per-lane partial sums (one at the end)
    m = float("-inf")
    d = tl.zeros([BLOCK], dtype=tl.float32)
    for first in range(start, end, BLOCK):
        cols = first + offs
        x = tl.load(ptr + cols, mask=cols < end, other=float("-inf")).to(tl.float32) * inv_tau
        m_new = tl.maximum(m, tl.max(x, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        d = d * tl.exp(m - m_safe) + tl.exp(x - m_safe)
        m = m_new
    return m, tl.sum(d, axis=0)


@triton.jit
def row_softmax_stats(ptr, V, inv_tau, BLOCK: tl.constexpr):
    """Online softmax statistics of ``x * inv_tau`` over one row of ``V`` entries.

    Returns ``(m, log_d)``: the row max and ``log sum exp(x * inv_tau - m)``, so that
    ``log q = (x * inv_tau - m) - log_d`` (the difference to the max first, exact at
    |x| ~ 1e4). -inf entries carry no mass; a row of -inf gives ``(0, -inf)``.
    """
    m, d = segment_softmax_stats(ptr, 0, V, inv_tau, BLOCK)
    return tl.where(m == float("-inf"), 0.0, m), tl.log(d)


@triton.jit
def combine_stats(m_ptr, d_ptr, S, S_POW2: tl.constexpr):
    """``(m, log_d)`` of a row from its ``S`` segments' ``(m, d)`` (:func:`segment_softmax_stats`), as
    :func:`row_softmax_stats` gives them: ``d = sum_s d_s exp(m_s - m)``."""
    idx = tl.arange(0, S_POW2)
    inside = idx < S
    m_parts = tl.load(m_ptr + idx, mask=inside, other=float("-inf"))
    d_parts = tl.load(d_ptr + idx, mask=inside, other=0.0)
    m = tl.max(m_parts, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    m_parts = tl.where(m_parts == float("-inf"), m_safe, m_parts)  # no mass: d_s = 0, and no -inf - -inf
    return m_safe, tl.log(tl.sum(d_parts * tl.exp(m_parts - m_safe), axis=0))


@triton.jit
def logaddexp(a, b):
    """log(exp(a) + exp(b)) elementwise; -inf when both are -inf."""
    hi = tl.maximum(a, b)
    lo = tl.minimum(a, b)
    hi_safe = tl.where(hi == float("-inf"), 0.0, hi)
    return tl.where(hi == float("-inf"), float("-inf"), hi_safe + tl.log(1.0 + tl.exp(lo - hi_safe)))


@triton.jit
def tile_log_probs(row_ptr, cols, mask, inv_tau, m, log_d):
    """log softmax(x * inv_tau) on one tile of a row, from its statistics; -inf outside the row."""
    x = tl.load(row_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32)
    return (x * inv_tau - m) - log_d


@triton.jit
def add_store(row_ptr, cols, mask, value):
    """row[cols] += value, accumulated in fp32 and rounded once to the buffer's dtype."""
    old = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(row_ptr + cols, (old + value).to(row_ptr.dtype.element_ty), mask=mask)


@triton.jit
def grad_store(row_ptr, cols, mask, value, ACCUMULATE: tl.constexpr):
    """The gradient of one tile: added into the buffer (ACCUMULATE), else written over it, never read.

    Written over, the caller's buffer needs no zero fill and costs one write per entry
    instead of a read and a write; a mixture's first term writes, the others add.
    """
    if ACCUMULATE:
        add_store(row_ptr, cols, mask, value)
    else:
        tl.store(row_ptr + cols, value.to(row_ptr.dtype.element_ty), mask=mask)
