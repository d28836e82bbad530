"""The sparse (top-k) teacher: an offline cache's view of the teacher, and its checks.

A divergence against a :class:`SparseTeacher` is taken over the k kept ids plus one
tail bucket on both sides (never a renormalised top-k); k equal to the vocab gives
the dense result.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from distillzoo.errors import NonFiniteError, ParameterError
from distillzoo.kernels import vocab_chunked


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
