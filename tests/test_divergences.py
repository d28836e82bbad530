"""The divergences against naive references: small vocab in float64, Qwen's vocab in fp32."""

import functools
import math

import pytest
import torch
from helpers import REFERENCES, log_space_reference, reference_loss

OBJECTIVES = sorted(REFERENCES)  # every logit-level objective of the zoo
DIVERGENCES = [name for name in OBJECTIVES if name not in ("ce", "dpkd_token")]
# Non-default parameters so that a parameter ignored by the implementation shows.
PARAMS = {"jsd": {"beta": 0.3}, "skl": {"alpha": 0.2}, "srkl": {"alpha": 0.25}, "ce": {"label_smoothing": 0.1},
          "dpkd_token": {"beta": 0.5, "eps": 0.1}, "abkd": {"alpha": 0.3, "beta": 0.6},
          "akl": {"mu": 0.4}, "taid": {"t_start": 0.3}}

import distillzoo as dz
from distillzoo.testing import CHECKS

QWEN_VOCAB = 151_936  # Qwen2.5 0.5B/1.5B/3B
QWEN_TEACHER_VOCAB = 152_064  # Qwen2.5 7B/14B/72B


@pytest.mark.parametrize("check", sorted(CHECKS))
@pytest.mark.parametrize("name", OBJECTIVES)
def test_conformance_kit(name, check):
    cls, params = dz.objective_spec(name).cls, PARAMS.get(name, {})
    if check == "reference":
        CHECKS[check](cls, functools.partial(REFERENCES[name], **params), params)
    else:
        CHECKS[check](cls, params)


def test_hand_computed_values():
    # p = (1/2, 1/2), q = (1/4, 3/4)
    teacher = torch.log(torch.tensor([[0.5, 0.5]], dtype=torch.float64))
    student = torch.log(torch.tensor([[0.25, 0.75]], dtype=torch.float64))
    labels = torch.tensor([1])
    fkl = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    rkl = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert dz.objective("fkl")(student, teacher, labels).item() == pytest.approx(fkl, rel=1e-12)
    assert dz.objective("rkl")(student, teacher, labels).item() == pytest.approx(rkl, rel=1e-12)
    assert dz.objective("tvd")(student, teacher, labels).item() == pytest.approx(0.25, rel=1e-12)
    # beta = 1/2: m = (3/8, 5/8)
    jsd = 0.5 * (0.5 * math.log(0.5 / 0.375) + 0.5 * math.log(0.5 / 0.625)) + 0.5 * (
        0.25 * math.log(0.25 / 0.375) + 0.75 * math.log(0.75 / 0.625))
    assert dz.objective("jsd", beta=0.5)(student, teacher, labels).item() == pytest.approx(jsd, rel=1e-12)
    # alpha = 0.2: skl against 0.2 p + 0.8 q = (0.3, 0.7); srkl against 0.8 p + 0.2 q = (0.45, 0.55)
    skl = 0.5 * math.log(0.5 / 0.3) + 0.5 * math.log(0.5 / 0.7)
    srkl = 0.25 * math.log(0.25 / 0.45) + 0.75 * math.log(0.75 / 0.55)
    assert dz.objective("skl", alpha=0.2)(student, teacher, labels).item() == pytest.approx(skl, rel=1e-12)
    assert dz.objective("srkl", alpha=0.2)(student, teacher, labels).item() == pytest.approx(srkl, rel=1e-12)


def _pair(seed=0, n=6, vocab=40, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, vocab, generator=g, dtype=torch.float64) * scale,
            torch.randn(n, vocab, generator=g, dtype=torch.float64) * scale,
            torch.zeros(n, dtype=torch.long))


