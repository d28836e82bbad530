"""Objective base classes: what a distillation loss implements, and what the base owns.

A logit-level objective implements one method, :meth:`LogitObjective.token_loss`,
on a chunk of rows: per-token loss from the student's and the teacher's
log-probabilities. The base class owns everything around it:

* flattening leading dims, and the ``ignore_index`` mask (ignored rows are never
  computed, so an all-ignored batch gives loss 0 and zero gradients, never NaN);
* temperature (``softmax(z / tau)`` on both sides) and the ``tau**2`` factor;
* teacher/student vocab mismatch: the divergence is taken over the first
  ``vocab_size`` entries (default: the smaller vocab), as if the rest were -inf;
* reductions: ``mean`` over valid tokens, ``sum``, ``none`` (per token, 0 where ignored);
* :meth:`LogitObjective.from_hidden`, the fused path from final hidden states and
  lm_head weights that never holds a [tokens, vocab] tensor.
"""

from __future__ import annotations

import math
import os
from typing import ClassVar, Sequence

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .errors import ParameterError

REDUCTIONS = ("mean", "sum", "none")
# Budget for the fp32 [chunk, vocab] temporaries of one fused chunk (logits of both
# models, log-probs, gradient). Overridable per call (chunk_size=) or by environment.
DEFAULT_CHUNK_BYTES = 1 << 30
_TEMPORARIES_PER_ROW = 8  # fp32 [vocab] rows live at once per token in a chunk


