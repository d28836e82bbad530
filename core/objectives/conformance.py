"""Conformance kit: the checks every logit-level objective must pass (public as ``distillzoo.testing``).

A plugin's own tests call it on the objective class with a float64 reference
written for clarity::

    from distillzoo.testing import check_objective

    def reference(student_logits, teacher_logits, labels):   # float64 [n, V] each, labels [n]
        ...                                                  # -> per-token loss [n] at tau = 1
    def test_conformance():
        check_objective(MyObjective, reference, params={"alpha": 0.3})

The kit owns temperature, masking and reduction in its own naive code, so the
reference only states the per-token formula at temperature 1. Each check raises
AssertionError with what differed. Tolerances (documented per dtype):

* float64: reference agreement to 1e-9 (rtol and atol), plus torch.autograd.gradcheck;
* fp32: 1e-5 rtol / 1e-6 atol between paths that do the same math in another order;
* bf16/fp16 inputs: compared with the fp32 loss of the same rounded inputs (the
  base accumulates in fp32): rtol 1e-4; from_hidden in bf16 against the bf16
  logit path: rtol 2e-2 (the lm_head matmul rounds to bf16 in both).
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch

from distillzoo.errors import ParameterError
from distillzoo.objectives.logit import LogitObjective
from distillzoo.objectives.sparse import SparseTeacher

Reference = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
IGNORE = -100
__all__ = ["CHECKS", "Reference", "check_dtypes", "check_finite", "check_from_hidden", "check_gradcheck",
           "check_masking", "check_objective", "check_reductions", "check_reference", "check_sparse_teacher",
           "check_temperature", "make_inputs"]


def make_inputs(n: int = 12, vocab: int = 37, teacher_vocab: int | None = None, *, seed: int = 0,
                dtype: torch.dtype = torch.float32, n_ignored: int = 4, scale: float = 3.0):
    """Random student/teacher logits and labels with ``n_ignored`` rows set to IGNORE."""
    g = torch.Generator().manual_seed(seed)
    teacher_vocab = teacher_vocab or vocab
    student = (scale * torch.randn(n, vocab, generator=g, dtype=torch.float64)).to(dtype)
    teacher = (scale * torch.randn(n, teacher_vocab, generator=g, dtype=torch.float64)).to(dtype)
    labels = torch.randint(0, min(vocab, teacher_vocab), (n,), generator=g)
    labels[torch.randperm(n, generator=g)[:n_ignored]] = IGNORE
    return student, teacher, labels


def _build(cls: type, params: Mapping, **overrides) -> LogitObjective:
    return cls(**{**params, "ignore_index": IGNORE, **overrides})


def _leaf(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.detach().to(dtype).clone().requires_grad_(True)


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float, what: str) -> None:
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, check_dtype=False,
                               msg=lambda m: f"{what}: {m}")


def check_reference(cls: type, reference: Reference, params: Mapping = {}) -> None:
    """Loss and student-logit gradient match the float64 reference (vocab mismatch included)."""
    student, teacher, labels = make_inputs(vocab=37, teacher_vocab=41, dtype=torch.float64)
    valid = labels != IGNORE
    s_ref = student[valid, :37].clone().requires_grad_(True)
    expected = reference(s_ref, teacher[valid, :37], labels[valid])
    assert expected.shape == (int(valid.sum()),), f"reference must return [n] per-token losses, got {tuple(expected.shape)}"
    expected.sum().div(valid.sum()).backward()
    s = student.clone().requires_grad_(True)
    loss = _build(cls, params, reduction="mean")(s, teacher, labels)
    loss.backward()
    _close(loss, expected.sum() / valid.sum(), 1e-9, 1e-9, f"{cls.__name__} mean loss vs float64 reference")
    grad = torch.zeros_like(student)
    grad[valid, :37] = s_ref.grad
    _close(s.grad, grad, 1e-9, 1e-9, f"{cls.__name__} student-logit gradient vs float64 reference")
    per_token = _build(cls, params, reduction="none")(student, teacher, labels)
    _close(per_token[valid], expected.detach(), 1e-9, 1e-9, f"{cls.__name__} per-token loss vs float64 reference")


def check_gradcheck(cls: type, params: Mapping = {}) -> None:
    """torch.autograd.gradcheck in float64 at a small vocab, temperature 1.7. An objective whose gradient holds
    some coefficients constant (``holds_constant``, AKL's weights) is not the derivative of its value, by design:
    its gradient is checked against the reference's, which holds the same coefficients, in ``check_reference``,
    and here the gradient must still be finite and vanish on ignored rows."""
    student, teacher, labels = make_inputs(n=5, vocab=7, dtype=torch.float64, n_ignored=1, scale=1.0)
    if getattr(cls, "holds_constant", ()):
        objective = _build(cls, params, reduction="sum", temperature=1.7)
        student.requires_grad_(True)
        objective(student, teacher, labels).backward()
        assert torch.isfinite(student.grad).all() and (student.grad[labels == IGNORE] == 0).all(), (
            f"{cls.__name__}: gradient not finite, or not 0 on ignored rows")
        return
    objective = _build(cls, params, reduction="sum", temperature=1.7)
    student.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: objective(s, teacher, labels), (student,), eps=1e-6, atol=1e-6), (
        f"{cls.__name__}: gradcheck failed"
    )


def check_temperature(cls: type, params: Mapping = {}, tau: float = 2.5) -> None:
    """loss at tau equals tau^2 * (loss at 1 on z / tau), and without the factor when switched off."""
    student, teacher, labels = make_inputs(dtype=torch.float64)
    at_one = _build(cls, params, reduction="sum")(student / tau, teacher / tau, labels)
    scaled = _build(cls, params, reduction="sum", temperature=tau)(student, teacher, labels)
    plain = _build(cls, params, reduction="sum", temperature=tau, scale_by_temperature_squared=False)(student, teacher, labels)
    _close(scaled, tau * tau * at_one, 1e-9, 1e-9, f"{cls.__name__}: temperature {tau} with the tau^2 factor")
    _close(plain, at_one, 1e-9, 1e-9, f"{cls.__name__}: temperature {tau} without the tau^2 factor")


def check_finite(cls: type, params: Mapping = {}) -> None:
    """Finite loss and gradients on large logits (|z| up to 1e4) in fp32."""
    student, teacher, labels = make_inputs(scale=3000.0)
    student.requires_grad_(True)
    loss = _build(cls, params)(student, teacher, labels)
    loss.backward()
    assert torch.isfinite(loss), f"{cls.__name__}: loss is {loss.item()} on logits of magnitude 1e4"
    assert torch.isfinite(student.grad).all(), f"{cls.__name__}: non-finite gradient on logits of magnitude 1e4"


def check_masking(cls: type, params: Mapping = {}) -> None:
    """Ignored rows change nothing and get zero gradient; all-ignored gives exactly 0."""
    student, teacher, labels = make_inputs()
    ignored = labels == IGNORE
    objective = _build(cls, params)
    base = objective(student, teacher, labels)
    s2, t2 = student.clone(), teacher.clone()
    s2[ignored] = torch.nan  # garbage in ignored rows must not leak into the loss
    t2[ignored] = 1e4
    s2.requires_grad_(True)
    perturbed = objective(s2, t2, labels)
    perturbed.backward()
    _close(perturbed, base, 0, 0, f"{cls.__name__}: loss changed when ignored rows changed")
    assert (s2.grad[ignored] == 0).all(), f"{cls.__name__}: nonzero gradient on ignored rows"
    for reduction in ("mean", "sum", "none"):
        s = student.clone().requires_grad_(True)
        out = _build(cls, params, reduction=reduction)(s, teacher, torch.full_like(labels, IGNORE))
        out.sum().backward()
        assert (out == 0).all() and not torch.isnan(out).any(), f"{cls.__name__}: all-ignored {reduction} loss is {out}"
        assert (s.grad == 0).all(), f"{cls.__name__}: all-ignored {reduction} gradient is not zero"


def check_reductions(cls: type, params: Mapping = {}) -> None:
    """none.sum() == sum == mean * n_valid; none is 0 at ignored positions and keeps leading dims."""
    student, teacher, labels = make_inputs()
    n_valid = int((labels != IGNORE).sum())
    none = _build(cls, params, reduction="none")(student, teacher, labels)
    total = _build(cls, params, reduction="sum")(student, teacher, labels)
    mean = _build(cls, params, reduction="mean")(student, teacher, labels)
    assert none.shape == labels.shape, f"{cls.__name__}: reduction='none' shape {tuple(none.shape)} != labels {tuple(labels.shape)}"
    assert (none[labels == IGNORE] == 0).all(), f"{cls.__name__}: reduction='none' is nonzero at ignored positions"
    _close(none.sum(), total, 1e-5, 1e-6, f"{cls.__name__}: none.sum() vs sum")
    _close(mean * n_valid, total, 1e-5, 1e-6, f"{cls.__name__}: mean * n_valid vs sum")
    batched = _build(cls, params, reduction="none")(student.view(3, 4, -1), teacher.view(3, 4, -1), labels.view(3, 4))
    _close(batched, none.view(3, 4), 1e-6, 1e-7, f"{cls.__name__}: [B, T, V] input vs flattened")


def check_dtypes(cls: type, params: Mapping = {}, dtypes=(torch.bfloat16, torch.float16)) -> None:
    """Half-precision inputs: fp32 accumulation (matches fp32 on the rounded inputs), grads in the input dtype."""
    for dtype in dtypes:
        student, teacher, labels = make_inputs(dtype=dtype)
        objective = _build(cls, params)
        s = student.clone().requires_grad_(True)
        loss = objective(s, teacher, labels)
        loss.backward()
        expected = objective(student.float(), teacher.float(), labels)
        assert loss.dtype == torch.float32, f"{cls.__name__}: {dtype} inputs gave a {loss.dtype} loss; expected fp32"
        _close(loss, expected, 1e-4, 1e-5, f"{cls.__name__}: {dtype} loss vs fp32 on the same rounded inputs")
        assert s.grad.dtype == dtype and torch.isfinite(s.grad).all(), f"{cls.__name__}: {dtype} gradient is {s.grad.dtype} or not finite"


def check_from_hidden(cls: type, params: Mapping = {}) -> None:
    """from_hidden (chunked, teacher hidden size != student's, teacher vocab larger) == logit path."""
    g = torch.Generator().manual_seed(1)
    n, hs_dim, ht_dim, vocab, t_vocab = 13, 16, 24, 37, 41
    hs = torch.randn(n, hs_dim, generator=g)
    ws = torch.randn(vocab, hs_dim, generator=g) / 2
    ht = torch.randn(n, ht_dim, generator=g)
    wt = torch.randn(t_vocab, ht_dim, generator=g) / 2
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[::4] = IGNORE
    for dtype, rtol, atol in ((torch.float32, 1e-5, 1e-6), (torch.bfloat16, 2e-2, 2e-3)):
        for reduction in ("mean", "sum", "none"):
            objective = _build(cls, params, reduction=reduction)
            h1, w1 = _leaf(hs, dtype), _leaf(ws, dtype)
            fused = objective.from_hidden(h1, w1, ht.to(dtype), wt.to(dtype), labels, chunk_size=4)
            fused.sum().backward()
            h2, w2 = _leaf(hs, dtype), _leaf(ws, dtype)
            plain = objective(h2 @ w2.T, ht.to(dtype) @ wt.to(dtype).T, labels)
            plain.sum().backward()
            what = f"{cls.__name__} from_hidden {dtype} reduction={reduction}"
            _close(fused, plain, rtol, atol, f"{what}: loss")
            _close(h1.grad.float(), h2.grad.float(), rtol, atol, f"{what}: d student_hidden")
            _close(w1.grad.float(), w2.grad.float(), rtol, atol, f"{what}: d student_weight")
    h = _leaf(hs, torch.float32)
    empty = _build(cls, params).from_hidden(h, ws, ht, wt, torch.full_like(labels, IGNORE))
    empty.backward()
    assert empty.item() == 0 and (h.grad == 0).all(), f"{cls.__name__}: all-ignored from_hidden is not 0 with zero gradient"


def check_sparse_teacher(cls: type, params: Mapping = {}) -> None:
    """A SparseTeacher with k = V (ids shuffled) equals the dense teacher, loss and gradient;
    an objective that does not accept sparse teachers refuses one with a ParameterError."""
    student, teacher, labels = make_inputs(dtype=torch.float64)
    objective = _build(cls, params, temperature=1.3)
    order = torch.argsort(torch.rand(teacher.shape, generator=torch.Generator().manual_seed(3)), dim=-1)
    sparse = SparseTeacher(order, torch.log_softmax(teacher / 1.3, dim=-1).gather(1, order))
    if not cls.accepts_sparse_teacher:
        if not cls.needs_teacher:  # no teacher at all: any teacher is ignored
            _close(objective(student, sparse, labels), objective(student, None, labels), 0, 0,
                   f"{cls.__name__} needs no teacher but a sparse one changed its loss")
            return
        try:
            objective(student, sparse, labels)
        except ParameterError as err:
            assert "sparse" in str(err), f"{cls.__name__}: the error for a sparse teacher does not say so: {err}"
            return
        raise AssertionError(f"{cls.__name__} does not accept sparse teachers but computed a loss from one")
    s1, s2 = student.clone().requires_grad_(True), student.clone().requires_grad_(True)
    dense_loss, sparse_loss = objective(s1, teacher, labels), objective(s2, sparse, labels)
    dense_loss.backward(), sparse_loss.backward()
    _close(sparse_loss, dense_loss, 1e-9, 1e-9, f"{cls.__name__}: sparse teacher with k = V vs dense loss")
    _close(s2.grad, s1.grad, 1e-9, 1e-9, f"{cls.__name__}: sparse teacher with k = V vs dense gradient")


CHECKS = {
    "reference": check_reference,
    "gradcheck": check_gradcheck,
    "temperature": check_temperature,
    "finite": check_finite,
    "masking": check_masking,
    "reductions": check_reductions,
    "dtypes": check_dtypes,
    "from_hidden": check_from_hidden,
    "sparse_teacher": check_sparse_teacher,
}


def check_objective(cls: type, reference: Reference, params: Mapping = {}) -> None:
    """Run every check of the kit on a LogitObjective subclass (``params``: its own parameters)."""
    assert isinstance(cls, type) and issubclass(cls, LogitObjective), f"{cls!r} is not a LogitObjective subclass"
    for name, check in CHECKS.items():
        if name == "reference":
            check(cls, reference, params)
        else:
            check(cls, params)
