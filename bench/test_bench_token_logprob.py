"""Per-token log-probs from hidden states (forward + backward): the building block of ce, dpo, simpo, dpkd.

Providers: ``naive-torch`` (materialised logits, log_softmax, gather);
``distillzoo-torch`` / ``distillzoo-triton`` (``distillzoo.kernels.token_logprobs``
with the backend forced); ``distillzoo-ce-sum``, the ce objective's
``from_hidden`` (a scalar loss, the operation ``F.linear_cross_entropy`` performs,
so its gradients are computed in the forward pass: three GEMMs where a per-token
output needs four, the logits being recomputed once its gradient is known); torch's
own ``F.linear_cross_entropy`` (sum, negated) where this torch has it; Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss``
(mean only) where installed. Fraction of the limit: the three lm_head matmuls
(logits, dX, dW) at full size, measured in the same run, over the provider's time.
"""

import importlib.util

import pytest
import torch
import torch.nn.functional as F

import distillzoo as dz
from common import CUDA, DEVICE, DTYPE, PeakMemory, device_name, forced_backend, sync, timed
from distillzoo.kernels.token_logprob import token_logprobs

SHAPES = [(8192, 896, 151_936)] if CUDA else [(512, 256, 151_936)]
LIGER = importlib.util.find_spec("liger_kernel") is not None


def naive(h, w, labels):
    return torch.log_softmax((h @ w.T).float(), -1).gather(1, labels[:, None]).squeeze(1).sum()


def distillzoo(backend):
    ctx = forced_backend(backend)

    def run(h, w, labels):
        with ctx():
            return token_logprobs(h, w, labels).sum()

    return run


def distillzoo_ce(h, w, labels):
    return -dz.objective("ce", reduction="sum").from_hidden(h, w, labels=labels)


def torch_linear_ce(h, w, labels):
    return -F.linear_cross_entropy(h, w, labels, reduction="sum")


def liger_flce():
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss(reduction="sum")
    return lambda h, w, labels: -loss(w, h, labels)


def matmul_bound(h, w):
    """Seconds for logits = h W^T, dX = dZ W and dW = dZ^T h at full size (cuBLAS / MKL alone)."""
    z = h @ w.T
    reps = 5 if CUDA else 1
    return timed(lambda: h @ w.T, reps) + timed(lambda: z @ w, reps) + timed(lambda: z.T @ h, reps)


PROVIDERS = {"naive-torch": lambda: naive, "distillzoo-torch": lambda: distillzoo("torch"),
             "distillzoo-ce-sum": lambda: distillzoo_ce}
if CUDA:
    PROVIDERS["distillzoo-triton"] = lambda: distillzoo("triton")
if hasattr(F, "linear_cross_entropy"):
    PROVIDERS["torch-linear-cross-entropy"] = lambda: torch_linear_ce
if LIGER and CUDA:
    PROVIDERS["liger-fused-linear-ce"] = liger_flce


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[0]}-H{s[1]}-V{s[2]}")
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_token_logprobs_fwd_bwd(benchmark, provider, shape):
    n, hidden, v = shape
    g = torch.Generator(device=DEVICE).manual_seed(0)
    h = torch.randn(n, hidden, device=DEVICE, generator=g).to(DTYPE).requires_grad_(True)
    w = (torch.randn(v, hidden, device=DEVICE, generator=g) / hidden**0.5).to(DTYPE).requires_grad_(True)
    labels = torch.randint(0, v, (n,), device=DEVICE, generator=g)
    fn = PROVIDERS[provider]()

    def step():
        h.grad = w.grad = None
        fn(h, w, labels).backward()
        sync()

    step()
    h.grad = w.grad = None
    memory = PeakMemory()
    memory.start()
    step()
    peak = memory.peak_mib()
    benchmark.pedantic(step, rounds=5 if CUDA else 3, iterations=1)
    bound = matmul_bound(h.detach(), w.detach())
    mean = benchmark.stats.stats.mean
    benchmark.extra_info.update({
        "device": device_name(),
        "dtype": str(DTYPE),
        "torch": torch.__version__,
        "matmul_bound_ms": round(bound * 1e3, 3),
        "fraction_of_limit": round(bound / mean, 3),
        "peak_extra_mib": round(peak, 1),
    })