class Objective(torch.nn.Module):
    """Root of every distillzoo objective. ``name`` is the catalogue name."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""


class LogitObjective(Objective):
    """A divergence between teacher and student next-token distributions.

    Subclasses implement :meth:`token_loss`. Call the objective with logits
    (``loss_fn(student_logits [N, Vs], teacher_logits [N, Vt], labels [N])``) or
    with hidden states through :meth:`from_hidden`. Leading dims are flattened:
    logits may be ``[B, T, V]`` with labels ``[B, T]``.
    """

    kind: ClassVar[str] = "logit"

    def __init__(
        self,
        *,
        temperature: float = 1.0,
        scale_by_temperature_squared: bool = True,
        ignore_index: int = -100,
        reduction: str = "mean",
        vocab_size: int | None = None,
    ) -> None:
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ParameterError(f"{type(self).__name__}: reduction {reduction!r} is not one of {list(REDUCTIONS)}")
        self.temperature = float(temperature)
        self.scale_by_temperature_squared = bool(scale_by_temperature_squared)
        self.ignore_index = int(ignore_index)
        self.reduction = reduction
        self.vocab_size = vocab_size

    # ------------------------------------------------------------------ the one method
    def token_loss(self, student_logprobs: Tensor, teacher_logprobs: Tensor, labels: Tensor) -> Tensor:
        """Per-token loss of ``n`` valid rows.

        Args:
            student_logprobs: ``[n, V]`` fp32 (float64 for float64 inputs),
                ``log softmax(z_s / tau)`` over the shared vocab.
            teacher_logprobs: ``[n, V]`` fp32, ``log softmax(z_t / tau)``; may hold -inf.
            labels: ``[n]`` int, the target ids of these rows (never ``ignore_index``).
        Returns:
            ``[n]`` in the dtype of the log-probs, before the ``tau**2`` factor.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement token_loss")

    # ------------------------------------------------------------------ shared machinery
    def chunk_loss(self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor) -> Tensor:
        """Per-token loss ``[n]`` of valid rows given raw logits (any float dtype, full widths)."""
        vocab = self.shared_vocab(student_logits.shape[-1], teacher_logits.shape[-1])
        tau = self.temperature
        # fp32 accumulation for fp32/bf16/fp16 inputs; float64 stays float64 (gradcheck).
        dtype = torch.promote_types(student_logits.dtype, torch.float32)
        student = torch.log_softmax(student_logits[:, :vocab].to(dtype) / tau, dim=-1)
        teacher = torch.log_softmax(teacher_logits[:, :vocab].to(dtype) / tau, dim=-1)
        loss = self.token_loss(student, teacher, labels)
        if self.scale_by_temperature_squared and tau != 1.0:
            loss = loss * (tau * tau)
        return loss

    def shared_vocab(self, student_vocab: int, teacher_vocab: int) -> int:
        """The number of leading vocab entries the divergence is taken over."""
        if self.vocab_size is None:
            return min(student_vocab, teacher_vocab)
        if self.vocab_size > min(student_vocab, teacher_vocab):
            raise ParameterError(
                f"{self.name or type(self).__name__}: vocab_size={self.vocab_size} exceeds the student vocab "
                f"({student_vocab}) or the teacher vocab ({teacher_vocab})"
            )
        return self.vocab_size

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None) -> Tensor:
        """Loss from logits ``[..., Vs]`` and ``[..., Vt]`` with labels ``[...]`` (fp32 result, float64 for float64)."""
        lead = tuple(student_logits.shape[:-1])
        _check_lead("student_logits", student_logits, "teacher_logits", teacher_logits)
        labels = self._labels(labels, lead, student_logits.device, "student_logits")
        student = student_logits.reshape(-1, student_logits.shape[-1])
        teacher = teacher_logits.reshape(-1, teacher_logits.shape[-1]).detach()
        valid = self._valid_rows(labels)
        per_token = self.chunk_loss(student[valid], teacher[valid], labels[valid])
        return self._reduce(per_token, valid, labels.numel(), lead)

    def from_hidden(
        self,
        student_hidden: Tensor,
        student_weight: Tensor,
        teacher_hidden: Tensor,
        teacher_weight: Tensor,
        labels: Tensor | None = None,
        *,
        chunk_size: int | None = None,
    ) -> Tensor:
        """Loss from final hidden states and lm_head weights, never holding [N, V].

        Args:
            student_hidden: ``[..., Hs]``; student_weight: ``[Vs, Hs]`` (lm_head, no bias).
            teacher_hidden: ``[..., Ht]``; teacher_weight: ``[Vt, Ht]``. Ht may differ from Hs.
            labels: ``[...]`` matching the hidden states' leading dims.
            chunk_size: tokens per chunk; default from a 1 GiB budget
                (``DISTILLZOO_CHUNK_BYTES`` overrides) for the fp32 [chunk, V] temporaries.

        Gradients flow to the student hidden states and weight; the teacher is treated
        as constant. With ``mean``/``sum`` the gradients are computed chunk by chunk in
        the forward pass (dW accumulated in fp32); with ``none`` each chunk is
        recomputed in the backward pass.
        """
        _check_weight("student", student_hidden, student_weight)
        _check_weight("teacher", teacher_hidden, teacher_weight)
        _check_lead("student_hidden", student_hidden, "teacher_hidden", teacher_hidden)
        lead = tuple(student_hidden.shape[:-1])
        labels = self._labels(labels, lead, student_hidden.device, "student_hidden")
        vocab = self.shared_vocab(student_weight.shape[0], teacher_weight.shape[0])
        hs = student_hidden.reshape(-1, student_hidden.shape[-1])
        ht = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).detach()
        ws, wt = student_weight[:vocab], teacher_weight[:vocab].detach()
        valid = self._valid_rows(labels)
        chunk = chunk_size or auto_chunk_rows(vocab)
        if chunk < 1:
            raise ParameterError(f"from_hidden: chunk_size must be >= 1, got {chunk}")
        if self.reduction == "none":
            parts = [
                checkpoint(self._hidden_chunk_loss, hs[rows], ws, ht[rows], wt, labels[rows], use_reentrant=False)
                for rows in valid.split(chunk)
            ]
            per_token = torch.cat(parts) if parts else hs.new_zeros(0, dtype=torch.promote_types(hs.dtype, torch.float32))
            return self._reduce(per_token, valid, labels.numel(), lead)
        scale = 1.0 / max(valid.numel(), 1) if self.reduction == "mean" else 1.0
        need_grad = torch.is_grad_enabled() and (hs.requires_grad or ws.requires_grad)
        return _FusedLinearLoss.apply(self, hs, ws, ht, wt, labels, valid, chunk, scale, need_grad)

    def _hidden_chunk_loss(self, hs: Tensor, ws: Tensor, ht: Tensor, wt: Tensor, labels: Tensor) -> Tensor:
        return self.chunk_loss(hs @ ws.T, ht @ wt.T, labels)

    def _labels(self, labels: Tensor | None, lead: tuple, device: torch.device, against: str) -> Tensor:
        if labels is None:
            return torch.zeros(math.prod(lead), dtype=torch.long, device=device)
        if tuple(labels.shape) != lead:
            raise ParameterError(
                f"{self.name or type(self).__name__}: labels has shape {tuple(labels.shape)} but {against} has "
                f"leading shape {lead}; they must match"
            )
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ParameterError(f"{self.name or type(self).__name__}: labels must be an integer tensor, got {labels.dtype}")
        return labels.reshape(-1)

    def _valid_rows(self, labels: Tensor) -> Tensor:
        return (labels != self.ignore_index).nonzero().squeeze(1)

    def _reduce(self, per_token: Tensor, valid: Tensor, n_rows: int, lead: tuple) -> Tensor:
        if self.reduction == "sum":
            return per_token.sum()
        if self.reduction == "mean":
            return per_token.sum() / max(valid.numel(), 1)
        full = per_token.new_zeros(n_rows).index_copy(0, valid, per_token)
        return full.view(lead)

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, scale_by_temperature_squared={self.scale_by_temperature_squared}, "
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, vocab_size={self.vocab_size}"
        )


