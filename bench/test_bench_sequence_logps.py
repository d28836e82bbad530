"""Preference-step sequence log-probs of a Qwen2-architecture policy at vocab 151,936: fused against naive.

One DPO step (reference log-probs precomputed, as from a cache): the policy
scores B chosen and B rejected responses in one [2B, T] forward pass, then
backward. Providers: ``naive-torch`` (the model's logits, fp32 log_softmax, gather:
``sequence_logps(fused=False)``, which holds [2B, T, V]) and ``distillzoo-fused``
(decoder hidden states + ``token_logprobs``, whose extra memory is O(chunk x V)).
Both include the same decoder, so the difference is the vocab-scale head. Peak
memory is measured above the model and batch.
"""

import pytest
import torch

import distillzoo as dz
from common import CUDA, DEVICE, DTYPE, PeakMemory, device_name, sync
from distillzoo.models.causal_lm import tiny_qwen2
from distillzoo.data.records import IGNORE_INDEX
from distillzoo.data.pairs import PreferenceBatch

# (pairs, tokens per row, hidden, layers): CUDA at Qwen2.5-0.5B's width; CPU small enough for 2 cores.
SHAPES = [(8, 1024, 896, 2)] if CUDA else [(2, 256, 64, 2)]
# distillzoo-fused sizes its token chunks from the 1 GiB default budget; -chunk128 fixes 128 tokens per chunk.
PROVIDERS = ("naive-torch", "distillzoo-fused", "distillzoo-fused-chunk128")


def make_batch(pairs, width, vocab, seed=0):
    """Prompts of a quarter of the row, responses filling the rest (rejected ones a little shorter)."""
    g = torch.Generator().manual_seed(seed)
    rows = 2 * pairs
    input_ids = torch.randint(0, vocab, (rows, width), generator=g)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    mask = torch.ones_like(input_ids)
    prompt = width // 4
    for i in range(rows):
        end = width if i < pairs else width - width // 8
        labels[i, prompt:end] = input_ids[i, prompt:end]
        mask[i, end:] = 0
    ref = torch.full((pairs,), -float(width), dtype=torch.float32)
    return PreferenceBatch(input_ids, mask, labels, [str(i) for i in range(pairs)], ref, ref - 1.0).to(DEVICE)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}-T{s[1]}-H{s[2]}-L{s[3]}-V151936")
@pytest.mark.parametrize("provider", PROVIDERS)
def test_dpo_step_sequence_logps(benchmark, provider, shape):
    pairs, width, hidden, layers = shape
    model = tiny_qwen2(hidden_size=hidden, num_layers=layers, num_heads=max(hidden // 64, 4), num_kv_heads=2,
                       dtype=DTYPE).to(DEVICE)
    batch = make_batch(pairs, width, model.config.vocab_size)
    dpo = dz.objective("dpo", beta=0.1)
    fused = provider.startswith("distillzoo")
    chunk = 128 if provider.endswith("chunk128") else None

    def step():
        model.zero_grad(set_to_none=True)
        dz.preference_step(dpo, model, batch, fused=fused, chunk_size=chunk).loss.backward()
        sync()

    step()
    model.zero_grad(set_to_none=True)
    memory = PeakMemory()
    memory.start()
    step()
    peak = memory.peak_mib()
    benchmark.pedantic(step, rounds=5 if CUDA else 3, iterations=1)
    scored = int((batch.labels != IGNORE_INDEX).sum())
    benchmark.extra_info.update({
        "device": device_name(),
        "dtype": str(DTYPE),
        "torch": torch.__version__,
        "scored_tokens": scored,
        "logits_mib_fp32": round(2 * pairs * width * model.config.vocab_size * 4 / 2**20, 1),
        "peak_extra_mib": round(peak, 1),
    })
