"""Triton building blocks shared by the kernels: online softmax statistics and log-add-exp.

Imported only when a Triton kernel first runs (see :mod:`distillzoo.kernels.backend`).
"""

import triton
import triton.language as tl


@triton.jit
def row_softmax_stats(ptr, V, inv_tau, BLOCK: tl.constexpr):
    """Online softmax statistics of ``x * inv_tau`` over one row of ``V`` entries.

    Returns ``(m, log_d)``: the row max and ``log sum exp(x * inv_tau - m)``, so that
    ``log q = (x * inv_tau - m) - log_d`` (the difference to the max first, exact at
    |x| ~ 1e4). -inf entries carry no mass; a row of -inf gives ``(0, -inf)``.
    """
    offs = tl.arange(0, BLOCK)
    # a running scalar max (one reduction per tile) and per-lane partial sums (one at the end)
    m = float("-inf")
    d = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + offs
        x = tl.load(ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32) * inv_tau
        m_new = tl.maximum(m, tl.max(x, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        d = d * tl.exp(m - m_safe) + tl.exp(x - m_safe)
        m = m_new
    m = tl.where(m == float("-inf"), 0.0, m)
    return m, tl.log(tl.sum(d, axis=0))


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
