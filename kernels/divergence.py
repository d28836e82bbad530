"""Triton kernels for the pointwise divergences (fkl, rkl, jsd, skl, srkl, tvd): loss and d(student logits).

One program per row of ``[rows, V]`` logits walks the vocab in tiles:

1. online softmax statistics of student and teacher (one read of each);
2. the loss ``sum_v f(log p_v, log q_v)`` and ``sum_v G_v`` with ``G = df/dlog q``;
3. the gradient ``dD/dz_v = (G_v - q_v sum G) / tau``, added into the caller's buffer, or written
   over it (``accumulate=False``: no zero fill, no read).

fkl skips pass 2 when a gradient is wanted: ``sum G = -sum p = -1``, and its loss is
summed in pass 3. Arithmetic is fp32 whatever the input dtype (fp32/bf16/fp16); the
gradient buffer may be fp32 or the logits' dtype (one rounding at the store).

The reference is the definition: ``LogitObjective.loss_and_grad`` (whole-row
log-softmax, autograd through the objective's ``pointwise``), which
``DISTILLZOO_BACKEND=reference`` selects; the chunked torch path is
:func:`distillzoo.kernels.vocab_chunked.pointwise_loss_and_grad`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from .backend import block_size, launch_grid_device, unit_stride
from .triton_common import grad_store, logaddexp, row_softmax_stats, tile_log_probs

KINDS = {"fkl": 0, "rkl": 1, "jsd": 2, "skl": 3, "srkl": 4, "tvd": 5}


@triton.jit
def _pointwise(lp, lq, c_a, c_b, w, KIND: tl.constexpr):
    """f(log p, log q) and df/dlog q; the same formulas as the plugins' ``pointwise``."""
    if KIND == 0:  # fkl: p (log p - log q)
        p = tl.exp(lp)
        f = tl.where(p > 0, p * (lp - lq), 0.0)
        g = -p
    elif KIND == 1:  # rkl: q (log q - log p)
        q = tl.exp(lq)
        ratio = tl.where(q > 0, lq - lp, 0.0)
        f = q * ratio
        g = q * (ratio + 1.0)
    elif KIND == 2:  # jsd: w KL(p||m) + (1 - w) KL(q||m), m = w p + (1 - w) q; c_a = log w, c_b = log(1 - w)
        lm = logaddexp(lp + c_a, lq + c_b)
        p = tl.exp(lp)
        q = tl.exp(lq)
        teacher_side = tl.where(p > 0, p * (lp - lm), 0.0)
        student_side = tl.where(q > 0, q * (lq - lm), 0.0)
        f = w * teacher_side + (1.0 - w) * student_side
        g = (1.0 - w) * student_side
    elif KIND == 3:  # skl: KL(p || w p + (1 - w) q)
        lm = logaddexp(lp + c_a, lq + c_b)
        p = tl.exp(lp)
        f = tl.where(p > 0, p * (lp - lm), 0.0)
        g = tl.where(p > 0, -(1.0 - w) * p * tl.exp(lq - lm), 0.0)
    elif KIND == 4:  # srkl: KL(q || (1 - w) p + w q)
        lm = logaddexp(lq + c_a, lp + c_b)
        q = tl.exp(lq)
        ratio = tl.where(q > 0, lq - lm, 0.0)
        f = q * ratio
        g = q * (ratio + 1.0 - w * tl.exp(ratio))
    else:  # tvd: 1/2 |p - q|, subgradient 0 where p = q
        p = tl.exp(lp)
        q = tl.exp(lq)
        diff = q - p
        f = 0.5 * tl.abs(diff)
        g = tl.where(diff > 0, 0.5 * q, tl.where(diff < 0, -0.5 * q, 0.0))
    return f, g


