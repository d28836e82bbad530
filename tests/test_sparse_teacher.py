"""Sparse (top-k) teachers: k kept ids of the full softmax plus one tail bucket on both sides."""

import math

import pytest
import torch
from helpers import REFERENCES

import distillzoo as dz

SPARSE = ["fkl", "jsd", "rkl", "skl", "srkl", "tvd", "abkd"]
PARAMS = {"jsd": {"beta": 0.3}, "skl": {"alpha": 0.2}, "srkl": {"alpha": 0.25}}
QWEN_VOCAB = 151_936


def top_k(teacher_logits, k, tau=1.0):
    """What an offline cache stores: top-k ids and their full-softmax log-probs at tau."""
    log_p = torch.log_softmax(teacher_logits.double() / tau, dim=-1)
    values, ids = log_p.topk(k, dim=-1)
    return ids, values.to(teacher_logits.dtype)


def bucket_reference(name, student_logits, teacher_logits, labels, ids, tau=1.0, **params):
    """Naive float64 reference: both distributions folded to the kept ids plus one tail bucket."""
    def fold(log_probs):
        kept = log_probs.gather(1, ids)
        tail = torch.log1p(-kept.exp().sum(-1, keepdim=True).clamp(max=1.0))
        return torch.cat([kept, tail], dim=1)
    log_q = fold(torch.log_softmax(student_logits / tau, -1))
    log_p = fold(torch.log_softmax(teacher_logits / tau, -1))
    # Normalised log-probs are logits of the same distribution, so the dense references apply.
    return REFERENCES[name](log_q, log_p, labels, **params) * tau**2


