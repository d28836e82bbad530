"""The Triton kernels against float64 references: on CPU in Triton's interpreter, unchanged on CUDA.

Every kernel is checked directly and through the objectives with
``DISTILLZOO_BACKEND=triton``: loss and gradients, fp32 and bf16, temperature,
ignore_index, all-ignored, vocab mismatch (a wider teacher read through a
strided view), and one case at Qwen's full 151,936-entry vocab per kernel.
"""

import math

import pytest
import torch

import distillzoo as dz
from distillzoo.kernels import backend as kernel_backend
from distillzoo.kernels.token_logprob import token_logprobs
from helpers import REFERENCES, log_space_reference, reference_loss

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
QWEN_VOCAB = 151_936
QWEN_TEACHER_VOCAB = 152_064
DIVERGENCES = ["fkl", "rkl", "jsd", "skl", "srkl", "tvd", "abkd"]
OBJECTIVES = DIVERGENCES + ["ce", "dpkd_token"]
PARAMS = {"jsd": {"beta": 0.3}, "skl": {"alpha": 0.2}, "srkl": {"alpha": 0.25}, "ce": {"label_smoothing": 0.1},
          "dpkd_token": {"beta": 0.5, "eps": 0.1}, "abkd": {"alpha": 0.3, "beta": 0.6}}
WEIGHT = {"jsd": 0.3, "skl": 0.2, "srkl": 0.25, "abkd": (0.3, 0.6)}


@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv("DISTILLZOO_BACKEND", "triton")


def divergence_kernel():
    return kernel_backend.kernel_module("divergence")


def leaf(x):
    """A fresh leaf on DEVICE that collects gradients (never the caller's tensor)."""
    return x.detach().clone().to(DEVICE).requires_grad_(True)


def rel_err(actual, expected):
    return ((actual.double() - expected.double()).norm() / expected.double().norm().clamp(min=1e-30)).item()


def reference_rows(name, student, teacher, tau=1.0):
    """Per-row float64 divergence of logits at temperature tau (tau^2 not applied), differentiable."""
    s, t = student / tau, teacher / tau
    if name in ("jsd", "skl", "srkl"):
        return log_space_reference(name, s, t, beta=WEIGHT.get(name, 0.5), alpha=WEIGHT.get(name, 0.1))
    return REFERENCES[name](s, t, **PARAMS.get(name, {}) if name == "abkd" else {})


# ---------------------------------------------------------------- the divergence kernel, directly
CASES = {
    # rows, vocab (two tiles, not a power of two), temperature, teacher extra width, masked teacher share
    "tiles": (5, 5000, 1.0, 0, 0.0),
    "temperature": (4, 700, 2.0, 0, 0.0),
    "strided_teacher": (4, 700, 1.0, 129, 0.0),
    "masked_teacher": (4, 700, 1.0, 0, 0.3),
}


