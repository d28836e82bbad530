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
* sparse (top-k) teachers, :class:`SparseTeacher`, for objectives that accept them.

Both paths reach an objective through one method, :meth:`LogitObjective.loss_and_grad`:
per-token loss of a block of rows plus d(loss)/d(student logits) added into a
buffer. Its default runs autograd over ``token_loss``; :class:`PointwiseDivergence`
(a sum over the vocab of an elementwise term) replaces it with the vocab-chunked
torch path of ``distillzoo.kernels.vocab_chunked``, whose temporaries are
O(rows x chunk).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch
from torch import Tensor

from .errors import NonFiniteError, ParameterError
from .kernels import backend as kernel_backend
from .kernels import columns
from .kernels import vocab_chunked
from .kernels.backend import auto_chunk_rows

REDUCTIONS = ("mean", "sum", "none")
# fp32 [vocab] rows live at once per token of a chunk on the torch path (logits of both
# models, log-probs, gradient); the chunk budget itself is kernel_backend.DEFAULT_CHUNK_BYTES
# (DEFAULT_CPU_CHUNK_BYTES for the CPU's column path, which sizes by LogitObjective.columns_buffers).
_TEMPORARIES_PER_ROW = 8


@dataclass(frozen=True)
class SparseTeacher:
    """A top-k teacher, as an offline teacher cache stores it.

    Args:
        ids: ``[..., k]`` int, the kept vocab ids of each token (distinct, in ``[0, vocab)``).
        logprobs: ``[..., k]`` float, ``log p`` at those ids **of the full softmax**
            at the objective's temperature (never renormalised over the top k).
        tail_logprob: ``[...]``, log of the teacher mass outside the ids. Default:
            ``log(1 - sum exp(logprobs))`` (0 mass when that sum rounds to >= 1);
            a cache should store it, since it is exact only when computed from the
            full logits.

    The divergence is taken between the (k + 1)-bucket distributions of teacher and
    student: the k ids plus one tail bucket on both sides. With k equal to the vocab
    the tail is empty and the result is the dense divergence.
    """

    ids: Tensor
    logprobs: Tensor
    tail_logprob: Tensor | None = None

    def __post_init__(self) -> None:
        if self.ids.dtype.is_floating_point or self.ids.dtype == torch.bool:
            raise ParameterError(f"SparseTeacher: ids must be an integer tensor, got {self.ids.dtype}")
        if not self.logprobs.dtype.is_floating_point:
            raise ParameterError(f"SparseTeacher: logprobs must be a float tensor, got {self.logprobs.dtype}")
        if self.ids.dim() < 1 or self.ids.shape != self.logprobs.shape:
            raise ParameterError(
                f"SparseTeacher: ids has shape {tuple(self.ids.shape)} and logprobs has shape "
                f"{tuple(self.logprobs.shape)}; they must match, [..., k]"
            )
        if self.tail_logprob is not None and tuple(self.tail_logprob.shape) != tuple(self.ids.shape[:-1]):
            raise ParameterError(
                f"SparseTeacher: tail_logprob has shape {tuple(self.tail_logprob.shape)} but ids has shape "
                f"{tuple(self.ids.shape)}; expected {tuple(self.ids.shape[:-1])}"
            )

    @property
    def k(self) -> int:
        return self.ids.shape[-1]

    @property
    def shape(self) -> torch.Size:
        return self.ids.shape

    def flatten(self) -> "SparseTeacher":
        """Rows ``[N, k]`` (leading dims flattened), the tail filled in, detached."""
        ids = self.ids.reshape(-1, self.k).long()
        logprobs = self.logprobs.reshape(-1, self.k).detach()
        if self.tail_logprob is None:
            total = torch.logsumexp(logprobs.to(vocab_chunked.compute_dtype(logprobs.dtype)), dim=-1).clamp(max=0.0)
            tail = torch.log(-torch.expm1(total))
        else:
            tail = self.tail_logprob.reshape(-1).detach()
        return SparseTeacher(ids, logprobs, tail)

    def select(self, rows: Tensor | slice) -> "SparseTeacher":
        tail = None if self.tail_logprob is None else self.tail_logprob[rows]
        return SparseTeacher(self.ids[rows], self.logprobs[rows], tail)

    def validate(self, vocab: int, where: str) -> "SparseTeacher":
        """Flattened, checked against the compared vocab; with k == vocab the tail is empty."""
        flat = self.flatten()
        if self.k > vocab:
            raise ParameterError(f"{where}: the sparse teacher keeps k={self.k} ids per token but the compared vocab has "
                                 f"only {vocab} entries; k must be <= vocab")
        if flat.ids.numel():
            low, high = int(flat.ids.min()), int(flat.ids.max())
            if low < 0 or high >= vocab:
                raise ParameterError(f"{where}: sparse teacher ids must be in [0, {vocab}) (the compared vocab); "
                                     f"found {low if low < 0 else high}")
            ordered = flat.ids.sort(dim=-1).values
            repeated = (ordered[:, 1:] == ordered[:, :-1]).any(dim=-1).nonzero()
            if repeated.numel():
                row = int(repeated[0])
                raise ParameterError(f"{where}: sparse teacher ids repeat within token {row} "
                                     f"({ordered[row].tolist()[:16]}...); each kept id must be distinct")
        lp, tail = flat.logprobs, flat.tail_logprob
        bad = lp.isnan().any(-1) | (lp == torch.inf).any(-1) | tail.isnan() | (tail == torch.inf) \
            | ((lp == -torch.inf).all(-1) & (tail == -torch.inf))
        if bool(bad.any()):
            row = int(bad.nonzero()[0])
            raise NonFiniteError(f"{where}: the sparse teacher at row {row} is not a distribution (log-probs "
                                 f"{lp[row, :4].tolist()}..., tail {float(tail[row])}): NaN, +inf, or no mass at all",
                                 row)
        if self.k == vocab:
            return SparseTeacher(flat.ids, flat.logprobs, torch.full_like(flat.tail_logprob, -torch.inf))
        return flat



