"""The vocab-chunked torch path: its temporaries are O(rows x chunk), and chunking changes no result."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import distillzoo as dz
from distillzoo.kernels import vocab_chunked


class LargestAllocation(TorchDispatchMode):
    """Records the bytes of every new storage an op creates (views of existing storage excluded)."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = {t.untyped_storage().data_ptr() for t in _tensors((args, kwargs))}
        for t in _tensors(out):
            if t.untyped_storage().data_ptr() not in seen:
                self.sizes.append((t.untyped_storage().nbytes(), func.__name__, tuple(t.shape)))
        return out


def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, (list, tuple)):
        for item in tree:
            yield from _tensors(item)
    elif isinstance(tree, dict):
        for item in tree.values():
            yield from _tensors(item)


@pytest.mark.parametrize("name", ["fkl", "jsd", "tvd", "ce", "dpkd_token", "sparse_fkl"])
def test_every_temporary_is_rows_times_chunk_except_the_gradient(name, monkeypatch):
    """Forward + backward on [N, V] logits: no tensor but the one [N, V] gradient holds more than N x chunk."""
    n, vocab, chunk = 64, 4096, 256
    monkeypatch.setenv("DISTILLZOO_VOCAB_CHUNK", str(chunk))
    g = torch.Generator().manual_seed(0)
    student = torch.randn(n, vocab, generator=g).requires_grad_(True)
    teacher = torch.randn(n, vocab, generator=g)
    if name == "sparse_fkl":
        log_p, ids = torch.log_softmax(teacher, -1).topk(32, dim=-1)
        teacher, name = dz.SparseTeacher(ids, log_p), "fkl"
    labels = torch.randint(0, vocab, (n,), generator=g)
    loss_fn = dz.objective(name)
    with LargestAllocation() as seen:
        loss_fn(student, teacher, labels).backward()
    full = n * vocab * 4
    big = [entry for entry in seen.sizes if entry[0] > 2 * n * (chunk + 1) * 4]
    # The gradient buffer is the only [N, V] allocation; nothing else is bigger than 2 x [N, chunk + 1].
    assert [entry[0] for entry in big] == [full], big


@pytest.mark.parametrize("name", ["fkl", "rkl", "jsd", "skl", "srkl", "tvd", "ce", "dpkd_token"])
def test_chunk_size_does_not_change_the_result(name, monkeypatch):
    g = torch.Generator().manual_seed(1)
    student = torch.randn(10, 1000, generator=g, dtype=torch.float64) * 3
    teacher = torch.randn(10, 1000, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, 1000, (10,), generator=g)
    results = []
    for chunk in ("7", "128", "1000", "4096"):
        monkeypatch.setenv("DISTILLZOO_VOCAB_CHUNK", chunk)
        s = student.clone().requires_grad_(True)
        loss = dz.objective(name)(s, teacher, labels)
        loss.backward()
        results.append((loss, s.grad))
    for loss, grad in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(grad, results[0][1], rtol=1e-12, atol=1e-15)


def test_softmax_stats_keep_the_log_probs_exact_at_large_logits():
    """log q = (x - max) - log d: at |x| ~ 1e4 a fused logsumexp would lose 1e-3 per entry."""
    x = (torch.rand(3, 5000, generator=torch.Generator().manual_seed(2)) * 2 - 1) * 1e4
    m, log_d = vocab_chunked.softmax_stats(x, chunk=333)
    log_q = (x - m[:, None]) - log_d[:, None]
    expected = torch.log_softmax(x.double(), -1)
    assert (log_q.double() - expected).abs().max() < 2e-3  # fp32 rounding of x - max itself
    assert (log_q.exp().sum(-1).double() - 1).abs().max() < 1e-5
    torch.testing.assert_close(vocab_chunked.logsumexp(x, chunk=333).double(), torch.logsumexp(x.double(), -1))


def test_argmax_takes_the_first_of_ties_across_chunks():
    x = torch.zeros(2, 100)
    x[0, [40, 90]] = 5.0
    x[1, [3, 4]] = 1.0
    value, index = vocab_chunked.argmax(x, chunk=16)
    assert index.tolist() == [40, 3] and value.tolist() == [5.0, 1.0]
