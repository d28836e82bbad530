"""Fused-linear distillation (fkl, forward + backward) against the naive materialised-logits path.

    pytest bench/ --benchmark-only --benchmark-json bench/results/<machine>.json

extra_info per case: peak extra memory (CUDA: max_memory_allocated above the
inputs), achieved matmul TFLOP/s and its fraction of this machine's own bf16/fp32
matmul throughput measured in the same run (the limit of SPEC section 4: the four
lm_head matmuls, 2*N*V*(3*Hs + Ht) flops).
"""

import time

import pytest
import torch

import distillzoo as dz

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
# (tokens, student hidden, teacher hidden, vocab): Qwen2.5-0.5B student; 1.5B / 7B teachers.
SHAPES = [(4096, 896, 1536, 151_936), (8192, 896, 3584, 152_064)] if CUDA else [(512, 256, 512, 151_936)]


def sync():
    if CUDA:
        torch.cuda.synchronize()


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


def fused(h_s, w_s, h_t, w_t, labels):
    return dz.objective("fkl").from_hidden(h_s, w_s, h_t, w_t, labels)


PROVIDERS = {"naive-torch": naive, "distillzoo-torch": fused}
_matmul_tflops = {}


def matmul_throughput(n, hs, v):
    """This machine's TFLOP/s for the student lm_head matmul shape, measured now."""
    key = (n, hs, v)
    if key not in _matmul_tflops:
        a = torch.randn(n, hs, device=DEVICE, dtype=DTYPE)
        b = torch.randn(v, hs, device=DEVICE, dtype=DTYPE)
        for _ in range(2):
            a @ b.T
        sync()
        reps = 10 if CUDA else 2
        start = time.perf_counter()
        for _ in range(reps):
            a @ b.T
        sync()
        _matmul_tflops[key] = 2 * n * hs * v * reps / (time.perf_counter() - start) / 1e12
    return _matmul_tflops[key]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[0]}-Hs{s[1]}-Ht{s[2]}-V{s[3]}")
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_fkl_from_hidden_fwd_bwd(benchmark, provider, shape):
    n, hs, ht, v = shape
    inputs = make_inputs(n, hs, ht, v)
    fn = PROVIDERS[provider]

    def step():
        inputs[0].grad = inputs[1].grad = None
        fn(*inputs).backward()
        sync()

    step()  # warm-up (and allocator caching) outside the measurement
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    benchmark.pedantic(step, rounds=5 if CUDA else 3, iterations=1)
    flops = 2 * n * v * (3 * hs + ht)
    achieved = flops / benchmark.stats.stats.mean / 1e12
    limit = matmul_throughput(n, hs, v)
    benchmark.extra_info.update({
        "device": torch.cuda.get_device_name() if CUDA else "cpu",
        "dtype": str(DTYPE),
        "tflops": round(achieved, 3),
        "matmul_limit_tflops": round(limit, 3),
        "fraction_of_limit": round(achieved / limit, 3),
        "peak_extra_mib": round((torch.cuda.max_memory_allocated() - base) / 2**20, 1) if CUDA else None,
    })
