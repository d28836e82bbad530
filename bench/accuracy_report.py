"""Print the fp32 accuracy of every objective at Qwen's vocab against float64 references.

    python bench/accuracy_report.py

Dense: worst loss and gradient relative error over the cases of
tests/test_divergences.py (CASES). Sparse: k = 32 against the float64 bucket
reference of tests/test_sparse_teacher.py. From hidden: the fused ``from_hidden`` path
and ``token_logprobs`` in fp32 (on CPU the column path of kernels/columns.py) against
the same computation in float64 by the reference backend, at V = 151,936. The tests
assert bounds on these; this prints the measured values.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("DISTILLZOO_PLUGINS", "")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import torch  # noqa: E402
from helpers import reference_loss  # noqa: E402
from test_divergences import CASES, OBJECTIVES, PARAMS, qwen_case, rel_err  # noqa: E402
from test_sparse_teacher import SPARSE, bucket_reference, top_k  # noqa: E402

import distillzoo as dz  # noqa: E402


def dense():
    print("| objective | worst loss rel. error | worst gradient rel. L2 error |\n|---|---|---|")
    for name in OBJECTIVES:
        worst_loss = worst_grad = 0.0
        for case, (n, ignored, tau, _, _) in CASES.items():
            if len(ignored) == n:
                continue
            student, teacher, labels = qwen_case(case)
            params = PARAMS.get(name, {})
            s = student.clone().requires_grad_(True)
            loss = dz.objective(name, temperature=tau, **params)(s, teacher, labels)
            loss.backward()
            s64 = student.double().requires_grad_(True)
            expected = reference_loss(name, s64, teacher.double(), labels, tau=tau, **params)
            expected.backward()
            worst_loss = max(worst_loss, abs(loss.item() / expected.item() - 1))
            worst_grad = max(worst_grad, rel_err(s.grad, s64.grad))
        print(f"| {name} | {worst_loss:.1e} | {worst_grad:.1e} |")


def sparse(k=32, vocab=151_936):
    print(f"\n| sparse objective (k={k}) | loss rel. error | gradient rel. L2 error |\n|---|---|---|")
    g = torch.Generator().manual_seed(4)
    student, teacher = torch.randn(6, vocab, generator=g) * 4, torch.randn(6, vocab, generator=g) * 4
    labels = torch.randint(0, vocab, (6,), generator=g)
    labels[2] = -100
    valid = labels != -100
    ids, log_p = top_k(teacher, k)
    for name in SPARSE:
        params = PARAMS.get(name, {})
        s = student.clone().requires_grad_(True)
        loss = dz.objective(name, **params)(s, dz.SparseTeacher(ids, log_p), labels)
        loss.backward()
        s64 = student.double().requires_grad_(True)
        expected = bucket_reference(name, s64[valid], teacher.double()[valid], labels[valid], ids[valid], **params).mean()
        expected.backward()
        print(f"| {name} | {abs(loss.item() / expected.item() - 1):.1e} | {rel_err(s.grad, s64.grad):.1e} |")


def from_hidden(n=64, hs=64, ht=96, vocab=151_936):
    """fp32 fused head (the device's backend: on CPU the column path) against float64 by the reference backend."""
    from common import forced_backend  # bench/common.py: the script's own directory is on sys.path
    from distillzoo.kernels.token_logprob import token_logprobs

    print(f"\n| from_hidden (N={n}, V={vocab}) | loss rel. error | dX rel. L2 error | dW rel. L2 error |\n|---|---|---|---|")
    g = torch.Generator().manual_seed(5)
    h, w = torch.randn(n, hs, generator=g), torch.randn(vocab, hs, generator=g) / hs**0.5 * 3
    h_t, w_t = torch.randn(n, ht, generator=g), torch.randn(vocab, ht, generator=g) / ht**0.5 * 3
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[::7] = -100

    def run(name, dtype, backend):
        with forced_backend(backend)():
            hh, ww = h.to(dtype).detach().requires_grad_(True), w.to(dtype).detach().requires_grad_(True)
            if name == "token_logprobs":
                loss = token_logprobs(hh, ww, labels).sum()
            else:
                loss = dz.objective(name, **PARAMS.get(name, {})).from_hidden(hh, ww, h_t.to(dtype), w_t.to(dtype),
                                                                              labels)
            loss.backward()
            return loss.item(), hh.grad, ww.grad

    from distillzoo.kernels.backend import backend_for

    for name in ["fkl", "rkl", "jsd", "tvd", "ce", "token_logprobs"]:
        loss, dx, dw = run(name, torch.float32, backend_for(h))
        loss64, dx64, dw64 = run(name, torch.float64, "reference")
        print(f"| {name} | {abs(loss / loss64 - 1):.1e} | {rel_err(dx, dx64):.1e} | {rel_err(dw, dw64):.1e} |")


if __name__ == "__main__":
    dense()
    sparse()
    from_hidden()
