"""Triton cross-entropy on hard labels with label smoothing: loss and d(student logits).

Per row: online softmax statistics (plus the row sum of log q when smoothing),
then ``dz_v = ((q_v - eps / V) - (1 - eps) [v = label]) / tau`` added into the
caller's buffer, or written over it (``accumulate=False``). Loss: ``-(1 - eps) log q(label) - eps / V sum_v log q_v``.
The torch path is :func:`distillzoo.kernels.vocab_chunked.cross_entropy_loss_and_grad`;
the reference is torch's ``cross_entropy`` (``DISTILLZOO_BACKEND=reference``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from distillzoo.kernels.backend import block_size, launch_grid_device, unit_stride
from distillzoo.kernels.triton_common import grad_store, row_softmax_stats, tile_log_probs


@triton.jit
def _cross_entropy_kernel(s_ptr, s_stride, labels_ptr, g_ptr, g_stride, loss_ptr, V, inv_tau, eps, grad_scale,
                          SMOOTH: tl.constexpr, GRAD_PASS: tl.constexpr, ACCUMULATE: tl.constexpr,
                          BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride
    m, log_d = row_softmax_stats(s_row, V, inv_tau, BLOCK)
    label = tl.load(labels_ptr + row)
    picked = (tl.load(s_row + label).to(tl.float32) * inv_tau - m) - log_d
    loss = -(1.0 - eps) * picked
    offs = tl.arange(0, BLOCK)
    if SMOOTH:
        total = 0.0
        for start in range(0, V, BLOCK):
            cols = start + offs
            mask = cols < V
            x = tl.load(s_row + cols, mask=mask, other=0.0).to(tl.float32)
            total += tl.sum(tl.where(mask, (x * inv_tau - m) - log_d, 0.0), axis=0)
        loss -= eps * total / V
    if GRAD_PASS:
        g_row = g_ptr + row * g_stride
        coef = grad_scale * inv_tau
        for start in range(0, V, BLOCK):
            cols = start + offs
            mask = cols < V
            q = tl.exp(tile_log_probs(s_row, cols, mask, inv_tau, m, log_d))
            grad_store(g_row, cols, mask, coef * (q - eps / V - tl.where(cols == label, 1.0 - eps, 0.0)),
                       ACCUMULATE)
    tl.store(loss_ptr + row, loss)


def loss_and_grad(student: Tensor, labels: Tensor, tau: float, label_smoothing: float = 0.0,
                  grad: Tensor | None = None, grad_scale: float = 1.0, accumulate: bool = True) -> Tensor:
    """Per-row loss ``[rows]`` (fp32) of ``[rows, V]`` logits with labels in ``[0, V)``; adds into ``grad``
    (``accumulate=False``: writes over it)."""
    rows, vocab = student.shape
    loss = torch.empty(rows, dtype=torch.float32, device=student.device)
    if rows == 0:
        return loss
    student = unit_stride(student)
    labels = labels.reshape(rows).long().contiguous()
    has_grad = grad is not None
    with launch_grid_device(student):
        _cross_entropy_kernel[(rows,)](
            student, student.stride(0), labels, grad if has_grad else loss, grad.stride(0) if has_grad else 0,
            loss, vocab, 1.0 / tau, float(label_smoothing), float(grad_scale),
            SMOOTH=label_smoothing != 0.0, GRAD_PASS=has_grad, ACCUMULATE=accumulate, BLOCK=block_size(vocab),
            num_warps=8)
    return loss