@pytest.mark.parametrize("end, limit", [("low", "fkl"), ("high", "rkl")])
def test_jsd_tends_continuously_to_fkl_and_rkl_at_its_ends(end, limit):
    """jsd/beta -> fkl as beta -> 0 and jsd/(1-beta) -> rkl as beta -> 1, the error shrinking like the gap."""
    # Unit-scale logits keep chi^2(p||q) moderate, so the first-order regime starts early.
    student, teacher, labels = _pair(scale=1.0)
    target = dz.objective(limit, reduction="sum")(student, teacher, labels).item()
    errors = []
    for gap in (1e-3, 1e-4, 1e-5, 1e-6):
        beta = gap if end == "low" else 1 - gap
        jsd = dz.objective("jsd", beta=beta, reduction="sum")(student, teacher, labels).item()
        errors.append(abs(jsd / gap - target))
    assert errors[-1] < 1e-5 * target
    for bigger, smaller in zip(errors, errors[1:]):
        assert 5 < bigger / smaller < 20  # first order in the gap: no jump, no stall


@pytest.mark.parametrize("skewed, plain", [("skl", "fkl"), ("srkl", "rkl")])
def test_skew_with_alpha_zero_is_the_plain_divergence(skewed, plain):
    student, teacher, labels = _pair(seed=1)
    s1, s2 = student.clone().requires_grad_(True), student.clone().requires_grad_(True)
    a = dz.objective(skewed, alpha=0.0)(s1, teacher, labels)
    b = dz.objective(plain)(s2, teacher, labels)
    a.backward(), b.backward()
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name, params, message", [
    ("jsd", {"beta": 0.0}, r"'beta' = 0.0 is out of range \(0, 1\)"),
    ("jsd", {"beta": 1.0}, r"'beta' = 1.0 is out of range \(0, 1\)"),
    ("skl", {"alpha": 1.0}, r"'alpha' = 1.0 is out of range \[0, 1\)"),
    ("srkl", {"alpha": -0.1}, r"'alpha' = -0.1 is out of range \[0, 1\)"),
    ("tvd", {"temperature": 0}, r"'temperature' = 0.0 is out of range \(0, inf\)"),
])
def test_out_of_range_parameters(name, params, message):
    with pytest.raises(dz.ParameterError, match=message):
        dz.objective(name, **params)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_identical_distributions_give_zero(name):
    z = torch.randn(6, 50, dtype=torch.float64) * 4
    assert dz.objective(name)(z, z.clone(), torch.zeros(6, dtype=torch.long)).item() == pytest.approx(0, abs=1e-12)


