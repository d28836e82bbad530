"""Logit-level objectives (forward + backward from [N, V] logits) against the naive path and the peers.

Providers: ``naive-torch`` (log_softmax of both, the formula, autograd);
``distillzoo-torch`` / ``distillzoo-triton`` (the objective with DISTILLZOO_BACKEND
forced; Triton on CUDA only); Liger-Kernel's ``LigerKLDIVLoss`` (fkl, after
log_softmax of both, which its API takes) and ``LigerJSD`` (jsd), where installed.

The limit of SPEC section 4 for a logit-level kernel is memory traffic: read z_s
and z_t once, write dz_s once. extra_info records those minimal bytes over the
time, as a fraction of the device's copy bandwidth measured in the same run.
"""

import importlib.util

import pytest
import torch

import distillzoo as dz
from common import CUDA, DEVICE, DTYPE, PeakMemory, copy_bandwidth, device_name, forced_backend, sync

SHAPES = [(4096, 151_936), (8192, 151_936)] if CUDA else [(256, 151_936)]
OBJECTIVES = ["fkl", "rkl", "jsd", "tvd", "ce", "dpkd_token"]
LIGER = importlib.util.find_spec("liger_kernel") is not None


def naive(name):
    def run(student, teacher, labels):
        if name == "ce":
            return torch.nn.functional.cross_entropy(student.float(), labels)
        log_q, log_p = torch.log_softmax(student.float(), -1), torch.log_softmax(teacher.float(), -1)
        if name == "fkl":
            return (log_p.exp() * (log_p - log_q)).sum(-1).mean()
        if name == "rkl":
            return (log_q.exp() * (log_q - log_p)).sum(-1).mean()
        if name == "tvd":
            return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1).mean()
        if name == "jsd":
            log_m = torch.logaddexp(log_p, log_q) - torch.log(torch.tensor(2.0, device=log_p.device))
            kl = lambda a, b: (a.exp() * (a - b)).sum(-1)  # noqa: E731
            return (0.5 * kl(log_p, log_m) + 0.5 * kl(log_q, log_m)).mean()
        rows = torch.arange(student.shape[0], device=student.device)
        chosen, rejected = log_p.argmax(-1), log_q.detach().argmax(-1)
        h = (log_q[rows, chosen] - log_q[rows, rejected]) - (log_p[rows, chosen] - log_p[rows, rejected])
        return -torch.nn.functional.logsigmoid(0.1 * h).mean()

    return run


def distillzoo(name, backend):
    ctx = forced_backend(backend)
    loss_fn = dz.objective(name)

    def run(student, teacher, labels):
        with ctx():
            return loss_fn(student, teacher, labels)

    return run


def liger(name):
    if name == "fkl":
        from liger_kernel.transformers import LigerKLDIVLoss

        loss = LigerKLDIVLoss(reduction="batchmean", log_target=True)
        return lambda s, t, labels: loss(torch.log_softmax(s, -1), torch.log_softmax(t, -1))
    from liger_kernel.transformers import LigerJSD

    loss = LigerJSD(beta=0.5)
    return lambda s, t, labels: loss(torch.log_softmax(s, -1), torch.log_softmax(t, -1))


CASES = []
for name in OBJECTIVES:
    CASES += [(name, "naive-torch"), (name, "distillzoo-torch")]
    if CUDA:
        CASES.append((name, "distillzoo-triton"))
    if LIGER and CUDA and name in ("fkl", "jsd"):
        CASES.append((name, "liger"))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[0]}-V{s[1]}")
@pytest.mark.parametrize("name,provider", CASES, ids=[f"{n}-{p}" for n, p in CASES])
def test_logit_objective_fwd_bwd(benchmark, name, provider, shape):
    n, v = shape
    g = torch.Generator(device=DEVICE).manual_seed(0)
    student = (torch.randn(n, v, device=DEVICE, generator=g) * 2).to(DTYPE).requires_grad_(True)
    teacher = (torch.randn(n, v, device=DEVICE, generator=g) * 2).to(DTYPE)
    labels = torch.randint(0, v, (n,), device=DEVICE, generator=g)
    if provider == "naive-torch":
        fn = naive(name)
    elif provider == "liger":
        fn = liger(name)
    else:
        fn = distillzoo(name, provider.split("-")[1])

    def step():
        student.grad = None
        fn(student, teacher, labels).backward()
        sync()

    step()
    student.grad = None
    memory = PeakMemory()
    memory.start()
    step()
    peak = memory.peak_mib()
    benchmark.pedantic(step, rounds=5 if CUDA else 3, iterations=1)
    mean = benchmark.stats.stats.mean
    reads = 1 if name == "ce" else 2  # ce reads only the student logits
    minimal_bytes = (reads + 1) * n * v * student.element_size()
    achieved = minimal_bytes / mean
    benchmark.extra_info.update({
        "device": device_name(),
        "dtype": str(DTYPE),
        "torch": torch.__version__,
        "minimal_gb": round(minimal_bytes / 1e9, 3),
        "achieved_gbps": round(achieved / 1e9, 1),
        "copy_gbps": round(copy_bandwidth() / 1e9, 1),
        "fraction_of_limit": round(achieved / copy_bandwidth(), 3),
        "peak_extra_mib": round(peak, 1),
    })