# rkl is +inf where the teacher masks an entry the student covers: its masked case is the
# infinity check of test_divergence_kernel_without_gradient_and_rkl_infinity.
KERNEL_CASES = [(name, case) for name in DIVERGENCES for case in CASES if (name, case) != ("rkl", "masked_teacher")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name,case", KERNEL_CASES, ids=[f"{n}-{c}" for n, c in KERNEL_CASES])
def test_divergence_kernel_against_float64_reference(name, case, dtype):
    rows, vocab, tau, extra, masked = CASES[case]
    g = torch.Generator().manual_seed(1)
    student = (torch.randn(rows, vocab, generator=g) * 3).to(dtype)
    wide = (torch.randn(rows, vocab + extra, generator=g) * 3)
    if masked:
        wide[torch.rand(rows, vocab + extra, generator=g) < masked] = -math.inf
    wide = wide.to(dtype)
    teacher = wide[:, :vocab]  # a strided view when extra > 0
    start = torch.randn(rows, vocab, generator=g) * 1e-3  # an fp32 buffer: the kernel adds into it
    grad = start.clone().to(DEVICE)
    scale = 0.75
    loss = divergence_kernel().loss_and_grad(name, student.to(DEVICE), wide.to(DEVICE)[:, :vocab], tau, grad,
                                             scale, WEIGHT.get(name, 0.0))
    s64 = student.detach().double().requires_grad_(True)
    expected = reference_rows(name, s64, teacher.double(), tau)
    (d_s,) = torch.autograd.grad(expected.sum() * scale, s64)
    torch.testing.assert_close(loss.cpu().double(), expected.detach(), rtol=1e-5, atol=2e-6)
    # bf16 inputs are exact in fp32, so both dtypes meet the fp32 bound.
    tol = 1e-3 if name in ("jsd", "srkl", "tvd") else 1e-4  # gradients that cancel terms of size q
    assert rel_err(grad.cpu().double() - start.double(), d_s) < tol
    if dtype == torch.bfloat16:  # a buffer in the logits' dtype: one rounding at the store (8 bits)
        low = torch.zeros(rows, vocab, dtype=dtype, device=DEVICE)
        divergence_kernel().loss_and_grad(name, student.to(DEVICE), teacher.to(DEVICE), tau, low, scale,
                                          WEIGHT.get(name, 0.0))
        assert rel_err(low.cpu(), d_s) < 1e-2


def test_divergence_kernel_without_gradient_and_rkl_infinity():
    student, teacher = torch.randn(3, 300), torch.randn(3, 300)
    teacher[0, 7] = -math.inf
    for name in DIVERGENCES:
        loss = divergence_kernel().loss_and_grad(name, student.to(DEVICE), teacher.to(DEVICE), 1.0, None, 1.0,
                                                 WEIGHT.get(name, 0.0)).cpu()
        expected = reference_rows(name, student.double(), teacher.double())
        if name == "rkl":
            assert math.isinf(loss[0]) and loss[0] > 0
            torch.testing.assert_close(loss[1:].double(), expected[1:], rtol=1e-5, atol=1e-6)
        else:
            torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


def test_zero_rows_launch_nothing():
    empty = torch.zeros(0, 50, device=DEVICE)
    assert divergence_kernel().loss_and_grad("fkl", empty, empty, 1.0, empty.clone()).shape == (0,)
    ce = kernel_backend.kernel_module("cross_entropy")
    assert ce.loss_and_grad(empty, torch.zeros(0, dtype=torch.long, device=DEVICE), 1.0).shape == (0,)


@pytest.mark.parametrize("vocab", [5000, QWEN_VOCAB], ids=["tiles", "qwen-vocab"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_written_gradient_equals_one_added_into_zeros(vocab, dtype):
    """accumulate=False writes every entry of a buffer holding anything (NaN here), never reading it: the
    same bits as adding into zeros, for every divergence kind and cross-entropy."""
    g = torch.Generator().manual_seed(11)
    rows = 3 if vocab == QWEN_VOCAB else 5
    student = (torch.randn(rows, vocab, generator=g) * 3).to(dtype).to(DEVICE)
    teacher = (torch.randn(rows, vocab, generator=g) * 3).to(dtype).to(DEVICE)
    labels = torch.randint(0, vocab, (rows,), generator=g).to(DEVICE)
    kinds = DIVERGENCES if vocab != QWEN_VOCAB else ["fkl", "jsd"]
    ce = kernel_backend.kernel_module("cross_entropy")
    for name in kinds + ["ce"]:
        added = torch.zeros(rows, vocab, dtype=dtype, device=DEVICE)
        written = torch.full((rows, vocab), float("nan"), dtype=dtype, device=DEVICE)
        if name == "ce":
            loss_a = ce.loss_and_grad(student, labels, 1.5, 0.1, added, 0.7)
            loss_w = ce.loss_and_grad(student, labels, 1.5, 0.1, written, 0.7, accumulate=False)
        else:
            args = (name, student, teacher, 1.5)
            loss_a = divergence_kernel().loss_and_grad(*args, added, 0.7, WEIGHT.get(name, 0.0))
            loss_w = divergence_kernel().loss_and_grad(*args, written, 0.7, WEIGHT.get(name, 0.0), accumulate=False)
        assert torch.equal(loss_a, loss_w), name
        assert torch.equal(added, written), name
        assert bool(added.abs().sum() > 0), name


# ---------------------------------------------------------------- split rows, autotuned tiles
SPLIT_CASES = [(name, 3) for name in DIVERGENCES] + [("fkl", 2), ("fkl", 7), ("jsd", 7)]


@pytest.mark.parametrize("name,splits", SPLIT_CASES, ids=[f"{n}-{k}" for n, k in SPLIT_CASES])
def test_split_rows_give_what_one_program_per_row_gives(name, splits):
    """Several programs per row (vocab segments, statistics combined across them): the row kernel's loss and
    gradient, added or written, with a strided teacher, temperature, and a teacher segment without mass."""
    rows, vocab = 3, 5000
    g = torch.Generator().manual_seed(12)
    student = (torch.randn(rows, vocab, generator=g) * 3).to(DEVICE)
    wide = (torch.randn(rows, vocab + 40, generator=g) * 3)
    if name != "rkl":  # rkl is +inf there (checked on the row kernel)
        wide[1, 100:2500] = -math.inf  # whole segments of row 1 carry no teacher mass
    teacher = wide.to(DEVICE)[:, :vocab]
    kernel = divergence_kernel()
    start = torch.randn(rows, vocab, generator=g).to(DEVICE) * 1e-3
    results = {}
    for parts in (1, splits):
        added = start.clone()
        loss = kernel.loss_and_grad(name, student, teacher, 1.5, added, 0.7, WEIGHT.get(name, 0.0), splits=parts)
        written = torch.full_like(start, float("nan"))
        loss_w = kernel.loss_and_grad(name, student, teacher, 1.5, written, 0.7, WEIGHT.get(name, 0.0),
                                      accumulate=False, splits=parts)
        alone = kernel.loss_and_grad(name, student, teacher, 1.5, None, 1.0, WEIGHT.get(name, 0.0), splits=parts)
        results[parts] = (loss, added - start, written, alone, loss_w)
    one, split = results[1], results[splits]
    for got, want in zip(split, one):
        torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-7)
    s64 = student.cpu().double().requires_grad_(True)
    expected = reference_rows(name, s64, teacher.cpu().double(), 1.5)
    (d_s,) = torch.autograd.grad(expected.sum() * 0.7, s64)
    torch.testing.assert_close(split[0].cpu().double(), expected.detach(), rtol=1e-5, atol=2e-6)
    assert rel_err(split[1].cpu(), d_s) < (1e-3 if name in ("jsd", "srkl", "tvd") else 1e-4)


@pytest.mark.parametrize("name", ["fkl", "jsd"])
def test_split_rows_at_qwen_vocab(name):
    """151,936 entries in 5 segments (fkl: statistics then gradient; jsd: also the loss and sum G pass)."""
    g = torch.Generator().manual_seed(13)
    student, teacher = torch.randn(2, QWEN_VOCAB, generator=g) * 4, torch.randn(2, QWEN_VOCAB, generator=g) * 4
    grad = torch.zeros(2, QWEN_VOCAB, device=DEVICE)
    loss = divergence_kernel().loss_and_grad(name, student.to(DEVICE), teacher.to(DEVICE), 1.0, grad, 1.0,
                                             WEIGHT.get(name, 0.0), splits=5)
    s64 = student.double().requires_grad_(True)
    expected = reference_rows(name, s64, teacher.double())
    (d_s,) = torch.autograd.grad(expected.sum(), s64)
    torch.testing.assert_close(loss.cpu().double(), expected.detach(), rtol=2e-5, atol=1e-7)
    assert rel_err(grad.cpu(), d_s) < (1e-3 if name == "jsd" else 5e-5)


def test_split_count_fills_the_device_and_keeps_segments_wide():
    kernel = divergence_kernel()
    assert kernel.split_count(rows=8192, vocab=QWEN_VOCAB, programs=264) == 1  # rows fill an H100 already
    assert kernel.split_count(rows=16, vocab=QWEN_VOCAB, programs=264) == 17  # ceil(264 / 16)
    assert kernel.split_count(rows=1, vocab=QWEN_VOCAB, programs=264) == QWEN_VOCAB // kernel.MIN_SEGMENT
    assert kernel.split_count(rows=4, vocab=5000, programs=264) == 1  # no segment narrower than MIN_SEGMENT
    assert kernel.split_count(rows=4, vocab=QWEN_VOCAB, programs=0) == 1  # the interpreter: one program per row
    with pytest.raises(ValueError, match="splits must be >= 1"):
        kernel.loss_and_grad("fkl", torch.zeros(2, 50, device=DEVICE), torch.zeros(2, 50, device=DEVICE), 1.0,
                             splits=0)


def test_autotuned_tiles_fit_the_vocab_and_the_interpreter_takes_one(monkeypatch):
    kernel = divergence_kernel()
    configs = kernel._configs()
    [fixed] = kernel._prune(configs, {"V": QWEN_VOCAB})
    assert fixed.kwargs["BLOCK"] == 4096 and fixed.num_warps == 8  # the interpreter's one configuration
    monkeypatch.setattr(kernel, "interpreting", lambda: False)
    assert kernel._prune(configs, {"V": QWEN_VOCAB}) == configs
    narrow = kernel._prune(configs, {"V": 700})
    assert {c.kwargs["BLOCK"] for c in narrow} == {1024} and len(narrow) == 3
    assert [c.kwargs["BLOCK"] for c in kernel._prune(configs, {"V": 300})] == [512]
    assert {c.kwargs["BLOCK"] for c in kernel._prune(configs, {"V": QWEN_VOCAB}, SEG=3000)} == {1024, 2048, 4096}


def test_only_the_first_mixture_term_writes_and_plugins_keep_adding(triton_backend):
    g = torch.Generator().manual_seed(12)
    student, teacher = torch.randn(4, 700, generator=g).to(DEVICE), torch.randn(4, 700, generator=g).to(DEVICE)
    labels = torch.randint(0, 700, (4,), generator=g).to(DEVICE)
    mix = dz.Mixture([(0.3, dz.objective("ce")), (0.7, dz.objective("fkl")), (0.2, dz.objective("tvd"))])
    assert mix.overwrites_grad(student, teacher)
    added = torch.zeros(4, 700, device=DEVICE)
    written = torch.full((4, 700), float("nan"), device=DEVICE)
    mix.loss_and_grad(student, teacher, labels, added)
    mix.loss_and_grad(student, teacher, labels, written, overwrite=True)
    torch.testing.assert_close(written, added, rtol=0, atol=0)

    class OwnLoop(dz.objective("fkl").__class__):  # a plugin's own loss_and_grad, written to add
        name = "own_loop"

        def loss_and_grad(self, student_logits, teacher, labels, grad=None, grad_scale=1.0):
            return super().loss_and_grad(student_logits, teacher, labels, grad, grad_scale)

    assert not OwnLoop().overwrites_grad(student, teacher)
    assert not dz.Mixture([(1.0, OwnLoop()), (1.0, dz.objective("fkl"))]).overwrites_grad(student, teacher)


# ---------------------------------------------------------------- every objective through the API
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", OBJECTIVES)
def test_objectives_on_the_triton_backend(triton_backend, name, dtype):
    """Ignored rows, a wider teacher (vocab mismatch), temperature, mean and none reductions."""
    g = torch.Generator().manual_seed(2)
    n, vs, vt = 7, 600, 640
    student = (torch.randn(n, vs, generator=g) * 2).to(dtype)
    teacher = (torch.randn(n, vt, generator=g) * 2).to(dtype)
    labels = torch.randint(0, vs, (n,), generator=g)
    labels[[1, 4]] = -100
    params = PARAMS.get(name, {})
    tau = 1.0 if name == "dpkd_token" else 2.0
    s = leaf(student)
    loss = dz.objective(name, temperature=tau, **params)(s, teacher.to(DEVICE), labels.to(DEVICE))
    loss.backward()
    s64 = student.detach().double().requires_grad_(True)
    expected = reference_loss(name, s64, teacher.double(), labels, tau=tau, **params)
    expected.backward()
    tol = 1e-5 if dtype == torch.float32 else 1e-3  # bf16 inputs are exact in fp32; the loss is fp32 math
    assert loss.item() == pytest.approx(expected.item(), rel=tol, abs=1e-6)
    assert s.grad.dtype == dtype
    assert rel_err(s.grad.cpu(), s64.grad) < (1e-4 if dtype == torch.float32 else 3e-2)
    assert (s.grad.cpu()[labels == -100] == 0).all()

    per_token = dz.objective(name, temperature=tau, reduction="none", **params)(
        student.to(DEVICE), teacher.to(DEVICE), labels.to(DEVICE))
    expected_rows = reference_loss(name, student.double(), teacher.double(), labels, tau=tau, reduction="none",
                                   **params)
    torch.testing.assert_close(per_token.cpu().double(), expected_rows, rtol=tol, atol=1e-6)


@pytest.mark.parametrize("name", OBJECTIVES)
def test_all_ignored_gives_zero_loss_and_zero_gradients(triton_backend, name):
    s = torch.randn(4, 300, device=DEVICE, requires_grad=True)
    labels = torch.full((4,), -100, device=DEVICE)
    loss = dz.objective(name, **PARAMS.get(name, {}))(s, torch.randn(4, 300, device=DEVICE), labels)
    loss.backward()
    assert loss.item() == 0.0 and (s.grad == 0).all()


@pytest.mark.parametrize("name", ["fkl", "jsd", "ce"])
def test_from_hidden_on_the_triton_backend(triton_backend, name):
    g = torch.Generator().manual_seed(3)
    n, hs, ht, vs, vt = 19, 16, 24, 900, 960
    h, w = torch.randn(n, hs, generator=g), torch.randn(vs, hs, generator=g) / 3
    th, tw = torch.randn(n, ht, generator=g), torch.randn(vt, ht, generator=g) / 4
    labels = torch.randint(0, vs, (n,), generator=g)
    labels[:3] = -100
    params = PARAMS.get(name, {})
    hd, wd = leaf(h), leaf(w)
    loss = dz.objective(name, **params).from_hidden(hd, wd, th.to(DEVICE), tw.to(DEVICE), labels.to(DEVICE),
                                                    chunk_size=6)
    loss.backward()
    h64, w64 = h.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    expected = reference_loss(name, h64 @ w64.T, th.double() @ tw.double().T, labels, **params)
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert rel_err(hd.grad.cpu(), h64.grad) < 1e-4 and rel_err(wd.grad.cpu(), w64.grad) < 1e-4


def test_mixture_terms_add_into_one_fp32_buffer(triton_backend):
    g = torch.Generator().manual_seed(4)
    student, teacher = torch.randn(6, 500, generator=g).bfloat16(), torch.randn(6, 500, generator=g).bfloat16()
    labels = torch.randint(0, 500, (6,), generator=g)
    mix = dz.Mixture([(0.5, dz.objective("ce")), (0.5, dz.objective("fkl"))])
    s = leaf(student)
    mix(s, teacher.to(DEVICE), labels.to(DEVICE)).backward()
    s64 = student.detach().double().requires_grad_(True)
    (0.5 * reference_loss("ce", s64, teacher.double(), labels)
     + 0.5 * reference_loss("fkl", s64, teacher.double(), labels)).backward()
    assert rel_err(s.grad.cpu(), s64.grad) < 1e-2


def test_a_plugin_overriding_pointwise_takes_the_torch_path(triton_backend):
    class HalfFKL(dz.objective("fkl").__class__):
        name = "half_fkl"

        def pointwise(self, log_p, log_q):
            f, g = super().pointwise(log_p, log_q)
            return 0.5 * f, 0.5 * g

    student, teacher = torch.randn(3, 200, device=DEVICE), torch.randn(3, 200, device=DEVICE)
    assert HalfFKL()._backend(student, teacher) == "torch"
    assert dz.objective("fkl")._backend(student, teacher) == "triton"
    torch.testing.assert_close(HalfFKL()(student, teacher), 0.5 * dz.objective("fkl")(student, teacher))


# ---------------------------------------------------------------- Qwen's full vocab, one case per kernel
@pytest.mark.parametrize("name", OBJECTIVES)
def test_qwen_vocab_on_the_triton_backend(triton_backend, name):
    """151,936 student entries against a 152,064-entry teacher (Qwen2.5-0.5B vs 7B), one row ignored."""
    g = torch.Generator().manual_seed(5)
    n = 3
    student = torch.randn(n, QWEN_VOCAB, generator=g) * 4
    teacher = torch.randn(n, QWEN_TEACHER_VOCAB, generator=g) * 4
    teacher[:, QWEN_VOCAB:] += 8.0  # mass beyond the shared vocab, which must be excluded
    labels = torch.tensor([5, -100, QWEN_VOCAB - 1])
    params = PARAMS.get(name, {})
    s = leaf(student)
    loss = dz.objective(name, **params)(s, teacher.to(DEVICE), labels.to(DEVICE))
    loss.backward()
    s64 = student.detach().double().requires_grad_(True)
    if name in ("jsd", "skl", "srkl"):
        valid = labels != -100
        expected = log_space_reference(name, s64[valid], teacher.double()[valid, :QWEN_VOCAB],
                                       **({"beta": 0.3} if name == "jsd" else {"alpha": WEIGHT[name]})).mean()
    else:
        expected = reference_loss(name, s64, teacher.double(), labels, **params)
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=2e-5, abs=1e-7)
    tol = {"jsd": 1e-3, "srkl": 1e-3, "tvd": 5e-3}.get(name, 5e-5)
    assert rel_err(s.grad.cpu(), s64.grad) < tol


def test_qwen_vocab_token_logprobs_triton(triton_backend):
    g = torch.Generator().manual_seed(6)
    n, hidden = 4, 32
    h, w = torch.randn(n, hidden, generator=g), torch.randn(QWEN_VOCAB, hidden, generator=g) / 2
    labels = torch.tensor([0, 151_643, -100, QWEN_VOCAB - 1])
    hd, wd = leaf(h), leaf(w)
    lp, ent = token_logprobs(hd, wd, labels.to(DEVICE), with_entropy=True, chunk_size=2)
    g_lp, g_ent = torch.randn(n, generator=g), torch.randn(n, generator=g)
    (lp * g_lp.to(DEVICE) + ent * g_ent.to(DEVICE)).sum().backward()
    h64, w64 = h.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    ref_lp, ref_ent = token_logprob_reference(h64, w64, labels)
    (ref_lp * g_lp.double() + ref_ent * g_ent.double()).sum().backward()
    torch.testing.assert_close(lp.cpu().double(), ref_lp.detach(), rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(ent.cpu().double(), ref_ent.detach(), rtol=1e-5, atol=2e-5)
    assert rel_err(hd.grad.cpu(), h64.grad) < 1e-4 and rel_err(wd.grad.cpu(), w64.grad) < 1e-4


# ---------------------------------------------------------------- token log-probs, every backend
def token_logprob_reference(h, w, labels, ignore_index=-100):
    log_q = torch.log_softmax(h @ w.T, dim=-1)
    valid = labels != ignore_index
    picked = log_q.gather(1, labels.clamp(min=0)[:, None]).squeeze(1)
    entropy = -(log_q.exp() * log_q).sum(-1)
    return torch.where(valid, picked, 0.0), torch.where(valid, entropy, 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
def test_token_logprobs_against_float64_reference(monkeypatch, backend, dtype):
    monkeypatch.setenv("DISTILLZOO_BACKEND", backend)
    monkeypatch.setenv("DISTILLZOO_VOCAB_CHUNK", "256")  # several vocab chunks on the torch path
    g = torch.Generator().manual_seed(7)
    n, hidden, vocab = 21, 24, 1000
    h = (torch.randn(2, n, hidden, generator=g) * 2).to(dtype)
    w = (torch.randn(vocab, hidden, generator=g) / 2).to(dtype)
    labels = torch.randint(0, vocab, (2, n), generator=g)
    labels[0, :4] = -100
    hd, wd = leaf(h), leaf(w)
    lp, ent = token_logprobs(hd, wd, labels.to(DEVICE), with_entropy=True, chunk_size=8)
    assert lp.shape == (2, n) and lp.dtype == torch.float32
    g_lp, g_ent = torch.randn(2, n, generator=g), torch.randn(2, n, generator=g)
    (lp * g_lp.to(DEVICE) + ent * g_ent.to(DEVICE)).sum().backward()
    h64, w64 = h.detach().double().reshape(-1, hidden).requires_grad_(True), w.detach().double().requires_grad_(True)
    ref_lp, ref_ent = token_logprob_reference(h64, w64, labels.reshape(-1))
    (ref_lp * g_lp.reshape(-1).double() + ref_ent * g_ent.reshape(-1).double()).sum().backward()
    # bf16: the lm_head matmul rounds the logits to 8 bits (|logit| ~ 10 -> 0.03), as in the model.
    atol = 3e-5 if dtype == torch.float32 else 6e-2
    torch.testing.assert_close(lp.cpu().double().reshape(-1), ref_lp.detach(), rtol=1e-5, atol=atol)
    torch.testing.assert_close(ent.cpu().double().reshape(-1), ref_ent.detach(), rtol=1e-5, atol=atol)
    assert (lp.cpu()[0, :4] == 0).all() and (ent.cpu()[0, :4] == 0).all()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert rel_err(hd.grad.cpu().reshape(-1, hidden), h64.grad) < tol
    assert rel_err(wd.grad.cpu(), w64.grad) < tol
    assert (hd.grad.cpu()[0, :4] == 0).all()


def test_token_logprobs_is_minus_cross_entropy_and_all_ignored_is_zero(triton_backend):
    g = torch.Generator().manual_seed(8)
    h, w = torch.randn(9, 8, generator=g, device="cpu"), torch.randn(300, 8, generator=g)
    labels = torch.randint(0, 300, (9,), generator=g)
    lp = token_logprobs(h.to(DEVICE), w.to(DEVICE), labels.to(DEVICE))
    expected = -torch.nn.functional.cross_entropy(h.double() @ w.double().T, labels, reduction="none")
    torch.testing.assert_close(lp.cpu().double(), expected, rtol=1e-5, atol=1e-5)
    hd = leaf(h)
    out = token_logprobs(hd, w.to(DEVICE), torch.full((9,), -100, device=DEVICE))
    out.sum().backward()
    assert (out == 0).all() and (hd.grad == 0).all()


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_token_logprobs_row_path_keeps_its_last_chunk_and_a_second_backward_recomputes(monkeypatch, backend):
    """The row path's logits GEMMs, counted at the dispatcher: 4 chunks forward, 3 recomputed in the first backward
    (the last chunk's logits kept from the forward pass), 4 in a retain_graph second backward; same gradients."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountLogits(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten.mm.default and out.shape[-1] == vocab:
                CountLogits.calls += 1
            return out

    monkeypatch.setenv("DISTILLZOO_BACKEND", backend)
    g = torch.Generator().manual_seed(9)
    n, hidden, vocab = 30, 8, 300
    h, w = torch.randn(n, hidden, generator=g), torch.randn(vocab, hidden, generator=g)
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[:3] = -100
    hd, wd = leaf(h), leaf(w)
    weights = torch.randn(n, generator=g).to(DEVICE)
    counts = []
    with CountLogits():
        lp = token_logprobs(hd, wd, labels.to(DEVICE), chunk_size=8)  # 27 valid: chunks of 8, 8, 8, 3
        counts.append(CountLogits.calls)
        first = torch.autograd.grad((lp * weights).sum(), (hd, wd), retain_graph=True)
        counts.append(CountLogits.calls - counts[0])
        second = torch.autograd.grad((lp * weights).sum(), (hd, wd))
        counts.append(CountLogits.calls - counts[0] - counts[1])
    assert counts == [4, 3, 4]
    h64, w64 = h.double().requires_grad_(True), w.double().requires_grad_(True)
    ref, _ = token_logprob_reference(h64, w64, labels)
    expected = torch.autograd.grad((ref * weights.cpu().double()).sum(), (h64, w64))
    for a, b, want in zip(first, second, expected):
        assert torch.equal(a, b) and rel_err(a.cpu(), want) < 1e-5


def test_token_logprobs_errors_name_the_input():
    h, w = torch.randn(4, 8), torch.randn(50, 8)
    with pytest.raises(dz.ParameterError, match=r"label 50 is outside the vocab \[0, 50\)"):
        token_logprobs(h, w, torch.tensor([1, 2, 50, -100]))
    with pytest.raises(dz.ParameterError, match=r"expected weight \[vocab, 8\]"):
        token_logprobs(h, torch.randn(50, 7), torch.zeros(4, dtype=torch.long))
    with pytest.raises(dz.ParameterError, match=r"labels has shape \(3,\)"):
        token_logprobs(h, w, torch.zeros(3, dtype=torch.long))


# ---------------------------------------------------------------- dpkd_token's argmax kernel
def test_argmax_pair_breaks_ties_at_the_lowest_index_across_tiles():
    kernel = kernel_backend.kernel_module("dpkd_token")
    vocab = 9000  # three 4096-wide tiles
    student = torch.randn(4, vocab)
    teacher = torch.randn(4, vocab)
    student[0, [100, 5000]] = 50.0  # tie across tiles
    student[1, [4097, 4098]] = 50.0  # tie inside a tile
    teacher[2, [8999, 3]] = 50.0
    teacher[3] = -math.inf
    teacher[3, 6000] = 1.0
    s_best, s_index, t_best, t_index = kernel.argmax_pair(student.to(DEVICE), teacher.to(DEVICE))
    assert s_index.cpu().tolist() == student.argmax(-1).tolist()
    assert s_index[0] == 100 and s_index[1] == 4097
    assert t_index.cpu().tolist() == teacher.argmax(-1).tolist() and t_index[2] == 3 and t_index[3] == 6000
    torch.testing.assert_close(s_best.cpu(), student.max(-1).values)
    torch.testing.assert_close(t_best.cpu(), teacher.max(-1).values)


# ---------------------------------------------------------------- dispatch
def test_backend_selection(monkeypatch):
    cpu = torch.zeros(2)
    monkeypatch.delenv("DISTILLZOO_BACKEND", raising=False)
    assert kernel_backend.backend_for(cpu) == "torch"
    if torch.cuda.is_available():
        assert kernel_backend.backend_for(cpu.cuda()) == "triton"
        assert kernel_backend.backend_for(cpu.cuda().double()) == "torch"  # Triton computes in fp32
    monkeypatch.setenv("DISTILLZOO_BACKEND", "Reference")
    assert kernel_backend.backend_for(cpu) == "reference"
    monkeypatch.setenv("DISTILLZOO_BACKEND", "cuda")
    with pytest.raises(dz.ParameterError, match=r"DISTILLZOO_BACKEND='cuda' is not one of \['triton', 'torch', 'reference'\]"):
        kernel_backend.backend_for(cpu)
    monkeypatch.setenv("DISTILLZOO_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(dz.ParameterError, match="set TRITON_INTERPRET=1"):
        kernel_backend.backend_for(cpu)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_every_backend_gives_the_same_objective_values(monkeypatch, backend):
    g = torch.Generator().manual_seed(9)
    student, teacher = torch.randn(5, 400, generator=g), torch.randn(5, 400, generator=g)
    labels = torch.randint(0, 400, (5,), generator=g)
    results = {}
    for which in ("triton", backend):
        monkeypatch.setenv("DISTILLZOO_BACKEND", which)
        for name in OBJECTIVES:
            s = leaf(student)
            loss = dz.objective(name, **PARAMS.get(name, {}))(s, teacher.to(DEVICE), labels.to(DEVICE))
            loss.backward()
            results[which, name] = (loss.detach().cpu(), s.grad.cpu())
    for name in OBJECTIVES:
        (la, ga), (lb, gb) = results["triton", name], results[backend, name]
        torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-6)
        assert rel_err(ga, gb) < 1e-4
