"""The fused autograd machinery behind :class:`~distillzoo.objectives.logit.LogitObjective`.

* :class:`LogitLoss`: the loss of ``[N, V]`` logits with the gradient computed in the
  forward pass, rows in blocks whose buffers a budget bounds;
* :class:`FusedLinearLoss` / :class:`FusedLinearPerToken`: the lm_head matmul and the
  loss chunk by chunk of tokens (peak extra memory O(chunk x V), never O(N x V)), dX
  and dW accumulated as the chunks go (mean/sum) or recomputed in the backward pass
  (reduction none);
* :class:`RowChunks` (Triton, the reference, sparse teachers) and :class:`ColumnChunks`
  (the CPU's ``[V, c]`` column layout): how one chunk's logits are made and turned into
  its gradient;
* :func:`check_teacher`: every dense teacher row scored must be a distribution.

It knows the objectives only through ``loss_and_grad``, ``columns_loss_and_grad``,
``grad_dtype`` and ``overwrites_grad``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from distillzoo.errors import NonFiniteError
from distillzoo.kernels import backend as kernel_backend
from distillzoo.kernels import columns
from distillzoo.kernels import vocab_chunked
from distillzoo.kernels.backend import auto_chunk_rows
from distillzoo.objectives.sparse import SparseTeacher

# fp32 [vocab] rows live at once per token of a chunk on the torch path (logits of both
# models, log-probs, gradient); the chunk budget itself is kernel_backend.DEFAULT_CHUNK_BYTES
# (DEFAULT_CPU_CHUNK_BYTES for the CPU's column path, which sizes by LogitObjective.columns_buffers).
TEMPORARIES_PER_ROW = 8


class LogitLoss(torch.autograd.Function):
    """Loss of the valid rows of ``[N, Vs]`` logits, the gradient computed in the forward pass.

    ``scale`` given (mean/sum): returns ``scale * sum`` of the per-token losses and
    keeps ``scale * d/dlogits`` in one ``[N, Vs]`` buffer in the logits' dtype, which
    the backward pass hands back as is (times a non-unit incoming gradient).
    ``scale`` None (reduction none): returns the per-token losses ``[n_valid]`` and
    scales the buffer's rows by the incoming per-token gradients. Rows are taken in
    blocks (a budget bounds the block's [rows, V] buffers); the vocab inside a block
    is walked in chunks by the objective.
    """

    @staticmethod
    def forward(ctx, objective, student, teacher, labels, valid, vocab, need_grad, scale):
        dtype = vocab_chunked.compute_dtype(student.dtype)
        n = valid.numel()
        per_token = torch.empty(n, dtype=dtype, device=student.device)
        buf = torch.zeros_like(student) if need_grad else None
        grad_scale = 1.0 if scale is None else scale
        # Row blocks bound the temporaries of the torch and reference paths; a Triton kernel keeps
        # none, and wants many rows per launch to fill the GPU (its only temporary is an fp32
        # gradient block where the buffer cannot be written in place).
        triton = kernel_backend.backend_for(student) == "triton"
        block = auto_chunk_rows(vocab, bytes_per_entry=4 if triton else 4 * TEMPORARIES_PER_ROW)
        all_valid = n == student.shape[0]  # rows can then be sliced, never copied
        for start in range(0, n, block):
            stop = min(start + block, n)
            rows = slice(start, stop) if all_valid else valid[start:stop]
            s = student[rows][:, :vocab]
            t = teacher if teacher is None else (teacher.select(rows) if isinstance(teacher, SparseTeacher)
                                                 else teacher[rows][:, :vocab])
            check_teacher(objective, t, rows)
            g = None
            if need_grad:
                g_dtype = objective.grad_dtype(s, t)
                in_place = all_valid and buf.dtype == g_dtype
                g = buf[rows, :vocab] if in_place else torch.zeros(stop - start, vocab, dtype=g_dtype,
                                                                   device=student.device)
            per_token[start:stop] = objective.loss_and_grad(s, t, labels[rows], g, grad_scale)
            if need_grad and not in_place:
                if all_valid:
                    buf[rows, :vocab] = g
                else:
                    buf[:, :vocab].index_copy_(0, rows, g.to(buf.dtype))
        ctx.buf, ctx.per_token_mode = buf, scale is None
        ctx.save_for_backward(valid)
        return per_token if scale is None else per_token.sum() * scale

    @staticmethod
    def backward(ctx, grad_output):
        buf = ctx.buf
        if ctx.per_token_mode:
            (valid,) = ctx.saved_tensors
            rows = grad_output.new_zeros(buf.shape[0]).index_copy(0, valid, grad_output)
            grad = buf * rows[:, None]
        else:
            grad = buf if bool(grad_output == 1) else buf * grad_output
        return None, grad, None, None, None, None, None, None


def check_teacher(objective, teacher, rows) -> None:
    """Every row of a dense teacher block must be a distribution: no NaN, no +inf, not -inf everywhere.

    (Unchecked, a NaN teacher row would give its token a loss of 0 and the student a NaN gradient.)
    ``rows``: the block's rows in the flattened input (an index tensor, or a slice of it).
    """
    if not isinstance(teacher, Tensor):
        return  # none, or a SparseTeacher (checked by SparseTeacher.validate)
    check_teacher_top(objective, teacher.amax(-1), rows)  # NaN propagates; +inf stays; -inf only if the whole row is


def check_teacher_top(objective, top: Tensor, rows) -> None:
    """:func:`check_teacher` given each row's max."""
    bad = ~torch.isfinite(top)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        row = rows.start + i if isinstance(rows, slice) else int(rows[i])
        what = "NaN" if bool(top[i].isnan()) else "+inf" if float(top[i]) > 0 else "-inf everywhere (no mass at all)"
        raise NonFiniteError(f"{objective.name or type(objective).__name__}: the teacher's logits at row {row} are "
                             f"{what}; a teacher must give a distribution on every scored token", row)


class RowChunks:
    """A chunk's logits as ``[c, V]`` rows through :meth:`LogitObjective.loss_and_grad`: the Triton kernels
    (CUDA), the reference, and sparse (top-k) teachers. The gradient is in the objective's
    :meth:`~LogitObjective.grad_dtype` (fp32, or the logits' dtype where a Triton kernel rounds once at the store)."""

    def __init__(self, objective, hs, ws, teacher, wt, labels) -> None:
        self.objective, self.hs, self.ws, self.teacher, self.wt, self.labels = objective, hs, ws, teacher, wt, labels

    def loss_and_grad(self, rows: Tensor, want_grad: bool):
        logits = self.hs[rows] @ self.ws.T
        teacher = self.teacher
        if isinstance(teacher, Tensor):
            teacher = teacher[rows] @ self.wt.T
        elif isinstance(teacher, SparseTeacher):
            teacher = teacher.select(rows)
        check_teacher(self.objective, teacher, rows)
        if not want_grad:
            return self.objective.loss_and_grad(logits, teacher, self.labels[rows]), None
        dtype = self.objective.grad_dtype(logits, teacher)
        if self.objective.overwrites_grad(logits, teacher):  # every entry written: no zero fill
            grad = torch.empty(logits.shape, dtype=dtype, device=logits.device)
            return self.objective.loss_and_grad(logits, teacher, self.labels[rows], grad, overwrite=True), grad
        grad = torch.zeros(logits.shape, dtype=dtype, device=logits.device)
        return self.objective.loss_and_grad(logits, teacher, self.labels[rows], grad), grad

    def release(self) -> None:
        """Frees what one pass over the chunks kept between them (nothing here)."""

    def add_grads(self, grad, rows, grad_h, grad_w) -> None:
        if grad_h is not None:
            grad_h.index_add_(0, rows, (grad.to(self.ws.dtype) @ self.ws).to(self.hs.dtype))
        if grad_w is not None:
            kernel_backend.accumulate_weight_grad(grad_w, grad, self.hs[rows])


class ColumnChunks(RowChunks):
    """The CPU path: a chunk's logits as ``[V, c]`` columns (``W @ h.T``, the faster GEMM there), through
    :meth:`LogitObjective.columns_loss_and_grad`, which transforms them in place
    (:mod:`distillzoo.kernels.columns`); the gradient comes back over one of the buffers."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.workspace = columns.Workspace()

    def loss_and_grad(self, rows: Tensor, want_grad: bool):
        logits = self.workspace.logits(0, self.ws, self.hs[rows])
        teacher = None
        if self.teacher is not None:
            teacher = self.workspace.logits(1, self.wt, self.teacher[rows])
            check_teacher_top(self.objective, columns.column_max(teacher), rows)
        return self.objective.columns_loss_and_grad(logits, teacher, self.labels[rows], want_grad)

    def release(self) -> None:
        self.workspace.release()

    def add_grads(self, grad, rows, grad_h, grad_w) -> None:
        if grad_h is not None:
            grad_h.index_add_(0, rows, (self.ws.T.to(grad.dtype) @ grad).T.to(self.hs.dtype))
        if grad_w is not None:
            h = self.hs[rows]
            grad_w.addmm_(grad.to(grad_w.dtype), h.to(grad_w.dtype))


class FusedLinearLoss(torch.autograd.Function):
    """Chunked lm_head + loss (mean/sum) whose gradients are computed during the forward pass.

    Per chunk of valid rows (``chunks``: :class:`RowChunks` or :class:`ColumnChunks`):
    the student's and the teacher's logits, the loss and d(logits), then dX = dZ W and
    dW += dZ^T h in fp32. Peak extra memory is O(chunk x V).
    """

    @staticmethod
    def forward(ctx, chunks, hs, ws, valid, chunk, scale, need_grad):
        dtype = vocab_chunked.compute_dtype(hs.dtype)
        grad_h, grad_w = kernel_backend.grad_buffers(hs, ws, need_grad and hs.requires_grad, need_grad and ws.requires_grad)
        want = grad_h is not None or grad_w is not None
        total = torch.zeros((), dtype=dtype, device=hs.device)
        for rows in kernel_backend.balanced_chunks(valid, chunk):
            loss, grad = chunks.loss_and_grad(rows, want)
            total += loss.sum()
            if want:
                chunks.add_grads(grad, rows, grad_h, grad_w)
            del grad
        chunks.release()
        if grad_h is not None and scale != 1.0:
            grad_h.mul_(scale)
        if grad_w is not None:
            if scale != 1.0:
                grad_w.mul_(scale)
            grad_w = grad_w.to(ws.dtype)
        ctx.grads = (grad_h, grad_w)
        return total * scale

    @staticmethod
    def backward(ctx, grad_output):
        grad_h, grad_w = ctx.grads
        del ctx.grads
        if not bool(grad_output == 1):  # the buffers are ours alone: scaled in place, not copied
            grad_h = None if grad_h is None else grad_h.mul_(grad_output)
            grad_w = None if grad_w is None else grad_w.mul_(grad_output)
        return None, grad_h, grad_w, None, None, None, None


class FusedLinearPerToken(torch.autograd.Function):
    """Chunked lm_head + per-token loss (reduction none): the backward pass recomputes each chunk.

    The forward pass keeps no [chunk, V] tensor; the backward pass redoes each
    chunk's logits and gradient, scales its tokens by their incoming gradients and
    accumulates dX and dW (fp32) as :class:`FusedLinearLoss` does.
    """

    @staticmethod
    def forward(ctx, chunks, hs, ws, valid, chunk):
        dtype = vocab_chunked.compute_dtype(hs.dtype)
        parts = [chunks.loss_and_grad(rows, False)[0] for rows in kernel_backend.balanced_chunks(valid, chunk)]
        chunks.release()  # the backward pass is a new pass: no workspace is held in between
        ctx.chunks, ctx.chunk = chunks, chunk
        ctx.save_for_backward(valid)
        return torch.cat(parts) if parts else hs.new_zeros(0, dtype=dtype)

    @staticmethod
    def backward(ctx, grad_per_token):
        (valid,) = ctx.saved_tensors
        chunks = ctx.chunks
        need_h, need_w = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grad_h, grad_w = kernel_backend.grad_buffers(chunks.hs, chunks.ws, need_h, need_w)
        start = 0
        for rows in kernel_backend.balanced_chunks(valid, ctx.chunk):
            with torch.no_grad():
                _, grad = chunks.loss_and_grad(rows, True)
            k = rows.numel()
            scale = grad_per_token[start:start + k].to(grad.dtype)
            grad.mul_(scale[None, :] if isinstance(chunks, ColumnChunks) else scale[:, None])
            start += k
            chunks.add_grads(grad, rows, grad_h, grad_w)
            del grad
        chunks.release()
        if grad_w is not None:
            grad_w = grad_w.to(chunks.ws.dtype)
        return None, grad_h, grad_w, None, None
