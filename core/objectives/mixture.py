"""Weighted mixtures of logit objectives (``0.5 * ce + 0.5 * fkl``), computed in one pass."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from distillzoo.errors import ParameterError
from distillzoo.objectives.logit import LogitObjective


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

    @property
    def wants_progress(self) -> bool:
        return any(t.wants_progress for t in self.terms)

    def begin_step(self, step: int, total_steps: int) -> None:
        for term in self.terms:
            term.begin_step(step, total_steps)

    def end_step(self, losses: dict) -> None:
        """Each term sees its own loss as ``loss``."""
        for name, term in zip(self.term_names, self.terms):
            if term.wants_progress:
                term.end_step({**losses, "loss": losses.get(f"loss/{name}", losses.get("loss"))})

    def progress_state(self) -> dict:
        return {name: term.progress_state() for name, term in zip(self.term_names, self.terms) if term.wants_progress}

    def load_progress_state(self, state: dict) -> None:
        for name, term in zip(self.term_names, self.terms):
            if name in state:
                term.load_progress_state(state[name])

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
