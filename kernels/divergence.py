"""Triton kernels for the pointwise divergences (fkl, rkl, jsd, skl, srkl, tvd): loss and d(student logits).

One program per row of ``[rows, V]`` logits walks the vocab in tiles:

1. online softmax statistics of student and teacher (one read of each);
2. the loss ``sum_v f(log p_v, log q_v)`` and ``sum_v G_v`` with ``G = df/dlog q``;
3. the gradient ``dD/dz_v = (G_v - q_v sum G) / tau``, added into the caller's buffer, or written
   over it (``accumulate=False``: no zero fill, no read).

fkl skips pass 2 when a gradient is wanted: ``sum G = -sum p = -1``, and its loss is
summed in pass 3. Arithmetic is fp32 whatever the input dtype (fp32/bf16/fp16); the
gradient buffer may be fp32 or the logits' dtype (one rounding at the store).

**Split rows.** A few wide rows (a small micro-batch, or one sequence's positions at a
time) leave most of a GPU idle under one program per row. The split-row variant runs
``S`` programs per row, each on a segment of the vocab: the segments' statistics
(:func:`~distillzoo.kernels.triton_common.segment_softmax_stats`), then each program
combines the ``S`` partial statistics of its row and runs passes 2 and 3 on its
segment, partial losses and ``sum G`` going through a ``[rows, 2, S]`` buffer. Same
formulas, same reads per entry, two or three launches instead of one.
:func:`split_count` picks ``S`` from the row count and the device's SM count.

**Tile sizes** are autotuned per vocab width and kernel kind on CUDA (``BLOCK`` and
``num_warps``; a gradient added into the caller's buffer is restored between trials).
Triton's interpreter (CPU tests) takes one configuration, the vocab's power of two up
to 4,096, 8 warps.

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

from distillzoo.kernels.backend import block_size, interpreting, launch_grid_device, unit_stride
from distillzoo.kernels.triton_common import (combine_stats, grad_store, logaddexp, row_softmax_stats, segment_softmax_stats,
                            tile_log_probs)

KINDS = {"fkl": 0, "rkl": 1, "jsd": 2, "skl": 3, "srkl": 4, "tvd": 5, "abkd": 6}
#: the smallest vocab segment a split-row program takes (below it, launches cost more than they spread)
MIN_SEGMENT = 8192


def _configs() -> list[triton.Config]:
    return [triton.Config({"BLOCK": block}, num_warps=warps) for block in (1024, 2048, 4096, 8192)
            for warps in (4, 8, 16)]


def _prune(configs, named_args, **kwargs):
    """Tiles no wider than the vocab (or segment) needs; in the interpreter, one fixed configuration (the
    vocab's power of two up to 4,096, 8 warps)."""
    args = {**named_args, **kwargs}
    width = args.get("SEG") or args["V"]
    if interpreting():
        return [triton.Config({"BLOCK": block_size(width)}, num_warps=8)]
    widest = block_size(width, cap=8192)
    return [c for c in configs if c.kwargs["BLOCK"] <= widest] or [triton.Config({"BLOCK": widest}, num_warps=4)]


def _autotune(key, restore=()):
    return triton.autotune(configs=_configs(), key=key, prune_configs_by={"early_config_prune": _prune},
                           restore_value=list(restore))


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
    elif KIND == 5:  # tvd: 1/2 |p - q|, subgradient 0 where p = q
        p = tl.exp(lp)
        q = tl.exp(lq)
        diff = q - p
        f = 0.5 * tl.abs(diff)
        g = tl.where(diff > 0, 0.5 * q, tl.where(diff < 0, -0.5 * q, 0.0))
    else:  # abkd: -1/(a b) [p^a q^b - a/(a+b) p^(a+b) - b/(a+b) q^(a+b)]; c_a = a, c_b = b
        cross = tl.exp(c_a * lp + c_b * lq)
        own_q = tl.exp((c_a + c_b) * lq)
        own_p = tl.exp((c_a + c_b) * lp)
        f = -(cross - c_a / (c_a + c_b) * own_p - c_b / (c_a + c_b) * own_q) / (c_a * c_b)
        g = -(cross - own_q) / c_a
    return f, g


@triton.jit
def _tile_terms(s_row, t_row, cols, mask, inv_tau, m_s, ld_s, m_t, ld_t, c_a, c_b, w, KIND: tl.constexpr):
    """log q, f and G on one tile of a row, from the row's statistics."""
    lq = tile_log_probs(s_row, cols, mask, inv_tau, m_s, ld_s)
    lp = tile_log_probs(t_row, cols, mask, inv_tau, m_t, ld_t)
    f, g = _pointwise(lp, lq, c_a, c_b, w, KIND)
    return lq, f, g


@_autotune(key=["V", "KIND", "LOSS_PASS", "GRAD_PASS"], restore=["g_ptr"])
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
            lq, f, g = _tile_terms(s_row, t_row, cols, mask, inv_tau, m_s, ld_s, m_t, ld_t, c_a, c_b, w, KIND)
            loss += tl.where(mask, f, 0.0)
            partial_g += tl.where(mask, g, 0.0)
        sum_g = tl.sum(partial_g, axis=0)
    if GRAD_PASS:
        g_row = g_ptr + row * g_stride
        coef = grad_scale * inv_tau
        for start in range(0, V, BLOCK):
            cols = start + offs
            mask = cols < V
            lq, f, g = _tile_terms(s_row, t_row, cols, mask, inv_tau, m_s, ld_s, m_t, ld_t, c_a, c_b, w, KIND)
            if not LOSS_PASS:
                loss += tl.where(mask, f, 0.0)
            grad_store(g_row, cols, mask, coef * (g - tl.exp(lq) * sum_g), ACCUMULATE)
    tl.store(loss_ptr + row, tl.sum(loss, axis=0))


@_autotune(key=["V", "SEG"])
@triton.jit
def _split_stats_kernel(s_ptr, s_stride, t_ptr, t_stride, stats_ptr, V, SEG, S, inv_tau, BLOCK: tl.constexpr):
    """Program (row, part): the softmax statistics of vocab segment ``part`` of both rows, into
    ``stats[row] = [m_s, d_s, m_t, d_t]`` (each ``[S]``)."""
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    start = part * SEG
    end = tl.minimum(start + SEG, V)
    m_s, d_s = segment_softmax_stats(s_ptr + row * s_stride, start, end, inv_tau, BLOCK)
    m_t, d_t = segment_softmax_stats(t_ptr + row * t_stride, start, end, inv_tau, BLOCK)
    base = stats_ptr + row * 4 * S + part
    tl.store(base, m_s)
    tl.store(base + S, d_s)
    tl.store(base + 2 * S, m_t)
    tl.store(base + 3 * S, d_t)


@_autotune(key=["V", "SEG", "KIND", "GRAD_PASS"], restore=["g_ptr"])
@triton.jit
def _split_pass_kernel(s_ptr, s_stride, t_ptr, t_stride, g_ptr, g_stride, stats_ptr, parts_ptr,
                       V, SEG, S, inv_tau, grad_scale, c_a, c_b, w,
                       KIND: tl.constexpr, GRAD_PASS: tl.constexpr, SUM_G_KNOWN: tl.constexpr,
                       ACCUMULATE: tl.constexpr, S_POW2: tl.constexpr, BLOCK: tl.constexpr):
    """Program (row, part) on vocab segment ``part``, from its row's combined statistics.

    Without GRAD_PASS: pass 2, the segment's loss and ``sum G`` into ``parts[row] = [loss, sum G]``
    (each ``[S]``). With it: pass 3, the gradient, ``sum G`` being -1 (SUM_G_KNOWN, fkl, whose
    loss this pass sums into ``parts``) or the sum of the row's partial ``sum G``.
    """
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    start = part * SEG
    end = tl.minimum(start + SEG, V)
    s_row = s_ptr + row * s_stride
    t_row = t_ptr + row * t_stride
    stats = stats_ptr + row * 4 * S
    m_s, ld_s = combine_stats(stats, stats + S, S, S_POW2)
    m_t, ld_t = combine_stats(stats + 2 * S, stats + 3 * S, S, S_POW2)
    out = parts_ptr + row * 2 * S + part
    offs = tl.arange(0, BLOCK)
    loss = tl.zeros([BLOCK], dtype=tl.float32)
    if not GRAD_PASS:
        partial_g = tl.zeros([BLOCK], dtype=tl.float32)
        for first in range(start, end, BLOCK):
            cols = first + offs
            mask = cols < end
            lq, f, g = _tile_terms(s_row, t_row, cols, mask, inv_tau, m_s, ld_s, m_t, ld_t, c_a, c_b, w, KIND)
            loss += tl.where(mask, f, 0.0)
            partial_g += tl.where(mask, g, 0.0)
        tl.store(out, tl.sum(loss, axis=0))
        tl.store(out + S, tl.sum(partial_g, axis=0))
    else:
        if SUM_G_KNOWN:
            sum_g = -1.0
        else:
            idx = tl.arange(0, S_POW2)
            sum_g = tl.sum(tl.load(parts_ptr + row * 2 * S + S + idx, mask=idx < S, other=0.0), axis=0)
        g_row = g_ptr + row * g_stride
        coef = grad_scale * inv_tau
        for first in range(start, end, BLOCK):
            cols = first + offs
            mask = cols < end
            lq, f, g = _tile_terms(s_row, t_row, cols, mask, inv_tau, m_s, ld_s, m_t, ld_t, c_a, c_b, w, KIND)
            if SUM_G_KNOWN:
                loss += tl.where(mask, f, 0.0)
            grad_store(g_row, cols, mask, coef * (g - tl.exp(lq) * sum_g), ACCUMULATE)
        if SUM_G_KNOWN:
            tl.store(out, tl.sum(loss, axis=0))


def split_count(rows: int, vocab: int, programs: int) -> int:
    """Vocab segments per row for the split-row kernels: 1 (one program per row) when ``rows`` already fill
    ``programs`` (about two per SM), else enough to fill them, each segment at least :data:`MIN_SEGMENT` wide."""
    if rows <= 0 or rows >= programs:
        return 1
    return max(1, min(-(-programs // rows), vocab // MIN_SEGMENT))


def _device_programs(tensor: Tensor) -> int:
    """About two programs per SM on CUDA; 0 elsewhere (the interpreter runs one program per row unless asked)."""
    if not tensor.is_cuda:
        return 0
    return 2 * torch.cuda.get_device_properties(tensor.device).multi_processor_count


def _split_loss_and_grad(kind, student, teacher, tau, grad, grad_scale, weight, accumulate, splits):
    rows, vocab = student.shape
    seg = -(-vocab // splits)
    seg = -(-seg // 128) * 128  # whole 128-entry lines per segment
    parts = -(-vocab // seg)
    stats = torch.empty(rows, 4, parts, dtype=torch.float32, device=student.device)
    partial = torch.empty(rows, 2, parts, dtype=torch.float32, device=student.device)  # every entry read is written
    has_grad = grad is not None
    fkl_shortcut = kind == "fkl" and has_grad
    c_a, c_b, w = _mixture_constants(kind, weight)
    common = dict(V=vocab, SEG=seg, S=parts)
    with launch_grid_device(student):
        _split_stats_kernel[(rows, parts)](student, student.stride(0), teacher, teacher.stride(0), stats,
                                           inv_tau=1.0 / tau, **common)
        flags = dict(KIND=KINDS[kind], S_POW2=triton.next_power_of_2(parts), ACCUMULATE=accumulate)
        args = (student, student.stride(0), teacher, teacher.stride(0))
        if not fkl_shortcut:
            _split_pass_kernel[(rows, parts)](*args, partial, 0, stats, partial, inv_tau=1.0 / tau,
                                              grad_scale=float(grad_scale), c_a=c_a, c_b=c_b, w=w,
                                              GRAD_PASS=False, SUM_G_KNOWN=False, **common, **flags)
        if has_grad:
            _split_pass_kernel[(rows, parts)](*args, grad, grad.stride(0), stats, partial, inv_tau=1.0 / tau,
                                              grad_scale=float(grad_scale), c_a=c_a, c_b=c_b, w=w,
                                              GRAD_PASS=True, SUM_G_KNOWN=fkl_shortcut, **common, **flags)
    return partial[:, 0].sum(1)


def _mixture_constants(kind: str, weight) -> tuple[float, float, float]:
    """(c_a, c_b, w) for the mixture m = w * first + (1 - w) * second: c_a = log w, c_b = log(1 - w); for abkd
    its exponents (alpha, beta, 0)."""
    if kind == "abkd":
        alpha, beta = weight
        return float(alpha), float(beta), 0.0
    if kind in ("jsd", "skl", "srkl"):
        log_w = math.log(weight) if weight > 0 else -math.inf
        return log_w, math.log1p(-weight), weight
    return 0.0, 0.0, 0.0


def loss_and_grad(kind: str, student: Tensor, teacher: Tensor, tau: float, grad: Tensor | None = None,
                  grad_scale: float = 1.0, weight: float = 0.0, accumulate: bool = True,
                  splits: int | None = None) -> Tensor:
    """Per-row divergence ``[rows]`` (fp32) of ``[rows, V]`` logits; adds ``grad_scale * dD/dz_s`` into ``grad``
    (``accumulate=False``: writes it over every entry of ``grad``, which may hold anything).

    ``kind`` is one of :data:`KINDS`; ``weight`` is jsd's beta or skl/srkl's alpha, or abkd's (alpha, beta).
    Rows of student, teacher and grad may have any stride (views of wider tensors).
    ``splits``: vocab segments per row (1: one program per row; None: :func:`split_count`).
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
    if splits is not None and splits < 1:
        raise ValueError(f"splits must be >= 1, got {splits}")
    parts = splits if splits is not None else split_count(rows, vocab, _device_programs(student))
    if parts > 1:
        return _split_loss_and_grad(kind, student, teacher, tau, grad, grad_scale, weight, accumulate, parts)
    has_grad = grad is not None
    fkl_shortcut = kind == "fkl" and has_grad
    c_a, c_b, w = _mixture_constants(kind, weight)
    with launch_grid_device(student):
        _divergence_kernel[(rows,)](
            student, student.stride(0), teacher, teacher.stride(0),
            grad if has_grad else loss, grad.stride(0) if has_grad else 0, loss,
            vocab, 1.0 / tau, float(grad_scale), c_a, c_b, w,
            KIND=KINDS[kind], LOSS_PASS=not fkl_shortcut, GRAD_PASS=has_grad,
            SUM_G=-1.0 if fkl_shortcut else 0.0, ACCUMULATE=accumulate)
    return loss