@triton.jit
def _divergence_kernel(s_ptr, s_stride, t_ptr, t_stride, g_ptr, g_stride, loss_ptr,
                       V, inv_tau, grad_scale, c_a, c_b, w,
                       KIND: tl.constexpr, LOSS_PASS: tl.constexpr, GRAD_PASS: tl.constexpr,
                       SUM_G: tl.constexpr, ACCUMULATE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride
    t_row = t_ptr + row * t_stride
    m_s, ld_s = row_softmax_stats(s_row, V, inv_tau, BLOCK)
    m_t, ld_t = row_softmax_stats(t_row, V, inv_tau, BLOCK)
    offs = tl.arange(0, BLOCK)
    loss = tl.zeros([BLOCK], dtype=tl.float32)  # per-lane partial sums, reduced once at the end
    sum_g = SUM_G  # used as is only where LOSS_PASS is off (fkl: -1)
    if LOSS_PASS:
        partial_g = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, V, BLOCK):
            cols = start + offs
            mask = cols < V
            lq = tile_log_probs(s_row, cols, mask, inv_tau, m_s, ld_s)
            lp = tile_log_probs(t_row, cols, mask, inv_tau, m_t, ld_t)
            f, g = _pointwise(lp, lq, c_a, c_b, w, KIND)
            loss += tl.where(mask, f, 0.0)
            partial_g += tl.where(mask, g, 0.0)
        sum_g = tl.sum(partial_g, axis=0)
    if GRAD_PASS:
        g_row = g_ptr + row * g_stride
        coef = grad_scale * inv_tau
        for start in range(0, V, BLOCK):
            cols = start + offs
            mask = cols < V
            lq = tile_log_probs(s_row, cols, mask, inv_tau, m_s, ld_s)
            lp = tile_log_probs(t_row, cols, mask, inv_tau, m_t, ld_t)
            f, g = _pointwise(lp, lq, c_a, c_b, w, KIND)
            if not LOSS_PASS:
                loss += tl.where(mask, f, 0.0)
            grad_store(g_row, cols, mask, coef * (g - tl.exp(lq) * sum_g), ACCUMULATE)
    tl.store(loss_ptr + row, tl.sum(loss, axis=0))


def _mixture_constants(kind: str, weight: float) -> tuple[float, float, float]:
    """(c_a, c_b, w) for the mixture m = w * first + (1 - w) * second: c_a = log w, c_b = log(1 - w)."""
    if kind in ("jsd", "skl", "srkl"):
        log_w = math.log(weight) if weight > 0 else -math.inf
        return log_w, math.log1p(-weight), weight
    return 0.0, 0.0, 0.0


def loss_and_grad(kind: str, student: Tensor, teacher: Tensor, tau: float, grad: Tensor | None = None,
                  grad_scale: float = 1.0, weight: float = 0.0, accumulate: bool = True) -> Tensor:
    """Per-row divergence ``[rows]`` (fp32) of ``[rows, V]`` logits; adds ``grad_scale * dD/dz_s`` into ``grad``
    (``accumulate=False``: writes it over every entry of ``grad``, which may hold anything).

    ``kind`` is one of :data:`KINDS`; ``weight`` is jsd's beta or skl/srkl's alpha.
    Rows of student, teacher and grad may have any stride (views of wider tensors).
    """
    rows, vocab = student.shape
    if tuple(teacher.shape) != (rows, vocab):
        raise ValueError(f"teacher logits have shape {tuple(teacher.shape)}, expected {(rows, vocab)}")
    loss = torch.empty(rows, dtype=torch.float32, device=student.device)
    if rows == 0:
        return loss
    student, teacher = unit_stride(student), unit_stride(teacher)
    if grad is not None and grad.stride(-1) != 1:
        raise ValueError("grad must have unit column stride")
    has_grad = grad is not None
    fkl_shortcut = kind == "fkl" and has_grad
    c_a, c_b, w = _mixture_constants(kind, weight)
    with launch_grid_device(student):
        _divergence_kernel[(rows,)](
            student, student.stride(0), teacher, teacher.stride(0),
            grad if has_grad else loss, grad.stride(0) if has_grad else 0, loss,
            vocab, 1.0 / tau, float(grad_scale), c_a, c_b, w,
            KIND=KINDS[kind], LOSS_PASS=not fkl_shortcut, GRAD_PASS=has_grad,
            SUM_G=-1.0 if fkl_shortcut else 0.0, ACCUMULATE=accumulate, BLOCK=block_size(vocab), num_warps=8)
    return loss
