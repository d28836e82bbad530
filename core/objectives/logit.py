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
  lm_head weights that never holds a [tokens, vocab] tensor;
* sparse (top-k) teachers, :class:`~distillzoo.objectives.sparse.SparseTeacher`, for objectives that accept them.

Both paths reach an objective through one method, :meth:`LogitObjective.loss_and_grad`:
per-token loss of a block of rows plus d(loss)/d(student logits) added into a
buffer. Its default runs autograd over ``token_loss``; :class:`PointwiseDivergence`
(a sum over the vocab of an elementwise term) replaces it with the vocab-chunked
torch path of ``distillzoo.kernels.vocab_chunked``, whose temporaries are
O(rows x chunk).
"""


from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor

from distillzoo.errors import ParameterError
from distillzoo.kernels import backend as kernel_backend
from distillzoo.kernels import columns
from distillzoo.kernels import vocab_chunked
from distillzoo.kernels.backend import auto_chunk_rows
from distillzoo.objectives.fused import (TEMPORARIES_PER_ROW, ColumnChunks, FusedLinearLoss, FusedLinearPerToken,
                                         LogitLoss, RowChunks)
from distillzoo.objectives.sparse import SparseTeacher

REDUCTIONS = ("mean", "sum", "none")


class Objective(torch.nn.Module):
    """Root of every distillzoo objective. ``name`` is the catalogue name.

    Training progress: an objective that depends on it (TAID's interpolation) sets :attr:`wants_progress`; the
    training loop then calls :meth:`begin_step` before each optimizer step and :meth:`end_step` after it, and
    checkpoints :meth:`progress_state` with the run, so a resumed run continues the same schedule.
    """

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""
    #: the training algorithm ``distillzoo train`` runs it with when a config names none
    default_algorithm: ClassVar[str] = ""
    #: True for an objective that reads the training step (:meth:`begin_step`, :meth:`end_step`)
    wants_progress: ClassVar[bool] = False

    def begin_step(self, step: int, total_steps: int) -> None:
        """Before optimizer step ``step`` (0-based) of ``total_steps``."""

    def end_step(self, losses: dict) -> None:
        """After the step: ``losses`` holds its global mean losses (``loss``, and ``loss/<term>`` of a mixture's
        terms), the same on every rank."""

    def progress_state(self) -> dict:
        """What a checkpoint holds for the schedule to resume exactly (JSON-able floats); default none."""
        return {}

    def load_progress_state(self, state: dict) -> None:
        pass


class LogitObjective(Objective):
    """A divergence between teacher and student next-token distributions.

    Subclasses implement :meth:`token_loss`. Call the objective with logits
    (``loss_fn(student_logits [N, Vs], teacher_logits [N, Vt], labels [N])``) or
    with hidden states through :meth:`from_hidden`. Leading dims are flattened:
    logits may be ``[B, T, V]`` with labels ``[B, T]``.
    """

    kind: ClassVar[str] = "logit"
    default_algorithm: ClassVar[str] = "distill"
    #: False for objectives that use only the student and the labels (ce).
    needs_teacher: ClassVar[bool] = True
    #: True for objectives computed from the two distributions alone, which accept a SparseTeacher.
    accepts_sparse_teacher: ClassVar[bool] = False
    #: The coefficients an objective holds constant in its gradient (a stop-gradient, e.g. AKL's weights);
    #: the conformance kit then checks its gradient against the reference's rather than by gradcheck.
    holds_constant: ClassVar[tuple[str, ...]] = ()

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
    def token_loss(self, student_logprobs: Tensor, teacher_logprobs: Tensor | None, labels: Tensor) -> Tensor:
        """Per-token loss of ``n`` valid rows.

        Args:
            student_logprobs: ``[n, V]`` fp32 (float64 for float64 inputs),
                ``log softmax(z_s / tau)`` over the shared vocab.
            teacher_logprobs: ``[n, V]`` fp32, ``log softmax(z_t / tau)``; may hold -inf.
                None for objectives with ``needs_teacher = False``.
            labels: ``[n]`` int, the target ids of these rows (never ``ignore_index``).
        Returns:
            ``[n]`` in the dtype of the log-probs, before the ``tau**2`` factor.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement token_loss")

    @property
    def loss_scale(self) -> float:
        """The tau^2 factor (1 when switched off or at tau = 1)."""
        tau = self.temperature
        return tau * tau if self.scale_by_temperature_squared and tau != 1.0 else 1.0

    def grad_dtype(self, student_logits: Tensor, teacher: "Tensor | SparseTeacher | None") -> torch.dtype:
        """The dtype of the gradient buffer that :meth:`loss_and_grad` adds into for these inputs.

        fp32 (float64 for float64 logits) by default. Objectives whose Triton kernel
        accumulates in fp32 registers and rounds once at the store return the logits'
        dtype there, which saves the fused path an fp32 ``[chunk, V]`` buffer and a cast.
        """
        return vocab_chunked.compute_dtype(student_logits.dtype)

    def overwrites_grad(self, student_logits: Tensor, teacher: "Tensor | SparseTeacher | None") -> bool:
        """Whether ``loss_and_grad(..., overwrite=True)`` writes every entry of ``grad`` for these inputs.

        Where it does, the fused path hands it an uninitialised buffer: no zero fill, and a
        kernel writes each entry once instead of reading and adding. The built-in Triton
        kernels do; the default (and any objective that does not override this) adds into
        a zeroed buffer.
        """
        return False

    def loss_and_grad(self, student_logits: Tensor, teacher: "Tensor | SparseTeacher | None", labels: Tensor,
                      grad: Tensor | None = None, grad_scale: float = 1.0) -> Tensor:
        """Per-token loss ``[r]`` (tau^2 included) of a block of valid rows; optionally its gradient.

        Args:
            student_logits: ``[r, V]`` raw logits over the compared vocab (any float dtype; a view).
            teacher: ``[r, V]`` raw teacher logits, a :class:`SparseTeacher` of ``r`` rows, or None.
            labels: ``[r]`` target ids.
            grad: if given, an ``[r, V]`` buffer (fp32, float64 for float64 logits, or the dtype
                :meth:`grad_dtype` returns) into which ``grad_scale * d(sum of the loss)/d(student_logits)``
                is added.
        Returns:
            ``[r]`` detached, fp32 (float64 for float64 logits).

        The default takes log-softmaxes of whole rows and runs autograd through
        :meth:`token_loss`, so its temporaries are O(r x V); the callers bound r.
        It is also the definition-level reference that ``DISTILLZOO_BACKEND=reference``
        selects for the built-ins. An objective with its own kernels overrides this
        method and picks the implementation with
        ``distillzoo.kernels.backend.backend_for(student_logits)`` (see the plugins page of the docs).
        """
        if isinstance(teacher, SparseTeacher):
            raise ParameterError(f"{self.name or type(self).__name__} does not accept a sparse teacher")
        dtype = vocab_chunked.compute_dtype(student_logits.dtype)
        tau = self.temperature
        student = student_logits.detach().to(dtype).requires_grad_(grad is not None)
        with torch.set_grad_enabled(grad is not None):
            log_q = torch.log_softmax(student / tau, dim=-1)
            log_p = None if teacher is None else torch.log_softmax(teacher.detach().to(dtype) / tau, dim=-1)
            loss = self.token_loss(log_q, log_p, labels) * self.loss_scale
            if grad is not None:
                (d_student,) = torch.autograd.grad(loss.sum(), student)
                grad.add_(d_student, alpha=grad_scale)
        return loss.detach()

    @classmethod
    def paths(cls) -> dict[str, str]:
        """How an objective of this class is computed on each device (what ``distillzoo show`` prints)."""
        return {"cuda": "row chunks, autograd over token_loss",
                "cpu": "autograd over token_loss on row chunks (from_hidden: of the W @ h.T columns)",
                "sparse teacher": "yes" if cls.accepts_sparse_teacher else "no"}

    #: fp32 ``[V, c]`` buffers :meth:`columns_loss_and_grad` holds at once; the CPU fused path sizes its
    #: chunks from it (the default's copies and whole-row autograd hold about eight)
    columns_buffers: ClassVar[int] = 8

    def columns_loss_and_grad(self, student: Tensor, teacher: Tensor | None, labels: Tensor,
                              want_grad: bool) -> tuple[Tensor, Tensor | None]:
        """The CPU fused path's form of :meth:`loss_and_grad`, on logits in the transposed layout.

        ``student`` and ``teacher`` are ``[V, c]``: one column per token (the layout in which
        a CPU computes the lm_head GEMM fastest, see :mod:`distillzoo.kernels.columns`), fp32
        (float64 for float64 inputs), over the compared vocab. They belong to the caller
        and may be overwritten. Returns the per-token loss ``[c]`` (tau^2 included) and, with
        ``want_grad``, ``d(sum of the loss)/d(student)`` as ``[V, c]`` (it may be one of the
        two buffers). The default goes through :meth:`loss_and_grad` on the rows.
        """
        rows = student.T.contiguous()
        grad = torch.zeros_like(rows) if want_grad else None
        loss = self.loss_and_grad(rows, None if teacher is None else teacher.T.contiguous(), labels, grad)
        return loss, None if grad is None else grad.T

    # ------------------------------------------------------------------ shared machinery
    def shared_vocab(self, student_vocab: int, teacher_vocab: int | None = None) -> int:
        """The number of leading vocab entries the divergence is taken over."""
        widest = student_vocab if teacher_vocab is None else min(student_vocab, teacher_vocab)
        if self.vocab_size is None:
            return widest
        if self.vocab_size > widest:
            raise ParameterError(
                f"{self.name or type(self).__name__}: vocab_size={self.vocab_size} exceeds the student vocab "
                f"({student_vocab})" + ("" if teacher_vocab is None else f" or the teacher vocab ({teacher_vocab})")
            )
        return self.vocab_size

    def forward(self, student_logits: Tensor, teacher_logits: "Tensor | SparseTeacher | None" = None,
                labels: Tensor | None = None) -> Tensor:
        """Loss from logits ``[..., Vs]`` and a teacher with labels ``[...]`` (fp32 result, float64 for float64).

        The teacher is raw logits ``[..., Vt]``, a :class:`SparseTeacher`, or None for
        objectives that need none (ce).
        """
        lead = tuple(student_logits.shape[:-1])
        teacher = self._teacher(teacher_logits, "teacher_logits", "student_logits", student_logits)
        labels = self._labels(labels, lead, student_logits.device, "student_logits")
        student = student_logits.reshape(-1, student_logits.shape[-1])
        vocab, teacher = self._compared_vocab(student.shape[-1], teacher)
        valid = self._valid_rows(labels, vocab)
        need_grad = torch.is_grad_enabled() and student.requires_grad
        if self.reduction == "none":
            per_token = LogitLoss.apply(self, student, teacher, labels, valid, vocab, need_grad, None)
            return self._reduce(per_token, valid, labels.numel(), lead)
        scale = 1.0 / max(valid.numel(), 1) if self.reduction == "mean" else 1.0
        return LogitLoss.apply(self, student, teacher, labels, valid, vocab, need_grad, scale)

    def from_hidden(
        self,
        student_hidden: Tensor,
        student_weight: Tensor,
        teacher_hidden: "Tensor | SparseTeacher | None" = None,
        teacher_weight: Tensor | None = None,
        labels: Tensor | None = None,
        *,
        chunk_size: int | None = None,
    ) -> Tensor:
        """Loss from final hidden states and lm_head weights, never holding [N, V].

        Args:
            student_hidden: ``[..., Hs]``; student_weight: ``[Vs, Hs]`` (lm_head, no bias).
            teacher_hidden: ``[..., Ht]`` with teacher_weight ``[Vt, Ht]`` (Ht may differ
                from Hs); or a :class:`SparseTeacher` with teacher_weight None; or None
                for objectives that need no teacher.
            labels: ``[...]`` matching the hidden states' leading dims.
            chunk_size: tokens per chunk; default from a budget (1 GiB on CUDA, 128 MiB on CPU;
                ``DISTILLZOO_CHUNK_BYTES`` overrides) for the fp32 [chunk, V] temporaries.

        Gradients flow to the student hidden states and weight; the teacher is treated
        as constant. With ``mean``/``sum`` the gradients are computed chunk by chunk in
        the forward pass (dW accumulated in fp32); with ``none`` each chunk is
        recomputed in the backward pass, scaled by its tokens' incoming gradients.
        """
        _check_weight("student", student_hidden, student_weight)
        lead = tuple(student_hidden.shape[:-1])
        if isinstance(teacher_hidden, Tensor):
            if teacher_weight is None:
                raise ParameterError("from_hidden: teacher_hidden is a tensor but teacher_weight is None; pass the "
                                     "teacher's lm_head weight, or a SparseTeacher as teacher_hidden")
            _check_weight("teacher", teacher_hidden, teacher_weight)
        elif teacher_weight is not None:
            raise ParameterError("from_hidden: teacher_weight is given but teacher_hidden is "
                                 f"{type(teacher_hidden).__name__}; pass teacher hidden states with it")
        teacher = self._teacher(teacher_hidden, "teacher_hidden", "student_hidden", student_hidden)
        labels = self._labels(labels, lead, student_hidden.device, "student_hidden")
        teacher_vocab = teacher_weight.shape[0] if isinstance(teacher, Tensor) else None
        vocab, teacher = self._compared_vocab(student_weight.shape[0], teacher, teacher_vocab)
        hs = student_hidden.reshape(-1, student_hidden.shape[-1])
        # a slice of the whole weight would cost a [V, H] zero-fill and copy in its backward (and a clone
        # of dW where autograd cannot hand the buffer over): slice only when the vocab is cut
        ws = student_weight if vocab == student_weight.shape[0] else student_weight[:vocab]
        wt = teacher_weight[:vocab].detach() if isinstance(teacher, Tensor) else None
        valid = self._valid_rows(labels, vocab)
        backend = kernel_backend.backend_for(hs)
        if backend == "torch" and not isinstance(teacher, SparseTeacher):
            chunks = ColumnChunks(self, hs, ws, teacher, wt, labels)
            itemsize = vocab_chunked.compute_dtype(hs.dtype).itemsize
            chunk = chunk_size or auto_chunk_rows(vocab, bytes_per_entry=itemsize * self.columns_buffers, cpu=True)
        else:
            chunks = RowChunks(self, hs, ws, teacher, wt, labels)
            per_entry = 4 * TEMPORARIES_PER_ROW
            if backend == "triton":
                per_entry = 2 * hs.element_size() + 4  # the chunk's two logits and (at most fp32) gradient
            chunk = chunk_size or auto_chunk_rows(vocab, bytes_per_entry=per_entry)
        if chunk < 1:
            raise ParameterError(f"from_hidden: chunk_size must be >= 1, got {chunk}")
        if self.reduction == "none":
            per_token = FusedLinearPerToken.apply(chunks, hs, ws, valid, chunk)
            return self._reduce(per_token, valid, labels.numel(), lead)
        scale = 1.0 / max(valid.numel(), 1) if self.reduction == "mean" else 1.0
        need_grad = torch.is_grad_enabled() and (hs.requires_grad or ws.requires_grad)
        return FusedLinearLoss.apply(chunks, hs, ws, valid, chunk, scale, need_grad)

    def _teacher(self, teacher, what: str, against: str, reference: Tensor):
        """The teacher flattened to rows: [N, Vt] detached, a flat SparseTeacher, or None."""
        name = self.name or type(self).__name__
        if not self.needs_teacher:
            return None  # ce and the like: a teacher given anyway is ignored
        if teacher is None:
            raise ParameterError(f"{name} needs a teacher: {what} is None")
        if isinstance(teacher, SparseTeacher):
            if not self.accepts_sparse_teacher:
                raise ParameterError(f"{name} does not accept a sparse (top-k) teacher; it needs the full "
                                     f"teacher distribution ({what} as a tensor)")
            if tuple(teacher.shape[:-1]) != tuple(reference.shape[:-1]):
                raise ParameterError(f"{against} has shape {tuple(reference.shape)} and the sparse teacher's ids "
                                     f"have shape {tuple(teacher.shape)}: their leading (token) dims must match")
            return teacher
        if not isinstance(teacher, Tensor):
            raise ParameterError(f"{name}: {what} must be a tensor, a SparseTeacher or None, got {type(teacher).__name__}")
        _check_lead(against, reference, what, teacher)
        return teacher.reshape(-1, teacher.shape[-1]).detach()

    def _compared_vocab(self, student_vocab: int, teacher, teacher_vocab: int | None = None):
        if isinstance(teacher, Tensor):
            return self.shared_vocab(student_vocab, teacher_vocab or teacher.shape[-1]), teacher
        vocab = self.shared_vocab(student_vocab)
        if isinstance(teacher, SparseTeacher):
            teacher = teacher.validate(vocab, self.name or type(self).__name__)
        return vocab, teacher

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

    def _valid_rows(self, labels: Tensor, vocab: int) -> Tensor:
        """The rows scored: labels other than ignore_index, each of which must be an id in ``[0, vocab)``."""
        valid = (labels != self.ignore_index).nonzero().squeeze(1)
        picked = labels[valid]
        if picked.numel() and (int(picked.min()) < 0 or int(picked.max()) >= vocab):
            i = int(((picked < 0) | (picked >= vocab)).nonzero()[0])
            raise ParameterError(f"{self.name or type(self).__name__}: label {int(picked[i])} is outside the compared "
                                 f"vocab [0, {vocab}) at row {int(valid[i])}, and is not ignore_index "
                                 f"({self.ignore_index}); it would be scored as a token")
        return valid

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


class PointwiseDivergence(LogitObjective):
    """A divergence that is a sum over the vocab of an elementwise term, ``D = sum_v f(log p_v, log q_v)``.

    Subclasses implement :meth:`pointwise`, which returns ``f`` and its partial
    derivative w.r.t. ``log q``. In exchange they get the vocab-chunked path
    (temporaries O(rows x chunk), the gradient written once, no autograd graph)
    and sparse (top-k) teachers: the same ``f`` summed over the k kept ids and
    one tail bucket.
    """

    accepts_sparse_teacher: ClassVar[bool] = True
    #: The built-in Triton kernel of this ``f`` (a key of ``distillzoo.kernels.divergence.KINDS``), or None.
    #: Honoured only on the class that also defines ``pointwise``: a subclass that overrides
    #: ``pointwise`` without naming a kernel takes the chunked torch path.
    triton_kind: ClassVar[str | None] = None
    #: The attribute holding the kernel's mixture weight (jsd's ``beta``, skl/srkl's ``alpha``; abkd's pair of
    #: exponents).
    triton_weight: ClassVar[str | None] = None

    def pointwise(self, log_p: Tensor, log_q: Tensor) -> tuple[Tensor, Tensor]:
        """Elementwise ``f(log p, log q)`` and ``df/d(log q)``, same shape as the inputs.

        Entries with zero mass on the weighting side must give 0 (``0 * log 0 = 0``), not NaN.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement pointwise")

    def token_loss(self, student_logprobs: Tensor, teacher_logprobs: Tensor, labels: Tensor) -> Tensor:
        return self.pointwise(teacher_logprobs, student_logprobs)[0].sum(-1)

    @classmethod
    def _kernel_kind(cls) -> str | None:
        for klass in cls.__mro__:
            if "pointwise" in vars(klass):
                return vars(klass).get("triton_kind")
        return None

    def _backend(self, student_logits: Tensor, teacher) -> str:
        """triton (a built-in kernel exists), reference, or torch (also every sparse teacher)."""
        if isinstance(teacher, SparseTeacher):
            return "torch"
        backend = kernel_backend.backend_for(student_logits)
        if backend == "triton" and self._kernel_kind() is None:
            return "torch"
        return backend

    def grad_dtype(self, student_logits, teacher):
        if self._backend(student_logits, teacher) == "triton":
            return student_logits.dtype
        return super().grad_dtype(student_logits, teacher)

    columns_buffers: ClassVar[int] = 3  # the student's logits, the teacher's, and a block's temporaries

    @classmethod
    def paths(cls) -> dict[str, str]:
        kind = cls._kernel_kind()
        own_columns = cls.columns_terms is not PointwiseDivergence.columns_terms
        return {"cuda": f"the Triton kernel {kind!r}" if kind else
                "vocab-chunked torch over its pointwise terms (no [N, V] autograd graph)",
                "cpu": "vocab-chunked torch; from_hidden: the column path (W @ h.T), "
                       + ("its own column form" if own_columns else "over its pointwise terms"),
                "sparse teacher": "yes (the kept ids and one tail bucket)"}

    def columns_loss_and_grad(self, student, teacher, labels, want_grad):
        loss, grad = self.columns_terms(student, teacher, want_grad)
        scale = self.loss_scale
        if grad is not None and scale != 1.0:
            grad.mul_(scale)
        return loss * scale, grad

    def columns_terms(self, student: Tensor, teacher: Tensor, want_grad: bool):
        """``(sum_v term [c], d/d(raw student logits) [V, c] or None)`` at unit scale on the column layout:
        :func:`~distillzoo.kernels.columns.pointwise` over :meth:`pointwise`; a divergence with a
        specialised column form overrides this."""
        return columns.pointwise(self.pointwise, student, teacher, self.temperature, want_grad)

    def overwrites_grad(self, student_logits, teacher):
        # a subclass with its own loss_and_grad keeps the adding contract it was written for
        own = type(self).loss_and_grad is PointwiseDivergence.loss_and_grad
        return own and self._backend(student_logits, teacher) == "triton"

    def loss_and_grad(self, student_logits: Tensor, teacher: "Tensor | SparseTeacher", labels: Tensor,
                      grad: Tensor | None = None, grad_scale: float = 1.0, overwrite: bool = False) -> Tensor:
        scale = self.loss_scale
        backend = self._backend(student_logits, teacher)
        if backend == "triton":
            kernels = kernel_backend.kernel_module("divergence")
            value = getattr(self, self.triton_weight) if self.triton_weight else 0.0
            weight = tuple(map(float, value)) if isinstance(value, tuple) else float(value)
            loss = kernels.loss_and_grad(self._kernel_kind(), student_logits, teacher, self.temperature, grad,
                                         grad_scale * scale, weight, accumulate=not overwrite)
            return loss * scale
        if overwrite and grad is not None:
            grad.zero_()  # the other paths add
        if backend == "reference":
            return super().loss_and_grad(student_logits, teacher, labels, grad, grad_scale)
        if isinstance(teacher, SparseTeacher):
            loss = vocab_chunked.sparse_pointwise_loss_and_grad(
                self.pointwise, student_logits, teacher.ids, teacher.logprobs, teacher.tail_logprob,
                self.temperature, grad, grad_scale * scale)
        else:
            loss = vocab_chunked.pointwise_loss_and_grad(
                self.pointwise, student_logits, teacher, self.temperature, grad, grad_scale * scale)
        return loss * scale


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