class Mixture(LogitObjective):
    """A weighted sum of logit objectives, e.g. ``0.5 * fkl + 0.5 * rkl``.

    The terms share one pass over the logits (and one lm_head matmul per chunk in
    :meth:`from_hidden`). They must agree on ``ignore_index``, ``reduction`` and
    ``vocab_size``; each keeps its own temperature.
    """

    name = "mixture"

    def __init__(self, terms: Sequence[tuple[float, LogitObjective]]) -> None:
        if not terms:
            raise ParameterError("Mixture needs at least one (weight, objective) term")
        for weight, term in terms:
            if not isinstance(term, LogitObjective):
                raise ParameterError(f"Mixture terms must be logit objectives; {term.name!r} is {term.kind!r}")
            if not math.isfinite(weight):
                raise ParameterError(f"Mixture weight of {term.name!r} must be finite, got {weight}")
        first = terms[0][1]
        for attr in ("ignore_index", "reduction", "vocab_size"):
            values = {getattr(term, attr) for _, term in terms}
            if len(values) > 1:
                raise ParameterError(
                    f"Mixture terms disagree on {attr}: "
                    + ", ".join(f"{t.name}={getattr(t, attr)!r}" for _, t in terms)
                )
        super().__init__(ignore_index=first.ignore_index, reduction=first.reduction, vocab_size=first.vocab_size)
        self.weights = [float(w) for w, _ in terms]
        self.terms = torch.nn.ModuleList([t for _, t in terms])

    def chunk_loss(self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor) -> Tensor:
        total = None
        for weight, term in zip(self.weights, self.terms):
            part = weight * term.chunk_loss(student_logits, teacher_logits, labels)
            total = part if total is None else total + part
        return total

    def extra_repr(self) -> str:
        return " + ".join(f"{w:g}*{t.name}" for w, t in zip(self.weights, self.terms))


def auto_chunk_rows(vocab: int, budget_bytes: int | None = None) -> int:
    """Tokens per fused chunk so that the fp32 [chunk, vocab] temporaries fit the budget."""
    budget = budget_bytes or int(os.environ.get("DISTILLZOO_CHUNK_BYTES", DEFAULT_CHUNK_BYTES))
    rows = budget // (vocab * 4 * _TEMPORARIES_PER_ROW)
    return max(8, rows - rows % 8)


class _FusedLinearLoss(torch.autograd.Function):
    """Chunked lm_head + loss whose gradients are computed during the forward pass.

    Per chunk of valid rows: logits = h @ W.T for both models, the loss and its
    gradient w.r.t. the student logits (autograd on the chunk alone), then
    dX = dZ @ W and dW += dZ.T @ h. Peak extra memory is O(chunk x V).
    """

    @staticmethod
    def forward(ctx, objective, hs, ws, ht, wt, labels, valid, chunk, scale, need_grad):
        grad_h = torch.zeros_like(hs) if need_grad and hs.requires_grad else None
        acc_dtype = torch.float32 if ws.dtype in (torch.float16, torch.bfloat16) else ws.dtype
        grad_w = torch.zeros(ws.shape, dtype=acc_dtype, device=ws.device) if need_grad and ws.requires_grad else None
        total = torch.zeros((), dtype=torch.promote_types(hs.dtype, torch.float32), device=hs.device)
        for rows in valid.split(chunk):
            h_chunk = hs[rows]
            teacher_logits = ht[rows] @ wt.T
            student_logits = (h_chunk @ ws.T).to(total.dtype)
            if grad_h is None and grad_w is None:
                total += objective.chunk_loss(student_logits, teacher_logits, labels[rows]).sum()
                continue
            student_logits.requires_grad_(True)
            with torch.enable_grad():
                loss = objective.chunk_loss(student_logits, teacher_logits, labels[rows]).sum()
                (d_logits,) = torch.autograd.grad(loss, student_logits)
            total += loss.detach()
            if grad_h is not None:
                grad_h.index_copy_(0, rows, (d_logits.to(ws.dtype) @ ws).to(hs.dtype))
            if grad_w is not None:
                grad_w.addmm_(d_logits.T.to(acc_dtype), h_chunk.to(acc_dtype))
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
        if grad_h is not None:
            grad_h = grad_h * grad_output
        if grad_w is not None:
            grad_w = grad_w * grad_output
        return None, grad_h, grad_w, None, None, None, None, None, None, None


def _check_lead(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    if a.shape[:-1] != b.shape[:-1]:
        raise ParameterError(
            f"{name_a} has shape {tuple(a.shape)} and {name_b} has shape {tuple(b.shape)}: "
            "their leading (token) dims must match"
        )


def _check_weight(side: str, hidden: Tensor, weight: Tensor) -> None:
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ParameterError(
            f"{side}_hidden has shape {tuple(hidden.shape)} and {side}_weight has shape {tuple(weight.shape)}: "
            f"expected {side}_weight [vocab, {hidden.shape[-1]}] (the lm_head weight)"
        )
