"""The CPU fused path (logits as [V, c] columns, transformed in place): the same numbers as the reference
backend, for every objective kind, and no temporary larger than its chunk."""

import pytest
import torch

import distillzoo as dz
from distillzoo.kernels import columns
from test_divergences import rel_err


class Cosine(dz.LogitObjective):
    """A third-party objective with only token_loss: the columns path falls back to loss_and_grad on rows."""

    name = "cosine_probe"

    def token_loss(self, student_logprobs, teacher_logprobs, labels):
        return 1 - torch.nn.functional.cosine_similarity(student_logprobs.exp(), teacher_logprobs.exp(), dim=-1)


OBJECTIVES = {
    "fkl": lambda **k: dz.objective("fkl", **k), "rkl": lambda **k: dz.objective("rkl", **k),
    "jsd": lambda **k: dz.objective("jsd", beta=0.3, **k), "skl": lambda **k: dz.objective("skl", **k),
    "srkl": lambda **k: dz.objective("srkl", **k), "tvd": lambda **k: dz.objective("tvd", **k),
    "ce": lambda **k: dz.objective("ce", label_smoothing=0.1, **k),
    "dpkd_token": lambda **k: dz.objective("dpkd_token", **k),
    "ce+fkl": lambda **k: dz.Mixture([(0.5, dz.objective("ce", **k)), (0.5, dz.objective("fkl", **k))]),
    "third-party": lambda **k: Cosine(**k),
}


def inputs(n=13, hs=12, ht=20, vs=700, vt=760, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hs, generator=g, dtype=torch.float64)
    w = torch.randn(vs, hs, generator=g, dtype=torch.float64) / 2
    h_t = torch.randn(n, ht, generator=g, dtype=torch.float64)
    w_t = torch.randn(vt, ht, generator=g, dtype=torch.float64) / 2
    labels = torch.randint(0, vs, (n,), generator=g)
    labels[[1, 6]] = -100
    return h, w, h_t, w_t, labels


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_the_column_path_equals_the_reference_backend(name, reduction, monkeypatch):
    """float64, temperature 2, a teacher with a wider vocab, ignored rows, several chunks and vocab blocks."""
    h, w, h_t, w_t, labels = inputs()
    results = {}
    for backend in ("torch", "reference"):
        monkeypatch.setenv("DISTILLZOO_BACKEND", backend)
        monkeypatch.setenv("DISTILLZOO_VOCAB_CHUNK", "96")  # 8 vocab blocks per chunk on the column path
        hs, ws = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        loss = OBJECTIVES[name](temperature=2.0, reduction=reduction).from_hidden(hs, ws, h_t, w_t, labels,
                                                                                  chunk_size=4)
        weights = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
        (loss * weights).sum().backward()
        results[backend] = (loss.detach(), hs.grad, ws.grad)
    got, want = results["torch"], results["reference"]
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-12)
    assert rel_err(got[1], want[1]) < 1e-9 and rel_err(got[2], want[2]) < 1e-9
    if reduction == "none":
        assert (got[0][[1, 6]] == 0).all()


