"""ce and dpkd_token beyond the conformance kit: hand values, identities and errors."""

import math

import pytest
import torch

import distillzoo as dz


def test_ce_hand_value_with_label_smoothing():
    # q = (1/2, 1/4, 1/4), label 0, eps = 0.3: 0.7 * log 2 + 0.3 * mean(log 2, log 4, log 4)
    student = torch.log(torch.tensor([[0.5, 0.25, 0.25]], dtype=torch.float64))
    expected = 0.7 * math.log(2) + 0.3 * (math.log(2) + 2 * math.log(4)) / 3
    loss = dz.objective("ce", label_smoothing=0.3)(student, None, torch.tensor([0]))
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_ce_needs_no_teacher_and_ignores_one():
    student = torch.randn(6, 20, dtype=torch.float64)
    labels = torch.tensor([1, 2, -100, 19, 0, 5])
    alone = dz.objective("ce")(student, None, labels)
    with_teacher = dz.objective("ce")(student, torch.randn(6, 25, dtype=torch.float64), labels)
    expected = torch.nn.functional.cross_entropy(student, labels)
    assert alone.item() == pytest.approx(expected.item(), rel=1e-12) == with_teacher.item()
    hs, ws = torch.randn(6, 4, dtype=torch.float64), torch.randn(20, 4, dtype=torch.float64)
    fused = dz.objective("ce").from_hidden(hs, ws, labels=labels, chunk_size=2)
    assert fused.item() == pytest.approx(torch.nn.functional.cross_entropy(hs @ ws.T, labels).item(), rel=1e-12)


def test_ce_label_outside_the_vocab_is_a_clear_error():
    with pytest.raises(dz.ParameterError, match=r"ce: label 20 is outside the compared vocab \[0, 20\)"):
        dz.objective("ce")(torch.randn(3, 20), None, torch.tensor([1, 20, -100]))


def test_objectives_that_need_a_teacher_say_so():
    with pytest.raises(dz.ParameterError, match="fkl needs a teacher: teacher_logits is None"):
        dz.objective("fkl")(torch.randn(3, 20), None, torch.zeros(3, dtype=torch.long))


def _move_argmax(student, target):
    """The student's logits with its argmax moved to ``target`` (the two entries swapped)."""
    moved = student.clone()
    rows = torch.arange(student.shape[0])
    top = student.argmax(-1)
    moved[rows, target], moved[rows, top] = student[rows, top], student[rows, target]
    return moved


@pytest.mark.parametrize("params", [{}, {"eps": 0.2}, {"loss_type": "ipo", "beta": 0.5}])
def test_dpkd_token_loss_decreases_when_the_student_argmax_moves_to_the_teacher(params):
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(16, 50, generator=g) * 3, torch.randn(16, 50, generator=g) * 3
    labels = torch.zeros(16, dtype=torch.long)
    loss_fn = dz.objective("dpkd_token", reduction="none", **params)
    assert (student.argmax(-1) != teacher.argmax(-1)).all()  # every position disagrees before
    before = loss_fn(student, teacher, labels)
    after = loss_fn(_move_argmax(student, teacher.argmax(-1)), teacher, labels)
    assert (after < before).all()
    # Agreement gives h = 0: the loss of a zero margin, and no gradient at all.
    beta = loss_fn.beta
    at_zero = (1 / (2 * beta)) ** 2 if loss_fn.loss_type == "ipo" else math.log(2)  # -(1-eps) log s(0) - eps log s(0)
    torch.testing.assert_close(after, torch.full_like(after, at_zero))
    s = _move_argmax(student, teacher.argmax(-1)).requires_grad_(True)
    loss_fn(s, teacher, labels).sum().backward()
    assert (s.grad == 0).all()


def test_dpkd_token_hand_value():
    # p = (0.7, 0.2, 0.1): y+ = 0; q = (0.1, 0.3, 0.6): y- = 2.
    # h = [log .1 - log .6] - [log .7 - log .1]; beta = 0.5, eps = 0.1.
    teacher = torch.log(torch.tensor([[0.7, 0.2, 0.1]], dtype=torch.float64))
    student = torch.log(torch.tensor([[0.1, 0.3, 0.6]], dtype=torch.float64)).requires_grad_(True)
    h = (math.log(0.1) - math.log(0.6)) - (math.log(0.7) - math.log(0.1))
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = -0.9 * math.log(sig(0.5 * h)) - 0.1 * math.log(sig(-0.5 * h))
    loss = dz.objective("dpkd_token", beta=0.5, eps=0.1)(student, teacher, torch.tensor([0]))
    loss.backward()
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    d_h = 0.5 * (-0.9 * sig(-0.5 * h) + 0.1 * sig(0.5 * h))  # dL/dh; dh/dz = +1 at y+, -1 at y-
    torch.testing.assert_close(student.grad, torch.tensor([[d_h, 0.0, -d_h]], dtype=torch.float64))
    ipo = dz.objective("dpkd_token", beta=0.5, loss_type="ipo")(student.detach(), teacher, torch.tensor([0]))
    assert ipo.item() == pytest.approx((h - 1.0) ** 2, rel=1e-12)


@pytest.mark.parametrize("name, params, message", [
    ("dpkd_token", {"beta": 0.0}, r"'beta' = 0.0 is out of range \(0, inf\)"),
    ("dpkd_token", {"eps": 0.5}, r"'eps' = 0.5 is out of range \[0, 0.5\)"),
    ("dpkd_token", {"loss_type": "hinge"}, r"'hinge'.*sigmoid.*ipo"),
    ("ce", {"label_smoothing": 1.5}, r"'label_smoothing' = 1.5 is out of range \[0, 1\]"),
    ("ce", {"temperature": -1.0}, r"'temperature' = -1.0 is out of range \(0, inf\)"),
])
def test_out_of_range_parameters(name, params, message):
    with pytest.raises(dz.ParameterError, match=message):
        dz.objective(name, **params)
