"""Triton row kernels of :mod:`distillzoo.kernels.token_logprob`: log q(label), entropy, and their gradient."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from distillzoo.kernels.backend import block_size, launch_grid_device, unit_stride


@triton.jit
def _forward_kernel(x_ptr, x_stride, labels_ptr, lp_ptr, ent_ptr, m_ptr, logd_ptr, V, BLOCK: tl.constexpr):
    """One pass: online max m, d = sum exp(x - m) and b = sum exp(x - m)(x - m), rescaled as m grows."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_stride
    offs = tl.arange(0, BLOCK)
    m = float("-inf")  # running scalar max; per-lane partial sums, reduced once at the end
    d = tl.zeros([BLOCK], dtype=tl.float32)
    b = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + offs
        x = tl.load(x_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        shift = tl.where(d > 0, (m - m_safe) * d, 0.0)
        e = tl.exp(x - m_safe)
        b = alpha * (b + shift) + tl.where(e > 0, e * (x - m_safe), 0.0)
        d = alpha * d + e
        m = m_new
    m = tl.where(m == float("-inf"), 0.0, m)
    d_total = tl.sum(d, axis=0)
    log_d = tl.log(d_total)
    b_total = tl.sum(b, axis=0)
    label = tl.load(labels_ptr + row)
    tl.store(lp_ptr + row, (tl.load(x_row + label).to(tl.float32) - m) - log_d)
    tl.store(ent_ptr + row, log_d - b_total / d_total)
    tl.store(m_ptr + row, m)
    tl.store(logd_ptr + row, log_d)


@triton.jit
def _backward_kernel(x_ptr, x_stride, labels_ptr, m_ptr, logd_ptr, ent_ptr, glp_ptr, gent_ptr, out_ptr, out_stride,
                     V, BLOCK: tl.constexpr):
    """dz = g_lp ([v = label] - q) - g_H q (log q + H); ``out`` may alias ``x`` (each entry read, then written)."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_stride
    out_row = out_ptr + row * out_stride
    m = tl.load(m_ptr + row)
    log_d = tl.load(logd_ptr + row)
    entropy = tl.load(ent_ptr + row)
    g_lp = tl.load(glp_ptr + row)
    g_h = tl.load(gent_ptr + row)
    label = tl.load(labels_ptr + row)
    offs = tl.arange(0, BLOCK)
    for start in range(0, V, BLOCK):
        cols = start + offs
        mask = cols < V
        log_q = (tl.load(x_row + cols, mask=mask, other=float("-inf")).to(tl.float32) - m) - log_d
        q = tl.exp(log_q)
        dz = -q * (g_lp + g_h * tl.where(q > 0, log_q + entropy, 0.0)) + tl.where(cols == label, g_lp, 0.0)
        tl.store(out_row + cols, dz.to(out_ptr.dtype.element_ty), mask=mask)


def forward(logits: Tensor, labels: Tensor):
    rows, vocab = logits.shape
    logits = unit_stride(logits)
    labels = labels.reshape(rows).long().contiguous()
    out = [torch.empty(rows, dtype=torch.float32, device=logits.device) for _ in range(4)]
    if rows:
        with launch_grid_device(logits):
            _forward_kernel[(rows,)](logits, logits.stride(0), labels, *out, vocab, BLOCK=block_size(vocab),
                                     num_warps=8)
    return tuple(out)


def backward(logits: Tensor, labels: Tensor, m, log_d, entropy, g_lp, g_h, out: Tensor) -> None:
    rows, vocab = logits.shape
    if not rows:
        return
    if logits.stride(-1) != 1 or out.stride(-1) != 1:
        raise ValueError("logits and out must have unit column stride")
    f32 = [t.float().contiguous() for t in (m, log_d, entropy, g_lp, g_h)]
    with launch_grid_device(logits):
        _backward_kernel[(rows,)](logits, logits.stride(0), labels.reshape(rows).long().contiguous(), *f32,
                                  out, out.stride(0), vocab, BLOCK=block_size(vocab), num_warps=8)
