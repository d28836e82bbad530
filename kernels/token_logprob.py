"""Fused per-token log-probabilities (and entropy) from hidden states and an lm_head weight.

``token_logprobs(hidden [N, H], weight [V, H], labels [N])`` returns
``log q(labels)`` per token, where ``q = softmax(hidden @ weight.T)``, and
optionally the entropy ``-sum_v q_v log q_v``, with gradients to hidden and
weight, never holding ``[N, V]``: tokens are taken in chunks; per chunk the
logits are one matmul, a row kernel reduces them, and the backward pass
recomputes the chunk's logits, overwrites them with

    dz_v = g_lp ([v = label] - q_v) - g_H q_v (log q_v + H)

and accumulates dX = dz @ W and dW += dz.T @ h (fp32 for bf16/fp16 weights).
Positions whose label is ``ignore_index`` give 0 and no gradient. Sequence-level
objectives (dpo, simpo, dpkd) sum these per response; ce is their negative.

Backends (see :mod:`distillzoo.kernels.backend`): the Triton row kernels below,
the vocab-chunked torch path (same math), or the reference (``log_softmax``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from distillzoo.errors import ParameterError

from distillzoo.kernels import columns
from distillzoo.kernels import vocab_chunked
from distillzoo.kernels.backend import (accumulate_weight_grad, auto_chunk_rows, backend_for, balanced_chunks, grad_buffers,
                      weight_grad_dtype)

# ---------------------------------------------------------------- row functions, three backends
def _rows_torch(logits: Tensor, labels: Tensor):
    """(logprob, entropy, m, log_d) per row, chunk by chunk over the vocab."""
    m, log_d = vocab_chunked.softmax_stats(logits)
    picked = (logits.gather(1, labels[:, None]).squeeze(1).to(m.dtype) - m) - log_d
    expected = torch.zeros_like(m)  # sum_v q_v (x_v - m)
    for a, b in vocab_chunked._columns(logits.shape[1], vocab_chunked.vocab_chunk()):
        shifted = logits[:, a:b].to(m.dtype) - m[:, None]
        q = (shifted - log_d[:, None]).exp()
        expected += torch.where(q > 0, q * shifted, 0.0).sum(-1)
    return picked, log_d - expected, m, log_d


def _grad_torch(logits: Tensor, labels: Tensor, m, log_d, entropy, g_lp, g_h, out: Tensor) -> None:
    for a, b in vocab_chunked._columns(logits.shape[1], vocab_chunked.vocab_chunk()):
        log_q = (logits[:, a:b].to(m.dtype) - m[:, None]) - log_d[:, None]
        q = log_q.exp()
        dz = -q * (g_lp[:, None] + g_h[:, None] * torch.where(q > 0, log_q + entropy[:, None], 0.0))
        out[:, a:b] = dz.to(out.dtype)
    inside = labels.long()[:, None]
    out.scatter_add_(1, inside, g_lp[:, None].to(out.dtype))


def _rows_reference(logits: Tensor, labels: Tensor):
    log_q = torch.log_softmax(logits.to(vocab_chunked.compute_dtype(logits.dtype)), dim=-1)
    q = log_q.exp()
    entropy = -torch.where(q > 0, q * log_q, 0.0).sum(-1)
    m = logits.amax(-1).to(log_q.dtype)
    return log_q.gather(1, labels[:, None]).squeeze(1), entropy, m, torch.logsumexp(logits.to(log_q.dtype) - m[:, None], -1)


def _triton():
    from distillzoo.kernels import token_logprob_triton

    return token_logprob_triton


def row_logprobs(logits: Tensor, labels: Tensor, backend: str | None = None):
    """``(log q(label), entropy, m, log_d)`` per row of ``[rows, V]`` logits (labels in range)."""
    backend = backend or backend_for(logits)
    if backend == "triton":
        return _triton().forward(logits, labels)
    if backend == "reference":
        return _rows_reference(logits, labels)
    return _rows_torch(logits, labels)


def row_grad(logits: Tensor, labels: Tensor, m, log_d, entropy, g_lp, g_h, out: Tensor,
             backend: str | None = None) -> None:
    """Writes d(g_lp . logprob + g_h . entropy)/d(logits) into ``out`` (may be ``logits`` itself)."""
    backend = backend or backend_for(logits)
    if backend == "triton":
        _triton().backward(logits, labels, m, log_d, entropy, g_lp, g_h, out)
    else:
        _grad_torch(logits, labels, m, log_d, entropy, g_lp, g_h, out)


# ---------------------------------------------------------------- the fused linear function
def _chunk_rows(vocab: int, itemsize: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        if chunk_size < 1:
            raise ParameterError(f"token_logprobs: chunk_size must be >= 1, got {chunk_size}")
        return chunk_size
    return auto_chunk_rows(vocab, bytes_per_entry=2 * max(itemsize, 4))  # the logits and their fp32 stats


class _TokenLogProbs(torch.autograd.Function):
    """The row path (Triton on CUDA, the reference): ``[c, V]`` logits per chunk. As on the column path, the
    forward pass keeps its last chunk's logits and the backward pass starts from them, in reverse order."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, valid, chunk):
        n = hidden.shape[0]
        dtype = vocab_chunked.compute_dtype(hidden.dtype)
        logprob = torch.zeros(n, dtype=dtype, device=hidden.device)
        entropy = torch.zeros_like(logprob)
        stats = torch.zeros(2, valid.numel(), dtype=dtype, device=hidden.device)
        start = 0
        logits = None
        for rows in balanced_chunks(valid, chunk):
            logits = hidden[rows] @ weight.T
            lp, h, m, log_d = row_logprobs(logits, labels[rows])
            logprob[rows], entropy[rows] = lp.to(dtype), h.to(dtype)
            stats[0, start:start + rows.numel()], stats[1, start:start + rows.numel()] = m, log_d
            start += rows.numel()
        ctx.chunk = chunk
        ctx.kept = logits if any(ctx.needs_input_grad[:2]) else None
        ctx.save_for_backward(hidden, weight, labels, valid, stats, entropy)
        return logprob, entropy

    @staticmethod
    def backward(ctx, g_logprob, g_entropy):
        hidden, weight, labels, valid, stats, entropy = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h, grad_w = grad_buffers(hidden, weight, need_h, need_w)
        dtype = stats.dtype
        g_logprob = torch.zeros_like(entropy) if g_logprob is None else g_logprob.to(dtype)
        g_entropy = torch.zeros_like(entropy) if g_entropy is None else g_entropy.to(dtype)
        kept, ctx.kept = ctx.kept, None
        chunks = balanced_chunks(valid, ctx.chunk)
        starts = _chunk_starts(chunks)
        for i in reversed(range(len(chunks))):
            rows, start, k = chunks[i], starts[i], chunks[i].numel()
            logits = hidden[rows] @ weight.T if kept is None else kept
            kept = None
            row_grad(logits, labels[rows], stats[0, start:start + k], stats[1, start:start + k], entropy[rows],
                     g_logprob[rows], g_entropy[rows], logits)
            if grad_h is not None:
                grad_h[rows] = logits @ weight
            if grad_w is not None:
                accumulate_weight_grad(grad_w, logits, hidden[rows])
            del logits
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None, None