def test_one_hot_teacher_is_finite_and_equals_cross_entropy():
    # A teacher with -inf everywhere but the label: fkl = -log q(label) (teacher entropy 0), no NaN.
    student = torch.randn(5, 40, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([3, 7, 0, 39, 12])
    teacher = torch.full((5, 40), -math.inf, dtype=torch.float64)
    teacher[torch.arange(5), labels] = 0.0
    loss = dz.objective("fkl")(student, teacher, labels)
    loss.backward()
    expected = torch.nn.functional.cross_entropy(student.detach(), labels)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    assert torch.isfinite(student.grad).all()


def rel_err(actual, expected):
    """Relative L2 error of a gradient against its float64 reference."""
    return ((actual.double().cpu() - expected).norm() / expected.norm()).item()


GRAD_RTOL = {"fkl": 2e-5, "rkl": 2e-5, "skl": 2e-5, "ce": 2e-5, "dpkd_token": 2e-5, "jsd": 1e-3, "srkl": 1e-3, "tvd": 5e-3,
             "abkd": 1e-4, "akl": 1e-4, "taid": 1e-4}
CASES = {
    # case id: (n, ignored rows, tau, student vocab, teacher vocab)
    "plain": (8, [], 1.0, QWEN_VOCAB, QWEN_VOCAB),
    "ignore_index": (8, [1, 4, 5], 1.0, QWEN_VOCAB, QWEN_VOCAB),
    "all_ignored": (4, [0, 1, 2, 3], 1.0, QWEN_VOCAB, QWEN_VOCAB),
    "single_token": (1, [], 1.0, QWEN_VOCAB, QWEN_VOCAB),
    "temperature": (8, [2], 2.0, QWEN_VOCAB, QWEN_VOCAB),
    "vocab_mismatch": (8, [0], 1.5, QWEN_VOCAB, QWEN_TEACHER_VOCAB),
}


def qwen_case(case):
    """fp32 student and teacher logits and labels for one of CASES."""
    n, ignored, tau, vocab_s, vocab_t = CASES[case]
    g = torch.Generator().manual_seed(7)
    student = torch.randn(n, vocab_s, generator=g) * 4
    teacher = torch.randn(n, vocab_t, generator=g) * 4
    if vocab_t > vocab_s:
        # Mass the teacher puts beyond the shared vocab must be dropped, not zero-padded:
        # make those entries dominate so a wrong rule shows.
        teacher[:, vocab_s:] += 30.0
    labels = torch.randint(0, vocab_s, (n,), generator=g)
    labels[ignored] = -100
    return student, teacher, labels


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name", OBJECTIVES)
def test_qwen_vocab_fp32_against_float64_reference(name, case):
    n, ignored, tau, vocab_s, vocab_t = CASES[case]
    student, teacher, labels = qwen_case(case)

    s = student.clone().requires_grad_(True)
    params = PARAMS.get(name, {})
    loss = dz.objective(name, temperature=tau, **params)(s, teacher, labels)
    loss.backward()

    s64 = student.double().requires_grad_(True)
    expected = reference_loss(name, s64, teacher.double(), labels, tau=tau, **params)
    expected.backward()
    torch.testing.assert_close(loss, expected.float(), rtol=1e-4, atol=1e-5)
    # fp32 log-probs at |z| ~ 20 carry ~1e-6 absolute error, and the mixture divergences' gradients
    # cancel terms of size q (tvd's also flips sign where p ~ q), so grads are compared as a whole:
    # relative L2 error under GRAD_RTOL[name]. Measured (python bench/accuracy_report.py):
    # fkl/rkl/skl <= 7e-7, ce/dpkd_token <= 1e-7, jsd/srkl/tvd <= 2.6e-5.
    if len(ignored) == n:
        assert loss.item() == 0.0 and (s.grad == 0).all()
        return
    assert rel_err(s.grad, s64.grad) < GRAD_RTOL[name]


@pytest.mark.parametrize("name", OBJECTIVES)
def test_qwen_vocab_from_hidden_matches_reference(name):
    """Fused path at V = 151,936 (student) vs 152,064 (teacher), hidden sizes 32 vs 48."""
    g = torch.Generator().manual_seed(3)
    n = 10
    hs, ht = torch.randn(n, 32, generator=g), torch.randn(n, 48, generator=g)
    ws = torch.randn(QWEN_VOCAB, 32, generator=g) / 4
    wt = torch.randn(QWEN_TEACHER_VOCAB, 48, generator=g) / 4
    labels = torch.randint(0, QWEN_VOCAB, (n,), generator=g)
    labels[[2, 7]] = -100
    h, w = hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
    params = PARAMS.get(name, {})
    loss = dz.objective(name, temperature=2.0, **params).from_hidden(h, w, ht, wt, labels, chunk_size=3)
    loss.backward()

    h64, w64 = hs.double().requires_grad_(True), ws.double().requires_grad_(True)
    expected = reference_loss(name, h64 @ w64.T, ht.double() @ wt.double().T, labels, tau=2.0, **params)
    expected.backward()
    torch.testing.assert_close(loss, expected.float(), rtol=1e-4, atol=1e-5)
    assert rel_err(h.grad, h64.grad) < GRAD_RTOL[name] and rel_err(w.grad, w64.grad) < GRAD_RTOL[name]


def test_bf16_weight_gradient_accumulates_in_fp32():
    """dW summed over many chunks stays close to the float64 sum (Liger-Kernel #512-style drift)."""
    g = torch.Generator().manual_seed(5)
    n, h, v = 256, 16, 64
    hs = torch.randn(n, h, generator=g).bfloat16()
    ws = (torch.randn(v, h, generator=g) / 4).bfloat16()
    ht, wt = torch.randn(n, h, generator=g).bfloat16(), (torch.randn(v, h, generator=g) / 4).bfloat16()
    labels = torch.zeros(n, dtype=torch.long)
    w = ws.clone().requires_grad_(True)
    dz.objective("fkl", reduction="sum").from_hidden(hs, w, ht, wt, labels, chunk_size=8).backward()
    w64 = ws.double().requires_grad_(True)
    reference_loss("fkl", hs.double() @ w64.T, ht.double() @ wt.double().T, labels, reduction="sum").backward()
    # bf16 matmuls bound the per-chunk error; fp32 accumulation keeps it from growing with 32 chunks.
    rel = (w.grad.double() - w64.grad).norm() / w64.grad.norm()
    assert w.grad.dtype == torch.bfloat16 and rel < 2e-2


def test_mixture_is_the_weighted_sum_sharing_one_pass():
    student, teacher = torch.randn(9, 30) * 3, torch.randn(9, 30) * 3
    labels = torch.randint(0, 30, (9,))
    labels[4] = -100
    mix = dz.Mixture([(0.3, dz.objective("fkl", temperature=2.0)), (0.7, dz.objective("rkl"))])
    expected = 0.3 * dz.objective("fkl", temperature=2.0)(student, teacher, labels) + 0.7 * dz.objective("rkl")(student, teacher, labels)
    torch.testing.assert_close(mix(student, teacher, labels), expected)
    hs, ws = torch.randn(9, 8), torch.randn(30, 8)
    torch.testing.assert_close(
        mix.from_hidden(hs, ws, hs, ws * 2, labels, chunk_size=2),
        mix(hs @ ws.T, hs @ (ws * 2).T, labels),
    )


def test_mixture_terms_must_agree_on_masking_and_reduction():
    with pytest.raises(dz.ParameterError, match="disagree on reduction: fkl='sum', rkl='mean'"):
        dz.Mixture([(1.0, dz.objective("fkl", reduction="sum")), (1.0, dz.objective("rkl"))])


def test_vocab_size_larger_than_a_model_vocab_is_refused():
    loss_fn = dz.objective("fkl", vocab_size=100)
    with pytest.raises(dz.ParameterError, match=r"vocab_size=100 exceeds the student vocab \(90\) or the teacher vocab \(120\)"):
        loss_fn(torch.randn(2, 90), torch.randn(2, 120), torch.zeros(2, dtype=torch.long))


def test_shape_errors_name_the_tensors():
    loss_fn = dz.objective("fkl")
    with pytest.raises(dz.ParameterError, match=r"labels has shape \(5,\) but student_logits has leading shape \(4,\)"):
        loss_fn(torch.randn(4, 10), torch.randn(4, 10), torch.zeros(5, dtype=torch.long))
    with pytest.raises(dz.ParameterError, match=r"student_logits has shape \(4, 10\) and teacher_logits has shape \(3, 10\)"):
        loss_fn(torch.randn(4, 10), torch.randn(3, 10), torch.zeros(4, dtype=torch.long))
    with pytest.raises(dz.ParameterError, match=r"expected teacher_weight \[vocab, 6\]"):
        loss_fn.from_hidden(torch.randn(4, 8), torch.randn(10, 8), torch.randn(4, 6), torch.randn(10, 8), torch.zeros(4, dtype=torch.long))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (runs on the GPU machine)")
@pytest.mark.parametrize("name", OBJECTIVES)
def test_cuda_bf16_from_hidden_matches_float64_reference(name):
    g = torch.Generator().manual_seed(11)
    n = 64
    hs, ht = torch.randn(n, 896, generator=g), torch.randn(n, 1536, generator=g)
    ws, wt = torch.randn(QWEN_VOCAB, 896, generator=g) / 30, torch.randn(QWEN_TEACHER_VOCAB, 1536, generator=g) / 40
    labels = torch.randint(0, QWEN_VOCAB, (n,), generator=g)
    labels[:10] = -100
    h = hs.cuda().bfloat16().requires_grad_(True)
    w = ws.cuda().bfloat16().requires_grad_(True)
    loss = dz.objective(name).from_hidden(h, w, ht.cuda().bfloat16(), wt.cuda().bfloat16(), labels.cuda(), chunk_size=16)
    loss.backward()
    h64, w64 = hs.bfloat16().double().requires_grad_(True), ws.bfloat16().double().requires_grad_(True)
    student_logits = h64 @ w64.T
    if name == "dpkd_token":
        # its argmaxes are taken on the bf16 logits: near-ties at the top of 151,936 entries resolve
        # differently in float64. Same values as the bf16 logits, gradient of the float64 product.
        student_logits = student_logits + (student_logits.bfloat16().double() - student_logits).detach()
    teacher_logits = ht.bfloat16().double() @ wt.bfloat16().double().T
    if name == "dpkd_token":
        teacher_logits = teacher_logits.bfloat16().double()
    expected = reference_loss(name, student_logits, teacher_logits, labels)
    expected.backward()
    # bf16 logits (8 mantissa bits) bound the agreement; tvd's gradient also flips sign where p ~ q.
    tol = 8e-2 if name == "tvd" else 3e-2
    assert loss.item() == pytest.approx(expected.item(), rel=2e-2)
    assert rel_err(h.grad, h64.grad) < tol and rel_err(w.grad, w64.grad) < tol


def test_int32_labels_as_stored_for_qwen_ids():
    student, teacher = torch.randn(4, 70_000), torch.randn(4, 70_000)
    labels64 = torch.tensor([69_999, -100, 65_536, 151])
    loss_fn = dz.objective("fkl", reduction="none")
    out32 = loss_fn(student, teacher, labels64.to(torch.int32))
    torch.testing.assert_close(out32, loss_fn(student, teacher, labels64))
    assert out32[1] == 0 and (out32[[0, 2, 3]] > 0).all()


# rkl is +inf where the teacher has no mass and the student has some; dpkd_token where the
# student's argmax is an entry the teacher masks (h = -inf). Both are what the formulas say.
FINITE_WHEN_TEACHER_MASKED = [name for name in OBJECTIVES if name not in ("rkl", "dpkd_token", "akl")]  # akl: its rkl part


@pytest.mark.parametrize("mask", ["masked_vocab", "one_hot"])
@pytest.mark.parametrize("name", FINITE_WHEN_TEACHER_MASKED)
def test_teacher_with_minus_inf_entries(name, mask):
    """-inf teacher logits (masked vocab, or a one-hot teacher): p = 0 there, 0 log 0 = 0, no NaN."""
    g = torch.Generator().manual_seed(9)
    n, vocab = 6, 300
    student = torch.randn(n, vocab, generator=g) * 3
    teacher = torch.randn(n, vocab, generator=g) * 3
    if mask == "masked_vocab":
        teacher[torch.rand(n, vocab, generator=g) < 0.3] = -math.inf
    else:
        keep = teacher.argmax(-1)
        teacher.fill_(-math.inf)
        teacher[torch.arange(n), keep] = 0.0
    labels = torch.randint(0, vocab, (n,), generator=g)
    params = PARAMS.get(name, {})
    s = student.clone().requires_grad_(True)
    loss = dz.objective(name, **params)(s, teacher, labels)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    s64 = student.double().requires_grad_(True)
    expected = reference_loss(name, s64, teacher.double(), labels, **params)
    expected.backward()
    torch.testing.assert_close(loss, expected.float(), rtol=1e-5, atol=1e-6)
    assert rel_err(s.grad, s64.grad) < GRAD_RTOL[name]


def test_rkl_with_a_masked_teacher_is_infinite_unless_the_student_is_masked_too():
    student, teacher = torch.randn(3, 20, dtype=torch.float64), torch.randn(3, 20, dtype=torch.float64)
    teacher[:, :5] = -math.inf
    labels = torch.zeros(3, dtype=torch.long)
    assert dz.objective("rkl")(student, teacher, labels).item() == math.inf
    # Masking the same entries on both sides is the divergence over the remaining entries.
    student[:, :5] = -math.inf
    s = student.clone().requires_grad_(True)
    loss = dz.objective("rkl")(s, teacher, labels)
    loss.backward()
    dropped = student[:, 5:].clone().requires_grad_(True)
    expected = dz.objective("rkl")(dropped, teacher[:, 5:], labels)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    assert (s.grad[:, :5] == 0).all()
    torch.testing.assert_close(s.grad[:, 5:], dropped.grad, rtol=1e-12, atol=1e-15)


# bf16 logits round to 8 mantissa bits; the loss is accumulated in fp32 and matches the float64
# loss of the same rounded logits to ~1e-6. The gradient is stored in bf16 (rel. error 2^-9 per entry).
BF16_GRAD_RTOL = 6e-3


@pytest.mark.parametrize("name", OBJECTIVES)
def test_qwen_vocab_bf16_against_float64_reference(name):
    g = torch.Generator().manual_seed(12)
    n = 6
    student = (torch.randn(n, QWEN_VOCAB, generator=g) * 4).bfloat16()
    teacher = (torch.randn(n, QWEN_TEACHER_VOCAB, generator=g) * 4).bfloat16()
    labels = torch.randint(0, QWEN_VOCAB, (n,), generator=g)
    labels[1] = -100
    params = PARAMS.get(name, {})
    s = student.clone().requires_grad_(True)
    loss = dz.objective(name, temperature=1.5, **params)(s, teacher, labels)
    loss.backward()
    s64 = student.double().requires_grad_(True)
    expected = reference_loss(name, s64, teacher.double(), labels, tau=1.5, **params)
    expected.backward()
    assert loss.dtype == torch.float32 and s.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, expected.float(), rtol=2e-5, atol=1e-6)
    assert rel_err(s.grad, s64.grad) < max(BF16_GRAD_RTOL, GRAD_RTOL[name])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", OBJECTIVES)
