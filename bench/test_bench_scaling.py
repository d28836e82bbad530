"""How the fused fkl head's cost grows: tokens N, vocab size, teacher hidden size (forward + backward).

    pytest bench/test_bench_scaling.py --benchmark-only --benchmark-json bench/results/<machine>-scaling.json

Each case runs ``distillzoo-torch`` (or ``distillzoo-triton`` on CUDA) and the naive
path (both models' ``[N, V]`` logits materialised) side by side, as
:mod:`test_bench_fused_linear` measures them. The cases vary one dimension from the
benchmark's base shape at a time:

* N: 128 to 2,048 on CPU (1k to 16k on CUDA): time should grow linearly, and the
  fused path's peak memory stay flat (its chunks are a fixed size; only dW, ``[V, Hs]``,
  and the ``[N, H]`` inputs' gradients are held);
* vocab: 151,936 (Qwen2.5 0.5B-3B), 152,064 (7B-72B), 248,320 (a larger vocab);
* teacher hidden: 256 to 2,048 (CPU), the teacher's GEMM being the largest one.

extra_info: peak extra memory (as in :mod:`test_bench_fused_linear`), time per token.
"""

import pytest
import torch

from common import CUDA, PeakMemory, device_name, sync
from test_bench_fused_linear import distillzoo, make_inputs, naive

if CUDA:
    BASE = (4096, 896, 1536, 151_936)
    N_SWEEP, H_SWEEP = (1024, 2048, 4096, 8192, 16384), (896, 1536, 3584, 8192)
else:
    BASE = (512, 256, 512, 151_936)
    N_SWEEP, H_SWEEP = (128, 256, 512, 1024, 2048), (256, 512, 1024, 2048)
V_SWEEP = (151_936, 152_064, 248_320)

CASES = ([("tokens", (n, *BASE[1:])) for n in N_SWEEP]
         + [("vocab", (*BASE[:3], v)) for v in V_SWEEP if v != BASE[3]]
         + [("teacher_hidden", (BASE[0], BASE[1], h, BASE[3])) for h in H_SWEEP if h != BASE[2]])
FUSED = "distillzoo-triton" if CUDA else "distillzoo-torch"


# provider innermost: each case's two providers run one after the other, so their ratio is side by side
@pytest.mark.parametrize("provider", [FUSED, "naive-torch"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-N{c[1][0]}-Hs{c[1][1]}-Ht{c[1][2]}-V{c[1][3]}")
def test_fkl_scaling(benchmark, provider, case):
    dimension, (n, hs, ht, v) = case
    if provider == "naive-torch" and CUDA and n > 8192:
        pytest.skip("the naive path's [N, V] fp32 temporaries exceed the GPU at this N")
    inputs = make_inputs(n, hs, ht, v)
    fn = naive if provider == "naive-torch" else distillzoo(FUSED.split("-")[1])

    def step():
        inputs[0].grad = inputs[1].grad = None
        fn(*inputs).backward()
        sync()

    step()
    inputs[0].grad = inputs[1].grad = None
    memory = PeakMemory()
    memory.start()
    step()
    peak = memory.peak_mib()
    benchmark.pedantic(step, rounds=3 if CUDA else 2, iterations=1)
    mean = benchmark.stats.stats.mean
    benchmark.extra_info.update({
        "device": device_name(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "dimension": dimension,
        "shape": [n, hs, ht, v],
        "us_per_token": round(mean / n * 1e6, 1),
        "peak_extra_mib": round(peak, 1),
        "dw_mib": round(v * hs * 4 / 2**20, 1),
    })