def test_mixture_term_losses_are_recorded_on_the_column_path():
    h, w, h_t, w_t, labels = inputs()
    mix = dz.Mixture([(0.25, dz.objective("ce")), (0.75, dz.objective("rkl"))])
    total = mix.from_hidden(h, w, h_t, w_t, labels, chunk_size=5)
    alone = [dz.objective(n).from_hidden(h, w, h_t, w_t, labels) for n in ("ce", "rkl")]
    torch.testing.assert_close(mix.term_losses["ce"], alone[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(mix.term_losses["rkl"], alone[1], rtol=1e-12, atol=0)
    torch.testing.assert_close(total, 0.25 * alone[0] + 0.75 * alone[1], rtol=1e-12, atol=0)


def test_column_statistics_at_large_logits_and_a_column_of_minus_inf():
    """log q = (x - max) - log d per column, as log_softmax takes it; a column of -inf gives no NaN."""
    g = torch.Generator().manual_seed(2)
    x = ((torch.rand(5000, 4, generator=g) * 2 - 1) * 1e4).double()
    x[:, 3] = -torch.inf
    top = columns.log_softmax_(y := x.clone())
    assert torch.isneginf(top[3]) and not y[:, :3].isnan().any()
    torch.testing.assert_close(y[:, :3], torch.log_softmax(x[:, :3], 0), rtol=0, atol=1e-9)
    for vocab in (64, 4096, 4099, 5000):  # the wide view, with and without a tail of rows
        z = torch.randn(vocab, 7, generator=g)
        torch.testing.assert_close(columns.column_max(z), z.amax(0), rtol=0, atol=0)


def test_a_chunk_holds_no_temporary_wider_than_its_columns(monkeypatch):
    """fkl.from_hidden, forward and backward: beside the weight gradient ([V, H]) and the columns of one chunk,
    nothing as large as [N, V] is allocated."""
    from test_vocab_chunked import LargestAllocation

    n, hidden, vocab, chunk = 64, 16, 4096, 8
    g = torch.Generator().manual_seed(4)
    h = torch.randn(n, hidden, generator=g).requires_grad_(True)
    w = torch.randn(vocab, hidden, generator=g).requires_grad_(True)
    h_t, w_t = torch.randn(n, hidden, generator=g), torch.randn(vocab, hidden, generator=g)
    labels = torch.randint(0, vocab, (n,), generator=g)
    with LargestAllocation() as seen:
        dz.objective("fkl").from_hidden(h, w, h_t, w_t, labels, chunk_size=chunk).backward()
    columns_bytes = vocab * chunk * 4
    big = sorted({size for size, *_ in seen.sizes if size > columns_bytes})
    assert big == [vocab * hidden * 4]  # the weight gradient alone


def test_the_student_weight_gradient_reaches_autograd_without_a_slice_or_copy():
    """With the whole student vocab compared, the weight enters the fused op as it is: no SliceBackward (which
    would allocate and zero-fill a second [V, H] gradient), and the .grad autograd stores is the buffer the op
    wrote. A student with the larger vocab is still cut to the teacher's, its extra rows getting no gradient."""
    h, w, h_t, w_t, labels = inputs(vs=760, vt=760)
    ws = w.clone().requires_grad_(True)
    loss = dz.objective("fkl").from_hidden(h, ws, h_t, w_t, labels, chunk_size=4)
    kinds = {type(f).__name__ for f, _ in loss.grad_fn.next_functions if f is not None}
    assert "SliceBackward0" not in kinds and "AccumulateGrad" in kinds

    h, w, h_t, w_t, labels = inputs(vs=760, vt=700)
    labels[labels >= 700] = 3
    results = {}
    for backend in ("torch", "reference"):
        ws = w.clone().requires_grad_(True)
        with pytest.MonkeyPatch.context() as m:
            m.setenv("DISTILLZOO_BACKEND", backend)
            dz.objective("rkl").from_hidden(h, ws, h_t, w_t, labels, chunk_size=4).backward()
        results[backend] = ws.grad
    assert results["torch"].shape == (760, 12) and bool((results["torch"][700:] == 0).all())
    assert rel_err(results["torch"], results["reference"]) < 1e-9


def test_a_workspace_reuses_its_buffer_for_every_chunk_and_frees_it_on_release():
    g = torch.Generator().manual_seed(1)
    w, h = torch.randn(50, 6, generator=g), torch.randn(9, 6, generator=g)
    space = columns.Workspace()
    first = space.logits(0, w, h[:5])
    pointer = first.data_ptr()
    torch.testing.assert_close(first, w @ h[:5].T)
    last = space.logits(0, w, h[5:])  # a narrower last chunk: a view of the same buffer
    assert last.data_ptr() == pointer and last.shape == (50, 4) and last.is_contiguous()
    torch.testing.assert_close(last, w @ h[5:].T)
    mixed = space.logits(1, w.bfloat16(), h[:2].bfloat16())  # another dtype: computed, then converted to fp32
    assert mixed.dtype == torch.float32 and 1 not in space.buffers
    space.release()
    assert space.buffers == {}


def _token_logprob_reference(h, w, labels):
    log_q = torch.log_softmax(h @ w.T, dim=-1)
    return torch.where(labels >= 0, log_q.gather(1, labels.clamp(min=0)[:, None]).squeeze(1), 0.0)


def test_token_logprobs_keeps_its_last_chunk_for_the_backward_pass_and_a_second_backward_recomputes(monkeypatch):
    monkeypatch.setenv("DISTILLZOO_BACKEND", "torch")
    h, w, _, _, labels = inputs(n=29)
    calls = []
    original = columns.Workspace.logits

    def counted(self, slot, weight, hidden):
        calls.append(hidden.shape[0])
        return original(self, slot, weight, hidden)

    monkeypatch.setattr(columns.Workspace, "logits", counted)
    hd, wd = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    lp = dz.kernels.token_logprobs(hd, wd, labels, chunk_size=8)  # 27 valid tokens: chunks of 8, 8, 8, 3
    forward_calls, calls[:] = list(calls), []
    g_lp = torch.randn(29, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    grads = torch.autograd.grad((lp * g_lp).sum(), (hd, wd), retain_graph=True)
    backward_calls, calls[:] = list(calls), []
    again = torch.autograd.grad((lp * g_lp).sum(), (hd, wd))
    assert sum(forward_calls) == 27 and len(forward_calls) == 4
    assert backward_calls == forward_calls[:-1][::-1]  # the last chunk's logits were kept, not recomputed
    assert calls == forward_calls[::-1]  # the kept buffer was overwritten: the second pass recomputes all
    h64, w64 = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    ref = _token_logprob_reference(h64, w64, labels)
    torch.testing.assert_close(lp, ref, rtol=1e-12, atol=1e-12)
    expected = torch.autograd.grad((ref * g_lp).sum(), (h64, w64))
    for got, twice, want in zip(grads, again, expected):
        assert rel_err(got, want) < 1e-10 and torch.equal(got, twice)
    assert bool((grads[0][[1, 6]] == 0).all())


def test_token_logprobs_gradients_when_only_one_input_needs_them_or_every_label_is_ignored(monkeypatch):
    monkeypatch.setenv("DISTILLZOO_BACKEND", "torch")
    h, w, _, _, labels = inputs()
    wd = w.clone().requires_grad_(True)
    dz.kernels.token_logprobs(h, wd, labels, chunk_size=8).sum().backward()
    w64 = w.clone().requires_grad_(True)
    _token_logprob_reference(h, w64, labels).sum().backward()
    assert rel_err(wd.grad, w64.grad) < 1e-10
    hd, wd = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    out = dz.kernels.token_logprobs(hd, wd, torch.full_like(labels, -100))
    out.sum().backward()
    assert bool((out == 0).all()) and bool((hd.grad == 0).all()) and bool((wd.grad == 0).all())
    assert wd.grad.shape == w.shape


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_forward_kl_columns_equal_autograd_with_a_teacher_that_gives_some_entries_no_mass(tau, monkeypatch):
    """fkl's own column form (fewer passes than the generic pointwise one): loss and d/d(student logits) as torch's
    autograd gives them, 0 (not NaN) for entries where p = 0, +inf where the student gives no mass where p > 0."""
    monkeypatch.setenv("DISTILLZOO_VOCAB_CHUNK", "64")  # several row blocks
    g = torch.Generator().manual_seed(5)
    student = (torch.randn(300, 6, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    teacher = torch.randn(300, 6, generator=g, dtype=torch.float64) * 3
    teacher[::7, 2] = -torch.inf  # masked vocab entries: zero teacher mass
    teacher[:150, 4] = -torch.inf
    log_p, log_q = torch.log_softmax(teacher / tau, 0), torch.log_softmax(student / tau, 0)
    want = torch.where(log_p.exp() > 0, log_p.exp() * (log_p - log_q), 0.0).sum(0)
    (want_grad,) = torch.autograd.grad(want.sum(), student)
    loss, grad = columns.forward_kl(student.detach().clone(), teacher.clone(), tau, want_grad=True)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-14)
    generic, generic_grad = columns.pointwise(dz.objective("fkl").pointwise, student.detach().clone(),
                                              teacher.clone(), tau, want_grad=True)
    torch.testing.assert_close(loss, generic, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, generic_grad, rtol=1e-12, atol=1e-14)
    hole = student.detach().clone()
    hole[3, 1] = -torch.inf  # the teacher has mass there
    loss, _ = columns.forward_kl(hole, teacher.clone(), tau, want_grad=False)
    assert torch.isposinf(loss[1]) and torch.isfinite(loss[[0, 2, 3, 4, 5]]).all()


def test_forward_kl_columns_give_nan_for_a_student_column_with_nan_or_inf_or_no_mass():
    g = torch.Generator().manual_seed(6)
    student, teacher = torch.randn(200, 4, generator=g), torch.randn(200, 4, generator=g)
    student[17, 0], student[3, 1], student[:, 2] = torch.nan, torch.inf, -torch.inf
    loss, grad = columns.forward_kl(student.clone(), teacher.clone(), 1.0, want_grad=True)
    generic, _ = columns.pointwise(dz.objective("fkl").pointwise, student.clone(), teacher.clone(), 1.0, True)
    assert loss[:3].isnan().all() and generic[:3].isnan().all()
    torch.testing.assert_close(loss[3], generic[3])