def test_qwen_vocab_logits_up_to_1e4(name, dtype):
    g = torch.Generator().manual_seed(13)
    n = 4
    student = ((torch.rand(n, QWEN_VOCAB, generator=g) * 2 - 1) * 1e4).to(dtype)
    teacher = ((torch.rand(n, QWEN_VOCAB, generator=g) * 2 - 1) * 1e4).to(dtype)
    labels = torch.randint(0, QWEN_VOCAB, (n,), generator=g)
    params = PARAMS.get(name, {})
    s = student.clone().requires_grad_(True)
    loss = dz.objective(name, **params)(s, teacher, labels)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    if name in ("jsd", "skl", "srkl"):  # p and q underflow float64 here, so their mixture must be taken in log space
        expected = log_space_reference(name, student.double(), teacher.double(), **params).mean()
    else:
        expected = reference_loss(name, student.double(), teacher.double(), labels, **params)
    torch.testing.assert_close(loss, expected.float(), rtol=1e-5, atol=1e-5)


def test_mixture_reports_each_term():
    g = torch.Generator().manual_seed(14)
    student, teacher = torch.randn(10, 40, generator=g), torch.randn(10, 40, generator=g)
    labels = torch.randint(0, 40, (10,), generator=g)
    labels[[0, 5]] = -100
    terms = [(0.5, dz.objective("ce")), (0.3, dz.objective("fkl", temperature=2.0)), (0.2, dz.objective("fkl"))]
    mix = dz.Mixture(terms)
    expected = {key: term(student, teacher, labels) for key, (_, term) in zip(["ce", "fkl", "fkl#2"], terms)}
    for call in (lambda: mix(student, teacher, labels),
                 lambda: mix.from_hidden(student, torch.eye(40), teacher, torch.eye(40), labels, chunk_size=3)):
        total = call()
        assert list(mix.term_losses) == ["ce", "fkl", "fkl#2"]
        for key, value in expected.items():
            torch.testing.assert_close(mix.term_losses[key], value)
        torch.testing.assert_close(total, sum(w * expected[k] for (w, _), k in zip(terms, expected)))
