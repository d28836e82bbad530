"""One dpo training step as ``distillzoo train`` runs it, against a hand-written loop over materialised logits.

A step: the policy and a frozen reference (a copy of the starting policy, TRL's
default) score B chosen and B rejected responses of a ``[2B, T]`` batch, the sigmoid
dpo loss, backward, gradient clipping and a fused AdamW update, on a
Qwen2-architecture policy with the real vocab (151,936).

* ``naive-torch``: the model's logits ``[2B, T, V]``, fp32 ``log_softmax``, gather,
  dpo written out; the way a hand-written loop does it.
* ``distillzoo-train-step``: the ``preference`` algorithm's micro-batches and loss
  inside :class:`distillzoo.training.algorithm.Models`, as the loop calls them (decoder hidden
  states + the fused token log-prob op; no ``[2B, T, V]`` tensor), then the loop's
  normalisation, clipping and optimiser step.

Both use the same decoder, optimiser and data, so the difference is the vocab-scale
head. Peak memory is measured above the models, optimiser state and batch, over one
step after a warm-up step (so Adam's moments already exist).
"""

import copy

import pytest
import torch

import distillzoo as dz
from common import CUDA, DEVICE, PeakMemory, device_name, sync
from distillzoo.training.algorithm import Models, Run
from distillzoo.models.causal_lm import tiny_qwen2
from distillzoo.data.records import IGNORE_INDEX
from distillzoo.data.pairs import PreferenceExample, collate_preference
from distillzoo.training.spec import build_algorithm

# (pairs, tokens per row, hidden, layers): CUDA at Qwen2.5-0.5B's width; CPU small enough for 2 cores.
SHAPES = [(8, 1024, 896, 4)] if CUDA else [(2, 256, 64, 2)]
PROVIDERS = ("naive-torch", "distillzoo-train-step")
BETA = 0.1


def examples(pairs, width, vocab, seed=0):
    """Prompts of a quarter of the row; chosen fills the rest, rejected an eighth less."""
    g = torch.Generator().manual_seed(seed)
    prompt = width // 4

    def ids(n):
        return torch.randint(0, vocab, (n,), generator=g, dtype=torch.int32)

    return [PreferenceExample(f"p{i}", ids(prompt), ids(width - prompt), ids(width - prompt - width // 8))
            for i in range(pairs)]


def naive_logps(model, batch):
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    targets = batch.labels[:, 1:]
    mask = targets != IGNORE_INDEX
    picked = torch.log_softmax(logits.float(), -1).gather(-1, torch.where(mask, targets, 0)[..., None]).squeeze(-1)
    return torch.where(mask, picked, 0.0).sum(-1)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}-T{s[1]}-H{s[2]}-L{s[3]}-V151936")
@pytest.mark.parametrize("provider", PROVIDERS)
def test_dpo_train_step(benchmark, provider, shape):
    pairs, width, hidden, layers = shape
    student = tiny_qwen2(hidden_size=hidden, num_layers=layers, num_heads=max(hidden // 64, 4), num_kv_heads=2,
                         tie_word_embeddings=True).to(DEVICE).train()
    reference = copy.deepcopy(student).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5, fused=True)
    data = examples(pairs, width, student.config.vocab_size)
    tok = dz.load_tokenizer()
    # bf16 on CUDA is the trainer's default (train.precision: auto); the naive loop runs under the same autocast
    bf16 = CUDA

    if provider == "naive-torch":
        def loss_of():
            batch = collate_preference(data, tok.pad_id).to(DEVICE)
            with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=bf16):
                policy = naive_logps(student, batch)
                with torch.no_grad():
                    ref = naive_logps(reference, batch)
            delta = (policy[:pairs] - ref[:pairs]) - (policy[pairs:] - ref[pairs:])
            return -torch.nn.functional.logsigmoid(BETA * delta).mean()
    else:
        cfg = dz.load_config({"objective": {"name": "dpo", "beta": BETA}, "student": {"tiny": {}},
                              "data": {"streams": []}})
        algorithm, _ = build_algorithm(cfg)
        algorithm.check(cfg, "bench")
        run = Run(cfg, "bench", tok, torch.device(DEVICE), 0, 1, [], student, reference=reference)
        models = Models(student, None, reference, algorithm, bf16)

        def loss_of():
            [batch] = algorithm.micro_batches(run, data, 0, pairs)
            return models(batch).value / batch.count

    def step():
        loss_of().backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()

    step()  # warm-up: Adam's moments exist from here on
    memory = PeakMemory()
    memory.start()
    step()
    peak = memory.peak_mib()
    benchmark.pedantic(step, rounds=5 if CUDA else 3, iterations=1)
    with torch.no_grad():  # both providers compute the same loss on the same weights
        check = float(loss_of())
    scored = sum(len(ex.chosen) + len(ex.rejected) for ex in data)
    benchmark.extra_info.update({
        "device": device_name(),
        "dtype": "bf16 autocast" if bf16 else "fp32",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "scored_tokens": scored,
        "logits_mib_fp32": round(2 * pairs * width * student.config.vocab_size * 4 / 2**20, 1),
        "peak_extra_mib": round(peak, 1),
        "loss_after": round(check, 6),
    })