def _chunk_starts(chunks) -> list[int]:
    """Each chunk's offset into the valid positions (the backward passes take the chunks in reverse)."""
    starts = [0]
    for rows in chunks[:-1]:
        starts.append(starts[-1] + rows.numel())
    return starts


class _ColumnTokenLogProbs(torch.autograd.Function):
    """The CPU path: each chunk's logits as ``[V, c]`` columns (``W @ h.T``, see :mod:`.columns`), the entropy
    only when asked for; the backward pass overwrites each chunk's logits with their gradient.

    A per-token output's gradient is known only in the backward pass, so the logits are
    computed twice (four GEMMs where a scalar loss such as ``F.linear_cross_entropy`` needs
    three). The forward pass keeps its last chunk's logits, the workspace it already holds,
    and the backward pass takes the chunks in reverse order, so that chunk is not recomputed
    and the same buffer serves the rest: one chunk's GEMM saved for no extra peak memory (the
    backward pass allocates that buffer anyway). A second backward pass (``retain_graph``)
    recomputes everything.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, valid, chunk, with_entropy):
        dtype = vocab_chunked.compute_dtype(hidden.dtype)
        logprob = torch.zeros(hidden.shape[0], dtype=dtype, device=hidden.device)
        entropy = torch.zeros_like(logprob) if with_entropy else logprob.new_zeros(0)
        stats = torch.zeros(2, valid.numel(), dtype=dtype, device=hidden.device)
        start = 0
        workspace = columns.Workspace()
        logits = None
        for rows in balanced_chunks(valid, chunk):
            logits = workspace.logits(0, weight, hidden[rows])
            lp, h, m, log_d = columns.label_logprobs(logits, labels[rows], with_entropy)
            logprob[rows] = lp
            if with_entropy:
                entropy[rows] = h
            stats[0, start:start + rows.numel()], stats[1, start:start + rows.numel()] = m, log_d
            start += rows.numel()
        ctx.chunk, ctx.with_entropy = chunk, with_entropy
        ctx.kept = (logits, workspace) if logits is not None and any(ctx.needs_input_grad[:2]) else None
        ctx.save_for_backward(hidden, weight, labels, valid, stats, entropy)
        return logprob, entropy

    @staticmethod
    def backward(ctx, g_logprob, g_entropy):
        hidden, weight, labels, valid, stats, entropy = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dtype = stats.dtype
        acc_dtype = weight_grad_dtype(weight)
        grad_h, _ = grad_buffers(hidden, weight, need_h, False)
        grad_w = None  # written by the first chunk
        g_logprob = torch.zeros(hidden.shape[0], dtype=dtype, device=hidden.device) if g_logprob is None \
            else g_logprob.to(dtype)
        use_entropy = ctx.with_entropy and g_entropy is not None
        kept, ctx.kept = ctx.kept, None
        kept_logits, workspace = kept if kept is not None else (None, columns.Workspace())
        chunks = balanced_chunks(valid, ctx.chunk)
        starts = _chunk_starts(chunks)
        for i in reversed(range(len(chunks))):
            rows, start, k = chunks[i], starts[i], chunks[i].numel()
            logits = workspace.logits(0, weight, hidden[rows]) if kept_logits is None else kept_logits
            kept_logits = None
            grad = columns.label_logprobs_grad_(logits, labels[rows], stats[0, start:start + k],
                                                stats[1, start:start + k], g_logprob[rows],
                                                entropy[rows] if use_entropy else None,
                                                g_entropy[rows].to(dtype) if use_entropy else None)
            if grad_h is not None:
                grad_h[rows] = (weight.T.to(dtype) @ grad).T.to(hidden.dtype)
            if need_w:
                h = hidden[rows].to(acc_dtype)
                if grad_w is None:  # the first chunk writes dW: no zero-filled [V, H] to read back
                    grad_w = torch.mm(grad.to(acc_dtype), h)
                else:
                    grad_w.addmm_(grad.to(acc_dtype), h)
        workspace.release()
        if need_w and grad_w is None:  # every position ignored
            grad_w = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device)
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None, None, None


def token_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, *, ignore_index: int = -100,
                   with_entropy: bool = False, chunk_size: int | None = None):
    """Per-token ``log softmax(hidden @ weight.T)[label]`` ``[...]`` (0 where ignored); with entropy if asked.

    Args:
        hidden: ``[..., H]`` final hidden states; weight: ``[V, H]`` lm_head (no bias).
        labels: ``[...]`` int target ids in ``[0, V)`` or ``ignore_index``.
        chunk_size: tokens per chunk (default: a budget for the chunk's logits, 1 GiB on CUDA and
            128 MiB on CPU; DISTILLZOO_CHUNK_BYTES overrides it, as for from_hidden).
    Returns:
        ``logprobs`` (fp32; float64 for float64 inputs), or ``(logprobs, entropy)``.
    """
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ParameterError(f"token_logprobs: hidden has shape {tuple(hidden.shape)} and weight has shape "
                             f"{tuple(weight.shape)}; expected weight [vocab, {hidden.shape[-1]}]")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ParameterError(f"token_logprobs: labels has shape {tuple(labels.shape)} but hidden has leading "
                             f"shape {tuple(hidden.shape[:-1])}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ParameterError(f"token_logprobs: labels must be an integer tensor, got {labels.dtype}")
    lead = tuple(hidden.shape[:-1])
    flat = labels.reshape(-1).long()
    valid = (flat != ignore_index).nonzero().squeeze(1)
    picked = flat[valid]
    vocab = weight.shape[0]
    if picked.numel() and (int(picked.min()) < 0 or int(picked.max()) >= vocab):
        bad = picked[(picked < 0) | (picked >= vocab)][0].item()
        raise ParameterError(f"token_logprobs: label {bad} is outside the vocab [0, {vocab}); positions without "
                             "a target must hold ignore_index")
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    if backend_for(hidden) == "torch":
        # one [V, c] buffer is live (the elementwise work runs on small row blocks of it): c about 270 at
        # Qwen's vocab, where the recomputed GEMMs run at full speed
        chunk = chunk_size or auto_chunk_rows(vocab, bytes_per_entry=vocab_chunked.compute_dtype(hidden.dtype).itemsize,
                                              cpu=True)
        if chunk < 1:
            raise ParameterError(f"token_logprobs: chunk_size must be >= 1, got {chunk}")
        logprob, entropy = _ColumnTokenLogProbs.apply(flat_hidden, weight, flat, valid, chunk, with_entropy)
    else:
        chunk = _chunk_rows(vocab, hidden.element_size(), chunk_size)
        logprob, entropy = _TokenLogProbs.apply(flat_hidden, weight, flat, valid, chunk)
    if with_entropy:
        return logprob.view(lead), entropy.view(lead)
    return logprob.view(lead)