@pytest.mark.parametrize("name", SPARSE)
def test_k_equal_to_vocab_is_the_dense_divergence(name):
    g = torch.Generator().manual_seed(0)
    n, vocab, tau = 7, 40, 1.5
    student = torch.randn(n, vocab, generator=g, dtype=torch.float64) * 3
    teacher = torch.randn(n, vocab, generator=g, dtype=torch.float64) * 3
    teacher[0, :10] = -torch.inf  # masked vocab: zero teacher mass, still exact
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[3] = -100
    params = PARAMS.get(name, {})
    loss_fn = dz.objective(name, temperature=tau, **params)
    s1, s2 = student.clone().requires_grad_(True), student.clone().requires_grad_(True)
    dense = loss_fn(s1, teacher, labels)
    # ids in a shuffled order per row: the buckets need not be sorted
    order = torch.argsort(torch.rand(n, vocab, generator=g), dim=-1)
    log_p = torch.log_softmax(teacher / tau, -1).gather(1, order)
    sparse = loss_fn(s2, dz.SparseTeacher(order, log_p), labels)
    dense.backward(), sparse.backward()
    if name == "rkl":  # the masked entries make rkl infinite on row 0: compare the rows without them
        assert torch.isinf(dense) and torch.isinf(sparse)
        return
    torch.testing.assert_close(sparse, dense, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s2.grad, s1.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("k", [1, 5, 39])
@pytest.mark.parametrize("name", SPARSE)
def test_top_k_matches_the_bucket_reference(name, k):
    g = torch.Generator().manual_seed(k)
    n, vocab, tau = 9, 40, 2.0
    student = torch.randn(n, vocab, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(n, vocab, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[[1, 6]] = -100
    ids, log_p = top_k(teacher, k, tau)
    params = PARAMS.get(name, {})
    s = student.clone().requires_grad_(True)
    loss = dz.objective(name, temperature=tau, reduction="sum", **params)(s, dz.SparseTeacher(ids, log_p), labels)
    loss.backward()
    valid = labels != -100
    s64 = student.clone().requires_grad_(True)
    expected = bucket_reference(name, s64[valid], teacher[valid], labels[valid], ids[valid], tau, **params).sum()
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(s.grad, s64.grad, rtol=1e-8, atol=1e-11)


def test_sparse_fkl_is_the_kept_terms_plus_the_tail_bucket():
    # p = (0.6, 0.3, 0.1), keep id 0 only: fkl = 0.6 log(0.6 / q0) + 0.4 log(0.4 / (1 - q0))
    student = torch.log(torch.tensor([[0.5, 0.2, 0.3]], dtype=torch.float64))
    teacher = dz.SparseTeacher(torch.tensor([[0]]), torch.log(torch.tensor([[0.6]], dtype=torch.float64)))
    expected = 0.6 * math.log(0.6 / 0.5) + 0.4 * math.log(0.4 / 0.5)
    assert dz.objective("fkl")(student, teacher, torch.tensor([0])).item() == pytest.approx(expected, rel=1e-12)


def test_an_explicit_tail_is_used_as_given():
    g = torch.Generator().manual_seed(2)
    student, teacher = torch.randn(5, 30, generator=g, dtype=torch.float64), torch.randn(5, 30, generator=g, dtype=torch.float64)
    ids, log_p = top_k(teacher, 4)
    labels = torch.zeros(5, dtype=torch.long)
    implied = dz.objective("fkl")(student, dz.SparseTeacher(ids, log_p), labels)
    tail = torch.log1p(-log_p.exp().sum(-1))
    explicit = dz.objective("fkl")(student, dz.SparseTeacher(ids, log_p, tail), labels)
    torch.testing.assert_close(explicit, implied, rtol=1e-12, atol=0)
    # A different tail changes the teacher's tail bucket only: p_tail log(p_tail / q_tail) per token.
    shifted = dz.objective("fkl", reduction="none")(student, dz.SparseTeacher(ids, log_p, tail - 1.0), labels)
    base = dz.objective("fkl", reduction="none")(student, dz.SparseTeacher(ids, log_p, tail), labels)
    q_tail = torch.log1p(-torch.log_softmax(student, -1).gather(1, ids).exp().sum(-1))
    expected = (tail - 1).exp() * (tail - 1 - q_tail) - tail.exp() * (tail - q_tail)
    torch.testing.assert_close(shifted - base, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", SPARSE)
def test_qwen_vocab_fp32_sparse_teacher(name):
    """k = 32 at V = 151,936 in fp32 against the float64 bucket reference; k = V against dense fp32."""
    g = torch.Generator().manual_seed(4)
    n = 6
    student = torch.randn(n, QWEN_VOCAB, generator=g) * 4
    teacher = torch.randn(n, QWEN_VOCAB, generator=g) * 4
    labels = torch.randint(0, QWEN_VOCAB, (n,), generator=g)
    labels[2] = -100
    params = PARAMS.get(name, {})
    ids, log_p = top_k(teacher, 32)
    s = student.clone().requires_grad_(True)
    loss = dz.objective(name, **params)(s, dz.SparseTeacher(ids, log_p), labels)
    loss.backward()
    valid = labels != -100
    s64 = student.double().requires_grad_(True)
    expected = bucket_reference(name, s64[valid], teacher.double()[valid], labels[valid], ids[valid], **params).mean()
    expected.backward()
    # Measured (python bench/accuracy_report.py): loss within 6e-7, gradients within 4e-7 (relative L2).
    torch.testing.assert_close(loss, expected.float(), rtol=2e-5, atol=1e-7)
    assert ((s.grad.double() - s64.grad).norm() / s64.grad.norm()).item() < 2e-5

    full_ids, full_log_p = top_k(teacher, QWEN_VOCAB)
    s1, s2 = student.clone().requires_grad_(True), student.clone().requires_grad_(True)
    dense = dz.objective(name, **params)(s1, teacher, labels)
    sparse = dz.objective(name, **params)(s2, dz.SparseTeacher(full_ids, full_log_p), labels)
    dense.backward(), sparse.backward()
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-6)
    assert ((s2.grad - s1.grad).norm() / s1.grad.norm()).item() < 1e-4


def test_from_hidden_with_a_sparse_teacher_matches_the_logit_path():
    g = torch.Generator().manual_seed(6)
    n, hidden, vocab = 11, 8, 50
    hs, ws = torch.randn(n, hidden, generator=g), torch.randn(vocab, hidden, generator=g)
    ids, log_p = top_k(torch.randn(n, vocab, generator=g) * 2, 6)
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[::3] = -100
    for reduction in ("mean", "none"):
        mix = dz.Mixture([(0.5, dz.objective("ce", reduction=reduction)), (0.5, dz.objective("jsd", reduction=reduction))])
        h1, w1 = hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
        h2, w2 = hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
        fused = mix.from_hidden(h1, w1, dz.SparseTeacher(ids, log_p), None, labels, chunk_size=3)
        plain = mix(h2 @ w2.T, dz.SparseTeacher(ids, log_p), labels)
        fused.sum().backward(), plain.sum().backward()
        torch.testing.assert_close(fused, plain)
        torch.testing.assert_close(h1.grad, h2.grad)
        torch.testing.assert_close(w1.grad, w2.grad)


def test_bf16_student_with_an_fp16_cache():
    g = torch.Generator().manual_seed(8)
    student, teacher = torch.randn(6, 500, generator=g) * 3, torch.randn(6, 500, generator=g) * 3
    ids, log_p = top_k(teacher, 16)
    labels = torch.zeros(6, dtype=torch.long)
    s = student.bfloat16().requires_grad_(True)
    loss = dz.objective("fkl")(s, dz.SparseTeacher(ids.int(), log_p.half()), labels)
    loss.backward()
    expected = dz.objective("fkl")(student.bfloat16().float(), dz.SparseTeacher(ids, log_p.half().float()), labels)
    assert loss.dtype == torch.float32 and s.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_sparse_teacher_errors_say_what_is_wrong():
    student, labels = torch.randn(2, 10), torch.zeros(2, dtype=torch.long)
    fkl = dz.objective("fkl")
    ids = torch.arange(11).repeat(2, 1)
    with pytest.raises(dz.ParameterError, match=r"keeps k=11 ids per token but the compared vocab has only 10"):
        fkl(student, dz.SparseTeacher(ids, torch.full((2, 11), -3.0)), labels)
    with pytest.raises(dz.ParameterError, match=r"ids must be in \[0, 10\).*found 12"):
        fkl(student, dz.SparseTeacher(torch.tensor([[0, 12], [1, 2]]), torch.full((2, 2), -1.0)), labels)
    with pytest.raises(dz.ParameterError, match=r"ids repeat within token 1"):
        fkl(student, dz.SparseTeacher(torch.tensor([[0, 1], [2, 2]]), torch.full((2, 2), -1.0)), labels)
    with pytest.raises(dz.ParameterError, match=r"ids has shape \(2, 3\) and logprobs has shape \(2, 2\)"):
        dz.SparseTeacher(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 2))
    with pytest.raises(dz.ParameterError, match=r"dpkd_token does not accept a sparse \(top-k\) teacher"):
        dz.objective("dpkd_token")(student, dz.SparseTeacher(ids[:, :3], torch.full((2, 3), -3.0)), labels)
    with pytest.raises(dz.ParameterError, match=r"student_logits has shape \(2, 10\) and the sparse teacher's ids have shape \(3, 2\)"):
        fkl(student, dz.SparseTeacher(torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 2)), labels)
