"""Fused-linear distillation (fkl, forward + backward) against the naive path and the peers.

    pytest bench/test_bench_fused_linear.py --benchmark-only --benchmark-json bench/results/<machine>-<what>.json

Providers: ``naive-torch`` materialises both models' [N, V] logits;
``distillzoo-torch`` and ``distillzoo-triton`` are ``from_hidden`` with
``DISTILLZOO_BACKEND`` forced (Triton on CUDA only); ``liger-chunked-jsd`` is
Liger-Kernel's ``LigerFusedLinearJSDLoss`` with beta = 0 (forward KL) and no hard
loss, and ``liger-fused-linear-jsd`` its ``LigerFusedLinearJSD`` (jsd_beta = 0),
where liger-kernel is installed.

extra_info per case: peak extra memory (CUDA max_memory_allocated, CPU peak RSS,
above the inputs), and the fraction of the limit of SPEC section 4: the time of
the four lm_head matmuls at full size (cuBLAS/MKL alone, measured in the same
run) over the provider's time.
"""

import importlib.util

import pytest
import torch

import distillzoo as dz
from common import CUDA, DEVICE, DTYPE, PeakMemory, device_name, forced_backend, matmul_bound, sync

# (tokens, student hidden, teacher hidden, vocab): Qwen2.5-0.5B student; 1.5B / 7B teachers.
SHAPES = ([(1024, 896, 1536, 151_936), (4096, 896, 1536, 151_936), (8192, 896, 3584, 151_936),
           (16384, 896, 3584, 152_064)] if CUDA else [(512, 256, 512, 151_936)])
LIGER = importlib.util.find_spec("liger_kernel") is not None


def make_inputs(n, hs, ht, v):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    h_s = torch.randn(n, hs, device=DEVICE, generator=g).to(DTYPE).requires_grad_(True)
    w_s = (torch.randn(v, hs, device=DEVICE, generator=g) / hs**0.5).to(DTYPE).requires_grad_(True)
    h_t = torch.randn(n, ht, device=DEVICE, generator=g).to(DTYPE)
    w_t = (torch.randn(v, ht, device=DEVICE, generator=g) / ht**0.5).to(DTYPE)
    labels = torch.randint(0, v, (n,), device=DEVICE, generator=g)
    return h_s, w_s, h_t, w_t, labels


def naive(h_s, w_s, h_t, w_t, labels):
    student = (h_s @ w_s.T).float()
    teacher = (h_t @ w_t.T).float()
    log_q, log_p = torch.log_softmax(student, -1), torch.log_softmax(teacher, -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def distillzoo(backend):
    ctx = forced_backend(backend)

    def run(h_s, w_s, h_t, w_t, labels):
        with ctx():
            return dz.objective("fkl").from_hidden(h_s, w_s, h_t, w_t, labels)

    return run


def liger_chunked():
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    loss = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0, compiled=CUDA)
    return lambda h_s, w_s, h_t, w_t, labels: loss(h_s, w_s, h_t, w_t, labels)


def liger_fused():
    from liger_kernel.transformers import LigerFusedLinearJSD

    loss = LigerFusedLinearJSD(jsd_beta=0.0)
    return lambda h_s, w_s, h_t, w_t, labels: loss(h_s, w_s, h_t, w_t, labels)


PROVIDERS = {"naive-torch": lambda: naive, "distillzoo-torch": lambda: distillzoo("torch")}
if CUDA:
    PROVIDERS["distillzoo-triton"] = lambda: distillzoo("triton")
if LIGER:
    PROVIDERS["liger-chunked-jsd"] = liger_chunked
    if CUDA:
        PROVIDERS["liger-fused-linear-jsd"] = liger_fused


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[0]}-Hs{s[1]}-Ht{s[2]}-V{s[3]}")
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_fkl_from_hidden_fwd_bwd(benchmark, provider, shape):
    n, hs, ht, v = shape
    if provider == "naive-torch" and CUDA and n > 8192:
        pytest.skip("the naive path's [N, V] fp32 temporaries exceed the GPU at this N")
    inputs = make_inputs(n, hs, ht, v)
    fn = PROVIDERS[provider]()

    def step():
        inputs[0].grad = inputs[1].grad = None
        fn(*inputs).backward()
        sync()

    step()  # warm-up (compilation, allocator caching) outside the measurement
    inputs[0].grad = inputs[1].grad = None
    memory = PeakMemory()
    memory.start()
    step()
    peak = memory.peak_mib()
    benchmark.pedantic(step, rounds=5 if CUDA else 3, iterations=1)
    bound = matmul_bound(n, hs, ht, v)
    mean = benchmark.stats.stats.mean
    benchmark.extra_info.update({
        "device": device_name(),
        "dtype": str(DTYPE),
        "torch": torch.__version__,
        "tflops": round(2 * n * v * (3 * hs + ht) / mean / 1e12, 3),
        "matmul_bound_ms": round(bound * 1e3, 3),
        "fraction_of_limit": round(bound / mean, 3),
        "peak_extra_mib": round(peak, 1),
    })