class Objective(torch.nn.Module):
    """Root of every distillzoo objective. ``name`` is the catalogue name."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""
    #: the training algorithm ``distillzoo train`` runs it with when a config names none
    default_algorithm: ClassVar[str] = ""


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
            grad: if given, an ``[r, V]`` buffer (fp32, float64 for float64 logits) into which
                ``grad_scale * d(sum of the loss)/d(student_logits)`` is added.
            grad may also be in the dtype :meth:`grad_dtype` returns.
        Returns:
            ``[r]`` detached, fp32 (float64 for float64 logits).

        The default takes log-softmaxes of whole rows and runs autograd through
        :meth:`token_loss`, so its temporaries are O(r x V); the callers bound r.
        It is also the definition-level reference that ``DISTILLZOO_BACKEND=reference``
        selects for the built-ins. An objective with its own kernels overrides this
        method and picks the implementation with
        ``distillzoo.kernels.backend.backend_for(student_logits)`` (see the README).
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
            per_token = _LogitLoss.apply(self, student, teacher, labels, valid, vocab, need_grad, None)
            return self._reduce(per_token, valid, labels.numel(), lead)
        scale = 1.0 / max(valid.numel(), 1) if self.reduction == "mean" else 1.0
        return _LogitLoss.apply(self, student, teacher, labels, valid, vocab, need_grad, scale)

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
            chunks = _ColumnChunks(self, hs, ws, teacher, wt, labels)
            itemsize = vocab_chunked.compute_dtype(hs.dtype).itemsize
            chunk = chunk_size or auto_chunk_rows(vocab, bytes_per_entry=itemsize * self.columns_buffers, cpu=True)
        else:
            chunks = _RowChunks(self, hs, ws, teacher, wt, labels)
            per_entry = 4 * _TEMPORARIES_PER_ROW
            if backend == "triton":
                per_entry = 2 * hs.element_size() + 4  # the chunk's two logits and (at most fp32) gradient
            chunk = chunk_size or auto_chunk_rows(vocab, bytes_per_entry=per_entry)
        if chunk < 1:
            raise ParameterError(f"from_hidden: chunk_size must be >= 1, got {chunk}")
        if self.reduction == "none":
            per_token = _FusedLinearPerToken.apply(chunks, hs, ws, valid, chunk)
            return self._reduce(per_token, valid, labels.numel(), lead)
        scale = 1.0 / max(valid.numel(), 1) if self.reduction == "mean" else 1.0
        need_grad = torch.is_grad_enabled() and (hs.requires_grad or ws.requires_grad)
        return _FusedLinearLoss.apply(chunks, hs, ws, valid, chunk, scale, need_grad)

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
    #: The attribute holding the kernel's mixture weight (jsd's ``beta``, skl/srkl's ``alpha``).
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
            weight = float(getattr(self, self.triton_weight)) if self.triton_weight else 0.0
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


class Mixture(LogitObjective):
    """A weighted sum of logit objectives, e.g. ``0.5 * ce + 0.5 * fkl``.

    The terms share one pass over the rows (and one lm_head matmul per chunk in
    :meth:`from_hidden`), adding their gradients into one buffer. They must agree
    on ``ignore_index``, ``reduction`` and ``vocab_size``; each keeps its own
    temperature. After each call, :attr:`term_losses` holds every term's own
    (unweighted, tau^2 included) loss averaged over the valid tokens, keyed by
    name (``fkl``, ``fkl#2`` for a repeated name), for logging.
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
        self.needs_teacher = any(t.needs_teacher for t in self.terms)
        self.accepts_sparse_teacher = all(t.accepts_sparse_teacher or not t.needs_teacher for t in self.terms)
        self.term_names = _term_names([t.name for t in self.terms])
        self.term_losses: dict[str, Tensor] = {}
        self._sums: list[Tensor | float] = []

    def overwrites_grad(self, student_logits, teacher):
        first = self.terms[0]
        return first.overwrites_grad(student_logits, teacher if first.needs_teacher else None)

    def loss_and_grad(self, student_logits, teacher, labels, grad=None, grad_scale=1.0, overwrite=False):
        total = None
        for i, (weight, term) in enumerate(zip(self.weights, self.terms)):
            # the first term writes the buffer where it can (overwrite), the others add into it
            first_writes = {"overwrite": True} if overwrite and i == 0 else {}
            part = term.loss_and_grad(student_logits, teacher if term.needs_teacher else None, labels,
                                      grad, grad_scale * weight, **first_writes)
            if i < len(self._sums):
                self._sums[i] = self._sums[i] + part.sum()
            total = weight * part if total is None else total + weight * part
        return total

    @property
    def columns_buffers(self) -> int:
        """The caller's two buffers, a copy for every term but the last, the gradient's sum, a block's temporaries."""
        return 2 + sum(1 + t.needs_teacher for t in list(self.terms)[:-1]) + 2

    def columns_loss_and_grad(self, student, teacher, labels, want_grad):
        total = grad = None
        last = len(self.terms) - 1
        for i, (weight, term) in enumerate(zip(self.weights, self.terms)):
            # each term overwrites what it is given: the last one takes the caller's buffers, the others copies
            s = student if i == last else student.clone()
            t = None if not term.needs_teacher else teacher if i == last else teacher.clone()
            part, g = term.columns_loss_and_grad(s, t, labels, want_grad)
            if i < len(self._sums):
                self._sums[i] = self._sums[i] + part.sum()
            total = weight * part if total is None else total + weight * part
            if g is not None:
                grad = g.mul_(weight) if grad is None else grad.add_(g, alpha=weight)
        return total, grad

    def forward(self, student_logits, teacher_logits=None, labels=None):
        return self._recording(labels, super().forward, student_logits, teacher_logits, labels)

    def from_hidden(self, student_hidden, student_weight, teacher_hidden=None, teacher_weight=None, labels=None, *,
                    chunk_size=None):
        return self._recording(labels, super().from_hidden, student_hidden, student_weight, teacher_hidden,
                               teacher_weight, labels, chunk_size=chunk_size)

    def _recording(self, labels, call, *args, **kwargs):
        self._sums = [0.0] * len(self.terms)
        try:
            out = call(*args, **kwargs)
            n_valid = 1 if labels is None else max(int((labels != self.ignore_index).sum()), 1)
            self.term_losses = {name: torch.as_tensor(s).detach() / n_valid for name, s in zip(self.term_names, self._sums)}
        finally:
            self._sums = []  # a recomputation in backward (reduction none) records nothing
        return out

    def extra_repr(self) -> str:
        return " + ".join(f"{w:g}*{t.name}" for w, t in zip(self.weights, self.terms))


def _term_names(names: Sequence[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return out


class _LogitLoss(torch.autograd.Function):
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
        block = auto_chunk_rows(vocab, bytes_per_entry=4 if triton else 4 * _TEMPORARIES_PER_ROW)
        all_valid = n == student.shape[0]  # rows can then be sliced, never copied
        for start in range(0, n, block):
            stop = min(start + block, n)
            rows = slice(start, stop) if all_valid else valid[start:stop]
            s = student[rows][:, :vocab]
            t = teacher if teacher is None else (teacher.select(rows) if isinstance(teacher, SparseTeacher)
                                                 else teacher[rows][:, :vocab])
            _check_teacher(objective, t, rows)
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


def _check_teacher(objective, teacher, rows) -> None:
    """Every row of a dense teacher block must be a distribution: no NaN, no +inf, not -inf everywhere.

    (A NaN teacher used to give that token a loss of 0 and the student a NaN gradient.)
    ``rows``: the block's rows in the flattened input (an index tensor, or a slice of it).
    """
    if not isinstance(teacher, Tensor):
        return  # none, or a SparseTeacher (checked by SparseTeacher.validate)
    _check_teacher_top(objective, teacher.amax(-1), rows)  # NaN propagates; +inf stays; -inf only if the whole row is


def _check_teacher_top(objective, top: Tensor, rows) -> None:
    """:func:`_check_teacher` given each row's max."""
    bad = ~torch.isfinite(top)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        row = rows.start + i if isinstance(rows, slice) else int(rows[i])
        what = "NaN" if bool(top[i].isnan()) else "+inf" if float(top[i]) > 0 else "-inf everywhere (no mass at all)"
        raise NonFiniteError(f"{objective.name or type(objective).__name__}: the teacher's logits at row {row} are "
                             f"{what}; a teacher must give a distribution on every scored token", row)


class _RowChunks:
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
        _check_teacher(self.objective, teacher, rows)
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


class _ColumnChunks(_RowChunks):
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
            _check_teacher_top(self.objective, columns.column_max(teacher), rows)
        return self.objective.columns_loss_and_grad(logits, teacher, self.labels[rows], want_grad)

    def release(self) -> None:
        self.workspace.release()

    def add_grads(self, grad, rows, grad_h, grad_w) -> None:
        if grad_h is not None:
            grad_h.index_add_(0, rows, (self.ws.T.to(grad.dtype) @ grad).T.to(self.hs.dtype))
        if grad_w is not None:
            h = self.hs[rows]
            grad_w.addmm_(grad.to(grad_w.dtype), h.to(grad_w.dtype))


class _FusedLinearLoss(torch.autograd.Function):
    """Chunked lm_head + loss (mean/sum) whose gradients are computed during the forward pass.

    Per chunk of valid rows (``chunks``: :class:`_RowChunks` or :class:`_ColumnChunks`):
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


class _FusedLinearPerToken(torch.autograd.Function):
    """Chunked lm_head + per-token loss (reduction none): the backward pass recomputes each chunk.

    The forward pass keeps no [chunk, V] tensor; the backward pass redoes each
    chunk's logits and gradient, scales its tokens by their incoming gradients and
    accumulates dX and dW (fp32) as :class:`_FusedLinearLoss` does.
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
            grad.mul_(scale[None, :] if isinstance(chunks, _ColumnChunks) else scale[:, None])
            start += k
            chunks.add_grads(grad, rows, grad_h, grad_w)
            del grad
        chunks.release()
        if grad_w is not None:
            grad_w = grad_w.to(chunks.ws.dtype)
        return None, grad_h, grad_w, None, None


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
